"""How the server stops: the first SIGTERM or SIGINT drains, a second one exits at once; the
engine core dying makes it exit with status 1."""
from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger("tpaserve")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with tpaserve's shutdown. The first signal stops accepting, marks
    the app draining (/health answers 503, so balancers and k8s readiness move traffic
    away) and lets in-flight requests finish within --graceful-shutdown-timeout; then it
    stops the engine core. A second signal of either kind exits at once (uvicorn
    alone forces only on a second SIGINT)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, llm=None,
                 ignore_sigint: bool = False):
        """ignore_sigint: one of several API processes, whose main process turns a Ctrl-C
        (which reaches the whole process group) into one SIGTERM for each of them."""
        super().__init__(config)
        self.app_state, self.llm = app.state, llm
        self.ignore_sigint = ignore_sigint
        self.exit_code = 0

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
        super().handle_exit(sig, frame)

    def engine_died(self, exc: BaseException) -> None:
        """The engine core process is gone: every open request has its error already; stop
        serving and exit non-zero, so a supervisor starts a new server."""
        logger.error("exiting: %s", exc)
        self.exit_code = 1
        self.should_exit = True
