"""A request's token sequence and its progress through the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from sampling.logprobs import TokenLogprob
from sampling.params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """`token_ids` = prompt + output; KV is valid for token_ids[:num_computed]."""

    seq_id: int
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival: float
    first_scheduled: float | None = None  # when the scheduler first admitted it (its queue time ends there)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    spec_k: int = 0  # draft tokens wanted at the next decode step (set by the speculation controller)
    finish_reason: str | None = None
    num_preemptions: int = 0
    num_failed_steps: int = 0  # failed engine steps it took part in since it last sampled a token
    # With params.logprobs: one per output token. With params.prompt_logprobs: one per prompt token after the
    # first (the first has no context to be scored in), filled chunk by chunk during the prefill.
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_pending_forks: int = 0  # sibling sequences (n > 1) to fork from its prompt's KV once prefilled
    cumulative_logprob: float = 0.0  # sum of its output tokens' logprobs (kept with logprobs asked or n > 1)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def wants_prompt_logits(self) -> bool:
        """Its prefill must score every prompt position (prompt_logprobs asked, no output yet): it gets no KV
        from the prefix cache, which would skip those positions."""
        return self.params.prompt_logprobs is not None and self.num_output_tokens == 0

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token lacks KV: the sequence can take speculative tokens this step."""
        return self.num_uncomputed == 1
