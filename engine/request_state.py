"""The engine's values per request: the output it streams each step, and the state it keeps per sequence."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine import hidden_rows
from engine.detokenizer import IncrementalDetokenizer
from engine.metrics import RequestMetrics
from engine.sequence import Sequence
from engine.spec_monitor import SpecTrack
from sampling.controls import LogitsControls
from sampling.grammar import GrammarState
from sampling.logprobs import TokenLogprob
from speculator.backoff import KController
from speculator.k_policy import CostKController


def seq_key(request_id: str, index: int) -> str:
    """The engine's key of a request's sequence `index` (the first is the request id itself)."""
    return request_id if index == 0 else f"{request_id}#{index}"


@dataclass
class RequestOutput:
    """One step's news of one sequence of a request: its new tokens and text, and how it ended."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    delta: str  # text that became visible in this step
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop", "length", or "error" (then `error` says why, in one line)
    metrics: RequestMetrics
    error: str | None = None
    error_param: str | None = None  # with `error`: the request field at fault (the request's failure, not the engine's)
    # With params.logprobs: one per token of new_token_ids. With params.prompt_logprobs: one per prompt token
    # after the first, in the request's first output only.
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    index: int = 0  # which of the request's n sequences (choices) this is
    all_finished: bool = False  # every sequence of the request has finished (this one included)
    cumulative_logprob: float = 0.0  # of this sequence's output tokens under the target (for best_of)


@dataclass
class RequestState:
    """What the engine keeps of one sequence of a request while it runs."""

    seq: Sequence
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    controller: KController | CostKController | None
    metrics: RequestMetrics
    hidden: hidden_rows.PendingHidden | None = None  # for a proposer that reads the target's hidden rows
    controls: LogitsControls | None = None  # min_tokens, logit_bias, penalties (None: the request has none)
    grammar: GrammarState | None = None  # structured output: the grammar's token masks (sampling/grammar.py)
    prompt_logprobs_sent: bool = False
    group: str = ""  # the caller's request id (its n sequences share it)
    index: int = 0
    pending: list[RequestState] = field(default_factory=list)  # siblings forked once this one's prompt is prefilled
    drafter: str | None = None  # speculator auto: its workload class's drafter ("none": it never drafts)
    workload_class: str | None = None  # speculator auto: its class (None: no classifier)
    spec_track: SpecTrack | None = None  # where its verification steps are counted (engine/spec_monitor.py)
