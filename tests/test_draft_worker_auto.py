"""`speculator: auto` with its learned drafter in a draft worker actor: the class's `mlp:code` drafter is a
RemoteDraftProposer, the adaptive loop installs a release in the actor between engine steps and it takes over, and
a killed actor costs drafts, never outputs; once it restarted the replica installs the release there again.

Real model and a real drafter (the class "code" retrained on the target's HumanEval answers, as in
test_adaptation.py), real local Ray; greedy outputs must equal plain greedy decoding throughout.
"""

from __future__ import annotations

import time

import pytest
import ray

from deployments.adaptation_agent import AdaptationAgent
from deployments.draft_worker import DraftWorkerClient, RemoteDraftProposer, start_draft_worker
from engine.llm_engine import LLMEngine
from model.config import EngineConfig
from sampling.params import SamplingParams
from speculator.adaptation import AdaptationConfig, read_files
from speculator.plan import ClassChoice
from tests.conftest import humaneval_prompts
from tests.test_adaptation import plan_path, released, traffic  # noqa: F401 - the retrained drafter's fixtures
from tests.test_draft_service import write_plan

CONFIG = {"kv_cache_gib": 0.25, "max_model_len": 1024}
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)
LOAD_S = 240.0  # bound on a draft actor (re)start on a busy 2-core machine
RAY_CPUS = 3  # for the local_ray fixture
pytestmark = pytest.mark.slow  # the drafter's retraining and an actor restart: minutes on 2 cores


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return humaneval_prompts(4)


@pytest.fixture(scope="module")
def plain(make_engine, prompts, released) -> list[list[int]]:  # noqa: F811
    engine = make_engine(**CONFIG)
    engine.reset_kv()  # retraining ran teacher-forced passes over the shared engine's pages
    return [o.output_token_ids for o in engine.generate(prompts, PARAMS)]


@pytest.fixture(scope="module")
def setup(local_ray, released, tmp_path_factory):  # noqa: F811
    """An auto engine whose class "code" drafts with the release as `mlp:code`, in a draft worker actor."""
    opt, release = released
    folder = str(opt.folder(release))
    plan = write_plan(
        tmp_path_factory.mktemp("plan") / "plan.json",
        [ClassChoice(name="code", drafter="mlp:code", k=3)],
        {"mlp:code": folder},
    )
    # The backoff, not auto's cost policy: on 2 cores four sequences in flight make drafting not pay after the
    # first steps, and these tests need drafting steps (to take over, to be cut by the kill).
    config = EngineConfig(speculator="auto", plan=plan, k_policy="backoff", **CONFIG)
    actor = start_draft_worker(config, ready_timeout_s=LOAD_S)
    client = DraftWorkerClient(actor, timeout_s=5.0, retry_interval_s=0.3, ready_timeout_s=LOAD_S)
    engine = LLMEngine(config, proposer=client.proposer_for(config))
    yield engine, client, read_files(opt.folder(release))
    ray.kill(actor, no_restart=True)


def run(engine: LLMEngine, prompts: list[str], at_step=None) -> list[list[int]]:
    """Greedy outputs of `prompts`; `at_step(n)` is called before each step."""
    ids = [engine.add_request(p, PARAMS) for p in prompts]
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    step = 0
    while engine.has_unfinished():
        if at_step is not None:
            at_step(step)
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
        step += 1
    return [outputs[i] for i in ids]


def drafted(engine: LLMEngine, version: str | None = None) -> tuple[int, int]:
    """(drafted, accepted) of the `mlp:code` drafter (of one version, or all)."""
    snapshot = engine.spec_snapshot()
    rows = [s.total for k, s in snapshot.items() if k.drafter == "mlp:code" and version in (None, k.version)]
    return sum(t.drafted for t in rows), sum(t.accepted for t in rows)


def test_the_plans_learned_drafter_drafts_in_the_actor(setup, prompts, plain):
    engine, client, _ = setup
    remote = engine.proposer.proposers["mlp:code"]
    assert isinstance(remote, RemoteDraftProposer) and remote.name == "mlp:code" and remote.max_k == 3
    assert run(engine, prompts) == plain
    sent, accepted = drafted(engine)
    assert sent > 0 and accepted > 0  # the drafts came from the actor and were used
    assert remote.calls > 0 and remote.fallback_steps == 0 and remote.failures == 0


def test_a_release_installed_mid_run_takes_over(setup, prompts, plain):
    engine, client, files = setup
    agent = AdaptationAgent(engine, engine.config, AdaptationConfig(enabled=True), lambda: None, draft_worker=client)

    def install(step: int) -> None:
        if step == 3:  # every request prefilled, a few tokens out
            agent._install("code", 2, files, 1.5)

    assert run(engine, prompts, install) == plain
    assert agent.installed == {"code": 2} and client.installed["mlp:code"][1] == "2"
    assert engine.proposer.proposers["mlp:code"] is client.remotes["mlp:code"]
    sent, accepted = drafted(engine, "2")
    assert sent > 0 and accepted > 0
    assert ray.get(client.actor.__ray_call__.remote(lambda service: service.versions)) == {"mlp:code": "2"}


def test_a_killed_actor_costs_drafts_not_outputs_and_gets_the_release_again(setup, prompts, plain):
    engine, client, _ = setup
    if "mlp:code" not in client.installed:
        pytest.skip("needs the release installed by the previous test")
    remote = client.remotes["mlp:code"]
    old = ray.get(client.actor.ping.remote())

    def kill(step: int) -> None:
        if step == 3:
            ray.kill(client.actor, no_restart=False)

    assert run(engine, prompts, kill) == plain
    assert remote.failures > 0 and remote.fallback_steps > 0
    # Keep serving until the restarted actor is taken back and the release, installed there again, drafts.
    mark: list[int] = []  # accepted tokens of release 2 when its files went to the new process

    def watch(step: int) -> None:
        if client.reinstalls and not mark:
            mark.append(drafted(engine, "2")[1])

    t0 = time.monotonic()
    while time.monotonic() - t0 < LOAD_S and not (mark and drafted(engine, "2")[1] > mark[0]):
        assert run(engine, prompts, watch) == plain
        time.sleep(0.3)  # leave the 2 cores some room for the actor's restart
    assert client.reinstalls >= 1 and remote.recoveries >= 1, f"not taken back within {LOAD_S:.0f}s"
    assert drafted(engine, "2")[1] > mark[0], "the installed drafter did not draft again after the restart"
    assert ray.get(client.actor.ping.remote()) != old
    assert ray.get(client.actor.__ray_call__.remote(lambda service: service.versions)) == {"mlp:code": "2"}
