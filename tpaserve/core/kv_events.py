"""KV-cache events on the wire: the block manager's changes to its prefix cache, published over
ZMQ in vLLM's format (vllm/distributed/kv_events.py), so that a KV-aware router written for
vLLM (llm-d's kv-cache indexer, the Gateway API Inference Extension's scorers) can follow
tpaserve's cache.

Wire (every message, a ZMQ multipart on a PUB socket):
    [topic, seq: 8 bytes big-endian, payload: msgpack KVEventBatch]
    KVEventBatch      [ts, [event, ...], data_parallel_rank]            (array_like structs)
    BlockStored       ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
                       lora_id, medium, lora_name]
    BlockRemoved      ["BlockRemoved", block_hashes, medium]
    AllBlocksCleared  ["AllBlocksCleared"]
Block hashes are unsigned 64-bit ints: the last 8 bytes, big-endian, of tpaserve's sha256
block hash (engine/block_manager.block_hash), the same number llm-d derives when an engine
sends a hash as bytes. medium is "GPU" (the engine's own cache, vLLM's name for it).

Invariants: sequence numbers start at 0 and grow by one per batch; a batch dropped because
the queue to the sending thread was full still takes its number, so subscribers see the gap.
The core's thread only numbers a batch and queues it; conversion, msgpack and sending run
in the publisher's thread, off the step. Replay (optional ROUTER): a request
[identity, b"", start seq (8 bytes)] is answered with every buffered batch from there,
[identity, b"", seq, payload] each, then [identity, b"", -1 (8 bytes, signed), b""].
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

import msgspec
import zmq

from tpaserve.config import KVEventsConfig
from tpaserve.engine import block_manager as bm
from tpaserve.exceptions import ConfigError

logger = logging.getLogger("tpaserve.core")

MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
REPLAY_BUFFER = 10_000       # batches kept for replay (vLLM's default)
MAX_QUEUED = 100_000         # batches waiting for the sending thread before they are dropped
REPLAY_POLL_S = 0.05         # how long a replay request may wait while no batch comes


# ---- vLLM's structs: the field order is the wire format; never reorder ---------------------
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Tagged by class name: the tag is each event array's first element."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


def wire_hash(h: bytes) -> int:
    """tpaserve's 32-byte block hash as the unsigned 64-bit int sent on the wire."""
    return int.from_bytes(h[-8:], "big")


def to_wire(event: bm.KVCacheEvent, block_size: int) -> KVCacheEvent:
    if isinstance(event, bm.BlockStored):
        parent = None if event.parent_hash is None else wire_hash(event.parent_hash)
        return BlockStored([wire_hash(h) for h in event.block_hashes], parent,
                           event.token_ids, block_size, None, MEDIUM_GPU, None)
    if isinstance(event, bm.BlockRemoved):
        return BlockRemoved([wire_hash(h) for h in event.block_hashes], MEDIUM_GPU)
    return AllBlocksCleared()


def binds(endpoint: str) -> bool:
    """vLLM's rule, so a flag means what it means there: bind a wildcard or a local
    transport (stable side), connect to a named host (the subscriber binds)."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KVEventPublisher:
    """Numbers and queues batches of block-manager events (`publish`, from the core's
    thread); a thread of its own converts, encodes and sends them."""

    def __init__(self, config: KVEventsConfig, block_size: int):
        self.block_size = block_size
        self.topic = config.topic.encode()
        self.next_seq = 0
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=MAX_QUEUED)
        self._ctx = zmq.Context()
        # both sockets are made here, then used by the sending thread only
        self._pub = self._ctx.socket(zmq.PUB)
        self._replay = None
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        self._pub.setsockopt(zmq.LINGER, 1000)       # close() lets queued messages leave
        try:
            flag, endpoint = "--kv-events-endpoint", config.endpoint
            if binds(endpoint):
                self._pub.bind(endpoint)
            else:
                self._pub.connect(endpoint)
            if config.replay_endpoint is not None:
                flag, endpoint = "--kv-events-replay-endpoint", config.replay_endpoint
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(endpoint)
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise ConfigError(f"{flag} {endpoint}: {exc}") from exc
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="tpaserve-kv-events")
        self._thread.start()

    def publish(self, events: list[bm.KVCacheEvent]) -> None:
        """Queue one batch (the events of one step, in order); never blocks."""
        if not self._thread.is_alive():          # it failed (logged): keep no backlog
            return
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        try:
            self._queue.put_nowait((seq, time.time(), events))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("KV-event publisher behind: %d batch(es) dropped (subscribers "
                               "see gaps in the sequence numbers)", self.dropped)

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (up to `timeout`), then close the sockets."""
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                return                           # a daemon: it ends with the process
            self._thread.join(timeout)

    # ---- the sending thread ------------------------------------------------------------------
    def _run(self) -> None:
        enc = msgspec.msgpack.Encoder()
        buffer: deque[tuple[int, bytes]] = deque(maxlen=REPLAY_BUFFER)
        try:
            while True:
                if self._replay is not None and self._replay.poll(0):
                    self._serve_replay(buffer)
                try:
                    item = self._queue.get(timeout=REPLAY_POLL_S if self._replay else None)
                except queue.Empty:
                    continue
                if item is None:
                    break
                seq, ts, events = item
                batch = KVEventBatch(ts, [to_wire(e, self.block_size) for e in events],
                                     data_parallel_rank=0)
                payload = enc.encode(batch)
                self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
                if self._replay is not None:
                    buffer.append((seq, payload))
        except Exception:                          # noqa: BLE001 - events stop, serving goes on
            logger.exception("the KV-event publisher failed: no more KV events are sent")
        finally:
            self._pub.close()
            if self._replay is not None:
                self._replay.close()
            self._ctx.term()

    def _serve_replay(self, buffer: deque) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            logger.warning("ignoring a malformed KV-event replay request (%d frames)",
                           len(frames))
            return
        client, _, start = frames
        start_seq = int.from_bytes(start, "big")
        for seq, payload in buffer:
            if seq >= start_seq:
                self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", END_SEQ, b""))
