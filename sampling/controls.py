"""The logits controls of a request: min_tokens, logit_bias and the presence / frequency / repetition penalties.

They act on the raw logits before temperature / top-k / top-p, in vLLM's order and with its rules: first
`min_tokens` masks EOS (unless `ignore_eos`) and `stop_token_ids` while fewer output tokens exist, then
`logit_bias` is added, then the repetition penalty divides the positive logits and multiplies the negative
ones of every token seen in the prompt or the output, and finally the frequency penalty (times the token's
count in the output) and the presence penalty (once per token in the output) are subtracted.

Under speculation one forward scores a whole draft: row i scores the token after the context plus draft
tokens 0..i-1, so row i's counts (and its output length for min_tokens) include those drafted tokens. With
that, the processed rows are exactly what one-token-at-a-time decoding would see for the same tokens, which
keeps verification lossless (greedy takes the argmax of processed rows; sampling verifies against the
processed distribution). A sampling drafter processes its own logits by the same rule so its q stays close.
All rows of a sequence are processed at once (counts as a cumulative sum over the drafted tokens).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from sampling.params import SamplingParams


@dataclass(frozen=True)
class LogitsControls:
    """What a request's logits processing needs: its params, where its output starts, and the ids min_tokens
    masks. Built once per request (`for_request`); None there means the request has no controls."""

    params: SamplingParams
    num_prompt_tokens: int
    min_tokens_ids: tuple[int, ...]  # EOS (unless ignore_eos) and stop_token_ids

    @classmethod
    def for_request(
        cls, params: SamplingParams, num_prompt_tokens: int, eos_token_ids: Collection[int]
    ) -> LogitsControls | None:
        if not params.has_logits_controls:
            return None
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        return cls(params, num_prompt_tokens, tuple(sorted(stop)))

    def apply(self, logits: torch.Tensor, token_ids: Sequence[int], draft: Sequence[int] = ()) -> torch.Tensor:
        """[N, V] logits -> processed float32 logits (a new tensor). Row i scores the token after `token_ids`
        (prompt + output so far) + `draft[:i]`; N may be at most len(draft) + 1."""
        p = self.params
        x = logits.float().clone()
        n, vocab = x.shape
        if n > len(draft) + 1:
            raise ValueError(f"{n} rows need at least {n - 1} draft tokens, got {len(draft)}")
        device = x.device
        num_output = len(token_ids) - self.num_prompt_tokens
        if p.min_tokens > num_output and self.min_tokens_ids:
            rows = min(n, p.min_tokens - num_output)  # rows scoring output tokens before min_tokens
            x[:rows, torch.tensor(self.min_tokens_ids, device=device)] = float("-inf")
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=device)
            x[:, ids] += torch.tensor(list(p.logit_bias.values()), device=device)
        if not (p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0):
            return x
        output = torch.tensor(token_ids[self.num_prompt_tokens :], dtype=torch.long, device=device)
        counts = torch.bincount(output, minlength=vocab).float().expand(n, vocab)
        if n > 1:  # row i also counts draft[:i]
            drafted = torch.zeros(n, vocab, device=device)
            drafted[torch.arange(1, n, device=device), torch.tensor(draft[: n - 1], device=device)] = 1.0
            counts = counts + drafted.cumsum(0)
        if p.repetition_penalty != 1.0:
            prompt = torch.tensor(token_ids[: self.num_prompt_tokens], dtype=torch.long, device=device)
            seen = (torch.bincount(prompt, minlength=vocab) > 0) | (counts > 0)
            scaled = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            x = torch.where(seen, scaled, x)
        if p.frequency_penalty:
            x = x - p.frequency_penalty * counts
        if p.presence_penalty:
            x = x - p.presence_penalty * (counts > 0).float()
        return x
