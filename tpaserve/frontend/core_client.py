"""How a frontend reaches an engine core. The one module of the frontend that knows where the
core runs:

  InprocClient    the EngineCore in this process, stepped by the caller (offline LLM, tests)
  CoreProcess     the engine core process: spawned, its start-up handshake, its exit
  AttachedCore    a core process another process owns (one of several API processes)
  AsyncMPClient   one frontend's sockets to it: a PUSH for inputs, a PULL for its outputs

Messages are engine/messages.py's msgspec Structs, msgpack-encoded. Inputs are sent from
a plain (blocking) socket: a PUSH with no high-water mark queues without waiting, so a send
never blocks the event loop. Outputs are awaited on an asyncio socket.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import uuid

import msgspec
import zmq
import zmq.asyncio

from tpaserve.config import EngineConfig
from tpaserve.engine.messages import (
    Abort,
    AddRequests,
    CoreFailed,
    CoreHandshake,
    CoreOutput,
    CoreReady,
    EngineCoreOutput,
    EngineCoreRequest,
    EngineInfo,
    SchedulerStats,
    Shutdown,
)

logger = logging.getLogger("tpaserve.frontend")


class CoreStartError(RuntimeError):
    """The engine core did not start. user_error: the CLI prints one line and exits 2."""

    def __init__(self, message: str, user_error: bool):
        super().__init__(message)
        self.user_error = user_error


class InprocClient:
    """The engine core in this process. `step()` runs one step and returns its outputs."""

    def __init__(self, config: EngineConfig, model=None):
        from tpaserve.core.engine_core import EngineCore
        self.core = EngineCore(config, model)
        self.info: EngineInfo = self.core.info

    def add(self, reqs: list[EngineCoreRequest]) -> list[EngineCoreOutput]:
        """Admit a group; the outputs say why it was refused (empty: admitted)."""
        return self.core.add_requests(reqs)

    def abort(self, request_ids: list[str]) -> None:
        self.core.abort(request_ids)

    def step(self) -> list[EngineCoreOutput]:
        return self.core.step()

    def has_work(self) -> bool:
        return self.core.has_work()

    def take_stats(self) -> SchedulerStats:
        return self.core.take_stats()


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        import signal
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class CoreProcess:
    """Spawns the engine core process for `num_clients` frontends and waits for it."""

    def __init__(self, config: EngineConfig, num_clients: int = 1, log_level: str = "info"):
        from tpaserve.core.process import CoreAddresses, run_engine_core  # torch-free
        # Linux's abstract socket namespace: no file to leave behind, no path-length limit
        base = f"ipc://@tpaserve-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.addresses = CoreAddresses(input=f"{base}-in",
                                       outputs=[f"{base}-out{i}" for i in range(num_clients)])
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        # if this process is killed, the pipe's end of file stops the core; if it exits any
        # other way without stopping the core (a failed start-up, an exception), the atexit
        # hook does (before multiprocessing's own, which would wait for it forever: the core
        # ignores SIGTERM)
        self.proc = ctx.Process(target=run_engine_core, name="tpaserve-core",
                                args=(config, self.addresses, child, log_level))
        self.proc.start()
        child.close()
        self.info: EngineInfo | None = None
        atexit.register(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        if self.proc.is_alive():
            AsyncMPClient.send_shutdown(self.addresses)
            self.stop(5.0)

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def sentinel(self) -> int:
        return self.proc.sentinel

    def wait_ready(self, timeout: float | None = None) -> EngineInfo:
        """Block until the core says it is ready. Raises CoreStartError."""
        dec = msgspec.msgpack.Decoder(CoreHandshake)
        waited = 0.0
        while True:
            if self._conn.poll(0.2):
                try:
                    msg = dec.decode(self._conn.recv_bytes())
                except EOFError:
                    msg = None
                if isinstance(msg, CoreReady):
                    self.info = msg.info
                    return msg.info
                self.proc.join(10)
                if isinstance(msg, CoreFailed):
                    raise CoreStartError(msg.message, msg.user_error)
                raise CoreStartError(f"the engine core process ended during start-up "
                                     f"({describe_exit(self.proc.exitcode)})", False)
            if not self.proc.is_alive():
                raise CoreStartError(f"the engine core process ended during start-up "
                                     f"({describe_exit(self.proc.exitcode)})", False)
            waited += 0.2
            if timeout is not None and waited > timeout:
                self.kill()
                raise CoreStartError(f"the engine core did not start within {timeout:.0f} s",
                                     False)

    def alive(self) -> bool:
        return self.proc.is_alive()

    def describe_exit(self) -> str:
        self.proc.join(1)
        return describe_exit(self.proc.exitcode)

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the core to exit (after a Shutdown was sent), killing it if it lingers."""
        self.proc.join(timeout)
        self.kill()
        self._conn.close()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


class AttachedCore:
    """A core process started by another process (the CLI's main process, with several API
    processes): its addresses and pid, watched through a pidfd (readable once it exits).
    Its owner stops it; here `stop` only closes the watch."""

    def __init__(self, addresses, pid: int, info: EngineInfo):
        self.addresses, self.pid, self.info = addresses, pid, info
        self.sentinel = os.pidfd_open(pid)

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    def describe_exit(self) -> str:
        return "it is gone"

    def stop(self, timeout: float = 0.0) -> None:
        try:
            os.close(self.sentinel)
        except OSError:
            pass

    def kill(self) -> None:
        pass


class AsyncMPClient:
    """Frontend `client_index`'s sockets to a core process. Create inside the event loop."""

    def __init__(self, addresses, client_index: int = 0):
        self.client_index = client_index
        self._sync_ctx = zmq.Context()
        self._input = self._sync_ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.setsockopt(zmq.LINGER, 1000)
        self._input.connect(addresses.input)
        self._async_ctx = zmq.asyncio.Context()
        self._output = self._async_ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.bind(addresses.outputs[client_index])
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(CoreOutput)

    def add(self, reqs: list[EngineCoreRequest]) -> None:
        self._input.send(self._enc.encode(AddRequests(reqs)), copy=False)

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self._input.send(self._enc.encode(Abort(request_ids)), copy=False)

    @staticmethod
    def send_shutdown(addresses) -> None:
        """Tell the core to exit, from any thread, with or without a connected client."""
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(addresses.input)
        sock.send(msgspec.msgpack.encode(Shutdown()))
        sock.close()
        ctx.term()

    async def get(self):
        """The next EngineCoreOutputs or CoreDead."""
        frame = await self._output.recv(copy=False)
        return self._dec.decode(frame.buffer)

    def close(self) -> None:
        self._output.close(linger=0)
        self._input.close(linger=1000)
        self._async_ctx.term()
        self._sync_ctx.term()
