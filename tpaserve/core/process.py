"""The engine core process: an EngineCore in a busy loop, between two ZMQ sockets.

    input thread    PULL (bound)  <- AddRequests / Abort / Shutdown from every frontend
    main thread     apply inputs -> core.step() -> outputs queue      (the busy loop)
    output thread   outputs queue -> PUSH to each frontend's PULL (EngineCoreOutputs)
    watch thread    blocks on the start-up pipe: end of file = the parent died -> exit

Socket I/O and msgpack (de)coding run in their own threads, so the loop only schedules,
launches steps and updates; pyzmq releases the GIL while it waits. The loop blocks on its
input queue only when the core has nothing to do.

Signals: SIGINT and SIGTERM are ignored. The API process decides when the core stops (it
drains its HTTP requests, then sends Shutdown); Ctrl-C reaches the whole process group and
must not kill the core under requests that are still draining. If the API process dies
without a word (kill -9), the start-up pipe closes and the core exits at once: no orphan.

Exit status: 0 after Shutdown; 1 when the core could not go on (it sends CoreDead first);
2 when start-up failed on what the user gave (a CoreFailed with user_error, which the CLI
prints as one line).

This module imports no torch: the API process names `run_engine_core` as the target of
the process it spawns; the engine is imported in the child.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
from dataclasses import dataclass

import msgspec
import zmq

from tpaserve.config import EngineConfig
from tpaserve.engine.messages import (
    Abort,
    AddRequests,
    CoreDead,
    CoreFailed,
    CoreInput,
    CoreReady,
    EngineCoreOutputs,
    Shutdown,
)
from tpaserve.exceptions import (
    ChatTemplateError,
    CheckpointError,
    ConfigError,
    TokenizerLoadError,
    TokenizerNotFoundError,
    one_line,
)

logger = logging.getLogger("tpaserve.core")

USER_ERRORS = (ConfigError, CheckpointError, TokenizerNotFoundError, TokenizerLoadError,
               ChatTemplateError, ValueError, OSError)


@dataclass(frozen=True)
class CoreAddresses:
    input: str                 # the core binds it; every frontend connects a PUSH
    outputs: list[str]         # frontend i binds outputs[i]; the core connects a PUSH to each


def run_engine_core(config: EngineConfig, addresses: CoreAddresses, conn,
                    log_level: str = "INFO") -> None:
    """The process target. `conn`: the child end of the start-up pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    enc = msgspec.msgpack.Encoder()
    try:
        import torch

        from tpaserve.core.engine_core import EngineCore
        try:
            core = EngineCore(config)
        except torch.OutOfMemoryError as exc:
            raise ConfigError(f"out of GPU memory while starting the engine: {exc}; lower "
                              f"--gpu-memory-utilization or --max-num-seqs") from exc
    except USER_ERRORS as exc:
        conn.send_bytes(enc.encode(CoreFailed(one_line(exc), user_error=True)))
        sys.exit(2)
    except BaseException as exc:                       # noqa: BLE001 - reported, then exit
        logger.exception("the engine core failed to start")
        conn.send_bytes(enc.encode(CoreFailed(f"{type(exc).__name__}: {one_line(exc)}",
                                              user_error=False)))
        sys.exit(1)
    try:
        loop = CoreLoop(core, addresses, conn)        # sockets open before we say ready
    except Exception as exc:                          # noqa: BLE001 - reported, then exit
        logger.exception("the engine core could not open its sockets")
        conn.send_bytes(enc.encode(CoreFailed(
            f"the engine core could not open its sockets: {one_line(exc)}", user_error=False)))
        sys.exit(1)
    logger.info("engine core ready (pid %d)", os.getpid())
    conn.send_bytes(enc.encode(CoreReady(core.info)))
    sys.exit(loop.run())


class CoreLoop:
    def __init__(self, core, addresses: CoreAddresses, conn):
        self.core, self.addresses = core, addresses
        self.inputs: queue.SimpleQueue = queue.SimpleQueue()
        self.outputs: queue.SimpleQueue = queue.SimpleQueue()
        self.ctx = zmq.Context()
        # sockets are made here, then each is used by one thread only
        inp = self.ctx.socket(zmq.PULL)
        inp.setsockopt(zmq.RCVHWM, 0)
        inp.bind(addresses.input)
        outs = []
        for addr in addresses.outputs:
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.LINGER, 2000)
            s.connect(addr)
            outs.append(s)
        threading.Thread(target=self._watch_parent, args=(conn,), daemon=True,
                         name="tpaserve-core-watch").start()
        threading.Thread(target=self._input_thread, args=(inp,), daemon=True,
                         name="tpaserve-core-in").start()
        self._out_thread = threading.Thread(target=self._output_thread, args=(outs,),
                                            daemon=True, name="tpaserve-core-out")
        self._out_thread.start()

    # ---- threads ---------------------------------------------------------------------------
    @staticmethod
    def _watch_parent(conn) -> None:
        try:
            while True:
                conn.recv_bytes()
        except (EOFError, OSError):
            pass
        logger.error("the API process went away: the engine core exits")
        os._exit(1)

    def _input_thread(self, sock) -> None:
        dec = msgspec.msgpack.Decoder(CoreInput)
        try:
            while True:
                frame = sock.recv(copy=False)
                try:
                    self.inputs.put(dec.decode(frame.buffer))
                except msgspec.DecodeError:
                    # the frontends only send what they validated; never let one message
                    # stop the loop
                    logger.exception("undecodable message on the engine core's input")
        except Exception:                              # noqa: BLE001 - the core must not go deaf
            logger.exception("the engine core's input thread died: the core exits")
            os._exit(1)

    def _output_thread(self, socks: list) -> None:
        enc = msgspec.msgpack.Encoder()
        try:
            while True:
                item = self.outputs.get()
                if item is None:
                    break
                client, msg = item
                targets = socks if client is None else [socks[client]]
                buf = enc.encode(msg)
                for s in targets:
                    s.send(buf, copy=False)
        except Exception:                              # noqa: BLE001 - the core must not go mute
            logger.exception("the engine core's output thread died: the core exits")
            os._exit(1)
        for s in socks:
            s.close()

    # ---- the busy loop -------------------------------------------------------------------
    def run(self) -> int:
        core = self.core
        try:
            while True:
                if not self._apply_inputs(block=not core.has_work()):
                    return self._stop(0)
                outs = core.step() if core.has_work() else []
                self._send(core.route(outs))
        except Exception as exc:                       # noqa: BLE001 - reported, then exit
            logger.exception("the engine core loop died")
            self.outputs.put((None, CoreDead(one_line(exc))))
            return self._stop(1)

    def _apply_inputs(self, block: bool) -> bool:
        """Apply every queued input (waiting for one if `block`); False on Shutdown."""
        core = self.core
        try:
            msg = self.inputs.get(timeout=1.0) if block else self.inputs.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(msg, AddRequests):
                refused = core.add_requests(msg.requests)
                if refused:        # to its sender: the refused ids were never routed
                    self._send({msg.requests[0].client_index: refused})
            elif isinstance(msg, Abort):
                core.abort(msg.request_ids)
            elif isinstance(msg, Shutdown):
                logger.info("shutdown requested: the engine core exits")
                return False
            try:
                msg = self.inputs.get_nowait()
            except queue.Empty:
                return True

    def _send(self, by_client: dict) -> None:
        """Each frontend its outputs; the stats (gauges, step timings) to frontend 0 only,
        which exports the metrics, with every message so its gauges stay current."""
        stats = self.core.take_stats()
        self.outputs.put((0, EngineCoreOutputs(by_client.pop(0, []), stats)))
        for client, outs in by_client.items():
            self.outputs.put((client, EngineCoreOutputs(outs)))

    def _stop(self, code: int) -> int:
        """Flush the outputs; the input thread (a daemon, blocked in recv) ends with the
        process: closing its socket from here would not be thread-safe."""
        self.outputs.put(None)
        self._out_thread.join(timeout=5)
        self.core.close()
        return code
