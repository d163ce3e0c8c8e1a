"""The model-server contract of the Gateway API Inference Extension (and llm-d's KV-aware
routing), against a real server: the gauges its endpoint picker scrapes, under vLLM's names,
and KV-cache events on a real ZMQ SUB socket (tcp), in vLLM's wire format, for a prompt the
server really served."""
from __future__ import annotations

import socket

import msgspec
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import MODEL_NAME, launch, stop
from tpaserve.core.kv_events import KVEventBatch

BLOCK_SIZE = 16
TOPIC = f"kv@test-pod@{MODEL_NAME}"          # the topic llm-d's indexer parses
ALIASES = {"vllm:num_requests_running": "tpaserve:num_requests_running",
           "vllm:num_requests_waiting": "tpaserve:num_requests_waiting",
           "vllm:kv_cache_usage_perc": "tpaserve:factor_cache_usage_perc"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def kv_server(checkpoint, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("kv_server") / "tpaserve.log"
    s = launch(checkpoint, log, "--num-blocks", "64", "--block-size", str(BLOCK_SIZE),
               "--kv-events-endpoint", f"tcp://*:{port}", "--kv-events-topic", TOPIC,
               api_key=None)
    try:
        yield s, port
    finally:
        stop(s)


def test_vllm_gauges_are_served_beside_tpaserve_s(kv_server):
    server, _ = kv_server
    server.client().completions.create(model=MODEL_NAME, prompt="hello", max_tokens=2)
    text = server.http().get("/metrics").text
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    for alias, name in ALIASES.items():
        assert samples[alias].labels == {"model_name": MODEL_NAME}
        assert samples[alias].value == samples[name].value


def test_a_served_prompt_arrives_as_block_stored(kv_server):
    server, port = kv_server
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{port}")
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
    decode = msgspec.msgpack.Decoder(KVEventBatch).decode
    try:
        # a SUB socket's subscription reaches the PUB a moment after connect(): until then the
        # server's events are not for us, so send fresh prompts until one is seen
        for attempt in range(10):
            prompt = [100 + attempt] + list(range(1, 2 * BLOCK_SIZE + 3))  # 2 full blocks
            server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1)
            stored = []
            while sub.poll(500):
                topic, seq, payload = sub.recv_multipart()
                assert topic == TOPIC.encode() and len(seq) == 8
                stored += [e for e in decode(payload).events
                           if type(e).__name__ == "BlockStored" and e.parent_block_hash is None
                           and e.token_ids[:1] == prompt[:1]]
            if stored:
                break
        else:
            raise AssertionError("no BlockStored for the served prompts")
        e = stored[0]
        assert e.block_size == BLOCK_SIZE and e.medium == "GPU"
        assert len(e.block_hashes) == 2 and e.token_ids == prompt[:2 * BLOCK_SIZE]
        assert all(0 <= h < 2**64 for h in e.block_hashes)
    finally:
        ctx.destroy(linger=0)
