"""`specserve profile` end to end, and `speculator: auto` with its plan: each request drafts with its class's
drafter (or not at all), and greedy output stays plain decoding's."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from engine.tokenization import encode_prompt
from sampling.params import SamplingParams
from speculator.plan import read_plan
from tests.conftest import write_prompt_file

CHAT = ["What is the capital of France?", "Tell me a joke about cats."]
ENGINE = {"kv_cache_gib": 0.25, "max_model_len": 1024}
pytestmark = pytest.mark.slow  # the profile runs the engine once per drafter on every prompt


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_prompt_file(tmp_path_factory.mktemp("auto") / "prompts.jsonl", 2, CHAT)


@pytest.fixture(scope="module")
def profiled(prompt_file):
    out = prompt_file.parent / "plan.json"
    argv = ["profile", "--prompts", str(prompt_file), "--out", str(out), "--max-tokens", "16", "--k", "3"]
    assert main([*argv, "--drafters", "ngram,suffix", "--classes", "2", "--kv-cache-gib", "0.25"]) == 0
    return out


def test_profile_writes_a_plan_of_measured_numbers(profiled):
    plan = read_plan(profiled)
    assert plan.classifier.kind == "kmeans" and len(plan.classifier.names) == 2
    assert sorted(c.num_prompts for c in plan.classes) == [2, 2]  # code apart from chat
    assert plan.step_times.rows == [1, 2, 3, 4] and all(s > 0 for s in plan.step_times.seconds)
    assert set(plan.drafters) == {"ngram", "suffix"}
    for profile in plan.drafters.values():
        assert profile.seconds_per_token > 0
        assert sum(a.steps for a in profile.by_class.values()) >= 4 * 15 // 4  # up to 4 tokens a step
        assert all(
            len(a.survival) == 3 and 0 <= min(a.survival) <= max(a.survival) <= 1 for a in profile.by_class.values()
        )
    for choice in plan.classes:
        assert (choice.drafter == "none") == (choice.k == 0)
        assert choice.drafter == "none" or choice.expected_speedup > 1


def with_drafters(path, tmp_path, drafters: list[str]):
    """The profiled plan with the given drafter per class, so both routes are exercised whatever this machine
    measured."""
    plan = read_plan(path)
    for choice, drafter in zip(plan.classes, drafters):
        choice.drafter, choice.k = drafter, 0 if drafter == "none" else 3
    out = tmp_path / "plan.json"
    out.write_text(plan.model_dump_json())
    return out, plan


def run_both(make_engine, plan_path, prompt_file):
    from cli.prompts import load_prompts

    auto = make_engine(speculator="auto", plan=str(plan_path), **ENGINE)
    specs = load_prompts(prompt_file)
    ids = [encode_prompt(auto.tokenizer, auto.arch.vocab_size, s.prompt, s.messages) for s in specs]
    params = SamplingParams(max_tokens=16)
    routes = [auto.router.route(i) for i in ids]
    got = auto.generate(ids, params)
    assert auto.proposer.owner == {}  # every sequence's drafter state released
    want = make_engine(**ENGINE).generate(ids, params)
    assert [o.output_token_ids for o in got] == [o.output_token_ids for o in want]
    return routes, got


def test_auto_routes_each_class_to_its_drafter_and_equals_plain_greedy(make_engine, profiled, prompt_file, tmp_path):
    plan_path, plan = with_drafters(profiled, tmp_path, ["ngram", "suffix"])
    routes, got = run_both(make_engine, plan_path, prompt_file)
    assert {r.drafter for r in routes} == {"ngram", "suffix"}
    assert routes[0].drafter == routes[1].drafter != routes[2].drafter == routes[3].drafter
    assert sum(o.metrics.spec.drafted for o in got) > 0


def test_a_class_with_drafter_none_never_drafts(make_engine, profiled, prompt_file, tmp_path):
    plan_path, _ = with_drafters(profiled, tmp_path, ["none", "ngram"])
    routes, got = run_both(make_engine, plan_path, prompt_file)
    assert {r.drafter for r in routes} == {"none", "ngram"}
    for route, out in zip(routes, got):
        if route.drafter == "none":
            assert out.metrics.spec.drafted == 0 and out.metrics.spec.steps == 0


def test_bench_with_speculator_auto(profiled, prompt_file, capsys):
    argv = [
        "bench",
        "--prompts",
        str(prompt_file),
        "--max-tokens",
        "4",
        "--speculator",
        "auto",
        "--plan",
        str(profiled),
    ]
    assert main([*argv, "--kv-cache-gib", "0.25"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["speculator"] == "auto"
