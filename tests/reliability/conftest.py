"""Fixtures of the reliability tests.

  checkpoint, tokenizer, ref_model   the tiny T6 checkpoint and sentencepiece tokenizer of
                                     tests/api (session-scoped, built locally)
  expect                             (prompt, max_tokens, stop) -> the Expected greedy output,
                                     from reference_generate (cached per prompt)
  start_server                       factory: a real tpaserve process on 127.0.0.1, started
                                     through fault_launcher.py (so a test may inject step
                                     failures and slow steps); killed at the end of the test

Every server binds port 0 and is stopped (SIGTERM, then SIGKILL) however the test ends.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.conftest import API_KEY, MODEL_NAME, Server, stop  # noqa: F401
from tests.api.conftest import checkpoint, ref_model, tokenizer  # noqa: F401 (fixtures)
from tests.api.conftest import launch as api_launch
from tests.reference import reference_generate
from tests.reliability.common import Expected, expected_output
from tpaserve.api.chat import encode_chat
from tpaserve.api.protocol import ChatMessage
from tpaserve.sampling_params import SamplingParams

LAUNCHER = Path(__file__).with_name("fault_launcher.py")


def launch(checkpoint: Path, log: Path, *flags: str, env: dict[str, str] | None = None,
           api_key: str | None = API_KEY) -> Server:
    """The API tests' launcher, through the fault-injecting entry script."""
    return api_launch(checkpoint, log, *flags, api_key=api_key, env=env,
                      entry=(str(LAUNCHER),))


@pytest.fixture
def start_server(checkpoint: Path, tmp_path: Path):
    started: list[Server] = []

    def start(*flags: str, env: dict[str, str] | None = None,
              api_key: str | None = API_KEY) -> Server:
        s = launch(checkpoint, tmp_path / f"tpaserve-{len(started)}.log", *flags, env=env,
                   api_key=api_key)
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in started:
            stop(s, timeout=10)


@pytest.fixture(scope="module")
def module_server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, request):
    """One server for a whole module, with the module's SERVER_FLAGS and SERVER_ENV."""
    flags = getattr(request.module, "SERVER_FLAGS", ())
    log = tmp_path_factory.mktemp("server") / "tpaserve.log"
    s = launch(checkpoint, log, *flags, env=getattr(request.module, "SERVER_ENV", None))
    try:
        yield s
    finally:
        stop(s, timeout=10)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids the server makes of a chat request's messages."""
    return encode_chat(tokenizer, [ChatMessage(**m) for m in messages], True, None)


@pytest.fixture(scope="session")
def expect(ref_model, tokenizer):
    eos, cache = tokenizer.eos_token_id, {}

    def expect(prompt: str | list[int], max_tokens: int, stop: tuple[str, ...] = ()) -> Expected:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        ref = cache.get(tuple(ids), [])
        if len(ref) < max_tokens and eos not in ref:     # greedy runs extend each other
            ref = cache[tuple(ids)] = reference_generate(
                ref_model, ids, SamplingParams(temperature=0, max_tokens=max_tokens), eos,
                tokenizer.vocab_size)
        return expected_output(tokenizer, ids, ref, max_tokens, stop)

    return expect
