"""Every knob a user can turn, defined once: EngineArgs (the engine: model, cache, scheduler;
also the keyword arguments of `tpaserve.LLM`) and ServerArgs (the HTTP server). Each field
carries its flag's help, group and parser; `add_cli_args` generates the `tpaserve` flags from
them, `from_cli_args` reads them back, and `create_engine_config` builds the frozen
per-concern configs (config.py), which validate the values with messages that name the flag.

Argument parsers here only parse (an integer, a size, a fraction); ranges are checked once,
by the configs. Pure Python: the API process imports it without torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpaserve.config import CacheConfig, EngineConfig, KVEventsConfig, SchedulerConfig
from tpaserve.exceptions import CheckpointError, ConfigError

DEMO_DIR = Path(__file__).resolve().parent / "demo" / "t6-demo"
DEMO_NAME = "t6-demo"
API_KEY_ENV = "TPASERVE_API_KEY"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20,
          "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


# ---- parsers (format only) -------------------------------------------------------------
def parse_size(text: str) -> int:
    """"4GiB" -> 4 * 2**30, "512MiB", "1.5GB" (decimal), "1048576" (bytes)."""
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give bytes or a number with a unit, e.g. 4GiB, 512MiB")
    value = float(m[1]) * _UNITS[(m[2] or "").lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte")
    return int(value)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _str_list(text: str) -> list[str]:
    """vLLM's form, a JSON list ('["http://a.example"]'), or one plain value."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list of strings")
        return value
    return [text]


def _arg(default: Any, help: str, *, group: str, parse=None, choices=None, metavar=None,
         nargs=None, negative: str | None = None) -> Any:
    """A field and its flag. `negative`: a boolean on by default gets the flag --no-<name>
    whose help is this text (what it turns off)."""
    meta = dict(help=help, group=group, parse=parse, choices=choices, metavar=metavar,
                nargs=nargs, negative=negative)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EngineArgs:
    # ---- model
    model: str | None = _arg(
        None, "checkpoint directory (config.json + weights) of a T6, T6-KVonly, MHA, GQA, "
        "MQA or MLA model. Default: the bundled demo model t6-demo", group="model", metavar="DIR")
    tokenizer: str | None = _arg(
        None, "tokenizer directory or file (tokenizer.json, tokenizer.model, vocab.json + "
        "merges.txt). Default: looked for in --model", group="model", metavar="PATH")
    dtype: str = _arg("auto", "weight and cache dtype; auto: bfloat16 on CUDA, float32 on "
                      "CPU", group="model", choices=["auto", "bfloat16", "float16", "float32"])
    device: str = _arg("auto", "auto: CUDA when a GPU is visible", group="model",
                       choices=["auto", "cuda", "cpu"])
    seed: int = _arg(0, "seed of the sampler for requests that give no seed", group="model",
                     parse=_int, metavar="N")
    enforce_eager: bool = _arg(False, "never capture CUDA graphs", group="model")
    rope_tables: str = _arg(
        "trained", "RoPE cos/sin tables. trained: as the checkpoint was trained (the authors' "
        "code rounds its fp32 tables to bfloat16; config.json rope_table_dtype says otherwise); "
        "exact: fp32 tables", group="model", choices=["trained", "exact"])
    # ---- factor cache
    block_size: int = _arg(16, "tokens per cache block", group="factor cache", parse=_int,
                           metavar="TOKENS")
    cache_dtype: str = _arg(
        "auto", "factor-cache dtype. auto: the model's (--dtype); fp8: e4m3, half the bytes "
        "of bfloat16 per token (twice the sequences) at a mean |delta logprob| of ~0.06 nats "
        "against it on t6-demo (docs/kernel_notes.md); needs an sm_89+ GPU (Ada, Hopper) or the CPU; "
        "not for MHA / GQA / MQA / MLA models (no A factor to hold the scale)", group="factor cache",
        choices=["auto", "bfloat16", "bf16", "float16", "fp8"])
    num_blocks: int | None = _arg(
        None, "cache blocks (overrides --cache-memory and --gpu-memory-utilization)",
        group="factor cache", parse=_int, metavar="N")
    cache_memory: int | None = _arg(
        None, "bytes for the factor cache, e.g. 4GiB, 512MiB, 1000000 (overrides "
        "--gpu-memory-utilization). Default on CPU: 256MiB", group="factor cache",
        parse=parse_size, metavar="SIZE")
    gpu_memory_utilization: float = _arg(
        0.9, "fraction of GPU memory for weights + activations + cache, in (0, 1]",
        group="factor cache", parse=_float, metavar="FRACTION")
    enable_prefix_caching: bool = _arg(
        True, "", group="factor cache",
        negative="turn off prefix caching (reusing the cached blocks of prompt prefixes "
                 "that earlier requests computed)")
    # ---- KV-cache events (vLLM's format, for KV-aware routers such as llm-d's)
    kv_events_endpoint: str | None = _arg(
        None, "publish the prefix cache's changes (BlockStored, BlockRemoved, "
        "AllBlocksCleared; vLLM's msgpack format) on a ZMQ PUB socket: bound for tcp://*:PORT, "
        "ipc:// and inproc://, connected for tcp://HOST:PORT. Default: off",
        group="kv events", metavar="ENDPOINT")
    kv_events_replay_endpoint: str | None = _arg(
        None, "a ZMQ ROUTER (bound) from which a subscriber asks for the batches it missed, "
        "by sequence number", group="kv events", metavar="ENDPOINT")
    kv_events_topic: str | None = _arg(
        None, "ZMQ topic of every event message (llm-d expects kv@POD@MODEL). Default: none",
        group="kv events", metavar="TOPIC")
    # ---- scheduler
    max_num_batched_tokens: int = _arg(2048, "token budget of one engine step",
                                       group="scheduler", parse=_int, metavar="TOKENS")
    max_num_seqs: int = _arg(128, "sequences running at once", group="scheduler", parse=_int,
                             metavar="N")
    max_model_len: int | None = _arg(None, "context length (prompt + output). Default: the "
                                     "model's", group="scheduler", parse=_int,
                                     metavar="TOKENS")
    max_queued_requests: int | None = _arg(
        None, "waiting sequences before new requests get 503 + Retry-After. Default: "
        "unbounded", group="scheduler", parse=_int, metavar="N")
    scheduling_policy: str = _arg(
        "fcfs", "fcfs: first come first served, and a request's 'priority' must be 0 (400 "
        "otherwise); priority: requests with a lower 'priority' run and keep running first "
        "(the operator must trust the clients with it)", group="scheduler",
        choices=["fcfs", "priority"])
    num_scheduler_steps: int | None = _arg(
        None, "decode steps per scheduling round while every running request only decodes "
        "(host work once per round; streams get up to this many tokens per chunk). Default: "
        "8 on CUDA, 1 on CPU", group="scheduler", parse=_int, metavar="N")
    async_scheduling: bool = _arg(
        True, "", group="scheduler",
        negative="turn off async scheduling (planning step N+1 while the device runs step "
                 "N); every step then waits for the one before")

    # ---- configs -------------------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        return DEMO_DIR if self.model is None else Path(self.model)

    def check_model(self) -> Path:
        """The checkpoint directory, with config.json and weights (CheckpointError names
        what is missing)."""
        from tpaserve.models.files import check_checkpoint_dir
        if self.model is None and not (DEMO_DIR / "config.json").is_file():
            raise CheckpointError(f"no --model given and the bundled demo model is missing "
                                  f"({DEMO_DIR}); pass --model DIR")
        return check_checkpoint_dir(self.model_dir)

    def load_tokenizer(self):
        """The tokenizer: --tokenizer, else the one in the checkpoint directory."""
        from tpaserve.models.tokenizer import load_tokenizer
        path = self.tokenizer if self.tokenizer is not None else self.model_dir
        return load_tokenizer(path, _read_json(self.model_dir / "config.json"))

    def create_engine_config(self, tokenizer=None) -> EngineConfig:
        """The frozen configs (ConfigError names the flag of a bad value)."""
        cache = CacheConfig(block_size=self.block_size, num_blocks=self.num_blocks,
                            cache_memory=self.cache_memory,
                            gpu_memory_utilization=self.gpu_memory_utilization,
                            enable_prefix_caching=self.enable_prefix_caching,
                            cache_dtype=self.cache_dtype)
        scheduler = SchedulerConfig(max_num_batched_tokens=self.max_num_batched_tokens,
                                    max_num_seqs=self.max_num_seqs,
                                    max_model_len=self.max_model_len,
                                    max_queued_requests=self.max_queued_requests,
                                    scheduling_policy=self.scheduling_policy,
                                    num_scheduler_steps=self.num_scheduler_steps)
        kv_events = KVEventsConfig(endpoint=self.kv_events_endpoint,
                                   replay_endpoint=self.kv_events_replay_endpoint,
                                   topic=self.kv_events_topic or "")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ConfigError(f"--seed must be an integer, got {self.seed!r}")
        return EngineConfig(
            model=str(self.model_dir), cache=cache, scheduler=scheduler, kv_events=kv_events,
            dtype=self.dtype,
            device=self.device, enforce_eager=self.enforce_eager, seed=self.seed,
            async_scheduling=self.async_scheduling, rope_tables=self.rope_tables,
            eos_token_id=tokenizer.eos_token_id if tokenizer is not None else None,
            vocab_size=tokenizer.vocab_size if tokenizer is not None else None,
            tokenizer=tokenizer.name_or_path if tokenizer is not None else None)

    # ---- the command line ----------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        add_fields(parser, cls)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace):
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


@dataclass
class ServerArgs:
    served_model_name: list[str] | None = _arg(
        None, "name(s) clients use in 'model'; the first is reported in responses. Default: "
        "the checkpoint directory's name", group="model", metavar="NAME", nargs="+")
    host: str = _arg("127.0.0.1", "address to listen on", group="server")
    port: int = _arg(8000, "port (0: any free port)", group="server", parse=_int,
                     metavar="PORT")
    api_key: str | None = _arg(
        None, f"require 'Authorization: Bearer KEY' on every path but /health, /metrics, "
        f"/version and /dashboard. Default: ${API_KEY_ENV} if set, else no key", group="server",
        metavar="KEY")
    max_request_body_bytes: int = _arg(16 * 2**20, "larger request bodies get 413",
                                       group="server", parse=parse_size, metavar="SIZE")
    request_body_timeout: float = _arg(
        30.0, "a request body that sends nothing for this long is answered 408 and its "
        "connection closed (slow or stalled uploads)", group="server", parse=_float,
        metavar="SECONDS")
    max_prompt_chars: int | None = _arg(
        None, "text prompts (and rendered chats) longer than this many characters get 400 "
        "before they are tokenized. Default: 32 x the context length", group="server",
        parse=_int, metavar="N")
    max_request_sequences: int = _arg(
        256, "sequences one request may ask for (prompts x n); more get 400", group="server",
        parse=_int, metavar="N")
    graceful_shutdown_timeout: float = _arg(
        30.0, "on SIGTERM/SIGINT, stop accepting and let in-flight requests finish for this "
        "long", group="server", parse=_float, metavar="SECONDS")
    log_level: str = _arg("info", "log level of tpaserve and uvicorn", group="server",
                          choices=["debug", "info", "warning", "error", "critical"])
    disable_dashboard: bool = _arg(
        False, "do not serve the live status page at /dashboard", group="server")
    api_server_count: int = _arg(
        1, "API processes serving the port in front of the one engine core (HTTP, "
        "tokenization and streaming spread over CPU cores; each its own event loop)",
        group="server", parse=_int, metavar="N")

    # ---- CORS (vLLM's flags; off unless --allowed-origins is given, unlike vLLM's "*")
    allowed_origins: list | None = _arg(
        None, "origins whose browser pages may call the API (CORS), e.g. "
        "https://app.example or '[\"*\"]' (vLLM's JSON form). Default: none (no CORS "
        "headers)", group="server", parse=_str_list, metavar="ORIGIN", nargs="+")
    allowed_methods: list = _arg(["*"], "HTTP methods allowed for CORS requests",
                                 group="server", parse=_str_list, metavar="METHOD", nargs="+")
    allowed_headers: list = _arg(["*"], "request headers allowed for CORS requests",
                                 group="server", parse=_str_list, metavar="HEADER", nargs="+")
    allow_credentials: bool = _arg(False, "allow credentials (cookies, auth headers) in CORS "
                                   "requests", group="server")

    def cors(self) -> dict | None:
        """Starlette CORSMiddleware's arguments, or None (no CORS)."""
        def flat(values: list | None) -> list[str]:
            return [v for item in values or [] for v in (item if isinstance(item, list)
                                                         else [item])]
        if not self.allowed_origins:
            return None
        return dict(allow_origins=flat(self.allowed_origins),
                    allow_methods=flat(self.allowed_methods),
                    allow_headers=flat(self.allowed_headers),
                    allow_credentials=self.allow_credentials)

    def validate(self) -> None:
        if not 1 <= self.api_server_count <= 64:
            raise ConfigError(f"--api-server-count must be in [1, 64], got "
                              f"{self.api_server_count}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_request_body_bytes < 1:
            raise ConfigError("--max-request-body-bytes must be at least 1 byte")
        if not self.request_body_timeout > 0:
            raise ConfigError(f"--request-body-timeout must be > 0 seconds, got "
                              f"{self.request_body_timeout}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ConfigError(f"--max-prompt-chars must be >= 1, got {self.max_prompt_chars}")
        if self.max_request_sequences < 1:
            raise ConfigError(f"--max-request-sequences must be >= 1, got "
                              f"{self.max_request_sequences}")
        if not self.graceful_shutdown_timeout >= 0:
            raise ConfigError(f"--graceful-shutdown-timeout must be >= 0 seconds, got "
                              f"{self.graceful_shutdown_timeout}")

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace):
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


# ---- flag generation ---------------------------------------------------------------------
class HelpFormatter(argparse.HelpFormatter):
    """Each default stated once (appended unless the help already says it, never for None
    or for a --no- flag); lines never broken inside a word or a flag name."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34, width=100)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (action.option_strings and d is not None and d is not False
                and d != argparse.SUPPRESS
                and not isinstance(action, argparse._StoreFalseAction)
                and "default" not in text.lower()):
            text += f" (default: {_show(d)})"
        return text


def _show(value: Any) -> str:
    if isinstance(value, int) and value >= 2**20 and value % 2**20 == 0:
        return f"{value // 2**20}MiB"
    return str(value)


def add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    groups = {g.title: g for g in parser._action_groups}
    for f in dataclasses.fields(cls):
        m = f.metadata
        group = groups.get(m["group"])
        if group is None:
            group = groups[m["group"]] = parser.add_argument_group(m["group"])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if m["negative"] is not None:
            group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                               action="store_false", default=default, help=m["negative"])
        elif isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action="store_true", default=default,
                               help=m["help"])
        else:
            kw = {k: m[k] for k in ("choices", "metavar", "nargs") if m[k] is not None}
            group.add_argument(flag, dest=f.name, type=m["parse"], default=default,
                               help=m["help"], **kw)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def engine_args_from(model=None, tokenizer=None, **kwargs) -> tuple[EngineArgs, Any, Any]:
    """For LLM(...) and build_engine(...): (EngineArgs, an nn.Module given as `model`, a
    Tokenizer object given as `tokenizer`). Paths go into the args."""
    module = None if model is None or isinstance(model, (str, os.PathLike)) else model
    tok = None if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(known - {'model', 'tokenizer'}))}")
    args = EngineArgs(model=None if module is not None or model is None else os.fspath(model),
                      tokenizer=None if tok is not None or tokenizer is None
                      else os.fspath(tokenizer), **kwargs)
    return args, module, tok
