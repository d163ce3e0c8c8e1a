"""A real `tpaserve` process on 127.0.0.1 serving a tiny random T6 checkpoint (saved with
save_checkpoint) and a tiny sentencepiece tokenizer, driven over HTTP.

  checkpoint   session: the checkpoint directory (tokenizer.model inside it)
  tokenizer    session: the same tokenizer, loaded in the test process
  ref_model    session: the same weights, loaded in the test process (reference logprobs)
  server       session: the shared server (API key on, prefix caching off, 64 KiB body limit)
  start_server factory for servers with other flags; each is killed at the end of its test
  async_llm    an AsyncLLM with its core process ready, for apps run in the test process

The server binds port 0 and logs the URL it got, so tests never race for a port. Every
process started here is killed (terminate, then kill) however the test ends.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.models.conftest import train_spm
from tpaserve.config import ModelConfig
from tpaserve.models.loader import load, save_checkpoint
from tpaserve.models.t6 import T6
from tpaserve.models.tokenizer import load_tokenizer

API_KEY = "test-key-123"
MODEL_NAME = "tiny-t6"
MAX_MODEL_LEN = 512
BODY_LIMIT = 64 * 1024
STARTUP_TIMEOUT = 120.0
_URL = re.compile(r"serving on (http://\S+)")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    api_key: str | None = API_KEY
    extra: dict = field(default_factory=dict)

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key=self.api_key or "none", max_retries=0,
                             timeout=kw.pop("timeout", 60.0), **kw)

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.v1, api_key=self.api_key or "none",
                                  max_retries=0, timeout=kw.pop("timeout", 60.0), **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(),
                            timeout=kw.pop("timeout", 60.0), **kw)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (labels matched as a subset)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"no sample {name}{labels} on /metrics")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_t6")
    tok_dir = root / "tok"
    train_spm(tok_dir)
    vocab = load_tokenizer(tok_dir).vocab_size
    # the model's vocabulary is padded past the tokenizer's, as in real checkpoints: the
    # server must never sample or report the padding ids
    cfg = ModelConfig(n_layer=2, n_head=4, head_dim=8, n_embd=32, vocab_size=vocab + 12,
                      q_rank=2, k_rank=2, v_rank=2, max_position=MAX_MODEL_LEN)
    ckpt = root / "ckpt"
    save_checkpoint(T6(cfg).init_random(seed=0, std=0.3), ckpt)
    shutil.copy(tok_dir / "tokenizer.model", ckpt / "tokenizer.model")
    return ckpt


@pytest.fixture(scope="session")
def tokenizer(checkpoint: Path):
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="session")
def ref_model(checkpoint: Path) -> T6:
    return load(checkpoint, dtype="float32", device="cpu").eval()


def launch(checkpoint: Path | None, log: Path, *flags: str, api_key: str | None = API_KEY,
           env: dict | None = None, entry: tuple[str, ...] = ("-m", "tpaserve")) -> Server:
    """Start `python <entry> --model checkpoint ...` on a free port and wait for /health.
    checkpoint None: no --model, the bundled demo model under its own name, as a new user
    runs it."""
    model = [] if checkpoint is None else ["--model", str(checkpoint), "--served-model-name",
                                           MODEL_NAME]
    args = [sys.executable, *entry, *model, "--host", "127.0.0.1", "--port", "0", "--device",
            "cpu", "--log-level", "info", *flags]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", TPASERVE_API_KEY=api_key or "")
    full_env.update(env or {})
    with open(log, "wb") as out:
        # its own process group (with its engine core): a test may signal the whole group,
        # as Ctrl-C in a terminal does, without hitting pytest
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                cwd=Path(__file__).resolve().parents[2],
                                start_new_session=True)
    server = Server(proc, "", log, api_key)
    try:
        _wait_ready(server)
    except BaseException:
        stop(server)
        raise
    return server


def _wait_ready(server: Server) -> None:
    end = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < end:
        if server.proc.poll() is not None:
            raise RuntimeError(f"tpaserve exited with {server.proc.returncode}:\n"
                               + server.log.read_text(errors="replace"))
        if not server.url:
            m = _URL.search(server.log.read_text(errors="replace"))
            if m:
                server.url = m[1]
        if server.url:
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise RuntimeError("tpaserve did not become ready:\n" + server.log.read_text(errors="replace"))


def stop(server: Server, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(sig)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


@pytest.fixture(scope="session")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server") / "tpaserve.log"
    s = launch(checkpoint, log, "--no-enable-prefix-caching", "--max-num-seqs", "16",
               "--num-blocks", "512", "--block-size", "16",
               "--max-request-body-bytes", str(BODY_LIMIT))
    try:
        yield s
    finally:
        stop(s)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    """The bundled demo model served as `tpaserve` with no --model (no API key)."""
    s = launch(None, tmp_path_factory.mktemp("demo") / "tpaserve.log", api_key=None)
    try:
        yield s
    finally:
        stop(s)


def make_async_llm(checkpoint: Path, **engine_args):
    """An AsyncLLM over the checkpoint (CPU), its core process ready: for apps run in the
    test process. Stop it with llm.core.stop() (the app's lifespan does it too)."""
    from tpaserve.args import EngineArgs
    from tpaserve.frontend.async_llm import AsyncLLM
    args = EngineArgs(model=str(checkpoint), device="cpu", **engine_args)
    tok = args.load_tokenizer()
    llm = AsyncLLM(args.create_engine_config(tok), tok)
    llm.wait_ready(timeout=STARTUP_TIMEOUT)
    return llm


@pytest.fixture
def async_llm(checkpoint: Path):
    llm = make_async_llm(checkpoint, num_blocks=64)
    yield llm
    llm.shutdown(timeout=5)


@pytest.fixture
def start_server(checkpoint: Path, tmp_path: Path):
    started: list[Server] = []

    def start(*flags: str, api_key: str | None = None) -> Server:
        s = launch(checkpoint, tmp_path / f"tpaserve-{len(started)}.log", *flags,
                   api_key=api_key)
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in started:
            stop(s)
