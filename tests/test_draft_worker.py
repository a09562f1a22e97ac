"""The draft model in its own Ray actor: same greedy tokens as in-process drafting and as no speculation, also
when the actor dies mid-generation (the engine falls back to plain decoding) or restarts (it is taken back).

Real model, real local Ray (3 CPUs): one target engine drives a fresh draft actor per test (its proposer is
swapped between tests, never while requests are in flight). The draft is the target's full depth: a
layer-truncated SmolLM2 (8, even 24 of 30 layers) has its drafts almost never accepted, and acceptance is
what shows that the drafts came from the actor and were used.
"""

from __future__ import annotations

import json
import time

import pytest
import ray
import torch

from deployments.draft_worker import RemoteDraftProposer, start_draft_worker
from engine.llm_engine import LLMEngine
from model.config import EngineConfig
from model.loader import ModelLoadError
from model.runner import ModelRunner
from sampling.params import SamplingParams
from speculator.proposer import DraftRequest
from tests.conftest import humaneval_prompts

MAX_TOKENS = 24
BASE = {"kv_cache_gib": 0.25, "draft_kv_cache_gib": 0.1, "max_model_len": 1024}
DRAFT = EngineConfig(speculator="draft", draft_num_layers=30, **BASE)  # all of SmolLM2-135M's 30 layers
GREEDY = SamplingParams(max_tokens=MAX_TOKENS)
LOAD_S = 240.0  # bound on a draft actor (re)start, i.e. a model load, on a busy 2-core machine
RAY_CPUS = 3  # for the local_ray fixture


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    chats = [[{"role": "user", "content": f"Complete this function:\n{p}"}] for p in humaneval_prompts(3)]
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chats]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def references(make_engine, prompts) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy tokens with speculation off and with the in-process draft (same draft settings)."""
    off = [o.output_token_ids for o in make_engine(**BASE).generate(prompts, GREEDY)]
    local = [o.output_token_ids for o in make_engine(**DRAFT.model_dump()).generate(prompts, GREEDY)]
    return off, local


def start(restartable: bool):
    return start_draft_worker(DRAFT, max_restarts=-1 if restartable else 0, ready_timeout_s=LOAD_S)


def num_sequences(actor) -> int:
    """Sequences the draft actor holds state for (a leak check)."""
    return ray.get(actor.__ray_call__.remote(lambda service: len(service.seqs)))


def send_releases(proposer: RemoteDraftProposer) -> None:
    """Sequences that finished after the last call have their releases queued: an empty call carries them."""
    assert proposer.propose([]) == []


def proposer_for(actor, **kwargs) -> RemoteDraftProposer:
    proposer = RemoteDraftProposer(actor, ready_timeout_s=LOAD_S, **kwargs)
    assert proposer.healthy, "the draft actor did not come up"
    return proposer


@pytest.fixture(scope="module")
def remote_engine(local_ray) -> LLMEngine:
    """The target engine with a draft actor; later tests plug in their own actor and proposer."""
    return LLMEngine(DRAFT, proposer=proposer_for(start(restartable=True)))


def plug(engine: LLMEngine, restartable: bool, **kwargs) -> tuple[object, RemoteDraftProposer]:
    assert not engine.has_unfinished()
    ray.kill(engine.proposer.actor)
    actor = start(restartable)
    engine.proposer = proposer_for(actor, device=engine.device, **kwargs)
    engine.spec.drafted = engine.spec.accepted = 0
    return actor, engine.proposer


def outputs_of(engine: LLMEngine, ids: list[str], finished: dict[str, list[int]]) -> list[list[int]]:
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.output_token_ids
    return [finished[i] for i in ids]


def test_draft_runner_rejects_a_mismatched_vocab_or_too_many_layers(model_folder, tmp_path):
    """The checks the engine and the actor share (they fail before any weights are loaded: the folder with
    another vocabulary has no weights at all)."""
    config = json.loads((model_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 123}))
    with pytest.raises(ModelLoadError, match="draft vocab"):
        ModelRunner.from_config(DRAFT.model_copy(update={"draft_model": str(tmp_path)}), draft=True)
    with pytest.raises(ValueError, match="draft_num_layers=99"):
        ModelRunner.from_config(DRAFT.model_copy(update={"draft_num_layers": 99}), draft=True)


def test_remote_draft_matches_in_process_draft_and_no_speculation(remote_engine, references, prompts):
    off, local = references
    assert local == off  # the reference itself: drafting is lossless
    proposer = remote_engine.proposer
    actor = proposer.actor
    got = [o.output_token_ids for o in remote_engine.generate(prompts, GREEDY)]
    assert got == local
    assert remote_engine.spec.drafted > 0 and remote_engine.spec.accepted > 0  # drafts came from the actor
    assert proposer.healthy and proposer.fallback_steps == 0 and proposer.failures == 0
    assert proposer.calls > 0 and proposer.resyncs == 0
    send_releases(proposer)
    assert num_sequences(actor) == 0


def test_remote_drafts_and_probs_equal_in_process_ones(remote_engine, make_engine, prompts):
    """The same batch (greedy and seeded sampled) to the actor and to the in-process draft: same tokens, and
    the sampled drafts' [k, vocab] probabilities arrive whole (they drive rejection sampling)."""
    local = make_engine(**DRAFT.model_dump()).proposer
    remote = remote_engine.proposer
    sampled = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    reqs = [DraftRequest(10_000 + i, p, 3, GREEDY if i % 2 else sampled) for i, p in enumerate(prompts)]
    try:
        want, got = local.propose(reqs), remote.propose(reqs)
    finally:
        for r in reqs:
            local.release(r.seq_id)
            remote.release(r.seq_id)
        send_releases(remote)
    assert [d.tokens for d in got] == [d.tokens for d in want]
    assert all(len(d.tokens) == 3 for d in got)
    for r, w, g in zip(reqs, want, got):
        if r.params.greedy:
            assert g.probs is None
        else:
            assert g.probs.shape == w.probs.shape == (3, remote_engine.arch.vocab_size)
            assert g.probs.dtype == w.probs.dtype == torch.float32
            torch.testing.assert_close(g.probs, w.probs, rtol=1e-4, atol=1e-6)
    assert num_sequences(remote.actor) == 0
    # A sequence sent as a delta that the actor has no mirror of (it restarted unnoticed): no draft, and
    # reported so the proposer resends it in full.
    drafts, missing = ray.get(remote.actor.propose.remote([(99_999, 5, [1], 2, None, None, None)], []))
    assert [d.tokens for d in drafts] == [[]] and missing == [99_999]


def test_actor_killed_mid_generation_degrades_to_exact_plain_decoding(remote_engine, references, prompts):
    off, _ = references
    actor, proposer = plug(remote_engine, restartable=False, retry_interval_s=0.2)
    ids = [remote_engine.add_request(p, GREEDY) for p in prompts]
    finished: dict[str, list[int]] = {}
    for _ in range(2):  # prefill, then a speculative step
        for out in remote_engine.step():
            if out.finished:
                finished[out.request_id] = out.output_token_ids
    assert remote_engine.spec.accepted > 0
    ray.kill(actor, no_restart=True)
    drafted = remote_engine.spec.drafted
    assert outputs_of(remote_engine, ids, finished) == off
    assert not proposer.healthy
    assert proposer.failures > 0 and proposer.fallback_steps > 0 and proposer.recoveries == 0
    # Every step after the failure went without drafts (at most the one call racing the kill drafted).
    assert remote_engine.spec.drafted - drafted <= len(prompts) * DRAFT.num_speculative_tokens


def test_restarted_actor_is_taken_back_and_drafts_again(remote_engine, references, prompts):
    off, _ = references
    actor, proposer = plug(remote_engine, restartable=True, timeout_s=5.0, retry_interval_s=0.5)
    old = ray.get(actor.ping.remote())
    ids = [remote_engine.add_request(p, GREEDY) for p in prompts]
    finished: dict[str, list[int]] = {}
    for _ in range(3):
        for out in remote_engine.step():
            if out.finished:
                finished[out.request_id] = out.output_token_ids
    ray.kill(actor, no_restart=False)
    t0 = time.monotonic()
    drafted_after = 0
    while time.monotonic() - t0 < LOAD_S and not (proposer.recoveries and drafted_after):
        if not remote_engine.has_unfinished():  # keep the engine busy until the worker is back
            assert outputs_of(remote_engine, ids, finished) == off
            ids = [remote_engine.add_request(p, GREEDY) for p in prompts]
            finished = {}
        recovered = proposer.recoveries
        drafted = remote_engine.spec.drafted
        for out in remote_engine.step():
            if out.finished:
                finished[out.request_id] = out.output_token_ids
        if recovered:  # drafts from the restarted worker
            drafted_after += remote_engine.spec.drafted - drafted
        time.sleep(0.05 if proposer.healthy else 0.3)  # leave the 2 cores some room for the model reload
    took = time.monotonic() - t0
    assert proposer.recoveries >= 1 and proposer.healthy, f"not taken back within {LOAD_S:.0f}s"
    assert drafted_after > 0, "the restarted worker never drafted"
    assert proposer.failures > 0 and proposer.fallback_steps > 0
    assert ray.get(actor.ping.remote()) != old  # really a new process, with an empty draft KV
    assert outputs_of(remote_engine, ids, finished) == off
    print(f"draft worker taken back {took:.1f}s after the kill")
    ray.kill(actor, no_restart=True)
