"""Lossless verification of speculative drafts.

A drafter proposes k tokens x_0..x_{k-1}; one target forward pass scores the k+1 positions and gives
the target's (processed: temperature / top-k / top-p already applied) distributions p_0..p_k.

Sampled verification is speculative rejection sampling (Leviathan et al. 2022, Chen et al. 2023).
At position j the draft token x ~ q_j is accepted with probability min(1, p_j(x) / q_j(x)); on
rejection a token is drawn from the residual r_j = normalize(max(p_j - q_j, 0)) and verification
stops; if all k are accepted a bonus token is drawn from p_k. This is lossless: the emitted token at
position j is distributed exactly as p_j, because

    P(emit y) = q(y) min(1, p(y)/q(y)) + (1 - sum_x min(p(x), q(x))) r(y)
              = min(p(y), q(y)) + max(p(y) - q(y), 0) = p(y),

using sum_y max(p(y) - q(y), 0) = 1 - sum_x min(p(x), q(x)). By induction over positions (each
position is reached only after accepting a token that is itself distributed as the target's), the
whole emitted sequence is distributed as if sampled from the target one token at a time; the draft
only changes how many tokens one target pass yields. A deterministic drafter (n-gram lookup) is the
point mass q = delta_x: accept with probability p(x), otherwise sample p with x zeroed and renormalised.

Greedy verification is the temperature -> 0 limit: p_j becomes the point mass on argmax p_j, so a
draft token is accepted iff it equals the target's argmax, and the first mismatch is replaced by it.

Inputs need not be clean: entries of p or q that are NaN, infinite or negative carry no probability. A draft
position whose q row has no mass, or gives its own token q(x) = 0 (so the drafter could not have drawn it),
ends the draft there: the token at that position is drawn from p itself, which keeps the output exact for any
drafter. A target row with no mass has no distribution to sample and raises ValueError.

All randomness is drawn from the caller's ``torch.Generator``, so seeded runs repeat exactly.
"""

from __future__ import annotations

import torch

__all__ = ["sample", "verify_greedy", "verify_sampled"]


def _mass(p: torch.Tensor) -> torch.Tensor:
    """``p`` with every entry that is not a finite non-negative number set to 0."""
    return torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)


def sample(p: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from the (not necessarily normalised) distribution ``p`` of shape [V]."""
    p = _mass(p)
    total = float(p.sum())
    if total == float("inf"):  # finite entries whose sum overflows: rescale
        p = p / p.max()
    elif not total > 0:
        raise ValueError("the distribution to sample from has no probability mass")
    return int(torch.multinomial(p, 1, generator=generator).item())


def verify_greedy(target_argmax: list[int], draft: list[int]) -> list[int]:
    """Return the accepted prefix of ``draft`` plus the target's token at the first mismatch.

    ``target_argmax`` has ``len(draft) + 1`` entries; when every draft token matches, the last entry
    is the bonus token. The result therefore has between 1 and ``len(draft) + 1`` tokens.
    """
    if len(target_argmax) != len(draft) + 1:
        raise ValueError(f"need len(draft)+1={len(draft) + 1} target tokens, got {len(target_argmax)}")
    n = 0
    while n < len(draft) and draft[n] == target_argmax[n]:
        n += 1
    # Accepted draft tokens equal the target's, so the output is just a prefix of target_argmax.
    return list(target_argmax[: n + 1])


def verify_sampled(
    p: torch.Tensor,
    draft: list[int],
    q: torch.Tensor | None,
    generator: torch.Generator | None,
) -> list[int]:
    """Speculative rejection sampling of ``draft`` against the target probabilities ``p``.

    Args:
        p: [k+1, V] target probabilities (after temperature / top-k / top-p) at the k+1 positions.
        draft: the k proposed token ids.
        q: [k, V] draft probabilities for the same positions, or None for a point-mass
            (deterministic) draft such as n-gram lookup.
        generator: source of all randomness (on p's device); None uses torch's global RNG.

    Returns:
        The emitted tokens: the accepted draft prefix followed by one token sampled from the residual
        at the first rejection, or from ``p[k]`` (the bonus) when all k are accepted.
    """
    k = len(draft)
    if p.dim() != 2 or p.shape[0] != k + 1:
        raise ValueError(f"p must be [k+1={k + 1}, V], got {tuple(p.shape)}")
    if q is not None and (q.dim() != 2 or q.shape[0] != k or q.shape[1] != p.shape[1]):
        raise ValueError(f"q must be [k={k}, V={p.shape[1]}], got {tuple(q.shape)}")
    if k == 0:
        return [sample(p[0], generator)]

    p = _mass(p)
    x = torch.tensor(draft, dtype=torch.long, device=p.device)
    rows = torch.arange(k, device=p.device)
    ratio = p[rows, x].double()
    if q is not None:
        q = _mass(q).double()
        q = q / q.sum(-1, keepdim=True)  # a row without mass becomes NaN: it is cut off below
        qx = q[rows, x]
        usable = (qx > 0) & torch.isfinite(qx)
        if not bool(usable.all()):  # the draft ends at its first position that q cannot explain
            k = int(usable.long().argmin())
            if k == 0:
                return [sample(p[0], generator)]
            draft, x, rows, q, qx = draft[:k], x[:k], rows[:k], q[:k], qx[:k]
        ratio = ratio[:k] / qx
    u = torch.rand(k, generator=generator, dtype=torch.float64, device=p.device)
    # Strict "<": with u ~ U[0, 1), P(u < r) = min(r, 1), and a token with p(x) = 0 is never accepted.
    accepted = (u < ratio).tolist()
    if all(accepted):
        return list(draft) + [sample(p[k], generator)]

    j = accepted.index(False)
    if q is None:
        residual = p[j].clone()
        residual[draft[j]] = 0
    else:
        residual = (p[j].double() - q[j]).clamp_min(0)
    if not residual.sum().item() > 0:  # only reachable through float error: p[j] <= q[j] everywhere
        residual = p[j]
    return list(draft[:j]) + [sample(residual, generator)]
