"""Every error tpaserve raises at an edge, in one module. Pure Python: the API process and
the engine core process both import it. Turning them into HTTP responses happens once, in
api/errors.py; the CLI prints any of them as one line.

    ConfigError             a flag or config.json value is invalid
    CheckpointError         a checkpoint directory is missing, unreadable or not T6
    TokenizerNotFoundError  no tokenizer where one was looked for
    TokenizerLoadError      a tokenizer file exists but cannot be read
    ChatTemplateError       messages a chat template cannot render
    SamplingParamsError     a request knob is invalid (.param: the OpenAI field name)
    RequestRejected         a request that can never run (.param: the field to change)
    QueueFull               the waiting queue is at --max-queued-requests (retry later)
    EngineDeadError         the engine core cannot go on (every open request fails)
"""
from __future__ import annotations

from typing import Any


class TpaserveError(Exception):
    """Base of the errors below."""


class ConfigError(TpaserveError, ValueError):
    """A configuration value a user gave (flag, config.json field) is invalid."""


class CheckpointError(TpaserveError, ValueError):
    """A checkpoint directory is missing, unreadable, unsafe or does not match T6."""


TOKENIZER_HINT = (
    "Pass one with --tokenizer PATH (a directory holding one of these, or the file itself). "
    "T6 checkpoints from the authors' training code ship without a tokenizer; they were "
    "trained with GPT-2's BPE, so point --tokenizer at a GPT-2 tokenizer directory "
    "(vocab.json + merges.txt, or tokenizer.json).")


class TokenizerNotFoundError(TpaserveError, ValueError):
    """No tokenizer at the given path. `searched` lists every place looked at."""

    def __init__(self, path: str, searched: list[str], reason: str = ""):
        self.searched = searched
        places = "\n".join(f"  - {s}" for s in searched)
        super().__init__(
            f"no tokenizer found for {path!r}{': ' + reason if reason else ''}. "
            f"Looked for:\n{places}\n{TOKENIZER_HINT}")


class TokenizerLoadError(TpaserveError, ValueError):
    """A tokenizer file exists but cannot be read or parsed; the message names the file."""


class ChatTemplateError(TpaserveError, ValueError):
    """Messages a template cannot render, or a template that cannot be compiled/rendered."""


class SamplingParamsError(TpaserveError, ValueError):
    """A request knob is invalid. `param` is the OpenAI field name, `value` what was given."""

    def __init__(self, param: str, value: Any, requirement: str):
        super().__init__(f"{param} {requirement}, got {value!r}")
        self.param = param
        self.value = value


class RequestRejected(TpaserveError, ValueError):
    """A request that can never run (too long for the context or the cache, bad token ids,
    a duplicate id). `param` names the request field to change."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(TpaserveError, RuntimeError):
    """The waiting queue is at --max-queued-requests; try again later."""


class ServerShuttingDown(TpaserveError, RuntimeError):
    """The server's drain time (--graceful-shutdown-timeout) ran out while this request was
    still running: it ends with a 503 (a stream: an error event, then [DONE])."""


class EngineDeadError(TpaserveError, RuntimeError):
    """The engine cannot continue; every request in flight fails with this."""

    def __init__(self, message: str):
        if not message.startswith("the engine has stopped"):
            message = f"the engine has stopped: {message}"
        super().__init__(message)


def one_line(exc: BaseException) -> str:
    """An error's message on one line (the CLI's and the core handshake's form)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
