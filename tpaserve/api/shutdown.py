"""How the server stops: the first SIGTERM or SIGINT drains, a second one exits at once."""
from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger("tpaserve")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with tpaserve's shutdown. The first signal stops accepting, marks
    the app draining (/health answers 503, so balancers and k8s readiness move traffic
    away) and lets in-flight requests finish within --graceful-shutdown-timeout. A second
    signal of either kind exits at once (uvicorn alone forces only on a second SIGINT)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app_state = app.state

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:
            self.force_exit = True
        else:
            self.app_state.draining = True
            logger.info("signal %s: draining in-flight requests (send it again to exit at once)",
                        getattr(sig, "name", sig))
        super().handle_exit(sig, frame)
