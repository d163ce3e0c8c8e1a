"""KV-cache events, end to end in one process: an LLMEngine (tiny random T6, CPU) publishing on
a real ZMQ PUB socket, and a real SUB socket that rebuilds the engine's set of cached block
hashes from the events alone. After every phase (shared prefixes; preemption and eviction
under a tiny cache; a prefix-cache reset; traffic after it) the rebuilt set must equal the
block manager's, decoded both with our msgspec structs and as plain msgpack arrays (the wire
layout vLLM's subscribers and llm-d's Go decoder read). Batches missed while the
subscription was still joining are fetched from the replay socket; sequence numbers must
run 0, 1, 2, ... with no gap and no repeat."""
from __future__ import annotations

import random
import uuid

import msgspec
import pytest
import zmq

from tpaserve.config import ModelConfig
from tpaserve.core.kv_events import KVEventBatch, wire_hash
from tpaserve.frontend.llm_engine import LLMEngine, build_engine
from tpaserve.models.t6 import T6
from tpaserve.sampling_params import SamplingParams

V, BS = 101, 4
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


class Subscriber:
    """What a KV-aware router keeps per server: the hashes it holds, from events only."""

    def __init__(self, endpoint: str, replay: str):
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.connect(endpoint)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.replay = self.ctx.socket(zmq.DEALER)      # a REQ would drop all but one reply
        self.replay.connect(replay)
        self.typed = msgspec.msgpack.Decoder(KVEventBatch)
        self.hashes: set[int] = set()                  # from our structs
        self.plain: set[int] = set()                   # from plain msgpack arrays
        self.expected = 0                              # next sequence number
        self.kinds: dict[str, int] = {}
        self.replayed = 0
        self.stored_tokens: list[tuple[int | None, list[int]]] = []

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    def catch_up(self, target: int, timeout_ms: int = 5000) -> None:
        """Apply batches until every one numbered below `target` is applied."""
        while self.expected < target:
            if not self.sub.poll(200):
                self._replay()                          # nothing came: ask for the rest
                continue
            topic, seq_bytes, payload = self.sub.recv_multipart()
            assert len(seq_bytes) == 8
            seq = int.from_bytes(seq_bytes, "big")
            if seq > self.expected:                     # joined late: fetch what we missed
                self._replay()
            if seq < self.expected:                     # already had it from the replay
                continue
            assert seq == self.expected, f"gap: got {seq}, expected {self.expected}"
            self._apply(payload)

    def _replay(self) -> None:
        self.replay.send_multipart([b"", self.expected.to_bytes(8, "big")])
        while True:
            assert self.replay.poll(5000), "no answer from the replay socket"
            empty, seq_bytes, payload = self.replay.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq == -1:
                assert payload == b""
                return
            if seq == self.expected:
                self._apply(payload)
                self.replayed += 1

    def _apply(self, payload: bytes) -> None:
        self.expected += 1
        batch = self.typed.decode(payload)
        for e in batch.events:
            name = type(e).__name__
            self.kinds[name] = self.kinds.get(name, 0) + 1
            if name == "BlockStored":
                assert e.block_size == BS and len(e.token_ids) == BS * len(e.block_hashes)
                self.hashes.update(e.block_hashes)
                self.stored_tokens.append((e.parent_block_hash, e.token_ids))
            elif name == "BlockRemoved":
                self.hashes.difference_update(e.block_hashes)
            else:
                self.hashes.clear()
        # the same bytes read with no schema: vLLM's array layout, field by field
        ts, events, dp_rank = msgspec.msgpack.decode(payload)
        assert isinstance(ts, float) and dp_rank == 0
        for e in events:
            if e[0] == "BlockStored":
                _, hashes, parent, tokens, block_size, lora_id, medium, lora_name = e
                assert all(isinstance(h, int) and 0 <= h < 2**64 for h in hashes)
                assert parent is None or isinstance(parent, int)
                assert (block_size, lora_id, medium, lora_name) == (BS, None, "GPU", None)
                self.plain.update(hashes)
            elif e[0] == "BlockRemoved":
                _, hashes, medium = e
                assert medium == "GPU"
                self.plain.difference_update(hashes)
            else:
                assert e == ["AllBlocksCleared"]
                self.plain.clear()


@pytest.fixture
def engine_and_subscribe():
    """An engine publishing on ipc (with a replay socket), and a function that connects a
    new Subscriber to it."""
    model = T6(ModelConfig(n_layer=2, n_head=5, head_dim=8, n_embd=32, k_rank=2, v_rank=2,
                           max_position=256, vocab_size=V, q_rank=3)).init_random(seed=1, std=0.3)
    name = f"ipc://@tpaserve-test-kv-{uuid.uuid4().hex}"
    eng = build_engine(model.eval(), num_blocks=14, block_size=BS, max_num_batched_tokens=16,
                       device="cpu", kv_events_endpoint=name,
                       kv_events_replay_endpoint=name + "-replay")
    subs: list[Subscriber] = []

    def subscribe() -> Subscriber:
        subs.append(Subscriber(name, name + "-replay"))
        return subs[-1]
    try:
        yield eng, subscribe
    finally:
        for sub in subs:
            sub.close()
        eng.core.close()


def run(eng: LLMEngine, prompts: list[list[int]], tag: str) -> None:
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}{i}", p, GREEDY)
    for _ in range(5000):
        if not eng.has_unfinished_requests():
            return
        eng.step()
    raise AssertionError("the engine stopped making progress")


def check_same(eng: LLMEngine, sub: Subscriber) -> None:
    sub.catch_up(eng.core.kv_events.next_seq)
    cached = {wire_hash(h) for h in eng.core.blocks.cached}
    assert len(cached) == len(eng.core.blocks.cached)          # no 64-bit collision here
    assert sub.hashes == cached
    assert sub.plain == cached


def test_subscriber_rebuilds_the_cached_hashes_from_events_alone(engine_and_subscribe):
    eng, subscribe = engine_and_subscribe
    rng = random.Random(5)
    prefix = [rng.randrange(V) for _ in range(12)]
    # 1. shared prefixes, one at a time: each later request hits the first one's blocks; the
    # subscriber joins after the first, so it must fetch those batches from the replay socket
    shared = [prefix + [rng.randrange(V) for _ in range(rng.randint(1, 6))] for _ in range(3)]
    run(eng, shared[:1], "shared0-")
    sub = subscribe()
    for i, p in enumerate(shared[1:]):
        run(eng, [p], f"shared{i + 1}-")
    assert eng.core.blocks.prefix_hits > 0
    check_same(eng, sub)
    assert sub.replayed > 0
    # the first event stores the first request's leading blocks: no parent, its tokens
    parent, tokens = sub.stored_tokens[0]
    assert parent is None and tokens == shared[0][:len(tokens)]

    # 2. a burst that does not fit 14 blocks: preemption, and cached blocks evicted
    burst = [prefix + [rng.randrange(V) for _ in range(rng.randint(1, 12))] for _ in range(10)]
    run(eng, burst, "burst")
    assert eng.core.scheduler.num_preemptions > 0
    check_same(eng, sub)
    assert sub.kinds["BlockRemoved"] > 0 and eng.core.blocks.cached

    # 3. a prefix-cache reset: the subscriber forgets everything
    eng.core.reset_prefix_cache()
    check_same(eng, sub)
    assert sub.kinds["AllBlocksCleared"] == 1 and not sub.hashes

    # 4. traffic after the reset fills the set again
    run(eng, [prefix + [1, 2, 3], prefix + [4, 5, 6, 7, 8]], "after")
    check_same(eng, sub)
    assert sub.hashes and sub.kinds["BlockStored"] > 3
    assert eng.core.kv_events.dropped == 0
    assert sub.expected == eng.core.kv_events.next_seq            # 0, 1, 2, ... each once


def test_no_events_are_recorded_when_off():
    model = T6(ModelConfig(n_layer=1, n_head=2, head_dim=8, n_embd=16, k_rank=1, v_rank=1,
                           max_position=64, vocab_size=V, q_rank=None)).init_random(seed=1)
    eng = build_engine(model.eval(), num_blocks=8, block_size=BS, device="cpu")
    run(eng, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], "off")
    assert eng.core.kv_events is None and eng.core.blocks.events is None
    assert eng.core.blocks.cached
