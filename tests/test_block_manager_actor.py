"""The block manager in its actor, driven by the real scheduler: the same answers as in process, and a killed
actor surfaces at the next call and is replaced by an empty one on reset."""

from __future__ import annotations

import pytest
import ray

from deployments.block_manager_actor import BlockManagerLost, RemoteBlockManager
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from sampling.params import SamplingParams

RAY_CPUS = 1


def decode(sched: Scheduler, steps: int) -> None:
    for _ in range(steps):
        for item in sched.schedule().scheduled:
            s = item.seq
            s.num_computed += item.num_tokens
            if item.completes_prefill:
                s.token_ids.append(7)
            sched.commit(s)


def test_a_killed_actor_fails_the_next_call_and_a_reset_starts_an_empty_one(local_ray):
    remote = RemoteBlockManager(32, 4, True, timeout_s=30)
    try:
        sched = Scheduler(remote, 32, 4, 4, 64, 1000)
        seqs = [
            Sequence(i, str(i), list(range(10 * i, 10 * i + 9)), 9, SamplingParams(max_tokens=50), i) for i in (1, 2)
        ]
        for s in seqs:
            sched.add(s)
        decode(sched, 5)
        assert remote.stats()["num_free_blocks"] == sched.num_free_blocks == 31 - sum(map(len, sched.tables.values()))
        ray.kill(remote.actor, no_restart=True)
        with pytest.raises(BlockManagerLost):
            decode(sched, 8)  # within 4 steps a table must grow: that call fails
        sched.reset()  # what the engine does before recomputing the requests in flight
        assert remote.stats()["num_seqs"] == 0 and all(s.num_computed == 0 for s in seqs)
        decode(sched, 3)
        assert sorted(sched.tables) == [1, 2] and remote.stats()["num_seqs"] == 2
        for s in seqs:
            sched.finish(s)
        assert remote.stats()["num_free_blocks"] == 31
    finally:
        remote.shutdown()
