"""The MLP speculator in the engine, on the default model with a drafter distilled from it (`mlp_drafter`):
greedy tokens equal plain decoding and HF `generate`, sampled tokens keep the target's distribution, drafts are
accepted on the drafter's own training prompts; the hidden rows a learned drafter is handed are the target's
own, in order and without gaps (across chunked prefill, partial acceptance and preemption); the draft worker's
logic drafts what the in-process proposer drafts; the command line and config take it."""

from __future__ import annotations

import pytest
import torch

from cli.main import main
from deployments.draft_worker import DraftService
from engine.llm_engine import LLMEngine
from model.config import EngineConfig
from sampling.params import SamplingParams
from speculator.distill_data import teacher_forced_records
from speculator.factory import make_proposer
from speculator.mlp_proposer import MLPProposer
from speculator.proposer import Draft, DraftRequest, Proposer
from tests.conftest import humaneval_prompts, mlp_training_chats
from tests.test_engine_greedy import check_against_reference, hf_greedy
from tests.test_engine_sampling import TEMPERATURE, assert_two_token_law, target_probs

MAX_TOKENS = 24
BASE = {"kv_cache_gib": 0.25, "max_model_len": 1024}
GREEDY = SamplingParams(max_tokens=MAX_TOKENS)


def chat_ids(tokenizer, chats: list[list[dict]]) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chats]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def mlp_config(mlp_drafter) -> dict:
    # the backoff rule drafts on every step (the default cost model follows this machine's timings: test_k_policy)
    return {
        **BASE,
        "speculator": "mlp",
        "speculator_model": str(mlp_drafter),
        "max_num_seqs": 128,
        "k_policy": "backoff",
    }


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Three training prompts, two unseen ones, a raw completion and one long enough to be prefilled in chunks."""
    unseen = [[{"role": "user", "content": f"Complete this function:\n{p}"}] for p in humaneval_prompts(12)[10:]]
    ids = chat_ids(tokenizer, mlp_training_chats()[:3] + unseen)
    ids.append(tokenizer("The three primary colors are")["input_ids"])
    long = tokenizer("Explain these functions.\n\n" + "\n\n".join(humaneval_prompts(20)[12:18]))["input_ids"]
    assert len(long) > 512  # the engine's default token budget per step
    return ids + [long]


@pytest.fixture(scope="module")
def reference(hf_model, prompts) -> list[list[int]]:
    return hf_greedy(hf_model, prompts, MAX_TOKENS)


def test_greedy_with_the_mlp_drafter_equals_plain_decoding_and_hf(
    make_engine, mlp_config, hf_model, prompts, reference
):
    plain = [o.output_token_ids for o in make_engine(**BASE).generate(prompts, GREEDY)]
    engine = make_engine(**mlp_config)
    assert isinstance(engine.proposer, MLPProposer) and engine.proposer.hidden_rows == "last"
    assert engine.config.num_speculative_tokens == 3  # capped to the drafter's n_predict
    outputs = engine.generate(prompts, GREEDY)
    assert [o.output_token_ids for o in outputs] == plain
    check_against_reference(hf_model, prompts, reference, outputs)
    assert engine.spec.drafted > 0 and engine.spec.accepted > 0
    assert engine.block_manager.stats()["num_free_blocks"] == engine.runner.num_blocks - 1, "KV blocks leaked"
    assert all(r.hidden is None for r in engine.requests.values()) and not engine.requests


def test_drafts_are_accepted_on_the_drafters_training_prompts(make_engine, mlp_config, tokenizer):
    engine = make_engine(**mlp_config)
    before = (engine.spec.drafted, engine.spec.accepted, engine.spec.steps, engine.spec.emitted)
    engine.generate(chat_ids(tokenizer, mlp_training_chats()), SamplingParams(max_tokens=48))
    drafted, accepted, steps, emitted = (
        a - b
        for a, b in zip((engine.spec.drafted, engine.spec.accepted, engine.spec.steps, engine.spec.emitted), before)
    )
    assert accepted / drafted > 0.5, f"acceptance {accepted}/{drafted} on the prompts the drafter learned"
    assert emitted / steps > 2.0


@pytest.mark.slow
def test_sampled_outputs_keep_the_target_distribution(make_engine, mlp_config, hf_model, tokenizer):
    """Joint law of the first two tokens of a prompt the drafter learned (so its drafts are often accepted):
    the second token comes out of verifying a point-mass draft."""
    (prompt_ids,) = chat_ids(tokenizer, mlp_training_chats()[:1])
    n = 600
    # The backoff drafts at any batch size; the cost model would rightly turn drafts down at 64 sequences.
    engine = make_engine(**mlp_config)
    params = [SamplingParams(max_tokens=3, temperature=TEMPERATURE, seed=i, ignore_eos=True) for i in range(n)]
    drafted, accepted = engine.spec.drafted, engine.spec.accepted
    outs = engine.generate([prompt_ids] * n, params)
    assert engine.spec.drafted - drafted >= n // 2, "too few verification steps saw a draft"
    assert engine.spec.accepted - accepted >= n // 10, "drafts were hardly ever accepted"
    p1 = target_probs(hf_model, [prompt_ids])[0]
    assert_two_token_law(
        outs, p1, lambda firsts: target_probs(hf_model, [prompt_ids + [t] for t in firsts]), 2, "samples"
    )


# ---- the hidden rows a learned drafter is handed ---------------------------------------------------------------


class RecordingProposer(Proposer):
    """Proposes the known greedy continuation with its second token wrong (so one draft is accepted, the rest
    rejected) and records every request's token ids and hidden rows, and every release."""

    def __init__(self, hidden_rows: str, continuations: list[list[int]], vocab_size: int):
        self.hidden_rows = hidden_rows
        self.continuations, self.vocab_size = continuations, vocab_size
        self.seen: list[tuple[int, list[int], torch.Tensor | None]] = []
        self.released: list[int] = []

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for r in requests:
            self.seen.append((r.seq_id, list(r.token_ids), None if r.hidden is None else r.hidden.clone()))
            full = next(c for c in self.continuations if c[: len(r.token_ids)] == r.token_ids)
            guess = full[len(r.token_ids) : len(r.token_ids) + r.k]
            if len(guess) > 1:
                guess[1] = (guess[1] + 1) % self.vocab_size
            drafts.append(Draft(guess))
        return drafts

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)


@pytest.fixture(scope="module")
def hidden_reference(make_engine, tokenizer) -> tuple[list[list[int]], list[list[int]], list[torch.Tensor]]:
    """Prompts, their plain greedy sequences (prompt + output) and the target's hidden rows along them."""
    engine = make_engine(**BASE)
    prompts = chat_ids(tokenizer, mlp_training_chats(4)[1:])
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    full = [o.prompt_token_ids + o.output_token_ids for o in outs]
    engine.reset_kv()
    hidden = [r.hidden for r in teacher_forced_records(engine.runner, [(f, 1) for f in full])]
    engine.reset_kv()
    return prompts, full, hidden


@pytest.mark.parametrize("mode", ["all", "last"])
def test_hidden_rows_are_the_targets_own_without_gaps(hidden_reference, mode):
    """Small KV pool (preemptions), small token budget (chunked prefill), no prefix cache (a recompute starts at
    position 0): each proposal gets exactly the rows since its sequence's previous one ("all"; after a release,
    from row 0) or the newest row ("last"), equal to a teacher-forced pass's."""
    prompts, full, hidden = hidden_reference
    engine = LLMEngine(
        **BASE | {"kv_cache_gib": 0.012, "max_num_batched_tokens": 64, "enable_prefix_caching": False},
        proposer=RecordingProposer(mode, full, 49152),
    )
    rec = engine.proposer
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    assert [o.prompt_token_ids + o.output_token_ids for o in outs] == full
    assert engine.scheduler.num_preemptions > 0, "the pool was not small enough to preempt"
    assert engine.spec.accepted > 0 and engine.spec.accepted < engine.spec.drafted
    last_len: dict[int, int] = {}
    for seq_id, tokens, rows in rec.seen:
        assert rows is not None and rows.shape[1] == hidden[0].shape[1]
        if mode == "last":
            assert rows.shape[0] == 1
        else:
            restarted = seq_id not in last_len or rec.released.count(seq_id) > 0 and rows.shape[0] == len(tokens) - 1
            want = len(tokens) - 1 if restarted else len(tokens) - last_len[seq_id]
            assert rows.shape[0] == want, (seq_id, len(tokens), rows.shape[0], last_len.get(seq_id))
        last_len[seq_id] = len(tokens)
        ref = hidden[next(i for i, f in enumerate(full) if f[: len(tokens)] == tokens)]
        n = rows.shape[0]
        torch.testing.assert_close(rows.float(), ref[len(tokens) - n - 1 : len(tokens) - 1], atol=2e-3, rtol=2e-3)
    assert set(rec.released) >= {s for s, _, _ in rec.seen}  # every sequence released at its end


# ---- the draft worker's logic, the factory, the command line -------------------------------------------------


def test_draft_service_drafts_what_the_in_process_proposer_drafts(mlp_config, make_engine, tokenizer):
    config = EngineConfig(**mlp_config)
    service = DraftService(config, num_threads=torch.get_num_threads())
    local = make_proposer(config)
    engine = make_engine(**BASE)
    ids = chat_ids(tokenizer, mlp_training_chats(2))
    hidden = [teacher_forced_records(engine.runner, [(t, len(t))])[0].hidden for t in ids]  # the last prompt row
    engine.reset_kv()
    reqs = [DraftRequest(i, t, 3, GREEDY, h) for i, (t, h) in enumerate(zip(ids, hidden))]
    wire = [(r.seq_id, 0, r.token_ids, r.k, r.params, None, r.hidden) for r in reqs]
    drafts, missing = service.propose(wire)
    assert missing == [] and [d.tokens for d in drafts] == [d.tokens for d in local.propose(reqs)]
    assert all(len(d.tokens) >= 1 and d.probs is None for d in drafts)
    # a delta for a sequence it mirrors, and one without a hidden row (no draft)
    more, _ = service.propose([(0, len(ids[0]), [], 2, None, None, None)])
    assert more[0].tokens == []


def test_config_and_command_line_take_a_learned_drafter(mlp_drafter, capsys):
    with pytest.raises(ValueError, match="speculator_model: required"):
        EngineConfig(speculator="mlp")
    with pytest.raises(ValueError, match="speculator_model: only read"):
        EngineConfig(speculator="ngram", speculator_model=str(mlp_drafter))
    with pytest.raises(ValueError, match="model_type is not 'specserve_eagle'"):  # an MLP folder is no EAGLE head
        make_proposer(EngineConfig(speculator="eagle", speculator_model=str(mlp_drafter)))
    assert main(["generate", "Hi", "--speculator", "mlp"]) == 2
    assert "speculator_model: required" in capsys.readouterr().err
    argv = ["generate", "Name one fruit.", "--speculator", "mlp", "--speculator-model", str(mlp_drafter)]
    assert main(argv + ["--max-tokens", "8", "--kv-cache-gib", "0.05", "--stats"]) == 0
    assert '"drafted"' in capsys.readouterr().err


# ---- the EAGLE head in the engine: the same checks, with a head distilled the same way (`eagle_drafter`) -----


def eagle_config(folder) -> dict:
    return {
        **BASE,
        "speculator": "eagle",
        "speculator_model": str(folder),
        "num_speculative_tokens": 3,
        "k_policy": "backoff",
    }


def test_greedy_with_the_eagle_head_equals_plain_decoding_and_hf(
    make_engine, eagle_drafter, hf_model, prompts, reference
):
    from speculator.eagle_proposer import EagleProposer

    plain = [o.output_token_ids for o in make_engine(**BASE).generate(prompts, GREEDY)]
    engine = make_engine(**eagle_config(eagle_drafter))
    assert isinstance(engine.proposer, EagleProposer) and engine.proposer.hidden_rows == "all"
    outputs = engine.generate(prompts, GREEDY)
    assert [o.output_token_ids for o in outputs] == plain
    check_against_reference(hf_model, prompts, reference, outputs)
    assert engine.spec.drafted > 0
    assert engine.block_manager.stats()["num_free_blocks"] == engine.runner.num_blocks - 1, "KV blocks leaked"


def test_eagle_drafts_are_accepted_on_the_prompts_it_learned(make_engine, eagle_drafter, tokenizer):
    engine = make_engine(**eagle_config(eagle_drafter), enable_prefix_caching=False)
    engine.generate(chat_ids(tokenizer, mlp_training_chats()), SamplingParams(max_tokens=48))
    assert engine.spec.accepted / engine.spec.drafted > 0.3, (engine.spec.accepted, engine.spec.drafted)
    assert engine.spec.emitted / engine.spec.steps > 1.5
