"""A tensor-parallel target runner: the `ModelRunner` interface over a group of `ShardWorker` actors.

`LLMEngine(config, runner=ShardedRunner.from_config(config, tensor_parallel_size=2))` runs the engine's step
loop (scheduler, block manager, speculation, sampling) in this process and each forward on all shards. Every
step goes to every rank in one round of `.remote` calls with the same inputs; the ranks meet in their
collectives and rank 0 returns the logits. One block manager (the engine's) drives all ranks, which is why the
shards are built with the same number of KV blocks.

The shards are placed together through a placement group, one bundle per shard. A Serve replica that already
reserved bundles for its shards passes its own group (`ray.util.get_current_placement_group()`) and the index
of the first shard bundle (`bundle_offset`).

A shard that dies or fails leaves its peers blocked in a collective, so the runner never waits for all of
them: the first error raises `ShardFailure`, the group is marked broken, and `restart()` rebuilds it.
"""

from __future__ import annotations

import time
from typing import Any

import ray
import torch
from ray.exceptions import RayError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.placement_group import placement_group as new_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.shard_worker import ShardWorker
from model.config import EngineConfig
from model.runner import StepInput, StepOutput


class ShardFailure(RuntimeError):
    """A shard died, failed or stopped answering. The group's collectives are out of step, so every later
    call fails the same way until `restart()`, after which the KV cache is empty (cached prefixes and running
    sequences must be recomputed)."""


class ShardedRunner:
    def __init__(
        self,
        config: EngineConfig,
        tensor_parallel_size: int,
        *,
        cpus_per_shard: float = 1.0,
        placement_group: PlacementGroup | None = None,
        bundle_offset: int = 0,
        strategy: str = "STRICT_PACK",
        start_timeout_s: float = 600.0,
        step_timeout_s: float | None = None,
    ):
        """Shards built for `config` the way LLMEngine builds its own runner (`ModelRunner.from_config` on every
        rank). `step_timeout_s` bounds a step or block copy (None: wait as long as the shards are alive; a dead
        shard is reported at once either way)."""
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.config = config
        self.tensor_parallel_size = tensor_parallel_size
        self.block_size = config.block_size
        self.cuda = config.device.startswith("cuda")
        # Logits come back through the object store on CPU; hand them to the engine on its device where it can.
        self.device = torch.device(config.device if not self.cuda or torch.cuda.is_available() else "cpu")
        self.cpus_per_shard = cpus_per_shard
        self.bundle_offset = bundle_offset
        self.start_timeout_s, self.step_timeout_s = start_timeout_s, step_timeout_s
        self._workers: list[Any] = []
        self._pending: list[ray.ObjectRef] = []  # block copies sent but not yet confirmed
        self._broken: str | None = None
        self._num_blocks = 0
        self._own_pg = placement_group is None
        self._pg = self._make_placement_group(strategy) if placement_group is None else placement_group
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def from_config(cls, config: EngineConfig, tensor_parallel_size: int, **kwargs: Any) -> ShardedRunner:
        """The name the callers use for the constructor (as `ModelRunner.from_config`)."""
        return cls(config, tensor_parallel_size, **kwargs)

    # ---- the ModelRunner interface --------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def execute(self, items: list[StepInput]) -> torch.Tensor:
        """Forward the batch on every shard; rank 0's logits [sum(num_logits), vocab] float32."""
        self._check()
        refs = [w.execute.remote(items) for w in self._workers]
        results = self._wait(self._pending + refs, self.step_timeout_s)
        self._pending = []
        return results[-len(refs)].to(self.device)

    def execute_with_hidden(self, items: list[StepInput]) -> StepOutput:
        """Forward the batch on every shard; rank 0's logits and final hidden states."""
        self._check()
        refs = [w.execute_with_hidden.remote(items) for w in self._workers]
        results = self._wait(self._pending + refs, self.step_timeout_s)
        self._pending = []
        out = results[-len(refs)]
        return StepOutput(out.logits.to(self.device), None if out.hidden is None else out.hidden.to(self.device))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Send copy-on-write pairs to every shard without waiting: each actor runs its calls in order, so the
        copy lands before the next step, which also collects the confirmations."""
        if not pairs:
            return
        self._check()
        self._pending += [w.copy_blocks.remote(pairs) for w in self._workers]

    # ---- lifecycle ------------------------------------------------------------------------------------

    @property
    def workers(self) -> list[Any]:
        """The shard actor handles, rank order."""
        return list(self._workers)

    def check_health(self, timeout_s: float = 30.0) -> None:
        """Raise ShardFailure unless every shard answers (e.g. from a Serve replica's check_health)."""
        self._check()
        self._wait([w.ping.remote() for w in self._workers], timeout_s)

    def restart(self) -> None:
        """Kill what is left of the group and start it afresh in the same bundles; the KV pool comes back
        empty, so the caller must drop or recompute whatever its block manager thinks is cached."""
        self._kill()
        self._start()

    def shutdown(self) -> None:
        """Kill the shards and release the placement group if this runner made it."""
        self._kill()
        if self._own_pg and self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    # ---- internals ------------------------------------------------------------------------------------

    def _bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_shard, **({"GPU": 1} if self.cuda else {})}

    def _make_placement_group(self, strategy: str) -> PlacementGroup:
        pg = new_placement_group([self._bundle()] * self.tensor_parallel_size, strategy=strategy)
        try:
            ray.get(pg.ready(), timeout=self.start_timeout_s)
        except RayError as e:
            remove_placement_group(pg)
            raise ShardFailure(
                f"the cluster cannot place {self.tensor_parallel_size} shards of {self._bundle()} ({strategy})"
            ) from e
        return pg

    def _start(self) -> None:
        threads = max(1, int(self.cpus_per_shard))
        self._workers = [
            ShardWorker.options(
                num_cpus=self.cpus_per_shard,
                num_gpus=1 if self.cuda else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=self.bundle_offset + rank
                ),
            ).remote(self.config, rank, self.tensor_parallel_size, threads)
            for rank in range(self.tensor_parallel_size)
        ]
        self._broken = None
        try:
            (address,) = self._wait([self._workers[0].rendezvous_address.remote()], self.start_timeout_s)
            # Every rank must be joining at once: init_process_group returns only when the whole group is in.
            blocks = self._wait([w.setup.remote(address) for w in self._workers], self.start_timeout_s)
            if len(set(blocks)) != 1:
                raise ShardFailure(f"shards built different KV pools ({blocks} blocks); one block manager needs one")
        except BaseException:
            self._kill()
            raise
        self._num_blocks = blocks[0]

    def _wait(self, refs: list[ray.ObjectRef], timeout_s: float | None) -> list[Any]:
        """The results of `refs`, in order. The first failure raises ShardFailure at once rather than waiting
        for the peers, which may be blocked forever in a collective with the dead shard."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(refs)
        try:
            while pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, pending = ray.wait(pending, num_returns=1, timeout=left)
                if not ready:
                    raise TimeoutError(f"{len(pending)} shard call(s) unanswered after {timeout_s} s")
                ray.get(ready)  # a dead actor's or a failed task's error surfaces here
            return ray.get(refs)
        except (RayError, TimeoutError) as e:
            self._broken = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
            raise ShardFailure(f"tensor-parallel group failed: {self._broken}") from e

    def _check(self) -> None:
        if not self._workers:
            raise ShardFailure("the shard group is not running (shut down, or a restart failed)")
        if self._broken:
            raise ShardFailure(f"the shard group is broken ({self._broken}); call restart()")

    def _kill(self) -> None:
        for w in self._workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
        self._workers, self._pending = [], []
