"""The `tpaserve` server with a stand-in engine core, to measure the API process alone: the
stand-in speaks the engine core's protocol (engine/messages.py over the same ZMQ sockets) and
"generates" every live request FAKE_CORE_TOKENS random token ids each FAKE_CORE_STEP_MS
milliseconds, with no model, until its max_tokens. What the server then makes per second is
what its HTTP, output processing and SSE can carry.

    FAKE_CORE_TOKENS=8 FAKE_CORE_STEP_MS=2 python bench/fake_core.py --model DIR --port 8000 \
        [--api-server-count N ...any tpaserve flag]

then drive it with bench.serve / bench.offline_vs_served (--skip-offline) as a real server.
How it hooks in: the engine core process is spawned by multiprocessing, which imports this
script in the child as `__mp_main__`; the import replaces the core's entry point there (and
here, before the CLI spawns it). Nothing in the package knows about it.
"""
from __future__ import annotations

import os
import queue
import random
import sys
import threading
import time

import msgspec
import zmq

from tpaserve.engine.messages import (
    Abort,
    AddRequests,
    CoreInput,
    CoreReady,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineInfo,
    SchedulerStats,
    Shutdown,
)


def run_fake_core(config, addresses, conn, log_level: str = "info") -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tokens = int(os.environ.get("FAKE_CORE_TOKENS", "8"))
    step_s = float(os.environ.get("FAKE_CORE_STEP_MS", "2")) / 1e3
    vocab = config.vocab_size or 1000
    max_len = config.scheduler.max_model_len or 4096
    info = EngineInfo(max_model_len=max_len, vocab_size=vocab, num_blocks=1 << 20,
                      block_size=16, device="none", dtype="none", num_scheduler_steps=tokens,
                      async_scheduling=True, enable_prefix_caching=False, bytes_per_token=1,
                      mha_bytes_per_token=1, n_layer=1, n_head=1, head_dim=1, k_rank=1,
                      v_rank=1, mha_heads=1, cache_summary="fake engine core: no model",
                      pid=os.getpid())
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.bind(addresses.input)
    outs = []
    for addr in addresses.outputs:
        s = ctx.socket(zmq.PUSH)
        s.connect(addr)
        outs.append(s)
    conn.send_bytes(msgspec.msgpack.encode(CoreReady(info)))
    threading.Thread(target=_watch, args=(conn,), daemon=True).start()
    dec, enc = msgspec.msgpack.Decoder(CoreInput), msgspec.msgpack.Encoder()
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def receive():
        while True:
            inbox.put(dec.decode(inp.recv()))
    threading.Thread(target=receive, daemon=True).start()
    live: dict[str, list] = {}            # id -> [client, tokens left]
    rng = random.Random(0)
    next_step = time.monotonic()
    while True:
        while True:
            try:
                msg = inbox.get(timeout=max(0.0, next_step - time.monotonic())
                                if not live else 0)
            except queue.Empty:
                break
            if isinstance(msg, AddRequests):
                for r in msg.requests:
                    live[r.request_id] = [r.client_index, r.params.max_tokens or 16]
            elif isinstance(msg, Abort):
                for rid in msg.request_ids:
                    live.pop(rid, None)
            elif isinstance(msg, Shutdown):
                return
            if not live:
                next_step = time.monotonic()
        delay = next_step - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        next_step = max(next_step + step_s, time.monotonic())
        by_client: dict[int, list] = {}
        for rid, state in list(live.items()):
            n = min(tokens, state[1])
            state[1] -= n
            done = state[1] == 0
            by_client.setdefault(state[0], []).append(EngineCoreOutput(
                rid, [rng.randrange(vocab) for _ in range(n)],
                finish_reason="length" if done else None))
            if done:
                del live[rid]
        stats = SchedulerStats(num_running=len(live), step_durations=[step_s],
                               step_tokens=[tokens * len(live)], step_seqs=[len(live)])
        for client, s in enumerate(outs):
            s.send(enc.encode(EngineCoreOutputs(by_client.get(client, []),
                                                stats if client == 0 else None)))


def _watch(conn) -> None:
    try:
        while True:
            conn.recv_bytes()
    except (EOFError, OSError):
        os._exit(1)


if __name__ in ("__main__", "__mp_main__"):
    import tpaserve.core.process
    tpaserve.core.process.run_engine_core = run_fake_core

if __name__ == "__main__":
    from tpaserve.api.cli import main
    main(sys.argv[1:])
