"""The engine as the HTTP server sees it: the engine core runs in its own process; this side
lives on the server's event loop. Each request is an async iterator of RequestOutputs.

    generate()  checks what can be checked here (token ids, lengths, stop strings), sends the
                request's sequences to the core, and yields its outputs; the first item is
                an error (RequestRejected / QueueFull raised) if the core refused it.
    output loop one task: core outputs -> OutputProcessor (text, stop strings, n > 1) ->
                metrics -> each request's queue; sequences a stop string ended are aborted
                in the core.
    abort       a consumer that stops iterating (disconnect, cancellation) aborts its request;
                the core frees its blocks when the message arrives (before its next step).

If the core process ends without being asked (killed, crashed, or CoreDead after failed
steps), every open request gets EngineDeadError at once, `ready` turns False, and the
`on_dead` callbacks run (the server uses one to exit non-zero, so a supervisor restarts it).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from tpaserve.config import EngineConfig
from tpaserve.engine.messages import CoreDead, EngineInfo, RequestError, SchedulerStats
from tpaserve.engine.scheduler import check_priority, check_request, check_sequences
from tpaserve.exceptions import EngineDeadError, QueueFull, RequestRejected
from tpaserve.frontend.core_client import AsyncMPClient, CoreProcess
from tpaserve.frontend.output_processor import OutputProcessor
from tpaserve.frontend.outputs import RequestOutput
from tpaserve.sampling_params import SamplingParams

logger = logging.getLogger("tpaserve.frontend")


def refusal(err: RequestError) -> Exception:
    """The exception for a request the core did not admit."""
    if err.kind == "queue_full":
        return QueueFull(err.message)
    return RequestRejected(err.message, err.param)


class AsyncLLM:
    def __init__(self, config: EngineConfig, tokenizer=None, log_level: str = "info",
                 core=None, client_index: int = 0):
        """Spawns the engine core process (it loads the model; `wait_ready` waits for it),
        or, given `core` (an AttachedCore), serves as frontend `client_index` of a core
        another process started."""
        self.tokenizer = tokenizer
        self.processor = OutputProcessor(tokenizer)
        self.core = core or CoreProcess(config, num_clients=1, log_level=log_level)
        self.client_index = client_index
        self.info: EngineInfo | None = getattr(core, "info", None)
        self.metrics = None              # frontend/metrics.EngineMetrics, set by the server
        self.stats: SchedulerStats | None = None   # the core's state after its last step
        self.dead: EngineDeadError | None = None
        self.shutting_down = False
        self._streams: dict[str, asyncio.Queue] = {}
        self._client: AsyncMPClient | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_dead: list[Callable[[EngineDeadError], None]] = []

    # ---- lifecycle -----------------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> EngineInfo:
        """Blocks until the core has loaded the model (raises core_client.CoreStartError)."""
        self.info = self.core.wait_ready(timeout)
        return self.info

    async def start(self) -> None:
        """Connect to the ready core from the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._client = AsyncMPClient(self.core.addresses, self.client_index)
        self._loop.add_reader(self.core.sentinel, self._core_exited)
        self._task = asyncio.create_task(self._output_loop(), name="tpaserve-outputs")

    @property
    def ready(self) -> bool:
        """Connected and alive. Asks the OS about the core process too (waitpid, no hang),
        so /health turns 503 the moment it is gone, before its exit is handled."""
        return (self._task is not None and self.dead is None and not self._task.done()
                and self.core.alive())

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def on_dead(self, callback: Callable[[EngineDeadError], None]) -> None:
        self._on_dead.append(callback)

    async def disconnect(self) -> None:
        """Close this loop's sockets and output task (the app's lifespan ends); the core runs
        on, and `start()` may connect again."""
        if self._loop is not None:
            self._loop.remove_reader(self.core.sentinel)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            self._client.close()
        self._task = self._client = self._loop = None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core process (after the server drained its requests and disconnected):
        it gets Shutdown, and is killed if it has not exited within `timeout`. An attached
        frontend only lets go of it (its owner stops it)."""
        self.shutting_down = True
        if isinstance(self.core, CoreProcess) and self.core.alive():
            AsyncMPClient.send_shutdown(self.core.addresses)
        self.core.stop(timeout)

    # ---- requests ------------------------------------------------------------------------
    def check_sequences(self, count: int, param: str = "n") -> None:
        """RequestRejected if a client request of `count` sequences (its prompts x n) could
        never be admitted under the queue's bound."""
        check_sequences(count, self.info.max_queued_requests, param)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, priority: int = 0
                       ) -> AsyncIterator[RequestOutput]:
        """Admit the request (admission errors raise at the first __anext__, before anything
        is yielded), then yield its outputs until it finishes."""
        if self.dead is not None:
            raise self.dead
        if request_id in self._streams:
            raise RequestRejected(f"request id {request_id!r} is already in flight", "request_id")
        info = self.info
        check_request(prompt_token_ids, params, vocab_size=info.vocab_size,
                      max_model_len=info.max_model_len, num_blocks=info.num_blocks,
                      block_size=info.block_size)
        check_priority(priority, info.scheduling_policy)
        check_sequences(params.n, info.max_queued_requests)
        if self._client is None:
            raise EngineDeadError("the engine is not connected")
        reqs = self.processor.add_request(request_id, prompt_token_ids, params,
                                          time.monotonic(), priority, self.client_index)
        try:
            self._client.add(reqs)
        except BaseException:
            self.processor.fail_request(request_id)
            raise
        # registered after the send: no output can arrive before it (no await in between)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None and item.error.kind != "step_failed":
                    finished = True
                    raise refusal(item.error)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def fail_all(self, exc: BaseException) -> int:
        """End every open request with `exc` (raised from its stream; its sequences are
        aborted in the core). The server's drain deadline. Returns how many there were."""
        for stream in self._streams.values():
            stream.put_nowait(exc)
        return len(self._streams)

    def abort(self, request_id: str) -> None:
        seqs = self.processor.abort_request(request_id)
        if seqs and self.dead is None and self._client is not None:
            self._client.abort(seqs)

    # ---- the output loop -----------------------------------------------------------------
    async def _output_loop(self) -> None:
        try:
            while True:
                msg = await self._client.get()
                if isinstance(msg, CoreDead):
                    self._die(msg.message)
                    return
                if msg.stats is not None:
                    self.stats = msg.stats
                processed = self.processor.process(msg.outputs) if msg.outputs else None
                if self.metrics is not None:
                    # before the outputs go out: a client that has its response sees it counted
                    if msg.stats is not None:
                        self.metrics.observe_core(msg.stats)
                    self.metrics.observe(self.processor.take_stats())
                if processed is None:
                    continue
                for out in processed.request_outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put_nowait(out)
                self._client.abort(processed.aborts)
        except asyncio.CancelledError:
            raise
        except Exception as exc:                       # noqa: BLE001 - every client must hear
            logger.exception("the output loop failed")
            self._die(f"the output loop failed: {type(exc).__name__}: {exc}")
            self.core.kill()

    def _core_exited(self) -> None:
        self._loop.remove_reader(self.core.sentinel)
        if self.shutting_down:
            return
        self._die(f"the engine core process ended unexpectedly ({self.core.describe_exit()})")

    def _die(self, message: str) -> None:
        if self.dead is not None:
            return
        self.dead = EngineDeadError(message)
        logger.error("%s", self.dead)
        for stream in self._streams.values():
            stream.put_nowait(self.dead)
        for rid in list(self.processor.requests):
            self.processor.fail_request(rid)
        for callback in self._on_dead:
            callback(self.dead)
