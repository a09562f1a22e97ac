"""The pieces of training an EAGLE head on the target's records (EAGLE-1's recipe), which the loop of
`speculator.distill.distill` drives.

A training sequence is a window of a record: the target's features f_p at positions p and the tokens x_{p+1}
that followed. Teacher forced on the target's features, the head predicts f_{p+1} from pairs 0..p of the window;
the loss is smooth L1 against the target's f_{p+1} plus `token_weight` times the cross-entropy of the target's LM
head (cut to the draft vocabulary) on the prediction against x_{p+2}. Only rows from the record's output on count
(`DistillRecord.output_start`); prompt rows are context.

Held-out accuracy is that of the head's own drafting: step m (m >= 1) feeds the head's step m-1 prediction back in
(`EagleHead.window_forward`), exactly what a proposal computes after position p, so the chain acceptance by
position is what greedy verification would accept on those records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from speculator.distill_labels import chain_labels
from speculator.eagle import IGNORE, EagleHead


@dataclass
class Window:
    features: torch.Tensor  # [T, d] the target's features at the window's positions
    tokens: torch.Tensor  # [T, S] x_{p+1+m}, 0 past the record's end (never counted)
    labels: torch.Tensor  # [T, S] x_{p+2+m} (`chain_labels`), -1 past the end or on a row that does not count
    next_features: torch.Tensor  # [T, d] f_{p+1} (zeros where the record has none)
    has_next: torch.Tensor  # [T] bool: next_features is real and the row counts


def windows(records: list[Any], steps: int, size: int) -> list[Window]:
    """Every `DistillRecord` cut into windows of at most `size` pairs, labels for `steps` chained steps."""
    out = []
    for r in records:
        n, h0, rows = len(r.token_ids), r.hidden_start, r.hidden.shape[0]
        pairs = min(rows, n - 1 - h0)  # positions h0 .. h0+pairs-1 have a token after them
        if pairs <= 0:
            continue
        ids = torch.tensor(r.token_ids + [-1] * (steps + 1), dtype=torch.long)
        pos = torch.arange(pairs) + h0
        tokens = ids[pos[:, None] + 1 + torch.arange(steps)].clamp(min=0)
        counts = pos >= (r.output_start if r.output_start is not None else h0 + 1) - 1
        labels = torch.where(counts[:, None], chain_labels(r.token_ids, h0, pairs, steps, r.greedy_next), -1)
        feats = r.hidden[:pairs].float()
        nxt = torch.zeros_like(feats)
        has_next = torch.zeros(pairs, dtype=torch.bool)
        m = min(pairs, rows - 1)
        nxt[:m] = r.hidden[1 : m + 1].float()
        has_next[:m] = counts[:m]
        for a in range(0, pairs, size):
            b = slice(a, a + size)
            out.append(Window(feats[b], tokens[b], labels[b], nxt[b], has_next[b]))
    return out


def batch_windows(ws: list[Window], rows: int, order: list[int]) -> list[list[Window]]:
    """Windows grouped up to `rows` pairs per batch (a longer window alone), in `order`."""
    out, cur, n = [], [], 0
    for i in order:
        t = ws[i].features.shape[0]
        if cur and n + t > rows:
            out.append(cur)
            cur, n = [], 0
        cur.append(ws[i])
        n += t
    return out + ([cur] if cur else [])


def _pad(ws: list[Window]) -> Window:
    """Right-padded batch of windows; padded rows never count."""
    t = max(w.features.shape[0] for w in ws)

    def stack(name: str, fill) -> torch.Tensor:
        parts = []
        for w in ws:
            x = getattr(w, name)
            pad = x.new_full((t - x.shape[0], *x.shape[1:]), fill)
            parts.append(torch.cat([x, pad]))
        return torch.stack(parts)

    return Window(stack("features", 0), stack("tokens", 0), stack("labels", -1), stack("next_features", 0),
                  stack("has_next", False))  # fmt: skip


def eagle_loss(head: EagleHead, group: list[Window], token_weight: float) -> torch.Tensor:
    """Smooth L1 on the predicted features plus `token_weight` x the LM head's cross-entropy, teacher forced."""
    batch = _pad(group)
    pred = head.window_forward(batch.features, batch.tokens, steps=1)[0]
    rows = batch.has_next
    loss = F.smooth_l1_loss(pred[rows], batch.next_features[rows]) if rows.any() else pred.sum() * 0
    own = head.own_ids(batch.labels[..., 0])
    keep = own != IGNORE
    if keep.any():
        loss = loss + token_weight * F.cross_entropy(head.token_logits(pred[keep]), own[keep])
    return loss


def eagle_evaluate(head: EagleHead, ws: list[Window], steps: int, rows: int) -> dict:
    """Held-out accuracy of the head's own chained drafting by position, and chain acceptance."""
    correct, chain, count = torch.zeros(steps), torch.zeros(steps), torch.zeros(steps)
    head.eval()
    with torch.no_grad():
        for group in batch_windows(ws, rows * 4, list(range(len(ws)))):
            batch = _pad(group)
            outs = head.window_forward(batch.features, batch.tokens, steps=steps)
            valid = batch.labels >= 0  # [B, T, S]
            own = head.own_ids(batch.labels)
            right = torch.stack([head.token_logits(o).argmax(-1) for o in outs], dim=-1) == own
            right &= valid & (own != IGNORE)
            correct += right.sum((0, 1))
            chain += right.cumprod(dim=-1).sum((0, 1))
            count += valid.sum((0, 1))
    head.train()
    acc = (correct / count.clamp(min=1)).tolist()
    return {
        "accuracy_by_position": acc,
        "chain_acceptance_by_position": (chain / count.clamp(min=1)).tolist(),
    }


def eagle_unigram(train: list[Window], held: list[Window], steps: int) -> list[float]:
    """Held-out accuracy by position of always guessing the most frequent training label."""
    labels = torch.cat([w.labels[:, 0] for w in train])
    top = int(torch.bincount(labels[labels >= 0]).argmax())
    out = []
    for m in range(steps):
        col = torch.cat([w.labels[:, m] for w in held])
        valid = col >= 0
        out.append(float((col[valid] == top).float().mean()) if valid.any() else 0.0)
    return out


def counted_rows(ws: list[Window]) -> int:
    """Rows with a first-step label: the samples trained on or evaluated."""
    return sum(int((w.labels[:, 0] >= 0).sum()) for w in ws)
