"""AsyncEngine: concurrent streams equal the synchronous engine, early exit aborts, a failed step ends only
the requests in flight (with an error) and the loop keeps serving."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine.async_engine import AsyncEngine, EngineStepError
from engine.sampling_params import SamplingParams

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
        assert all(isinstance(r, EngineStepError) and "shard lost" in str(r) for r in results)
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
