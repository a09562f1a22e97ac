"""Turn logits into the distribution a request samples from (temperature, top-k, top-p).

Any parameters that validation allows give a proper distribution: each row is shifted so that its largest
logit is 0 before the division by the temperature (so nothing can overflow: the other entries only become
very negative or -inf, whose exp is 0), the top token survives every cut, and the softmax of a row holding a
0 never divides by zero. Greedy params give the argmax's point mass, the temperature -> 0 limit.
"""

from __future__ import annotations

import torch

from sampling.params import SamplingParams

_U64 = 1 << 64


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[N, V] logits -> [N, V] float32 probabilities after temperature, top-k and top-p.

    NaN logits carry no probability and +inf counts as the largest float; a row without any finite logit has no
    distribution at all and raises ValueError (the engine then ends that request only)."""
    x = logits.float()
    x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max, neginf=float("-inf"))
    top = x.amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(top).all()):
        raise ValueError("the logits hold no finite value")
    if params.greedy:
        return torch.zeros_like(x).scatter_(-1, x.argmax(dim=-1, keepdim=True), 1.0)
    x = (x - top) / params.temperature  # <= 0, exactly 0 at the top token
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the tokens strictly before it already reach top_p. The top token always stays,
        # also when top_p is below float32's resolution (1e-320 compares as 0).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        drop[..., 0] = False
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return torch.softmax(x, dim=-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator: seeded requests repeat exactly, whatever else shares the batch.

    Any integer is a seed: it is taken modulo 2^64, which is how torch itself reads a negative seed (-1 is
    2^64 - 1), so every int64 that OpenAI's API allows works, and the draft proposer's `seed + 1` too. (The CPU
    generator uses the seed's low 32 bits only.)"""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % _U64)
    return g


def token_logprobs(logits: torch.Tensor, tokens: list[int]) -> list[float]:
    """Each token's log-probability under its row's log-softmax (row i produced tokens[i]): the target's own
    distribution, before temperature / top-k / top-p, which `best_of` ranks sequences by."""
    rows = logits[: len(tokens)].float()
    index = torch.tensor(tokens, device=rows.device).unsqueeze(-1)
    return torch.log_softmax(rows, dim=-1).gather(-1, index).squeeze(-1).tolist()
