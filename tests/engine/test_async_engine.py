"""AsyncEngine: the step loop in a thread, one async stream per request. Streams must equal
the sync engine's outputs; a consumer that goes away aborts within a step; admission errors
raise before the first yield; a dead engine fails every waiting stream instead of hanging.
Every test runs under a timeout and ends with the engine drained (no request, all blocks
free)."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from tpaserve.config import ModelConfig
from tpaserve.engine.async_engine import AsyncEngine, EngineDead
from tpaserve.engine.factory import build_engine
from tpaserve.engine.llm_engine import EngineDeadError, LLMEngine
from tpaserve.engine.scheduler import RequestRejected
from tpaserve.models.t6 import T6
from tpaserve.sampling_params import SamplingParams, SamplingParamsError

V = 101
TIMEOUT = 15.0


@pytest.fixture(scope="module")
def model() -> T6:
    cfg = ModelConfig(n_layer=2, n_head=5, head_dim=8, n_embd=32, vocab_size=V, k_rank=2,
                      v_rank=2, q_rank=3, max_position=256)
    return T6(cfg).init_random(seed=4, std=0.3).eval()


def engine(model: T6, **kw) -> LLMEngine:
    args = dict(num_blocks=64, block_size=4, max_num_batched_tokens=32, device="cpu")
    args.update(kw)
    return build_engine(model, **args)


def run(coro_fn, *args):
    """Run coro_fn(*args) on a fresh event loop under a global timeout."""
    return asyncio.run(asyncio.wait_for(coro_fn(*args), TIMEOUT))


def assert_drained(eng: LLMEngine) -> None:
    eng.blocks.check()
    assert not eng.has_unfinished_requests() and not eng.scheduler.requests
    assert eng.blocks.num_free == eng.blocks.num_blocks and eng.blocks.tables == {}


async def wait_until(pred, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


async def collect(ae: AsyncEngine, rid, prompt, params):
    """Final output and the concatenated streamed deltas of every sequence."""
    deltas, last = {}, None
    async for out in ae.generate(rid, prompt, params):
        assert not (last is not None and last.finished)
        for o in out.outputs:
            deltas.setdefault(o.index, []).extend(o.token_ids_delta)
        last = out
    return last, deltas


def sync_outputs(model, requests, **kw):
    eng = engine(model, **kw)
    for rid, p, sp in requests:
        eng.add_request(rid, p, sp)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = [o.token_ids for o in out.outputs]
    return done


def workload(n: int = 10, seed: int = 0):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(V) for _ in range(rng.randint(1, 30))]
        kind = i % 3
        sp = (SamplingParams(temperature=0, max_tokens=rng.randint(1, 12)) if kind == 0 else
              SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=10) if kind == 1 else
              SamplingParams(n=2, temperature=0.7, seed=50 + i, max_tokens=6))
        reqs.append((f"r{i}", prompt, sp))
    return reqs


def test_concurrent_streams_equal_sync_engine(model):
    reqs = workload()
    want = sync_outputs(model, reqs)

    async def main():
        ae = AsyncEngine(engine(model))
        ae.start()
        try:
            results = await asyncio.gather(*(collect(ae, *r) for r in reqs))
            for (rid, _, _), (last, deltas) in zip(reqs, results):
                assert last.finished and last.request_id == rid
                assert [o.token_ids for o in last.outputs] == want[rid]
                assert [deltas[o.index] for o in last.outputs] == want[rid]
            assert ae.num_in_flight == 0 and not ae._streams
            await wait_until(lambda: not ae.engine.has_unfinished_requests())
            assert_drained(ae.engine)
        finally:
            ae.shutdown()
    run(main)


def test_breaking_out_of_a_stream_aborts_and_frees_blocks(model):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    short = ("keep", [3, 1, 4, 1, 5], SamplingParams(temperature=0, max_tokens=20))
    want = sync_outputs(model, [short])

    async def main():
        ae = AsyncEngine(engine(model))
        ae.start()
        eng = ae.engine
        try:
            keep = asyncio.create_task(collect(ae, *short))
            n = 0
            async for out in ae.generate("leave", list(range(1, 30)), long):
                n += 1
                if n == 3:
                    break                  # the generator is dropped: aclose() runs, aborts
            await wait_until(lambda: "leave" not in eng.groups
                             and eng.blocks.table("leave#0") == [])
            eng.blocks.check()
            # explicit aclose(), and cancelling a consumer task, abort too
            agen = ae.generate("closed", list(range(1, 30)), long)
            await agen.__anext__()
            await agen.aclose()

            async def consume():
                async for _ in ae.generate("cancelled", list(range(1, 30)), long):
                    pass
            task = asyncio.create_task(consume())
            await wait_until(lambda: eng.blocks.table("cancelled#0") != [])
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            last, _ = await keep
            assert [o.token_ids for o in last.outputs] == want["keep"]
            await wait_until(lambda: not eng.has_unfinished_requests()
                             and eng.blocks.num_free == eng.blocks.num_blocks)
            assert ae.num_in_flight == 0
            assert_drained(eng)
        finally:
            ae.shutdown()
    run(main)


def test_cancelled_while_waiting_for_admission_aborts(model):
    async def main():
        eng = engine(model)
        add, aborted = eng.add_request, []

        def slow_add(*a, **kw):
            time.sleep(0.3)                  # the step thread is busy admitting
            return add(*a, **kw)
        eng.add_request = slow_add
        abort = eng.abort_request
        eng.abort_request = lambda rid: aborted.append(rid) or abort(rid)
        ae = AsyncEngine(eng)
        ae.start()
        try:
            sp = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
            task = asyncio.create_task(ae.generate("gone", [1, 2, 3], sp).__anext__())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: aborted == ["gone"] and not eng.has_unfinished_requests())
            assert not ae._streams and ae.num_in_flight == 0
            assert_drained(eng)
        finally:
            ae.shutdown()
    run(main)


def test_admission_errors_raise_before_the_first_yield(model):
    async def main():
        ae = AsyncEngine(engine(model, num_blocks=16))
        ae.start()
        try:
            agen = ae.generate("long", [1] * 250, SamplingParams(max_tokens=10))
            with pytest.raises(RequestRejected, match="256"):
                await agen.__anext__()
            with pytest.raises(RequestRejected, match="cache blocks"):
                await ae.generate("big", [1] * 60, SamplingParams(max_tokens=10)).__anext__()
            with pytest.raises(SamplingParamsError):
                await ae.generate("oov", [1], SamplingParams(stop_token_ids=[V + 1])).__anext__()
            assert not ae._streams and ae.num_in_flight == 0
            last, _ = await collect(ae, "ok", [1, 2, 3], SamplingParams(max_tokens=4))
            assert last.finished and len(last.outputs[0].token_ids) == 4
            await wait_until(lambda: not ae.engine.has_unfinished_requests())
            assert_drained(ae.engine)
        finally:
            ae.shutdown()
    run(main)


def test_duplicate_request_id_is_rejected_without_hurting_the_first(model):
    async def main():
        ae = AsyncEngine(engine(model))
        ae.start()
        try:
            sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
            first = asyncio.create_task(collect(ae, "same", [1, 2, 3], sp))
            await wait_until(lambda: "same" in ae.engine.groups)
            with pytest.raises(RequestRejected, match="already in flight"):
                await ae.generate("same", [4, 5], sp).__anext__()
            last, _ = await first
            assert last.finished and len(last.outputs[0].token_ids) == 30
            await wait_until(lambda: not ae.engine.has_unfinished_requests())
            assert_drained(ae.engine)
        finally:
            ae.shutdown()
    run(main)


def test_dead_engine_fails_every_waiting_stream(model):
    async def main():
        eng = engine(model, max_num_seqs=2)
        real_step, calls = eng.step, []

        def dying_step():
            calls.append(1)
            if len(calls) == 4:
                raise EngineDeadError("the device is gone")
            return real_step()
        eng.step = dying_step
        ae = AsyncEngine(eng)
        ae.start()
        try:
            sp = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
            tasks = [asyncio.create_task(collect(ae, f"r{i}", [i + 1] * 5, sp)) for i in range(4)]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, EngineDead) for r in results), results
            assert not ae.ready and ae.dead is not None
            with pytest.raises(EngineDead, match="the device is gone"):
                await ae.generate("after", [1], sp).__anext__()
            assert not ae._streams and ae.num_in_flight == 0
        finally:
            ae.shutdown()
    run(main)


def test_any_step_exception_kills_the_loop_with_engine_dead(model):
    async def main():
        eng = engine(model)

        def broken():
            raise ZeroDivisionError("scheduler bug")
        eng.step = broken
        ae = AsyncEngine(eng)
        ae.start()
        try:
            with pytest.raises(EngineDead, match="scheduler bug"):
                await collect(ae, "x", [1, 2], SamplingParams(max_tokens=3))
        finally:
            ae.shutdown()
    run(main)


def test_admission_racing_with_engine_death_does_not_hang(model):
    """The loop dies between generate()'s liveness check and its add command: nobody will
    ever read that command, so generate() must notice by itself."""
    async def main():
        eng = engine(model)
        ae = AsyncEngine(eng)
        ae.start()
        commands = ae._commands

        class RacingQueue:
            """Kills the loop (and waits for it to die) just before an add is queued."""
            get, get_nowait = commands.get, commands.get_nowait

            def put(self, cmd):
                if cmd[0] == "add":
                    def boom():
                        raise RuntimeError("died meanwhile")
                    eng.has_unfinished_requests = boom
                    commands.put(("wake",))
                    ae._thread.join(5)
                    assert ae.dead is not None
                commands.put(cmd)
        ae._commands = RacingQueue()
        try:
            with pytest.raises(EngineDead):
                await asyncio.wait_for(
                    ae.generate("x", [1, 2], SamplingParams(max_tokens=2)).__anext__(), 5)
        finally:
            ae.shutdown()
    run(main)
