"""Many candidates verified in one pass in the engine (`num_candidates`): the n-gram, suffix, MLP and EAGLE proposers
give token trees, fed as the sequence's lookahead rows and verified in the one target forward, the accepted path
compacted in place. Greedy tokens equal plain decoding (and HF `generate`) at 1 and 3 candidates, no KV block
leaks, branching trees are really verified, more candidates accept at least as much as one chain on the drafter's
training prompts, and sampled tokens keep the target's distribution."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cli.main import main
from engine.llm_engine import LLMEngine
from sampling.params import SamplingParams
from tests.conftest import humaneval_prompts, mlp_training_chats
from tests.test_engine_greedy import check_against_reference, hf_greedy
from tests.test_engine_sampling import TEMPERATURE, assert_two_token_law, target_probs

MAX_TOKENS = 24
BASE = {"kv_cache_gib": 0.25, "max_model_len": 1024, "max_num_seqs": 128}
# The learned drafters default to the cost model, whose k follows this machine's step times; the trees and counts
# checked here need drafts on every step, so these engines draft by the backoff rule (the cost model: test_k_policy).
FIXED_K = {"k_policy": "backoff"}
GREEDY = SamplingParams(max_tokens=MAX_TOKENS)


def chat_ids(tokenizer, chats: list[list[dict]]) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chats]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@contextmanager
def count_trees(engine: LLMEngine) -> Iterator[Counter]:
    """Counts the forwards' items fed as branching trees, and the compactions of an accepted path, meanwhile;
    with the engine's spec counters' growth under "drafted", "accepted" and "steps" at the end."""
    counts: Counter = Counter()
    before = {k: getattr(engine.spec, k) for k in ("drafted", "accepted", "steps")}
    runner = engine.runner
    execute, execute_with_hidden, move_slots = runner.execute, runner.execute_with_hidden, runner.move_slots

    def seen(items):
        counts["trees"] += sum(it.tree_parents is not None for it in items)
        return items

    def moved(moves):
        counts["moves"] += len(moves)
        move_slots(moves)

    runner.execute = lambda items: execute(seen(items))
    runner.execute_with_hidden = lambda items: execute_with_hidden(seen(items))
    runner.move_slots = moved
    try:
        yield counts
    finally:
        for name in ("execute", "execute_with_hidden", "move_slots"):
            delattr(runner, name)
        counts.update({k: getattr(engine.spec, k) - v for k, v in before.items()})


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Three of the MLP drafter's training prompts, two unseen ones, and a raw completion with repeats."""
    unseen = [[{"role": "user", "content": f"Complete this function:\n{p}"}] for p in humaneval_prompts(12)[10:]]
    ids = chat_ids(tokenizer, mlp_training_chats()[:3] + unseen)
    ids.append(tokenizer("red green blue, red green yellow, red blue green, red green")["input_ids"])
    return ids


@pytest.fixture(scope="module")
def plain(make_engine, prompts) -> list[list[int]]:
    return [o.output_token_ids for o in make_engine(**BASE).generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def configs(mlp_drafter, eagle_drafter) -> dict[str, dict]:
    return {
        "ngram": {"speculator": "ngram"},
        "suffix": {"speculator": "suffix"},
        "mlp": {"speculator": "mlp", "speculator_model": str(mlp_drafter), **FIXED_K},
        "eagle": {
            "speculator": "eagle",
            "speculator_model": str(eagle_drafter),
            "num_speculative_tokens": 3,
            **FIXED_K,
        },
    }


@pytest.mark.parametrize("candidates", [1, 3])
@pytest.mark.parametrize("speculator", ["ngram", "suffix", "mlp", "eagle"])
def test_greedy_with_candidates_equals_plain_decoding(make_engine, configs, prompts, plain, speculator, candidates):
    engine = make_engine(**BASE, **configs[speculator], num_candidates=candidates)
    with count_trees(engine) as counts:
        outputs = engine.generate(prompts, GREEDY)
    assert [o.output_token_ids for o in outputs] == plain
    assert counts["drafted"] > 0 and counts["accepted"] > 0
    assert engine.block_manager.stats()["num_free_blocks"] == engine.runner.num_blocks - 1, "KV blocks leaked"
    if candidates == 1:
        assert counts["trees"] == 0, "one candidate is one chain, on the chain's path"
    elif speculator != "ngram":  # n-gram lookup branches only where two suffix lengths disagree
        assert counts["trees"] > 0, "no branching tree was verified"
        assert counts["moves"] > 0, "no accepted path off the first branch was compacted"


def test_mlp_candidates_equal_hf_generate(make_engine, configs, hf_model, prompts):
    reference = hf_greedy(hf_model, prompts, MAX_TOKENS)
    config = {**configs["mlp"], "k_policy": "auto"}  # the default policy: its k choices must not change the output
    outputs = make_engine(**BASE, **config, num_candidates=3).generate(prompts, GREEDY)
    check_against_reference(hf_model, prompts, reference, outputs)


def test_more_candidates_accept_at_least_as_much_on_training_prompts(make_engine, configs, tokenizer):
    ids = chat_ids(tokenizer, mlp_training_chats())
    per_step = {}
    for n in (1, 3):
        engine = make_engine(**BASE, **configs["mlp"], num_candidates=n)
        with count_trees(engine) as counts:
            engine.generate(ids, SamplingParams(max_tokens=48))
        per_step[n] = counts["accepted"] / counts["steps"]
    assert per_step[3] >= per_step[1], f"accepted tokens per step: {per_step}"
    assert per_step[1] > 1.0


def test_candidates_on_the_command_line(mlp_drafter, capsys):
    argv = ["generate", "Name one fruit.", "--speculator", "mlp", "--speculator-model", str(mlp_drafter)]
    assert main(argv + ["--candidates", "3", "--max-tokens", "8", "--kv-cache-gib", "0.05", "--stats"]) == 0
    assert '"drafted"' in capsys.readouterr().err
    assert main(argv + ["--candidates", "0"]) == 2
    assert "num_candidates" in capsys.readouterr().err


@pytest.mark.slow
def test_sampled_outputs_with_candidates_keep_the_target_distribution(make_engine, configs, hf_model, tokenizer):
    """Joint law of the first two tokens of a prompt the drafter learned, with three candidates per step: the
    second token comes out of recursive rejection over a tree of point-mass candidates."""
    (prompt_ids,) = chat_ids(tokenizer, mlp_training_chats()[:1])
    n = 600
    engine = make_engine(**BASE, **configs["mlp"], num_candidates=3)
    params = [SamplingParams(max_tokens=3, temperature=TEMPERATURE, seed=i, ignore_eos=True) for i in range(n)]
    with count_trees(engine) as counts:
        outs = engine.generate([prompt_ids] * n, params)
    assert counts["trees"] >= n // 2, "too few verification steps saw a tree"
    assert counts["accepted"] >= n // 10, "drafts were hardly ever accepted"
    p1 = target_probs(hf_model, [prompt_ids])[0]
    assert_two_token_law(
        outs, p1, lambda firsts: target_probs(hf_model, [prompt_ids + [t] for t in firsts]), 2, "samples"
    )
