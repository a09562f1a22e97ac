"""Suffix decoding proposer: the tries against brute-force counting over the raw token lists, the global trie
bounded by its budget under eviction, and greedy output through the engine equal to plain greedy."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sampling.params import SamplingParams
from speculator.proposer import DraftRequest
from speculator.suffix import SuffixProposer, SuffixTrie
from tests.conftest import humaneval_prompts

GREEDY = SamplingParams(max_tokens=1)
texts = st.lists(st.integers(0, 3), min_size=1, max_size=60)


def occurrences(text: list[int], s: list[int]) -> list[int]:
    return [j for j in range(len(text) - len(s) + 1) if text[j : j + len(s)] == s]


def continuations(text: list[int], s: list[int]) -> dict[int, int]:
    """How often each token follows an occurrence of s in text."""
    out: dict[int, int] = {}
    for j in occurrences(text, s):
        if j + len(s) < len(text):
            out[text[j + len(s)]] = out.get(text[j + len(s)], 0) + 1
    return out


def longest_match(text: list[int], depth: int) -> int:
    """Brute force: the longest suffix (shorter than depth) of text that occurs earlier followed by a token."""
    for p in range(min(depth - 1, len(text) - 1), 0, -1):
        if continuations(text, text[len(text) - p :]):
            return p
    return 0


def best_path(text: list[int], p: int, budget: int, min_prob: float) -> tuple[list[int], float]:
    """Brute force of path mode: the most frequent continuation (ties: the one seen first) while the product of
    continuation frequencies stays >= min_prob."""
    ctx, out, prob, score = text[len(text) - p :], [], 1.0, 0.0
    while len(out) < budget:
        cont = continuations(text, ctx)
        if not cont:
            break
        first = {x: min(occurrences(text, [*ctx, x])) for x in cont}
        x = min(cont, key=lambda t: (-cont[t], first[t]))
        prob *= cont[x] / sum(cont.values())
        if prob < min_prob:
            break
        out.append(x)
        score += prob
        ctx = [*ctx, x]
    return out, score


def dump(trie: SuffixTrie) -> dict[tuple[int, ...], tuple[int, int]]:
    """Every node of the trie: path -> (count, total)."""
    out, stack = {}, [((), trie.root)]
    while stack:
        path, node = stack.pop()
        for t, child in (trie.kids[node] or {}).items():
            out[(*path, t)] = (trie.count[child], trie.total[child])
            stack.append(((*path, t), child))
    return out


def build(texts: list[list[int]], depth: int) -> SuffixTrie:
    trie = SuffixTrie(depth)
    for text in texts:
        active = trie.start()
        for t in text:
            active = trie.append(active, t)
    return trie


@settings(max_examples=150, deadline=None)
@given(text=texts, depth=st.integers(2, 8))
def test_trie_counts_every_substring_up_to_depth(text, depth):
    nodes = dump(build([text], depth))
    expected = {}
    for j in range(len(text)):
        for n in range(1, min(depth, len(text) - j) + 1):
            s = tuple(text[j : j + n])
            if s not in expected:
                expected[s] = (len(occurrences(text, list(s))), sum(continuations(text, list(s)).values()))
    assert {s: c for s, c in nodes.items()} == {s: (c, t if len(s) < depth else 0) for s, (c, t) in expected.items()}


@settings(max_examples=150, deadline=None)
@given(text=texts, depth=st.integers(2, 8), k=st.integers(1, 8), min_prob=st.sampled_from([0.0, 0.1, 0.4]))
def test_local_proposal_is_the_longest_match_continued(text, depth, k, min_prob):
    proposer = SuffixProposer(max_depth=depth, min_token_prob=min_prob, global_budget=0)
    draft = proposer.propose([DraftRequest(0, text, k, GREEDY)])[0].tokens
    p = longest_match(text, depth)
    assert build([text], depth).find(text)[0] == p
    expected: list[int] = []
    if p:  # the longest match, and the longest one leaving room for k tokens: the better path, ties to the first
        paths = [
            best_path(text, q, min(k, depth - q, q), min_prob) for q in sorted({p, max(1, min(p, depth - k))})[::-1]
        ]
        expected = max((path for path in paths if path[0]), key=lambda path: path[1], default=([], 0.0))[0]
    assert draft == expected


@settings(max_examples=100, deadline=None)
@given(text=texts, cut=st.integers(0, 60), k=st.integers(1, 6))
def test_incremental_updates_equal_a_fresh_proposer(text, cut, k):
    """Growing a sequence step by step proposes what a proposer that sees it whole proposes."""
    grown = SuffixProposer(max_depth=6, global_budget=0)
    grown.propose([DraftRequest(0, text[: max(1, min(cut, len(text)))], k, GREEDY)])
    got = grown.propose([DraftRequest(0, text, k, GREEDY)])[0].tokens
    assert got == SuffixProposer(max_depth=6, global_budget=0).propose([DraftRequest(0, text, k, GREEDY)])[0].tokens


@settings(max_examples=60, deadline=None)
@given(outputs=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=30), min_size=1, max_size=8))
def test_global_trie_holds_the_latest_outputs_within_its_budget(outputs):
    """Each sequence's outputs go into the global trie step by step; the oldest leave first, and the trie always
    equals one built from what is left."""
    budget, depth = 25, 5
    proposer = SuffixProposer(max_depth=depth, global_budget=budget)
    prompt = [9, 9, 9]
    for seq_id, out in enumerate(outputs):
        for n in range(1, len(out) + 1, 3):
            proposer.propose([DraftRequest(seq_id, prompt + out[:n], 2, GREEDY)])
        proposer.propose([DraftRequest(seq_id, prompt + out, 2, GREEDY)])
        proposer.release(seq_id)
        kept = [c.held for c in proposer._fifo]
        assert proposer.global_tokens == sum(map(len, kept)) <= budget
        tree = dump(proposer.global_trie)
        assert tree == dump(build(kept, depth))
        assert proposer.global_trie.num_nodes == len(tree)
    everything = [t for out in outputs for t in out]
    assert [t for c in proposer._fifo for t in c.held] == everything[-budget:]


def test_global_trie_evicts_a_live_sequence_and_keeps_growing_it():
    """One long sequence over the budget: its oldest outputs leave, the newest stay matched."""
    proposer = SuffixProposer(max_depth=4, global_budget=8)
    text = [5, 6]
    for t in range(30):
        text.append(t % 11)
        proposer.propose([DraftRequest(1, text, 3, GREEDY)])
    assert proposer.global_tokens == 8
    assert dump(proposer.global_trie) == dump(build([text[-8:]], 4))
    proposer.release(1)
    for _ in range(8):
        proposer._evict_one()
    assert proposer.global_trie.num_nodes == 0 and not proposer.global_trie.kids[0]
    assert not proposer._fifo and not proposer._contributions


def test_global_trie_proposes_what_other_requests_wrote():
    """A new request whose context ends like an earlier request's output is continued from that output."""
    proposer = SuffixProposer(global_budget=1000)
    earlier = [50, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # a prompt of one token, then its outputs step by step
    for n in range(2, len(earlier) + 1):
        proposer.propose([DraftRequest(0, earlier[:n], 4, GREEDY)])
    proposer.release(0)
    assert proposer.propose([DraftRequest(1, [60, 61, 1, 2, 3], 4, GREEDY)])[0].tokens == [4, 5, 6]
    assert proposer.propose([DraftRequest(1, [60, 61, 1, 2, 3, 4, 5], 8, GREEDY)])[0].tokens == [6, 7, 8, 9, 10]


def test_candidates_branch_off_the_best_chain():
    proposer = SuffixProposer(global_budget=0)
    text = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 7, 0, 1, 2]
    chains = proposer.propose_candidates([DraftRequest(0, text, 4, GREEDY)], 3)[0]
    assert chains[0] == proposer.propose([DraftRequest(0, text, 4, GREEDY)])[0].tokens
    assert chains[0][:1] == [3]
    assert len(chains) >= 2 and all(c and c != chains[0][: len(c)] for c in chains[1:])
    assert [7] in [c[:1] for c in chains[1:]] or [3, 5] in [c[:2] for c in chains[1:]]


def test_k_caps_the_draft_and_zero_k_proposes_nothing():
    proposer = SuffixProposer(global_budget=0)
    text = list(range(30)) * 2 + list(range(10))  # a match longer than the trie is deep
    assert len(proposer.propose([DraftRequest(0, text, 3, GREEDY)])[0].tokens) == 3
    assert proposer.propose([DraftRequest(0, text, 0, GREEDY)])[0].tokens == []


# ---- through the engine -----------------------------------------------------------------------------------

ENGINE = {"kv_cache_gib": 0.25, "max_model_len": 1024}


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    chats = [[{"role": "user", "content": f"Complete this function:\n{p}"}] for p in humaneval_prompts(4)]
    ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chats]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ids]


def test_greedy_suffix_equals_plain_greedy(make_engine, prompts):
    params = SamplingParams(max_tokens=40)
    plain = [o.output_token_ids for o in make_engine(**ENGINE).generate(prompts, params)]
    engine = make_engine(**ENGINE, speculator="suffix", num_speculative_tokens=6)
    first = [o.output_token_ids for o in engine.generate(prompts, params)]
    accepted = engine.spec.accepted
    again = [o.output_token_ids for o in engine.generate(prompts, params)]  # now the global trie knows them
    assert first == plain and again == plain
    assert engine.spec.drafted > 0 and engine.spec.accepted - accepted > accepted
    assert engine.block_manager.stats()["num_free_blocks"] == engine.runner.num_blocks - 1, "KV blocks leaked"
