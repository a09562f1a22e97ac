"""Distilling a learned drafter from the target's own behaviour: the training core.

Input is what the target did: its token sequences and its final hidden states along them (`DistillRecord`). As in
IBM's recipe, the sample at position t is (hidden state at t, token t+1) and stage i learns token t+2+i, teacher
forced (stage i reads the true token t+1+i); where the records carry the target's argmax at each position, stage i
learns the target's greedy choice instead (`speculator.distill_labels`), so sampled outputs teach what greedy
verification accepts. Every tenth record is held out; the held-out top-1 accuracy by stage
is what the report and the progress bar show. With greedy target outputs, "stages 0..i all right" on held-out
data is exactly the acceptance a greedy chain of i+1 drafts gets there, so it is reported too.

The function is plain (no engine, no files) so the command line and a retraining loop on logged traffic share it.
An EAGLE head (`kind="eagle"`) trains on the same records in `speculator.eagle_distill`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from model.loader import ModelArch
from speculator.distill_labels import chain_labels
from speculator.draft_vocab import DraftVocab
from speculator.eagle import EagleHead, TargetParts, new_head
from speculator.eagle_distill import batch_windows, counted_rows, eagle_evaluate, eagle_loss, eagle_unigram
from speculator.eagle_distill import windows as eagle_windows
from speculator.mlp_speculator import MLPSpeculator, MLPSpeculatorConfig

IGNORE = -100


@dataclass
class DistillRecord:
    """One target sequence: `token_ids` (prompt + output) and the final hidden states [n, hidden_size] at
    positions hidden_start .. hidden_start + n - 1."""

    token_ids: list[int]
    hidden: torch.Tensor
    hidden_start: int
    # first output position (eagle: rows before it are attention context, not trained on); None = hidden_start + 1
    output_start: int | None = None
    prompt: int | None = None  # records of one prompt (its greedy and sampled outputs) are held out together
    sampled: bool = False  # an output sampled at a temperature: trained on, never a held-out figure
    # [n] the target's argmax after each hidden row's position: the labels (`speculator.distill_labels`); None =
    # the record's own tokens
    greedy_next: torch.Tensor | None = None


class DistillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_predict: int = Field(default=3, ge=1, le=8)
    inner_dim: int = Field(default=0, ge=0, description="0 = the target's hidden size")
    draft_vocab: int = Field(default=8192, ge=0, description="K most frequent target tokens; 0 = full vocabulary")
    tie_weights: bool = True
    scale_input: bool = True
    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=256, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    holdout_every: int = Field(default=10, ge=2, description="one record in N is held out (see `holdout`)")
    seed: int = 0
    window: int = Field(default=512, ge=8, description="eagle: pairs per training sequence")
    token_weight: float = Field(default=0.1, ge=0, description="eagle: LM-head cross-entropy weight")
    samples: int = Field(default=1, ge=1, description="outputs per prompt: the greedy one and samples - 1 sampled")
    sample_temperature: float = Field(default=0.8, gt=0)


@dataclass
class DistillMetrics:
    accuracy_by_position: list[float]  # held-out teacher-forced top-1, stage i predicting t+2+i
    chain_acceptance_by_position: list[float]  # held-out: stages 0..i all right
    expected_tokens_per_step: float  # 1 + sum of cumulative products of accuracy_by_position
    unigram_accuracy_by_position: list[float]  # always guessing the most frequent training token
    train_samples: int
    heldout_samples: int
    train_time_s: float
    final_loss: float
    history: list[dict] = field(default_factory=list)  # held-out metrics after each epoch
    best_epoch: int = 0  # the epoch whose weights are kept (highest held-out expected tokens per step)


@dataclass
class DistillResult:
    model: MLPSpeculator | EagleHead
    metrics: DistillMetrics


@dataclass
class _Samples:
    hidden: torch.Tensor  # [S, d] float32
    inputs: torch.Tensor  # [S, n] the record's tokens t+1 .. t+n (stage i reads t+1+i), -1 past the end
    labels: torch.Tensor  # [S, n] what stage i learns after t (`chain_labels`), -1 where nothing

    def __len__(self) -> int:
        return self.hidden.shape[0]


def _samples(records: list[DistillRecord], n: int) -> _Samples:
    hidden, inputs, labels = [], [], []
    for r in records:
        tokens = torch.tensor(r.token_ids + [-1] * (n + 1), dtype=torch.long)
        rows = min(r.hidden.shape[0], len(r.token_ids) - 1 - r.hidden_start)  # token t+1 exists
        if rows <= 0:
            continue
        lab = chain_labels(r.token_ids, r.hidden_start, rows, n, r.greedy_next)
        keep = lab[:, 0] >= 0  # stage 0 has a label
        starts = torch.arange(rows) + r.hidden_start + 1
        inputs.append(tokens[starts[:, None] + torch.arange(n)][keep])
        labels.append(lab[keep])
        hidden.append(r.hidden[:rows][keep].float())
    if not hidden:
        return _Samples(torch.empty(0, 0), *(torch.empty(0, n, dtype=torch.long),) * 2)
    return _Samples(torch.cat(hidden), torch.cat(inputs), torch.cat(labels))


def _inputs_and_labels(data: _Samples, idx, model: MLPSpeculator) -> tuple[torch.Tensor, torch.Tensor]:
    """Own-vocabulary inputs [B, n] and labels [B, n] (IGNORE where none) of the samples at `idx`."""
    inputs = model.own_ids(data.inputs[idx].clamp(min=0))
    labels = data.labels[idx]
    return inputs, torch.where(labels < 0, IGNORE, model.own_ids(labels.clamp(min=0)))


def _evaluate(model: MLPSpeculator, data: _Samples, batch_size: int) -> dict:
    """Held-out loss, accuracy by stage and chain acceptance by stage."""
    n = model.n_predict
    other = model.draft_vocab.other if model.draft_vocab is not None else -1
    correct, chain, count, loss_sum = torch.zeros(n), torch.zeros(n), torch.zeros(n), 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data), batch_size * 4):
            inputs, labels = _inputs_and_labels(data, slice(i, i + batch_size * 4), model)
            logits = model(data.hidden[i : i + batch_size * 4], inputs)  # [n, B, V]
            loss_sum += _loss(logits, labels).item() * labels.shape[0]
            valid = labels != IGNORE
            right = (logits.argmax(-1).T == labels) & valid & (labels != other)
            correct += right.sum(0)
            chain += right.cumprod(dim=1).sum(0)
            count += valid.sum(0)
    model.train()
    acc = (correct / count.clamp(min=1)).tolist()
    return {
        "loss": loss_sum / max(len(data), 1),
        "accuracy_by_position": acc,
        "chain_acceptance_by_position": (chain / count.clamp(min=1)).tolist(),
        "expected_tokens_per_step": expected_tokens_per_step(acc),
    }


def expected_tokens_per_step(accuracy_by_position: list[float]) -> float:
    """1 + sum over i of the product of the first i+1 accuracies (a chain's expected accepted drafts + bonus)."""
    total, survive = 1.0, 1.0
    for a in accuracy_by_position:
        survive *= a
        total += survive
    return total


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over stages of each stage's mean cross-entropy (IBM weighs the stages equally)."""
    return sum(
        F.cross_entropy(logits[i].float(), labels[:, i], ignore_index=IGNORE)
        for i in range(logits.shape[0])
        if (labels[:, i] != IGNORE).any()
    )


def _unigram_accuracy(train: _Samples, held: _Samples, n: int) -> list[float]:
    labels = train.labels[:, 0]
    top = int(torch.bincount(labels[labels >= 0]).argmax())
    out = []
    for i in range(n):
        col = held.labels[:, i]
        valid = col >= 0
        out.append(float((col[valid] == top).float().mean()) if valid.any() else 0.0)
    return out


def lr_schedule(total: int):
    """The learning-rate factor by step: linear warm-up over 5%, then cosine down to 10%."""
    warmup = max(1, total // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return lr_at


def holdout(n: int, every: int, seed: int = 0) -> set[int]:
    """The indices of the held-out slice of `n` sequences (prompts or logged traffic): `n // every` of them,
    picked pseudo-randomly (a fixed seed). Not every Nth: traffic that repeats with a period (the same questions
    asked each round, in order) would then put every copy of some questions in the held-out slice and none in
    training."""
    return set(random.Random(seed).sample(range(n), n // every))


def split_by_prompt(records: list[DistillRecord], every: int) -> tuple[list[DistillRecord], list[DistillRecord]]:
    """(train, held out): `holdout` over prompts, a prompt's records (its greedy and sampled outputs) all on one
    side, at least one prompt held out; held-out figures count greedy outputs only. A record without a prompt
    is a prompt of its own."""
    groups = [r.prompt if r.prompt is not None else -1 - i for i, r in enumerate(records)]
    names = list(dict.fromkeys(groups))  # in first-seen order
    held = {names[j] for j in holdout(len(names), every)}
    if not held and len(names) >= 2:
        held = {names[-1]}
    if not held:
        raise ValueError("distillation needs at least 2 prompts (one is held out)")
    train = [r for r, g in zip(records, groups) if g not in held]
    return train, [r for r, g in zip(records, groups) if g in held and not r.sampled]


def distill(
    records: list[DistillRecord],
    kind: Literal["mlp", "eagle"] = "mlp",
    *,
    target_vocab_size: int,
    options: DistillOptions | None = None,
    progress: bool = True,
    arch: ModelArch | None = None,
    target: TargetParts | None = None,
) -> DistillResult:
    """Train a drafter of `kind` on the target's records; returns it (eval mode, float32, CPU) with held-out
    metrics. An EAGLE head needs the target's `arch` and `target` parts (embedding, LM head, RoPE). Raises
    ValueError for an unknown kind, missing target parts, or too few records to hold some out."""
    if kind not in ("mlp", "eagle"):
        raise ValueError(f"unknown drafter kind {kind!r} (mlp or eagle)")
    if kind == "eagle" and (arch is None or target is None):
        raise ValueError("an eagle head needs the target's architecture and parts (arch, target)")
    opts = options or DistillOptions()
    n = opts.n_predict
    train_records, held_records = split_by_prompt(records, opts.holdout_every)
    if kind == "eagle":
        return _distill_eagle(train_records, held_records, arch, target, opts, progress)
    train, held = _samples(train_records, n), _samples(held_records, n)
    if not len(train) or not len(held):
        raise ValueError("too few generated tokens to train on and to hold out")
    torch.manual_seed(opts.seed)
    vocab = None
    if opts.draft_vocab:
        train_targets = train.labels[:, 0]
        vocab = DraftVocab.most_frequent(train_targets[train_targets >= 0], opts.draft_vocab, target_vocab_size)
    config = MLPSpeculatorConfig(
        emb_dim=train.hidden.shape[1],
        inner_dim=opts.inner_dim,
        vocab_size=vocab.num_rows if vocab else target_vocab_size,
        n_predict=n,
        tie_weights=opts.tie_weights and n > 1,
        scale_input=opts.scale_input,
    )
    model = MLPSpeculator(config, vocab).train()
    steps_per_epoch = math.ceil(len(train) / opts.batch_size)
    plan = []
    for _ in range(opts.epochs):
        order = torch.randperm(len(train))
        plan.append([order[s * opts.batch_size : (s + 1) * opts.batch_size] for s in range(steps_per_epoch)])

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        inputs, labels = _inputs_and_labels(train, idx, model)
        return _loss(model(train.hidden[idx], inputs), labels)

    trained = _train(model, plan, step_loss, lambda: _evaluate(model, held, opts.batch_size), opts, kind, progress)
    metrics = _metrics(trained, _unigram_accuracy(train, held, n), len(train), len(held))
    return DistillResult(model.eval(), metrics)


@dataclass
class _Trained:
    history: list[dict]  # held-out metrics after each epoch
    best: int  # the index in `history` of the epoch whose weights were kept
    final_loss: float  # the training loss EMA at the end
    seconds: float


def _train(
    model: torch.nn.Module,
    plan: list[list],
    step_loss: Callable[[object], torch.Tensor],
    evaluate: Callable[[], dict],
    opts: DistillOptions,
    kind: str,
    progress: bool,
) -> _Trained:
    """The optimisation loop of every kind: AdamW, clipped gradients, `lr_schedule`, a held-out evaluation after
    each epoch of `plan` (per epoch, the batches `step_loss` takes). A small drafter learns its training answers by
    heart long before the last epoch, so the weights of the epoch with the most held-out expected tokens per step
    are the ones kept (the first such epoch on a tie)."""
    total = sum(len(batches) for batches in plan)
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.95), weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_schedule(total))
    history: list[dict] = []
    best, best_state = 0, None
    start, ema = time.perf_counter(), None
    bar = tqdm(total=total, desc=f"distill {kind}", unit="step", disable=not progress)
    for epoch, batches in enumerate(plan):
        for s, batch in enumerate(batches):
            loss = step_loss(batch)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            bar.update(1)
            if s % 20 == 0:
                bar.set_postfix(loss=f"{ema:.3f}", **_acc_postfix(history))
        history.append(evaluate() | {"epoch": epoch + 1, "train_loss": ema})
        bar.set_postfix(loss=f"{ema:.3f}", **_acc_postfix(history))
        if best_state is None or history[-1]["expected_tokens_per_step"] > history[best]["expected_tokens_per_step"]:
            best = epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return _Trained(history, best, float(ema or 0.0), time.perf_counter() - start)


def _distill_eagle(
    train_records: list[DistillRecord],
    held_records: list[DistillRecord],
    arch: ModelArch,
    target: TargetParts,
    opts: DistillOptions,
    progress: bool,
) -> DistillResult:
    """EAGLE-1's recipe on windows of the records (`speculator.eagle_distill`); held-out accuracy is the head's own
    chained drafting of n_predict tokens."""
    steps = opts.n_predict
    train, held = eagle_windows(train_records, steps, opts.window), eagle_windows(held_records, steps, opts.window)
    train_rows, held_rows = counted_rows(train), counted_rows(held)
    if not train_rows or not held_rows:
        raise ValueError("too few generated tokens to train on and to hold out")
    vocab = None
    if opts.draft_vocab:
        labels = torch.cat([w.labels[:, 0] for w in train])
        vocab = DraftVocab.most_frequent(labels[labels >= 0], opts.draft_vocab, arch.vocab_size)
    head = new_head(arch, vocab, target, seed=opts.seed, draft_steps=steps).train()
    gen = torch.Generator().manual_seed(opts.seed)
    plan = [batch_windows(train, opts.batch_size, torch.randperm(len(train), generator=gen).tolist())
            for _ in range(opts.epochs)]  # fmt: skip

    def evaluate() -> dict:
        out = eagle_evaluate(head, held, steps, opts.batch_size)
        return out | {"expected_tokens_per_step": expected_tokens_per_step(out["accuracy_by_position"])}

    trained = _train(head, plan, lambda group: eagle_loss(head, group, opts.token_weight), evaluate, opts, "eagle",
                     progress)  # fmt: skip
    metrics = _metrics(trained, eagle_unigram(train, held, steps), train_rows, held_rows)
    return DistillResult(head.eval(), metrics)


def _metrics(trained: _Trained, unigram: list[float], train: int, held: int) -> DistillMetrics:
    """The held-out metrics of the epoch whose weights `_train` kept."""
    kept = trained.history[trained.best]
    return DistillMetrics(
        accuracy_by_position=kept["accuracy_by_position"],
        chain_acceptance_by_position=kept["chain_acceptance_by_position"],
        expected_tokens_per_step=kept["expected_tokens_per_step"],
        unigram_accuracy_by_position=unigram,
        train_samples=train,
        heldout_samples=held,
        train_time_s=trained.seconds,
        final_loss=trained.final_loss,
        history=trained.history,
        best_epoch=trained.best + 1,
    )


def _acc_postfix(history: list[dict]) -> dict[str, str]:
    """Held-out top-1 accuracy by position of the last evaluation, for the progress bar."""
    if not history:
        return {}
    return {"heldout_acc": "/".join(f"{a:.2f}" for a in history[-1]["accuracy_by_position"])}


def proposal_seconds(model: MLPSpeculator, repeats: int = 50) -> float:
    """Wall time of one greedy chain proposal of n_predict tokens for one sequence (median of `repeats`)."""
    hidden = torch.randn(1, model.config.emb_dim, dtype=next(model.parameters()).dtype)
    token = torch.zeros(1, dtype=torch.long)
    times = []
    for _ in range(repeats + 3):
        t0 = time.perf_counter()
        model.propose_chain(hidden, token)
        times.append(time.perf_counter() - t0)
    return sorted(times[3:])[repeats // 2]
