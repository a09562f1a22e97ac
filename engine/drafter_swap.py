"""Drafters swapped into a running engine (adaptation), between steps, without touching any request's KV.

A swap is queued from any thread and applied by the engine thread at the start of its next step: the new drafter
joins the routed proposer under its name, the class's new requests route to it, and the class's requests in
flight switch to it at once (their old drafter's state is dropped; the target's KV and every emitted token stay,
so nothing is recomputed and verification keeps the output exactly the target's).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.spec_monitor import FIRST_VERSION, SpecKey, SpecMonitor
from speculator.k_policy import CostPolicy
from speculator.plan import NONE
from speculator.proposer import Proposer
from speculator.routed import RoutedProposer

if TYPE_CHECKING:
    from engine.request_state import RequestState
    from engine.workload_routing import WorkloadRouter


@dataclass(frozen=True)
class Swap:
    workload_class: str
    name: str | None  # None: the class goes back to its plan's drafter
    proposer: Proposer | None
    version: str


class DrafterSwap:
    """Mixin of LLMEngine: `install_drafter` / `restore_drafter` and their application between steps."""

    proposer: Proposer | None
    router: WorkloadRouter | None
    requests: dict[str, RequestState]
    drafter_versions: dict[str, str]
    monitor: SpecMonitor
    _swaps: deque[Swap]
    k_policy: CostPolicy | None

    def install_drafter(self, workload_class: str, name: str, proposer: Proposer, version: str) -> None:
        """From the next step on, the class drafts with `proposer` (called `name`, labelled `version`)."""
        if not isinstance(self.proposer, RoutedProposer) or self.router is None:
            raise ValueError("swapping drafters needs engine.speculator 'auto'")
        self._swaps.append(Swap(workload_class, name, proposer, version))

    def restore_drafter(self, workload_class: str) -> None:
        """From the next step on, the class drafts with its plan's drafter again."""
        if isinstance(self.proposer, RoutedProposer) and self.router is not None:
            self._swaps.append(Swap(workload_class, None, None, "0"))

    def _apply_swaps(self) -> None:
        while self._swaps:
            swap = self._swaps.popleft()
            if swap.proposer is not None:
                if self.k_policy is not None:  # its cost, estimated afresh
                    self.k_policy.time(swap.name, swap.proposer)
                self.proposer.install(swap.name, swap.proposer)
                self.drafter_versions[swap.name] = swap.version
            self.router.assign(swap.workload_class, swap.name)
            drafter = swap.name
            for req in self.requests.values():
                if req.workload_class != swap.workload_class:
                    continue
                if drafter is None:
                    drafter = self.router.route(req.seq.token_ids[: req.seq.num_prompt_tokens]).drafter
                self.proposer.release(req.seq.seq_id)
                req.hidden = None
                req.drafter = drafter
                if req.spec_track is not None:  # its steps from here on count under the new drafter and version
                    key = SpecKey(swap.workload_class, drafter, self.drafter_versions.get(drafter, FIRST_VERSION))
                    req.spec_track = self.monitor.move(req.spec_track, key)
                if drafter != NONE:  # a new drafter: its k and acceptance are learned afresh
                    req.controller = self._make_controller(drafter=drafter)
