"""Several drafters in one engine (`speculator: auto`): each request drafts with its workload class's drafter,
named in its DraftRequest, and each drafter sees only its own sequences, so its per-sequence state (n-gram
indexes, a draft model's KV, an EAGLE head's KV) is released by the drafter that holds it."""

from __future__ import annotations

from dataclasses import replace

from speculator.proposer import Draft, DraftRequest, HiddenRows, Proposer

_HIDDEN_ORDER: tuple[HiddenRows, ...] = ("none", "last", "all")


class RoutedProposer(Proposer):
    def __init__(self, proposers: dict[str, Proposer], default: str):
        if default not in proposers:
            raise ValueError(f"default drafter {default!r} is not among {sorted(proposers)}")
        self.proposers = proposers
        self.default = default
        # The engine hands over the most any drafter reads: "all" rows serve a "last" reader too (it reads the
        # newest of them).
        self._update_hidden_rows()
        self.owner: dict[int, str] = {}  # seq id -> the drafter holding its state

    def _update_hidden_rows(self) -> None:
        self.hidden_rows = max(
            (p.hidden_rows for p in self.proposers.values()), key=_HIDDEN_ORDER.index, default="none"
        )

    def install(self, name: str, proposer: Proposer) -> None:
        """Add a drafter, or replace the one called `name` (its sequences' state is dropped: they draft with the
        new one from their next step, from the rows it is handed then)."""
        for seq_id in [s for s, owner in self.owner.items() if owner == name]:
            self.release(seq_id)
        self.proposers[name] = proposer
        self._update_hidden_rows()

    def reads_hidden(self, drafter: str | None) -> bool:
        p = self.proposers.get(drafter or self.default)
        return p is not None and p.hidden_rows != "none"

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        out: list[Draft] = [Draft([]) for _ in requests]
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            name = r.drafter or self.default
            if name in self.proposers and r.k > 0:
                groups.setdefault(name, []).append(i)
        for name, where in groups.items():
            proposer = self.proposers[name]
            batch = []
            for i in where:
                r = requests[i]
                self.owner[r.seq_id] = name
                k = min(r.k, proposer.max_k) if proposer.max_k else r.k
                batch.append(replace(r, k=k) if k != r.k else r)
            for i, draft in zip(where, proposer.propose(batch)):
                out[i] = draft
        return out

    def release(self, seq_id: int) -> None:
        name = self.owner.pop(seq_id, None)
        if name is not None:
            self.proposers[name].release(seq_id)
