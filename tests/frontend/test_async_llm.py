"""AsyncLLM: the engine core in its own (real, spawned) process, one async stream per request.
Streams must equal the in-process engine's outputs; a consumer that goes away aborts and the
core frees its blocks; admission errors, from this side or from the core, raise before the
first yield; a core killed with SIGKILL fails every waiting stream at once instead of
hanging; shutdown ends the core process with status 0. Every test runs under a timeout."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from tpaserve.args import EngineArgs
from tpaserve.config import ModelConfig
from tpaserve.exceptions import EngineDeadError, QueueFull, RequestRejected, SamplingParamsError
from tpaserve.frontend.async_llm import AsyncLLM
from tpaserve.frontend.llm_engine import build_engine
from tpaserve.models.loader import load, save_checkpoint
from tpaserve.models.t6 import T6
from tpaserve.sampling_params import SamplingParams

V = 101
TIMEOUT = 60.0
ARGS = dict(num_blocks=64, block_size=4, max_num_batched_tokens=32, device="cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = ModelConfig(n_layer=2, n_head=5, head_dim=8, n_embd=32, vocab_size=V, k_rank=2,
                      v_rank=2, q_rank=3, max_position=256)
    path = tmp_path_factory.mktemp("async_llm") / "ckpt"
    save_checkpoint(T6(cfg).init_random(seed=4, std=0.3), path)
    return path


def start(checkpoint, **kw) -> AsyncLLM:
    """An AsyncLLM whose core process is ready (no tokenizer: token-id prompts)."""
    config = EngineArgs(model=str(checkpoint), **{**ARGS, **kw}).create_engine_config()
    llm = AsyncLLM(config)
    llm.wait_ready(timeout=TIMEOUT)
    return llm


def run(coro_fn, *args):
    """Run coro_fn(*args) on a fresh event loop under a global timeout."""
    return asyncio.run(asyncio.wait_for(coro_fn(*args), TIMEOUT))


async def wait_until(pred, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


def drained(llm: AsyncLLM) -> bool:
    """The core's last report: nothing running or waiting, no block in use."""
    s = llm.stats
    return s is not None and s.num_running == s.num_waiting == s.num_blocks_used == 0


async def collect(llm: AsyncLLM, rid, prompt, params):
    """Final output and the concatenated streamed deltas of every sequence."""
    deltas, last = {}, None
    async for out in llm.generate(rid, prompt, params):
        assert not (last is not None and last.finished)
        for o in out.outputs:
            deltas.setdefault(o.index, []).extend(o.token_ids_delta)
        last = out
    return last, deltas


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


def test_concurrent_streams_equal_the_in_process_engine(checkpoint):
    reqs = workload()
    eng = build_engine(load(checkpoint, dtype="float32", device="cpu"), **ARGS)
    for rid, p, sp in reqs:
        eng.add_request(rid, p, sp)
    want = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                want[out.request_id] = [o.token_ids for o in out.outputs]

    async def main():
        llm = start(checkpoint)
        await llm.start()
        try:
            assert llm.ready and llm.info.pid != os.getpid()
            results = await asyncio.gather(*(collect(llm, *r) for r in reqs))
            for (rid, _, _), (last, deltas) in zip(reqs, results):
                assert last.finished and last.request_id == rid
                assert [o.token_ids for o in last.outputs] == want[rid]
                assert [deltas[o.index] for o in last.outputs] == want[rid]
            assert llm.num_in_flight == 0 and not llm.processor.requests
            await wait_until(lambda: drained(llm))
        finally:
            await llm.disconnect()
            llm.shutdown()
        assert llm.core.proc.exitcode == 0
    run(main)


def test_leaving_a_stream_aborts_it_in_the_core(checkpoint):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        llm = start(checkpoint)
        await llm.start()
        try:
            n = 0
            async for _ in llm.generate("leave", list(range(1, 30)), long):
                n += 1
                if n == 3:
                    break                  # the generator is dropped: aclose() runs, aborts
            await wait_until(lambda: drained(llm))
            # explicit aclose(), and cancelling a consumer task, abort too
            agen = llm.generate("closed", list(range(1, 30)), long)
            await agen.__anext__()
            await agen.aclose()
            await wait_until(lambda: drained(llm))

            async def consume():
                async for _ in llm.generate("cancelled", list(range(1, 30)), long):
                    pass
            task = asyncio.create_task(consume())
            await wait_until(lambda: llm.stats.num_blocks_used > 0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: drained(llm))
            assert llm.num_in_flight == 0 and not llm.processor.requests
            last, _ = await collect(llm, "after", [1, 2, 3], SamplingParams(max_tokens=4))
            assert len(last.outputs[0].token_ids) == 4
        finally:
            await llm.disconnect()
            llm.shutdown()
    run(main)


def test_admission_errors_raise_before_the_first_yield(checkpoint):
    async def main():
        llm = start(checkpoint, num_blocks=16, max_num_seqs=1, max_queued_requests=2)
        await llm.start()
        try:
            # checked in this process, before anything is sent
            with pytest.raises(RequestRejected, match="256"):
                await llm.generate("long", [1] * 250, SamplingParams(max_tokens=10)).__anext__()
            with pytest.raises(RequestRejected, match="cache blocks"):
                await llm.generate("big", [1] * 60, SamplingParams(max_tokens=10)).__anext__()
            with pytest.raises(SamplingParamsError):
                await llm.generate("oov", [1], SamplingParams(stop_token_ids=[V + 1])).__anext__()
            with pytest.raises(RequestRejected, match="outside the vocabulary"):
                await llm.generate("tok", [V], SamplingParams()).__anext__()
            with pytest.raises(RequestRejected, match="tokenizer"):
                await llm.generate("stop", [1], SamplingParams(stop=["x"])).__anext__()
            # refused by the core: its queue holds 2 sequences and one runs; ten sent in
            # one burst (no await between the sends) reach it before its first step ends.
            # 2 are admitted, or 3 if a step moved the first to running between arrivals
            sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
            results = await asyncio.gather(*(collect(llm, f"b{i}", [1, 2], sp)
                                             for i in range(10)), return_exceptions=True)
            full = [r for r in results if isinstance(r, QueueFull)]
            done = [r for r in results if not isinstance(r, BaseException)]
            assert len(full) + len(done) == 10 and full and len(done) >= 2, results
            assert all("queue is full" in str(r) for r in full)
            for last, _ in done:
                assert last.finished and len(last.outputs[0].token_ids) == 40
            with pytest.raises(RequestRejected, match="could never be admitted"):
                await llm.generate("n3", [5], SamplingParams(n=3)).__anext__()
            assert llm.num_in_flight == 0 and not llm.processor.requests
            await wait_until(lambda: drained(llm))
        finally:
            await llm.disconnect()
            llm.shutdown()
    run(main)


def test_duplicate_request_id_is_rejected_without_hurting_the_first(checkpoint):
    async def main():
        llm = start(checkpoint)
        await llm.start()
        try:
            sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
            first = asyncio.create_task(collect(llm, "same", [1, 2, 3], sp))
            await wait_until(lambda: "same" in llm.processor.requests)
            with pytest.raises(RequestRejected, match="already in flight"):
                await llm.generate("same", [4, 5], sp).__anext__()
            last, _ = await first
            assert last.finished and len(last.outputs[0].token_ids) == 30
            await wait_until(lambda: drained(llm))
        finally:
            await llm.disconnect()
            llm.shutdown()
    run(main)


def test_a_killed_core_fails_every_waiting_stream_at_once(checkpoint):
    async def main():
        llm = start(checkpoint, max_num_seqs=2)
        died = []
        llm.on_dead(died.append)
        await llm.start()
        try:
            sp = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
            tasks = [asyncio.create_task(collect(llm, f"r{i}", [i + 1] * 5, sp)) for i in range(4)]
            await wait_until(lambda: llm.stats is not None and llm.stats.num_running == 2)
            os.kill(llm.core.pid, signal.SIGKILL)
            t0 = time.monotonic()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert time.monotonic() - t0 < 5
            assert all(isinstance(r, EngineDeadError) for r in results), results
            assert "SIGKILL" in str(results[0])
            assert not llm.ready and llm.dead is not None and died == [llm.dead]
            with pytest.raises(EngineDeadError):
                await llm.generate("after", [1], sp).__anext__()
            assert llm.num_in_flight == 0 and not llm.processor.requests
        finally:
            await llm.disconnect()
            llm.shutdown()
    run(main)


def test_reconnect_then_shutdown_stops_the_core(checkpoint):
    async def main():
        llm = start(checkpoint)
        await llm.start()
        last, _ = await collect(llm, "x", [1, 2], SamplingParams(max_tokens=3))
        assert last.finished
        await llm.disconnect()               # an app's lifespan ends; the core serves on
        assert not llm.ready and llm.core.alive()
        await llm.start()
        last, _ = await collect(llm, "y", [1, 2], SamplingParams(max_tokens=3))
        assert last.finished and llm.ready
        # Linux's abstract namespace: no socket file is ever made, none can be left behind
        assert all(a.startswith("ipc://@") for a in
                   (llm.core.addresses.input, *llm.core.addresses.outputs))
        await llm.disconnect()
        llm.shutdown()
        assert llm.core.proc.exitcode == 0 and not llm.core.alive()
    run(main)


def test_a_process_that_exits_without_stopping_its_core_takes_it_along(checkpoint, tmp_path):
    """A failed start-up (or any exception) may leave the core unstopped: the process must
    still exit at once, and the core with it (the core ignores SIGTERM, so multiprocessing's
    own exit hook alone would wait for it forever)."""
    script = tmp_path / "leave.py"
    script.write_text(f"""
import sys
from tpaserve.args import EngineArgs
from tpaserve.frontend.core_client import CoreProcess
if __name__ == "__main__":
    config = EngineArgs(model={str(checkpoint)!r}, device="cpu", num_blocks=16).create_engine_config()
    core = CoreProcess(config)
    core.wait_ready(60)
    print(core.pid, flush=True)
    sys.exit(3)
""")
    import subprocess
    import sys
    start = time.monotonic()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=90)
    assert out.returncode == 3, out.stderr[-2000:]
    pid = int(out.stdout.split()[0])
    assert time.monotonic() - start < 60
    end = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}"):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                break
        assert time.monotonic() < end, "the core outlived its parent"
        time.sleep(0.05)
