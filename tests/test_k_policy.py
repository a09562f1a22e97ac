"""The engine's k from the speculation cost model, on the default model: drafts that never land turn speculation
off within a few steps (probed now and then), drafts that always land keep it on at batch 1, a large batch on a
target whose step time grows fast with rows turns it down; the output equals plain greedy decoding throughout."""

from __future__ import annotations

import time

import pytest

from engine.llm_engine import LLMEngine
from model.config import EngineConfig
from model.runner import ModelRunner
from sampling.params import SamplingParams
from speculator.backoff import KController
from speculator.cost_model import StepTimes
from speculator.k_policy import CostKController, CostPolicy, DraftCost
from speculator.proposer import Draft, DraftRequest, Proposer
from tests.conftest import humaneval_prompts

CONFIG = {"max_model_len": 512, "kv_cache_gib": 0.25, "num_speculative_tokens": 4}
MAX_TOKENS = 40
# A CPU-like target: a few verified rows cost little more than one.
CPU_LIKE = StepTimes((1, 4, 8, 16, 32), (0.030, 0.033, 0.040, 0.060, 0.100))
# Flat up to 8 rows, then steep: speculation pays for one sequence, not beside fifteen others.
STEEP = StepTimes((1, 8, 64), (0.030, 0.035, 0.500))


class Oracle(Proposer):
    """Proposes the plain greedy continuation it was given (`wrong`: each of those tokens plus one, never
    accepted)."""

    def __init__(self, references: list[list[int]], vocab_size: int, wrong: bool = False):
        self.references, self.vocab_size, self.wrong = references, vocab_size, wrong

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for r in requests:
            n = len(r.token_ids)
            ref = next(ref for ref in self.references if ref[:n] == r.token_ids)
            tokens = ref[n : n + r.k]
            drafts.append(Draft([(t + 1) % self.vocab_size for t in tokens] if self.wrong else tokens))
        return drafts


@pytest.fixture(scope="module")
def plain(make_engine):
    return make_engine(**CONFIG)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in humaneval_prompts(16)]


@pytest.fixture(scope="module")
def references(plain, prompts) -> list[list[int]]:
    """Prompt + plain greedy output, per prompt."""
    outputs = plain.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    return [p + o.output_token_ids for p, o in zip(prompts, outputs)]


def engine_with(plain: LLMEngine, proposer: Proposer, step_times: StepTimes) -> LLMEngine:
    """An engine on the plain engine's runner (one model load) with the given drafter and step times."""
    return LLMEngine(
        runner=plain.runner, proposer=proposer, step_times=step_times, speculator="ngram", k_policy="cost", **CONFIG
    )


def run_tracking_k(engine: LLMEngine, prompts: list[list[int]]) -> tuple[dict[str, list[int]], list, list[int]]:
    """Run the prompts; each request's k after each of its steps, the outputs in order, and the running count."""
    ids = [engine.add_request(p, SamplingParams(max_tokens=MAX_TOKENS)) for p in prompts]
    ks: dict[str, list[int]] = {i: [] for i in ids}
    running, final = [], {}
    while engine.has_unfinished():
        running.append(len(engine.scheduler.running))
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
            elif out.new_token_ids:
                ks[out.request_id].append(engine.requests[out.request_id].controller.k)
    return ks, [final[i] for i in ids], running


def test_never_accepted_drafts_turn_speculation_off(plain, prompts, references):
    engine = engine_with(plain, Oracle(references, plain.arch.vocab_size, wrong=True), CPU_LIKE)
    ks, outputs, _ = run_tracking_k(engine, prompts[:1])
    assert [p + o.output_token_ids for p, o in zip(prompts, outputs)] == references[:1]
    (k,) = ks.values()
    assert k[0] > 0, "a new sequence starts out speculating"
    off = k.index(0)
    assert off <= 12, f"k still {k[:off]} after {off} steps of rejected drafts"
    assert max(k[off:]) <= 1, "after turning off, only k = 1 probes"
    assert engine.spec.accepted == 0 and engine.spec.drafted < 2 * off * 4


def test_always_accepted_drafts_keep_speculating_at_batch_one(plain, prompts, references):
    engine = engine_with(plain, Oracle(references, plain.arch.vocab_size), CPU_LIKE)
    ks, outputs, _ = run_tracking_k(engine, prompts[:1])
    assert [p + o.output_token_ids for p, o in zip(prompts, outputs)] == references[:1]
    (k,) = ks.values()
    # Both estimates (after a miss, the first; after a whole hit, the rest) learn from one step each.
    assert min(k) > 0 and set(k[2:]) == {4}, f"k {k}: all of k_max pays once drafts are seen to land"
    assert engine.spec.mean_tokens_per_step > 3


def test_a_large_batch_on_a_steep_target_turns_speculation_down(plain, prompts, references):
    alone = engine_with(plain, Oracle(references, plain.arch.vocab_size), STEEP)
    ks_alone, _, _ = run_tracking_k(alone, prompts[:1])
    assert min(next(iter(ks_alone.values()))[:-1]) == 4

    engine = engine_with(plain, Oracle(references, plain.arch.vocab_size), STEEP)
    ks, outputs, running = run_tracking_k(engine, prompts)
    assert [p + o.output_token_ids for p, o in zip(prompts, outputs)] == references
    assert max(running) == len(prompts)
    busy = [k for seq_ks in ks.values() for k in seq_ks[2:6]]  # early steps, all sixteen sequences decoding
    assert sum(busy) / len(busy) < 1, f"k under load {busy}"


def test_ngram_with_the_cost_policy_equals_plain_greedy(make_engine, plain, prompts, references):
    engine = make_engine(speculator="ngram", k_policy="cost", **CONFIG)
    assert engine.k_policy is not None and isinstance(engine.runner, ModelRunner)
    step = engine.k_policy.model.step
    assert step.rows == (1, 2, 3, 4, 5, 6, 8, 16, 32) and step.at(32) >= step.at(1) > 0
    rid = engine.add_request(prompts[0], SamplingParams(max_tokens=MAX_TOKENS))
    assert isinstance(engine.requests[rid].controller, CostKController)
    first = next(o for o in engine.run() if o.finished)
    outputs = [first, *engine.generate(prompts[1:4], SamplingParams(max_tokens=MAX_TOKENS))]
    assert [p + o.output_token_ids for p, o in zip(prompts, outputs)] == references[:4]
    assert engine.spec.drafted > 0


def test_backoff_policy_and_fixed_k_stay_selectable(plain, references):
    backoff = LLMEngine(runner=plain.runner, speculator="ngram", k_policy="backoff", **CONFIG)
    fixed = LLMEngine(runner=plain.runner, speculator="ngram", adaptive_k=False, **CONFIG)
    for engine in (backoff, fixed):
        assert engine.k_policy is None
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
        assert all(isinstance(r.controller, KController) for r in engine.requests.values())
        list(engine.run())
    with pytest.raises(ValueError, match="k_policy"):
        LLMEngine(runner=plain.runner, speculator="ngram", k_policy="fast", **CONFIG)


def test_draft_cost_is_a_running_estimate_past_the_first_call():
    cost = DraftCost(decay=0.5)
    cost.observe(1.0, 1)  # one-time set-up: not counted
    cost.observe(0.5, 0)  # no sequences: nothing to divide
    assert cost.seconds_per_sequence == 0
    cost.observe(0.4, 4)
    cost.observe(0.2, 4)
    assert cost.seconds_per_sequence == pytest.approx(0.075)


class Sleepy(Proposer):
    """A drafter whose every call takes `seconds`, whatever k (an actor's round trip, say); drafts that land."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        time.sleep(self.seconds)
        return [Draft([1] * r.k) for r in requests]


def test_each_drafter_is_timed_apart_per_sequence_and_a_new_one_afresh():
    """Under speculator auto an engine holds a cheap lookup and a costly drafter: each sequence is charged its own
    drafter's cost, a call's time shared by the sequences it drafts for, whatever their k. The costly drafter
    (three one-row steps' time per sequence) does not pay even for a run of hits at batch 1; the cheap one does.
    A drafter installed under a name starts a new estimate."""
    policy = CostPolicy(CPU_LIKE, 4)
    cheap, costly = policy.time("ngram", Sleepy(0.0)), policy.time("mlp:chat", Sleepy(0.2))
    for k in (1, 3, 1, 3, 1):
        cheap.propose([DraftRequest(0, [1], k, SamplingParams())])
        costly.propose([DraftRequest(i, [1], k, SamplingParams()) for i in range(2)] + [DraftRequest(9, [1], 0, None)])
    policy.time("failing", Sleepy(0.2)).propose([DraftRequest(0, [1], 0, SamplingParams())])  # no drafts: not timed
    assert policy.cost_of("ngram").seconds_per_sequence < 0.002 and policy.cost_of("failing").seconds_per_sequence == 0
    assert 0.099 < policy.cost_of("mlp:chat").seconds_per_sequence < 0.15  # 0.2 s a call, for 2 drafting
    assert policy.controller("ngram").next_k() > 0 and policy.controller("mlp:chat").next_k() == 0
    policy.time("mlp:chat", Sleepy(0.0))
    assert policy.cost_of("mlp:chat").seconds_per_sequence == 0 and policy.controller("mlp:chat").next_k() > 0


def test_k_follows_the_run_alone_and_the_cap_of_a_run_of_hits_under_load():
    """Copied passages are accepted to their end, then drafts miss: acceptance after a whole hit is kept apart
    from acceptance after a miss. Alone, k is the backoff's (it follows the run); beside 15 other sequences, on a
    target whose step time is steep past 8 rows, not even a run of hits pays: k = 0."""
    from speculator.cost_model import CostModel

    controller = CostKController(CostModel(STEEP, 4), KController(4))
    for _ in range(12):  # runs of four misses, then of sixteen drafts accepted whole
        for hit in [False] * 4 + [True] * 16:
            k = controller.next_k()
            controller.update(k, k if hit else 0)
    assert controller.hot
    assert controller.after_hit.alphas(1)[0] > controller.acceptance.alphas(1)[0]
    assert controller.next_k() == controller.backoff.k > 0
    assert controller.next_k(batch_rows=15, batch_tokens=15.0) == 0
    controller.update(4, 1)
    assert not controller.hot
    assert controller.next_k() == 2  # the backoff's: one more than it accepted
    controller.seed([0.9, 0.2])
    assert controller.acceptance.alphas(2) == [0.9, 0.2] and controller.after_hit.alphas(1) != [0.9]
    for _ in range(controller.model.probe_interval):  # under load, no drafts; then a probe
        assert controller.next_k(batch_rows=15, batch_tokens=15.0) == 0
    assert controller.next_k(batch_rows=15, batch_tokens=15.0) == 1


def test_a_tree_of_candidates_is_priced_at_its_rows():
    """With 3 candidates a step drafting k verifies up to 3k rows: on the steep target a run of hits pays for 4
    drafts in a chain, for only 2 in a tree (7 rows, where 13 cost twice a decode step)."""
    from speculator.cost_model import CostModel

    chain = CostKController(CostModel(STEEP, 4), KController(4))
    tree = CostPolicy(STEEP, 4, candidates=3).controller("mlp")
    assert tree.candidates == 3
    assert chain.next_k() == 4 and tree.next_k() == 2


def test_the_default_k_policy_is_the_cost_model_under_speculator_auto_and_learned_drafters(plain):
    auto = LLMEngine(runner=plain.runner, speculator="auto", **CONFIG)
    ngram = LLMEngine(runner=plain.runner, speculator="ngram", **CONFIG)
    assert auto.config.k_policy == ngram.config.k_policy == "auto"
    assert auto.k_policy is not None and ngram.k_policy is None
    for learned in ("mlp", "eagle"):  # a proposal costs time: draft only where it pays
        assert EngineConfig(speculator=learned, speculator_model="d").k_policy_in_use == "cost"
    assert EngineConfig(speculator="suffix").k_policy_in_use == "backoff"
    assert set(auto.k_policy.costs) == set(auto.proposer.proposers)  # each of auto's drafters timed apart
