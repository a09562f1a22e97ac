"""One tensor-parallel shard as a Ray actor: a thin shell around `ModelRunner` with `ParallelContext(rank, ws)`.

All model logic lives in engine/; this file only joins the torch.distributed group (gloo on CPU, NCCL on CUDA) and
exposes the runner's step to the driver. Every rank gets the engine's own settings and builds its slice with
`ModelRunner.from_config`, as the engine builds its in-process runner. Startup has two phases because rank 0 must
pick the rendezvous address on its own node before any rank can join: `rendezvous_address()` on rank 0, then
`setup(address)` on every rank at once (joining blocks until the whole group is there).
"""

from __future__ import annotations

import socket
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from model.config import EngineConfig
from model.parallel import ParallelContext
from model.runner import ModelRunner, StepInput, StepOutput


@ray.remote
class ShardWorker:
    """Rank `rank` of a tensor-parallel group; only rank 0 returns logits (they are all-gathered to every rank).

    `config.kv_cache_gib` is the budget of ONE shard (one device's memory); all shards end up with the same
    number of blocks, sized by the rank that holds the most KV heads."""

    def __init__(self, config: EngineConfig, rank: int, world_size: int, num_threads: int = 1):
        # Not `self.config`: an attribute named like a torch.distributed submodule makes Ray pickle that module.
        self.engine_config, self.rank, self.world_size = config, rank, world_size
        self.runner: ModelRunner | None = None
        if config.device.startswith("cuda"):
            # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPU, so it is always device 0 here.
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # Two shards on one host must not each spin a thread per core: stay within this actor's CPU share.
        torch.set_num_threads(max(1, num_threads))

    def rendezvous_address(self) -> str:
        """host:port on this actor's node with a port free right now (rank 0 hosts the store there)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def setup(self, address: str, timeout_s: float = 300.0) -> int:
        """Join the group at `address`, then load this rank's slices; returns the KV pool's block count."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        # A finite timeout turns a collective stuck on a vanished peer into an error instead of a hang.
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        tp = ParallelContext(self.rank, self.world_size)
        self.runner = ModelRunner.from_config(self.engine_config, device=self.device, tp=tp)
        return self.runner.num_blocks

    def execute(self, items: list[StepInput]) -> torch.Tensor | None:
        """Run the step; rank 0 returns float32 logits on CPU (they cross processes), other ranks None."""
        logits = self._runner().execute(items)
        return logits.cpu() if self.rank == 0 else None

    def execute_with_hidden(self, items: list[StepInput]) -> StepOutput | None:
        """Like `execute`, with the final hidden states too (replicated after the last norm: rank 0's are whole)."""
        out = self._runner().execute_with_hidden(items)
        if self.rank != 0:
            return None
        return StepOutput(out.logits.cpu(), None if out.hidden is None else out.hidden.cpu())

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self._runner().copy_blocks(pairs)

    def ping(self) -> int:
        """Liveness probe: the rank, answered between steps."""
        return self.rank

    def _runner(self) -> ModelRunner:
        if self.runner is None:
            raise RuntimeError(f"shard {self.rank} was not set up")
        return self.runner
