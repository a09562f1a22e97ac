"""`specserve adapt`'s chart: per class, every measured drafter's acceptance by position (the plan's choice before
and after marked), and each class's expected speedup before and after."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402

from speculator.plan import NONE, WorkloadPlan  # noqa: E402


def draw(before: WorkloadPlan, after: WorkloadPlan, path: str | Path) -> None:
    names = [c.name for c in after.classes]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        chosen = {before.choice(name).drafter: "before", after.choice(name).drafter: "after"}
        if before.choice(name).drafter == after.choice(name).drafter:
            chosen[after.choice(name).drafter] = "before, after"
        for drafter, profile in sorted(after.drafters.items()):
            acceptance = profile.by_class.get(name)
            if acceptance is None or not acceptance.survival:
                continue
            mark = chosen.get(drafter)
            label = f"{drafter} (chosen {mark})" if mark else drafter
            positions = range(1, len(acceptance.survival) + 1)
            ax.plot(
                positions, acceptance.survival, marker="o", lw=2.5 if mark else 1, ls="-" if mark else "--", label=label
            )
            ax.set_xticks(positions)
        ax.set(
            title=f"{name}: acceptance by position", xlabel="draft position", ylabel="accepted share", ylim=(0, 1.02)
        )
        if ax.lines:
            ax.legend(fontsize=7)
    ax = axes[0][-1]
    width = 0.38
    for offset, (label, plan) in zip((-width / 2, width / 2), (("before", before), ("after", after))):
        speedups = [plan.choice(n).expected_speedup for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], speedups, width, label=label)
        for bar, n in zip(bars, names):
            c = plan.choice(n)
            text = NONE if c.drafter == NONE else f"{c.drafter} k{c.k}"
            ax.annotate(
                text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=6
            )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set(title="expected speedup over plain decoding", ylabel="x plain tokens/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
