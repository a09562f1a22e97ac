"""The paged block manager of one target replica, in its own actor: one round trip per scheduler step at most.

The actor owns the bookkeeping of the replica's KV pages (the pages themselves live with the model, in the
replica or its shards) and wraps `kv_cache.block_batch.BatchedBlockManager`, whose one `step` call carries a
whole batch; the scheduler's `kv_cache.block_tables.BlockTables` decides when a step needs it. It asks for no
CPU and is pinned to the replica's node, so a call costs a local round trip. `RemoteBlockManager` is the
scheduler's side: the same interface, every call waited for; if the actor dies a call raises `BlockManagerLost`,
the step fails, and the engine's reset (before it recomputes what was in flight) starts an empty actor.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kv_cache.block_batch import BatchedBlockManager, BlockStep, BlockStepResult


class BlockManagerLost(RuntimeError):
    """The block manager actor died or stopped answering; its KV bookkeeping is gone."""


@ray.remote(num_cpus=0, max_concurrency=1)
class BlockManagerActor:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.manager = BatchedBlockManager(num_blocks, block_size, enable_prefix_caching)

    def step(self, request: BlockStep) -> BlockStepResult:
        return self.manager.step(request)

    def reset(self) -> None:
        self.manager.reset()

    def stats(self) -> dict[str, Any]:
        return self.manager.stats()


class RemoteBlockManager:
    """A `BlockService` backed by a BlockManagerActor on this node; call it from one thread (the engine's)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, timeout_s: float = 60.0):
        self._args = (num_blocks, block_size, enable_prefix_caching)
        self.timeout_s = timeout_s
        self.actor = self._start()

    def _start(self) -> Any:
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor = BlockManagerActor.options(scheduling_strategy=here).remote(*self._args)
        ray.get(actor.stats.remote(), timeout=self.timeout_s)
        return actor

    def _call(self, ref: ray.ObjectRef) -> Any:
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except (RayError, GetTimeoutError) as e:
            raise BlockManagerLost(f"block manager actor: {type(e).__name__}: {str(e).strip()[:200]}") from e

    def step(self, request: BlockStep) -> BlockStepResult:
        return self._call(self.actor.step.remote(request))

    def reset(self) -> None:
        """Empty the manager; an actor that died or stopped answering is replaced by a new (empty) one."""
        try:
            self._call(self.actor.reset.remote())
        except BlockManagerLost:
            self.shutdown()
            self.actor = self._start()

    def stats(self) -> dict[str, Any]:
        return self._call(self.actor.stats.remote())

    def shutdown(self) -> None:
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass
