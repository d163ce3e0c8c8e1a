"""How the server stops: the first SIGTERM or SIGINT drains, a second one exits at once; the
engine core dying makes it exit with status 1.

When the drain time runs out, the requests still open are ended by the server, not cut:
each gets a 503 `shutting_down` (a stream: an error event, then `data: [DONE]`), and uvicorn
is given DRAIN_GRACE_S more to send those before it cancels what is left."""
from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn
from fastapi import FastAPI

from tpaserve.exceptions import ServerShuttingDown

logger = logging.getLogger("tpaserve")


DRAIN_GRACE_S = 2.0


def make_server(llm, names: list[str], args, ignore_sigint: bool = False) -> DrainingServer:
    """The uvicorn server of one API process: the app over `llm` with `args` (ServerArgs)."""
    from tpaserve.api.server import build_app
    app = build_app(llm, names, args)
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="on", log_config=None,
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout
                            + DRAIN_GRACE_S)
    server = DrainingServer(config, app, llm, ignore_sigint=ignore_sigint,
                            drain_timeout=args.graceful_shutdown_timeout)
    app.state.on_engine_dead = server.engine_died
    return server


class DrainingServer(uvicorn.Server):
    """uvicorn's server with tpaserve's shutdown. The first signal stops accepting, marks
    the app draining (/health answers 503, so balancers and k8s readiness move traffic
    away) and lets in-flight requests finish within --graceful-shutdown-timeout; then it
    stops the engine core. A second signal of either kind exits at once (uvicorn
    alone forces only on a second SIGINT)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, llm=None,
                 ignore_sigint: bool = False, drain_timeout: float | None = None):
        """ignore_sigint: one of several API processes, whose main process turns a Ctrl-C
        (which reaches the whole process group) into one SIGTERM for each of them.
        drain_timeout: when the requests still open are ended (None: uvicorn's timeout
        cuts them)."""
        super().__init__(config)
        self.app_state, self.llm = app.state, llm
        self.ignore_sigint = ignore_sigint
        self.drain_timeout = drain_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def _end_open_requests(self) -> None:
        n = self.llm.fail_all(ServerShuttingDown(
            f"the server is shutting down and its drain time ran out "
            f"(--graceful-shutdown-timeout {self.drain_timeout:g} s)"))
        if n:
            logger.warning("drain time ran out: ended %d open request(s) with 503 "
                           "shutting_down", n)

    async def shutdown(self, sockets=None) -> None:
        """uvicorn's shutdown (drain, then the app's lifespan), then the engine core: here,
        before uvicorn re-raises the signal it caught, which ends the process."""
        await super().shutdown(sockets)
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)
            logger.info("engine stopped")

    def handle_exit(self, sig, frame) -> None:
        if self.ignore_sigint and sig == signal.SIGINT:
            return
        if self.should_exit:
            self.force_exit = True
        else:
            self.app_state.draining = True
            logger.info("signal %s: draining in-flight requests (send it again to exit at once)",
                        getattr(sig, "name", sig))
            if self.drain_timeout is not None and self.llm is not None and self._loop:
                # from the signal handler: through the loop, never directly
                self._loop.call_soon_threadsafe(self._loop.call_later, self.drain_timeout,
                                                self._end_open_requests)
        super().handle_exit(sig, frame)

    def engine_died(self, exc: BaseException) -> None:
        """The engine core process is gone: every open request has its error already; stop
        serving and exit non-zero, so a supervisor starts a new server."""
        logger.error("exiting: %s", exc)
        self.exit_code = 1
        self.should_exit = True
