"""Admission policy: a ingress's in-flight limit (429) and a replica's queue and KV checks (503)."""

from __future__ import annotations

import pytest

from deployments.admission import InFlightLimit, ReplicaAdmission


def test_in_flight_limit_refuses_beyond_and_frees_on_release():
    limit = InFlightLimit(2, retry_after_s=3)
    assert limit.try_acquire() is None and limit.try_acquire() is None
    refusal = limit.try_acquire()
    assert (refusal.status, refusal.code, refusal.retry_after_s) == (429, "rate_limit_exceeded", 3)
    assert (limit.in_flight, limit.refused) == (2, 1)
    limit.release()
    assert limit.try_acquire() is None
    limit.release()
    limit.release()
    with pytest.raises(RuntimeError):
        limit.release()


def stats(running=0, waiting=0, free=1000, total=1000) -> dict:
    return {"num_running": running, "num_waiting": waiting, "free_kv_blocks": free, "total_kv_blocks": total}


def policy(max_waiting=2, kv=0.0, max_num_seqs=4) -> ReplicaAdmission:
    return ReplicaAdmission(max_waiting, kv, block_size=16, max_num_seqs=max_num_seqs, retry_after_s=2)


def test_idle_engine_admits_anything_that_fits():
    assert policy(max_waiting=0).check(stats(free=10, total=10), prompt_tokens=10_000, admitted=0) is None


def test_queue_beyond_the_free_batch_slots_is_limited():
    p = policy(max_waiting=2, max_num_seqs=4)
    assert p.check(stats(running=3), 10, admitted=3) is None  # a free slot
    assert p.check(stats(running=4, waiting=1), 10, admitted=5) is None  # one waits: room for another
    refusal = p.check(stats(running=4, waiting=2), 10, admitted=6)
    assert (refusal.status, refusal.code, refusal.retry_after_s) == (503, "overloaded", 2)
    # a burst the engine has not seen yet counts too
    assert p.check(stats(running=0, waiting=0), 10, admitted=6) is not None
    assert policy(max_waiting=0).check(stats(running=4), 10, admitted=4) is not None


def test_busy_engine_refuses_a_prompt_that_does_not_fit_free_kv():
    p = policy(kv=0.0, max_num_seqs=64)
    assert p.check(stats(running=1, free=7, total=100), prompt_tokens=111, admitted=1) is None  # 7 blocks
    assert p.check(stats(running=1, free=7, total=100), prompt_tokens=112, admitted=1) is not None  # 8 blocks
    reserve = policy(kv=0.1, max_num_seqs=64)
    assert reserve.check(stats(running=1, free=20, total=100), prompt_tokens=15, admitted=1) is None
    assert reserve.check(stats(running=1, free=10, total=100), prompt_tokens=15, admitted=1) is not None


def test_bad_settings():
    with pytest.raises(ValueError):
        InFlightLimit(0)
    with pytest.raises(ValueError):
        ReplicaAdmission(-1, 0.0, 16, 4)
    with pytest.raises(ValueError):
        ReplicaAdmission(1, 1.0, 16, 4)
