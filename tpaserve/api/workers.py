"""--api-server-count N > 1: N API processes on one port in front of one engine core.

    main process    binds the port, starts the engine core (N output sockets) and then the N
                    API processes, and supervises them; serves nothing itself
    API process i   a whole API server (HTTP, tokenization, output processing, SSE) on the
                    shared listening socket (the kernel spreads connections), frontend i of
                    the core: its requests carry client_index i, their outputs come back to
                    its own socket; it watches the core's pid (pidfd) and its parent
    engine core     as with one API process; its scheduler stats go to API process 0, which
                    alone sets the engine's gauges

Metrics: PROMETHEUS_MULTIPROC_DIR (a fresh directory) is set before any API process starts,
so each keeps its samples in files there and /metrics on any of them shows all merged
(frontend/metrics.render).

Failure semantics, as with one process: the core gone -> every API process fails its open
requests, answers 503, exits 1, and the main process exits 1; an API process gone -> the
others are stopped (drained) and the main process exits 1 (a supervisor restarts the whole
server); the main process killed -> its API processes (parent sentinel) and the core (its
start-up pipe) exit too. SIGTERM or SIGINT to the main process drains the API processes,
then stops the core, and exits 0; a second signal kills everything at once.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

logger = logging.getLogger("tpaserve")


METRICS_DIR_PREFIX = "tpaserve-metrics-"


def serve_with_workers(engine_args, server_args, config, core, sock: socket.socket,
                       names: list[str]) -> int:
    """Start the API processes over a ready core (a CoreProcess for len(outputs) clients),
    supervise them; returns the exit status."""
    ctx = multiprocessing.get_context("spawn")
    n = len(core.addresses.outputs)
    workers = [ctx.Process(target=run_api_worker, name=f"tpaserve-api-{i}", args=(
        i, engine_args, server_args, names, core.addresses, core.pid, core.info,
        sock)) for i in range(n)]
    for w in workers:
        w.start()
    sock.close()                            # the API processes hold their own copies
    logger.info("%d API processes: %s", n, ", ".join(str(w.pid) for w in workers))
    return _supervise(core, workers)


def _supervise(core, workers: list) -> int:
    stopping = False

    def on_signal(sig, frame) -> None:
        nonlocal stopping
        if stopping:                         # the second signal: everything, now
            for w in workers:
                if w.is_alive():
                    w.kill()
            core.kill()
            os._exit(1)
        stopping = True
        logger.info("signal %s: draining %d API processes", signal.Signals(sig).name,
                    len(workers))
        _terminate(workers)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    while any(w.is_alive() for w in workers):
        watch = [w.sentinel for w in workers if w.is_alive()]
        if core.alive():
            watch.append(core.sentinel)
        multiprocessing.connection.wait(watch, timeout=1.0)
        if not core.alive() and not stopping:
            # the API processes see it through their pidfds and exit 1 on their own
            logger.error("the engine core process ended unexpectedly (%s)", core.describe_exit())
            code, stopping = 1, True
        gone = [w for w in workers if not w.is_alive() and w.exitcode != 0]
        if gone and not stopping:
            logger.error("API process %s ended unexpectedly (exit status %s): stopping the "
                         "server", gone[0].pid, gone[0].exitcode)
            code, stopping = 1, True
            _terminate(workers)
    if any(w.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT) for w in workers):
        code = 1
    if core.alive():
        from tpaserve.frontend.core_client import AsyncMPClient
        AsyncMPClient.send_shutdown(core.addresses)
    core.stop(10)
    logger.info("engine stopped")
    return code


def _terminate(workers: list) -> None:
    for w in workers:
        if w.is_alive():
            os.kill(w.pid, signal.SIGTERM)


def run_api_worker(index: int, engine_args, server_args, names: list[str],
                   addresses, core_pid: int, info, sock: socket.socket) -> None:
    """API process `index`: a whole server, frontend `index` of the core."""
    logging.basicConfig(level=server_args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s [api {index}]: %(message)s")
    parent = multiprocessing.parent_process()
    threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()
    from tpaserve.api.shutdown import make_server
    from tpaserve.frontend.async_llm import AsyncLLM
    from tpaserve.frontend.core_client import AttachedCore
    tokenizer = engine_args.load_tokenizer()
    config = engine_args.create_engine_config(tokenizer)
    llm = AsyncLLM(config, tokenizer, core=AttachedCore(addresses, core_pid, info),
                   client_index=index)
    server = make_server(llm, names, server_args, ignore_sigint=True)
    server.run(sockets=[sock])
    sys.exit(server.exit_code or (0 if server.started else 1))


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    logging.getLogger("tpaserve").error("the main process went away: exiting")
    # its exit hook that removes the metrics directory did not run (SIGKILL): every API
    # process tries, the first one wins
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.basename(path).startswith(METRICS_DIR_PREFIX):
        shutil.rmtree(path, ignore_errors=True)
    os._exit(1)


def metrics_dir() -> str:
    """A fresh PROMETHEUS_MULTIPROC_DIR for this server's API processes (set in the
    environment before any of them starts; removed at exit)."""
    path = tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    import atexit
    atexit.register(shutil.rmtree, path, True)
    return path
