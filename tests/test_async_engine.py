"""AsyncEngine: concurrent streams equal the synchronous engine, leaving a stream at any point aborts it and
frees its KV, a failed step ends only the requests in flight (with an error) and the loop keeps serving."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from engine.async_engine import STEP_FAILED, AsyncEngine, EngineStepError, RequestFailed
from sampling.params import SamplingParams

PROMPTS = ["def add(a, b):\n    return", "The three primary colours are", "Once upon a time, in a small village,"]
GREEDY = SamplingParams(max_tokens=12)


@pytest.fixture
def engine(make_engine):
    eng = make_engine(kv_cache_gib=0.25)
    yield eng
    assert not eng.has_unfinished()


async def collect(aeng: AsyncEngine, prompt: str, params: SamplingParams = GREEDY) -> list[int]:
    tokens: list[int] = []
    async for out in aeng.generate(prompt, params):
        tokens.extend(out.new_token_ids)
    return tokens


def test_concurrent_streams_equal_the_synchronous_engine(engine):
    reference = [o.output_token_ids for o in engine.generate(PROMPTS, GREEDY)]
    aeng = AsyncEngine(engine)
    try:

        async def main():
            return await asyncio.gather(*(collect(aeng, p) for p in PROMPTS))

        assert asyncio.run(main()) == reference
    finally:
        aeng.shutdown()


def test_leaving_a_stream_early_frees_its_blocks(engine):
    free = engine.block_manager.stats()["num_free_blocks"]
    aeng = AsyncEngine(engine)
    try:

        async def main():
            stream = aeng.generate(PROMPTS[2], SamplingParams(max_tokens=500, ignore_eos=True))
            async for _ in stream:
                break
            await stream.aclose()
            for _ in range(100):
                if not engine.requests:
                    return
                await asyncio.sleep(0.05)

        asyncio.run(main())
        assert not engine.requests and engine.block_manager.stats()["num_free_blocks"] == free
    finally:
        aeng.shutdown()


def fail_once_when_batched(runner, n: int = 2) -> list[int]:
    """Make the runner's first forward over `n` or more sequences raise, as a lost shard would."""
    real_execute, failures = runner.execute, []

    def flaky(items):
        if not failures and len(items) >= n:
            failures.append(len(items))
            raise RuntimeError("shard lost")
        return real_execute(items)

    runner.execute = flaky
    return failures


def test_an_unrepaired_failed_step_ends_requests_in_flight_and_the_loop_goes_on(engine):
    failures = fail_once_when_batched(engine.runner)
    attempts: list[Exception] = []
    aeng = AsyncEngine(engine, on_step_error=lambda e: attempts.append(e) and False)
    try:

        async def main():
            results = await asyncio.gather(*(collect(aeng, p) for p in PROMPTS[:2]), return_exceptions=True)
            after = await collect(aeng, PROMPTS[0])
            return results, after

        results, after = asyncio.run(main())
        aeng.shutdown()  # the engine is driven synchronously below
        assert failures == [2] and len(attempts) == 1 and aeng.num_step_errors == 1
        # One line without internals (the exception goes to the log); not a failure of one request.
        assert all(type(r) is EngineStepError and str(r) == STEP_FAILED for r in results)
        assert after == engine.generate([PROMPTS[0]], GREEDY)[0].output_token_ids
        assert not engine.requests and engine.block_manager.stats()["num_seqs"] == 0
    finally:
        del engine.runner.execute
        aeng.shutdown()


def test_a_repaired_failed_step_recomputes_and_loses_nothing(engine):
    reference = [o.output_token_ids for o in engine.generate(PROMPTS, GREEDY)]
    failures = fail_once_when_batched(engine.runner, n=3)
    aeng = AsyncEngine(engine, on_step_error=lambda e: True)
    try:

        async def main():
            return await asyncio.gather(*(collect(aeng, p) for p in PROMPTS))

        assert asyncio.run(main()) == reference  # streams went on; tokens already sent were kept
        assert failures == [3] and aeng.num_recoveries == 1
        assert engine.block_manager.stats()["num_free_blocks"] == engine.runner.num_blocks - 1
    finally:
        del engine.runner.execute
        aeng.shutdown()


def test_a_bad_request_raises_before_any_output(engine):
    aeng = AsyncEngine(engine)
    try:

        async def main():
            with pytest.raises(ValueError, match="context"):
                await collect(aeng, "hello " * 9000)

        asyncio.run(main())
    finally:
        aeng.shutdown()


def test_a_factory_builds_the_engine_on_the_loop_thread_and_its_error_is_raised(engine):
    reference = engine.generate([PROMPTS[0]], GREEDY)[0].output_token_ids
    built_on: list[str] = []

    def factory():
        built_on.append(threading.current_thread().name)
        return engine

    aeng = AsyncEngine(factory)
    try:
        assert built_on == ["engine-loop"] and aeng.engine is engine
        assert asyncio.run(collect(aeng, PROMPTS[0])) == reference
    finally:
        aeng.shutdown()

    def broken():
        raise FileNotFoundError("no model at /nowhere")

    with pytest.raises(FileNotFoundError, match="/nowhere"):
        AsyncEngine(broken)


async def wait_until_idle(engine, timeout_s: float = 10.0) -> None:
    """Until the engine thread has dropped every request (a leaked one would generate for much longer)."""
    for _ in range(int(timeout_s / 0.05)):
        if engine.num_requests == 0:
            return
        await asyncio.sleep(0.05)


def test_a_caller_cancelled_before_or_while_its_request_is_added_leaves_nothing(engine, monkeypatch):
    entered, release, added = threading.Event(), threading.Event(), threading.Event()
    real_add, calls = engine.add_request, []

    def slow_add(*args, **kwargs):
        calls.append(args[0].prompt_token_ids)
        entered.set()
        release.wait(10)
        try:
            return real_add(*args, **kwargs)
        finally:
            added.set()

    monkeypatch.setattr(engine, "add_request", slow_add)
    long = SamplingParams(max_tokens=400, ignore_eos=True)
    aeng = AsyncEngine(engine)
    try:

        async def main():
            first = asyncio.create_task(collect(aeng, PROMPTS[0], long))  # cancelled while being added
            await asyncio.to_thread(entered.wait, 10)
            second = asyncio.create_task(collect(aeng, PROMPTS[1], long))  # cancelled before its add runs
            await asyncio.sleep(0.05)
            first.cancel()
            second.cancel()
            results = await asyncio.gather(first, second, return_exceptions=True)
            release.set()
            await asyncio.to_thread(added.wait, 10)
            await wait_until_idle(engine)
            return results

        results = asyncio.run(main())
    finally:
        release.set()
        aeng.shutdown()
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    first_ids = engine.prepare(PROMPTS[0]).prompt_token_ids
    assert calls == [first_ids], "a request cancelled before its add ran was added anyway"
    assert engine.num_requests == 0 and engine.num_free_kv_blocks() == engine.num_kv_blocks


def test_cancelling_many_requests_at_random_points_frees_everything(engine):
    """40 requests (some with long prompts prefilled in chunks, some waiting for the token budget) cancelled at
    once, after a random delay, or at a random point after their first output; a few finish first."""
    rng = random.Random(9)
    long_prompt = "Describe the history of the old harbour town in great detail. " * 60
    aeng = AsyncEngine(engine)
    try:

        async def consume(prompt: str, params: SamplingParams, first: asyncio.Event) -> None:
            async for _ in aeng.generate(prompt, params):
                first.set()

        async def cancel(i: int, task: asyncio.Task, first: asyncio.Event) -> None:
            if i % 10 == 7:  # a short request: cancelled after it finished
                await asyncio.wait([task])
            elif i % 4 == 1:  # while streaming
                await asyncio.wait_for(first.wait(), 120)
                await asyncio.sleep(rng.uniform(0.0, 0.3))
            elif i % 4 == 2:  # anywhere: waiting, prefilling or decoding
                await asyncio.sleep(rng.uniform(0.0, 2.0))
            else:  # before the request is added, or before its first output
                await asyncio.sleep(0)
            task.cancel()

        async def main():
            tasks, firsts = [], []
            for i in range(40):
                prompt = long_prompt if i % 10 == 3 else f"{PROMPTS[i % 3]} {i}"
                params = SamplingParams(
                    max_tokens=2 if i % 10 == 7 else 200, ignore_eos=True, temperature=0.8 * (i % 2), seed=i
                )
                firsts.append(asyncio.Event())
                tasks.append(asyncio.create_task(consume(prompt, params, firsts[-1])))
            await asyncio.gather(*(cancel(i, t, f) for i, (t, f) in enumerate(zip(tasks, firsts))))
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await wait_until_idle(engine)
            return results, [f.is_set() for f in firsts]

        results, started = asyncio.run(main())
    finally:
        aeng.shutdown()
    cancelled = [isinstance(r, asyncio.CancelledError) for r in results]
    assert sum(cancelled) >= 30 and all(c or r is None for c, r in zip(cancelled, results))
    assert [results[i] for i in (7, 17, 27, 37)] == [None] * 4, "the short requests should have finished"
    assert sum(c and not s for c, s in zip(cancelled, started)) >= 10, "too few cancelled before their first output"
    assert sum(c and s for c, s in zip(cancelled, started)) >= 8, "too few cancelled while streaming"
    assert engine.num_requests == 0 and not engine.has_unfinished()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.num_free_kv_blocks() == engine.num_kv_blocks


def test_aborting_by_id_ends_the_reading_stream_with_an_error(engine):
    aeng = AsyncEngine(engine)
    try:

        async def main():
            stream = aeng.generate(PROMPTS[2], SamplingParams(max_tokens=300, ignore_eos=True), request_id="r-1")
            await stream.__anext__()
            aeng.abort("r-1")
            with pytest.raises(RequestFailed, match="aborted"):
                async for _ in stream:
                    pass
            await wait_until_idle(engine)

        asyncio.run(main())
    finally:
        aeng.shutdown()
    assert engine.num_requests == 0 and engine.num_free_kv_blocks() == engine.num_kv_blocks
