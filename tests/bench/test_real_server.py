"""bench.serve and capacity --verify against the real tpaserve server (CPU, tiny random
checkpoint): the tools run end to end against the engine they were written for."""
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench import capacity, serve
from bench.make_random_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(model_type="gpt2", n_layer=2, n_head=4, head_dim=16, n_embd=64, vocab_size=512,
            block_size=256, rank=2, q_rank=3, using_groupnorm=False, bias=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("real_server")
    (d / "config.json").write_text(json.dumps(TINY))
    info = make_checkpoint(str(d / "config.json"), d / "ckpt", max_position=256,
                           dtype="float32", tokenizer_vocab=300)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(d / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tpaserve", "--model", str(d / "ckpt"), "--device", "cpu",
         "--served-model-name", "tiny", "--port", str(port), "--num-blocks", "64",
         "--log-level", "warning"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"tpaserve exited with {proc.returncode}:\n{log.read()[-2000:]}")
            try:
                resp = httpx.get(url + "/v1/models", timeout=1)
            except httpx.HTTPError:          # not listening yet
                resp = None
            if resp is not None and resp.status_code == 200:
                break
            if resp is not None and resp.status_code >= 500:
                log.seek(0)
                pytest.fail(f"tpaserve answered /v1/models with {resp.status_code} "
                            f"{resp.text[:200]}:\n{log.read()[-3000:]}")
            assert time.monotonic() < deadline, "tpaserve did not come up in 60 s"
            time.sleep(0.2)
        yield url, info["vocab_size"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_serve_against_tpaserve(server, tmp_path):
    url, vocab = server
    rows = serve.main(["--base-url", url, "--model", "tiny", "--token-ids",
                       "--vocab-size", str(vocab), "--input-len", "24", "--output-len", "8",
                       "--num-prompts", "10", "--concurrency", "4", "--no-progress",
                       "--json", str(tmp_path / "real.json")])
    (row,) = rows
    assert (row["completed"], row["failed"]) == (10, 0), row["first_error"]
    assert row["total_output_tokens"] == 80 and row["total_input_tokens"] == 240
    assert 0 < row["median_ttft_ms"] < row["mean_e2el_ms"]
    assert row["mean_tpot_ms"] > 0 and row["median_itl_ms"] > 0
    assert row["output_throughput"] > 0


def test_verify_against_tpaserve(server):
    url, vocab = server
    # 64 blocks of 16, 128-token sequences take 8: the cache holds 8
    v = asyncio.run(capacity.verify(url, 128, 48, num_requests=None, block_size=16,
                                    vocab_size=vocab, poll_s=0.02))
    assert v["requested"] == 8 and v["server_num_blocks"] == 64
    assert (v["completed"], v["failed"]) == (8, 0), v["first_error"]
    print(capacity.format_verify(v))
    assert v["max_running"] >= 2           # the engine held several at once; ideally all 8
