"""`specserve adapt` end to end (profile, distill per class, profile again, chart), and plans naming a learned
drafter per class ("mlp:class0"): read_plan takes them and `speculator: auto` loads each from its own folder, with
greedy output plain decoding's."""

from __future__ import annotations

import json
import shutil

import pytest

from cli.main import main
from engine.tokenization import encode_prompt
from sampling.params import SamplingParams
from speculator.cost_model import StepTimes
from speculator.plan import build_plan, read_plan
from speculator.workload_class import ClassRule, rules_spec
from tests.conftest import write_prompt_file

CHAT = ["Tell me a joke about cats."]
ENGINE = {"kv_cache_gib": 0.25, "max_model_len": 1024}
PNG = b"\x89PNG\r\n\x1a\n"


def test_read_plan_takes_a_learned_drafter_per_class_only_with_its_folder(tmp_path):
    plan = build_plan(rules_spec([ClassRule(name="code", regex="def ")]), StepTimes((1, 2), (0.01, 0.012)), {}, 1)
    plan.classes[0].drafter, plan.classes[0].k = "mlp:code", 1
    path = tmp_path / "plan.json"
    path.write_text(plan.model_dump_json())
    with pytest.raises(ValueError, match="unknown drafters"):
        read_plan(path)  # no folder for it
    plan.drafter_models["mlp:code"] = str(tmp_path)
    path.write_text(plan.model_dump_json())
    assert read_plan(path).drafters_used() == ["mlp:code"]
    plan.classes[0].drafter = plan.classes[1].drafter = "ngram:code"  # only learned drafters have their own
    plan.drafter_models["ngram:code"] = str(tmp_path)
    path.write_text(plan.model_dump_json())
    with pytest.raises(ValueError, match="unknown drafters"):
        read_plan(path)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_prompt_file(tmp_path_factory.mktemp("adapt") / "prompts.jsonl", 3, CHAT)


@pytest.fixture(scope="module")
def adapted(prompt_file):
    """Without cheap drafters every class starts at drafter none, so each class with enough prompts is distilled
    (the chat class has one prompt: skipped)."""
    out = prompt_file.parent / "adapt"
    argv = ["adapt", "--prompts", str(prompt_file), "--out", str(out), "--max-tokens", "12", "--k", "3"]
    argv += ["--drafters", "", "--classes", "2", "--epochs", "3", "--kv-cache-gib", "0.25"]
    assert main(argv) == 0
    return out


@pytest.mark.slow  # a profile, a distillation and a second profile of the real engine
def test_adapt_writes_both_plans_the_chart_and_the_summary(adapted):
    assert (adapted / "adapt.png").read_bytes().startswith(PNG)
    before = read_plan(adapted / "plan-before.json")
    assert [c.drafter for c in before.classes] == ["none", "none"]
    plan = read_plan(adapted / "plan.json")
    assert plan.classifier == before.classifier and plan.step_times == before.step_times
    code, chat = sorted(plan.classes, key=lambda c: -c.num_prompts)
    assert (code.num_prompts, chat.num_prompts) == (3, 1)
    learned = f"mlp:{code.name}"
    assert plan.drafter_models == {learned: str((adapted / "drafters" / f"{code.name}-mlp").resolve())}
    assert (adapted / "drafters" / f"{code.name}-mlp" / "report.json").is_file()
    assert set(plan.drafters[learned].by_class) == {code.name}  # measured on its own class's prompts
    # chosen where its measured acceptance pays for its cost at this machine's step times (which a busy machine
    # skews), else none: no cheap drafter was measured
    assert code.drafter in (learned, "none") and chat.drafter == "none"
    assert (code.drafter == learned) == (code.expected_speedup > 1) == (code.k > 0)
    summary = {c["name"]: c for c in json.loads((adapted / "adapt.json").read_text())["classes"]}
    assert summary[code.name]["distilled"] == learned and summary[code.name]["after"] == code.model_dump()
    if code.drafter == learned:
        assert summary[code.name]["survival_after"] == plan.drafters[learned].by_class[code.name].survival
    assert summary[chat.name]["distilled"] is None and "prompts" in summary[chat.name]["skipped"]


@pytest.mark.slow
def test_auto_with_the_adapted_plan_equals_plain_greedy(make_engine, adapted, prompt_file, tmp_path):
    """The adapted plan, and the same with a second per-class MLP (a copy of the first in its own folder) for the
    chat class: each request drafts with its class's drafter, and greedy output is plain decoding's."""
    from cli.prompts import load_prompts

    plan = read_plan(adapted / "plan.json")
    code, chat = sorted(plan.classes, key=lambda c: -c.num_prompts)
    second = tmp_path / "second"
    shutil.copytree(plan.drafter_models[f"mlp:{code.name}"], second)
    two = plan.model_copy(deep=True)
    two.drafter_models[f"mlp:{chat.name}"] = str(second)
    two.classes = [c.model_copy(update={"drafter": f"mlp:{c.name}", "k": 3}) for c in two.classes]
    (tmp_path / "two.json").write_text(two.model_dump_json())
    params = SamplingParams(max_tokens=12)
    want = None
    for plan_path in (adapted / "plan.json", tmp_path / "two.json"):
        auto = make_engine(speculator="auto", plan=str(plan_path), **ENGINE)
        ids = [
            encode_prompt(auto.tokenizer, auto.arch.vocab_size, s.prompt, s.messages) for s in load_prompts(prompt_file)
        ]
        routes = [auto.router.route(i) for i in ids]
        got = auto.generate(ids, params)
        assert auto.proposer.owner == {}
        want = want or make_engine(**ENGINE).generate(ids, params)
        assert [o.output_token_ids for o in got] == [o.output_token_ids for o in want]
        for route, out in zip(routes, got):
            assert (out.metrics.spec.drafted > 0) == (route.drafter != "none")
    assert sorted(auto.proposer.proposers) == sorted({f"mlp:{code.name}", f"mlp:{chat.name}"})
    assert {r.drafter for r in routes} == {f"mlp:{code.name}", f"mlp:{chat.name}"}
