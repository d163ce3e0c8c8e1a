"""The engine for the HTTP server: LLMEngine.step() runs in one background thread, and each
request is an async iterator of RequestOutputs on the server's event loop.

Only the step thread touches the LLMEngine. The event loop talks to it through a command
queue (add, abort) and gets outputs back through loop.call_soon_threadsafe, so neither
side blocks the other. A consumer that stops iterating (client disconnect, cancellation)
aborts its request; the abort is applied before the next step, so its blocks are free
within one step.

Metrics are observed here, in the step thread: after every pass of the loop the engine's
stats (step times, token times, finished requests; see llm_engine.EngineStats) go to
EngineMetrics before that pass's outputs are handed to the event loop, so a client that has
its response sees it counted. A request's arrival is taken when `generate` is called.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from tpaserve.engine.llm_engine import EngineDeadError, LLMEngine
from tpaserve.engine.metrics import EngineMetrics
from tpaserve.engine.outputs import RequestOutput
from tpaserve.engine.scheduler import RequestRejected
from tpaserve.sampling_params import SamplingParams

logger = logging.getLogger("tpaserve.engine")


class EngineDead(RuntimeError):
    """Raised to every waiting client once the step loop has died."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: EngineMetrics | None = None):
        self.engine, self.metrics = engine, metrics
        engine.collect_stats = metrics is not None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.dead: BaseException | None = None
        self.num_in_flight = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tpaserve-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- requests ------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Admit the request (admission errors raise here, before anything is yielded),
        then yield its outputs until it finishes."""
        if self.dead is not None:
            raise EngineDead(f"the engine has stopped: {self.dead}")
        if request_id in self._streams:
            # checked here, not only by the engine: registering this stream would replace
            # the live request's stream, and the rejection would then drop it (it hung)
            raise RequestRejected(f"request id {request_id!r} is already in flight", "request_id")
        stream: asyncio.Queue = asyncio.Queue()
        admitted = self._loop.create_future()
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt_token_ids, params, priority, admitted,
                            time.monotonic()))
        if self.dead is not None:
            # the loop died after the check above and may have drained the queue already:
            # nobody would ever answer this command
            _set_exception(admitted, EngineDead(f"the engine has stopped: {self.dead}"))
        try:
            await admitted
        except BaseException:
            self._streams.pop(request_id, None)
            if admitted.cancelled():
                # the caller went away (cancelled) while the add was queued: the add still
                # runs, so abort it after, or it would generate for nobody to the end
                self.abort(request_id)
            raise
        self.num_in_flight += 1
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self.num_in_flight -= 1
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # ---- the step thread ---------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                self._drain(block=not eng.has_unfinished_requests())
                outs = eng.step() if eng.has_unfinished_requests() else []
                if self.metrics is not None:
                    self.metrics.observe(eng.take_stats())
                for out in outs:
                    self._emit(out.request_id, out)
        except BaseException as exc:             # noqa: BLE001 - the loop must report it
            logger.exception("engine loop died")
            self.dead = exc if isinstance(exc, EngineDeadError) else EngineDead(repr(exc))
            for rid in list(self._streams):
                self._emit(rid, EngineDead(f"the engine has stopped: {exc}"))
            self._fail_pending_admissions()

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, ids, params, priority, fut, arrival = cmd
            try:
                self.engine.add_request(rid, ids, params, priority, arrival)
            except Exception as exc:             # noqa: BLE001 - handed to the caller
                self._loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                self._loop.call_soon_threadsafe(_set_result, fut, None)
        elif cmd[0] == "abort":
            self.engine.abort_request(cmd[1])

    def _fail_pending_admissions(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                self._loop.call_soon_threadsafe(_set_exception, cmd[5], EngineDead("the engine has stopped"))

    def _emit(self, request_id: str, item) -> None:
        def put() -> None:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(item)
        self._loop.call_soon_threadsafe(put)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
