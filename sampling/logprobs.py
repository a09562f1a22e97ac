"""Log-probabilities of chosen tokens and each position's most likely ones, as OpenAI's API reports them.

The values are the model's own distribution: log-softmax over the raw logits of the row that produced the
token (before logit bias, penalties, temperature, top-k or top-p; vLLM's default "raw_logprobs"). So they do
not depend on how the token was chosen, and with speculation they come from the verification forward's row of
each emitted token, which scores the same context as plain decoding would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # most likely tokens reported per position (OpenAI's chat limit; completions allow 5)


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the chosen token's log-probability and the `k` most likely tokens, most likely first.
    The chosen token is reported whether it is among them or not."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprob]:
    """Row i of `logits` [N, V] scores `token_ids[i]` (N >= len(token_ids)); `k` most likely tokens per row."""
    n = len(token_ids)
    if n == 0:
        return []
    rows = torch.log_softmax(logits[:n].float(), dim=-1)
    rows = torch.nan_to_num(rows, nan=float("-inf"), neginf=float("-inf"))
    chosen = rows.gather(-1, torch.tensor(token_ids, device=rows.device).unsqueeze(-1)).squeeze(-1).tolist()
    if k <= 0:
        return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
    values, ids = torch.topk(rows, min(k, rows.shape[-1]), dim=-1, sorted=True)
    values, ids = values.tolist(), ids.tolist()
    return [
        TokenLogprob(t, lp, tuple(zip(row_ids, row_values)))
        for t, lp, row_ids, row_values in zip(token_ids, chosen, ids, values)
    ]
