"""Proposer and backoff unit tests (no model)."""

from __future__ import annotations

from sampling.params import SamplingParams
from speculator.backoff import KController
from speculator.ngram import NgramProposer
from speculator.proposer import DraftRequest


def req(tokens: list[int], k: int, seq_id: int = 0) -> DraftRequest:
    return DraftRequest(seq_id, tokens, k, SamplingParams())


def test_ngram_copies_what_followed_the_latest_match():
    p = NgramProposer(1, 3)
    toks = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    # suffix [1,2,3] occurred at 0..2 (then 4,5,9) and 6..8 (then 7,8): the latest wins
    assert p.propose([req(toks, 3)])[0].tokens == [7, 8, 1]


def test_ngram_prefers_longest_match_and_handles_no_match_and_k0():
    p = NgramProposer(1, 3)
    toks = [5, 6, 1, 9, 9, 2, 6, 1]
    assert p.propose([req(toks, 2)])[0].tokens == [9, 9]  # [6, 1] matched, not just [1]
    assert p.propose([req([1, 2, 3], 4, seq_id=1)])[0].tokens == []
    assert p.propose([req(toks, 0, seq_id=2)])[0].tokens == []


def test_ngram_index_is_incremental_across_calls():
    p = NgramProposer(1, 2)
    toks = [1, 2, 3]
    assert p.propose([req(toks, 2)])[0].tokens == []
    toks += [1, 2]
    assert p.propose([req(toks, 2)])[0].tokens == [3, 1]
    toks += [3, 4, 1, 2]
    assert p.propose([req(toks, 2)])[0].tokens == [3, 4]
    p.release(0)
    assert 0 not in p._indexes


def test_backoff_grows_shrinks_pauses_and_recovers():
    c = KController(k_max=4, patience=2, cooldown=3)
    assert c.next_k() == 4
    c.update(4, 4)
    assert c.next_k() == 4
    c.update(4, 1)
    assert c.next_k() == 2
    c.update(2, 0)
    assert c.next_k() == 1
    c.update(1, 0)  # second miss in a row: pause
    assert [c.next_k() for _ in range(3)] == [0, 0, 0]
    assert c.next_k() == 1  # probing again
    c.update(1, 1)
    assert c.next_k() == 2
    c.update(0, 0)  # nothing drafted: no evidence, no change
    assert c.next_k() == 2
