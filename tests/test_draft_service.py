"""The draft worker's logic without Ray: under `speculator: auto` it hosts the plan's model-backed drafters by name
(lookups stay in the replica), installs a released drafter from its files, and keeps a token mirror per (drafter,
sequence), so a sequence moved between drafters drafts from its own tokens, never from another drafter's mirror.

Two learned drafters with different weights (untrained, seeded: what is checked is that each request reaches the
drafter it names with the right tokens, compared with the same drafters run in-process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deployments.draft_worker import DraftService
from model.config import EngineConfig
from sampling.params import SamplingParams
from speculator.adaptation import read_files
from speculator.cost_model import StepTimes
from speculator.mlp_checkpoint import save_speculator
from speculator.mlp_proposer import MLPProposer
from speculator.mlp_speculator import MLPSpeculator, MLPSpeculatorConfig
from speculator.plan import ClassChoice, build_plan
from speculator.proposer import DraftRequest
from speculator.workload_class import ClassRule, rules_spec
from tests.conftest import humaneval_prompts

CONFIG = {"kv_cache_gib": 0.25, "max_model_len": 1024}
GREEDY = SamplingParams(max_tokens=8)


def write_plan(path: Path, choices: list[ClassChoice], drafter_models: dict[str, str]) -> str:
    """A plan classifying prompts with "def " as "code", with the given drafter per class."""
    plan = build_plan(rules_spec([ClassRule(name="code", regex="def ")]), StepTimes((1, 2), (0.01, 0.0101)), {}, 4)
    plan = plan.model_copy(update={"classes": choices, "drafter_models": drafter_models})
    path.write_text(plan.model_dump_json())
    return str(path)


def mlp_folder(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = MLPSpeculatorConfig(emb_dim=576, inner_dim=64, vocab_size=49152, n_predict=3)
    save_speculator(MLPSpeculator(config).eval(), folder)
    return folder


@pytest.fixture(scope="module")
def drafters(tmp_path_factory) -> tuple[DraftService, Path, Path]:
    tmp = tmp_path_factory.mktemp("drafters")
    a, b = mlp_folder(tmp / "a", 0), mlp_folder(tmp / "b", 1)
    choices = [ClassChoice(name="code", drafter="mlp:code", k=3), ClassChoice(name="other", drafter="ngram", k=3)]
    plan = write_plan(tmp / "plan.json", choices, {"mlp:code": str(a)})
    return DraftService(EngineConfig(speculator="auto", plan=plan, **CONFIG)), a, b


def local(folder: Path) -> MLPProposer:
    return MLPProposer.load(folder, target_hidden_size=576, target_vocab_size=49152)


def wire(seq_id: int, tokens: list[int], base: int, hidden: torch.Tensor):
    """A sequence as RemoteDraftProposer sends it: in full (base 0) or the tokens after `base`."""
    if base == 0:
        return (seq_id, 0, tokens, 3, GREEDY, None, hidden)
    return (seq_id, base, tokens[base:], 3, None, None, hidden)


def test_two_named_drafters_with_their_own_mirrors(drafters, tokenizer):
    service, a, b = drafters
    assert list(service.proposers) == ["mlp:code"]  # the plan's n-gram lookups stay in the replica
    hidden_rows, max_k, incarnation = service.install("mlp:b", read_files(b), "2")
    assert (hidden_rows, max_k, incarnation) == ("last", 3, service.ping())
    assert service.versions == {"mlp:b": "2"}
    want_a, want_b = local(a), local(b)

    tokens = tokenizer(humaneval_prompts(1)[0])["input_ids"]
    torch.manual_seed(5)
    h = [torch.randn(1, 576) for _ in range(4)]

    def expect(proposer: MLPProposer, n: int, hidden: torch.Tensor) -> list[int]:
        return proposer.propose([DraftRequest(7, tokens[:n], 3, GREEDY, hidden)])[0].tokens

    def drafts(name: str, n: int, base: int, hidden: torch.Tensor) -> list[int]:
        out, missing = service.propose([wire(7, tokens[:n], base, hidden)], [], name)
        assert missing == []
        return out[0].tokens

    # Sequence 7 drafts with A, moves to B (sent in full there), grows, and comes back to A with a delta on
    # A's own mirror: each time the drafts are the in-process drafter's for the full token list.
    assert drafts("mlp:code", 10, 0, h[0]) == expect(want_a, 10, h[0])
    assert drafts("mlp:b", 12, 0, h[1]) == expect(want_b, 12, h[1])
    assert drafts("mlp:code", 14, 10, h[2]) == expect(want_a, 14, h[2])
    assert drafts("mlp:b", 15, 12, h[3]) == expect(want_b, 15, h[3])
    assert expect(want_a, 15, h[3]) != expect(want_b, 15, h[3])  # the two drafters really differ
    assert service.seqs[("mlp:code", 7)].tokens == tokens[:14] and service.seqs[("mlp:b", 7)].tokens == tokens[:15]

    # A release names its drafter: the other's mirror stays.
    service.release([("mlp:code", 7)])
    assert ("mlp:code", 7) not in service.seqs and ("mlp:b", 7) in service.seqs
    # A delta to a drafter with no mirror of the sequence: no draft, reported for a full resend.
    out, missing = service.propose([wire(7, tokens[:16], 14, h[0])], [], "mlp:code")
    assert [d.tokens for d in out] == [[]] and missing == [7]

    # Installing over a name drops that drafter's mirrors (its sequences start over with the new weights).
    service.install("mlp:b", read_files(a), "3")
    assert ("mlp:b", 7) not in service.seqs and service.versions["mlp:b"] == "3"
    assert drafts("mlp:b", 16, 0, h[1]) == expect(want_a, 16, h[1])


def test_a_restarted_or_unknown_drafter_is_refused(drafters):
    service, _, _ = drafters
    with pytest.raises(LookupError, match="restarted"):
        service.propose([], [], "mlp:code", incarnation="an-earlier-process")
    with pytest.raises(LookupError, match="mlp:gone"):
        service.propose([], [], "mlp:gone", incarnation=service.ping())
