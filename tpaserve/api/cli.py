"""`tpaserve`: serve a T6 checkpoint over an OpenAI-compatible HTTP API.

    tpaserve                                  # the bundled demo model, as "t6-demo"
    tpaserve --model ckpt/ --tokenizer gpt2/ --port 8000 --cache-memory 4GiB

Any bad value (a flag, the checkpoint, the tokenizer) ends the program with one line on
stderr and a non-zero status, never a traceback. The listening socket is bound before the
model loads, so a busy port fails fast, and the URL logged is the one really bound
(--port 0 picks a free port).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo" / "t6-demo"
DEMO_NAME = "t6-demo"
API_KEY_ENV = "TPASERVE_API_KEY"
EXIT_BAD_CONFIG = 2

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20,
          "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}

logger = logging.getLogger("tpaserve")


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


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


def _port(text: str) -> int:
    v = _non_negative_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):          # one line, no usage block
        self.exit(EXIT_BAD_CONFIG, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tpaserve", description="Serve a Tensor Product Attention (T6) model "
                "over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="DIR", default=None,
                   help=f"T6 checkpoint directory (config.json + weights). Default: the "
                        f"bundled demo model {DEMO_DIR}, served as {DEMO_NAME!r}")
    m.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="tokenizer directory or file (tokenizer.json, tokenizer.model, "
                        "vocab.json + merges.txt). Default: looked for in --model")
    m.add_argument("--served-model-name", metavar="NAME", nargs="+", default=None,
                   help="name(s) clients use in 'model'; the first is reported in responses. "
                        "Default: the checkpoint directory's name")
    m.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"],
                   default="auto", help="weight and cache dtype; auto: bfloat16 on CUDA, "
                                        "float32 on CPU")
    m.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA when a GPU is visible")
    m.add_argument("--seed", type=int, default=0,
                   help="seed of the sampler for requests that give no seed")
    m.add_argument("--enforce-eager", action="store_true",
                   help="never capture CUDA graphs")

    c = p.add_argument_group("factor cache")
    c.add_argument("--block-size", type=_positive_int, default=16,
                   help="tokens per cache block")
    c.add_argument("--num-blocks", type=_positive_int, default=None,
                   help="cache blocks (overrides --cache-memory and "
                        "--gpu-memory-utilization)")
    c.add_argument("--cache-memory", type=parse_size, default=None, metavar="SIZE",
                   help="bytes for the factor cache, e.g. 4GiB, 512MiB, 1000000 "
                        "(overrides --gpu-memory-utilization). Default on CPU: 256MiB")
    c.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9,
                   help="fraction of GPU memory for weights + activations + cache")
    c.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", help="do not reuse cached blocks of common prefixes")

    s = p.add_argument_group("scheduler")
    s.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048,
                   help="token budget of one engine step")
    s.add_argument("--max-num-seqs", type=_positive_int, default=128,
                   help="sequences running at once")
    s.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="context length (prompt + output); default: the model's")
    s.add_argument("--max-queued-requests", type=_non_negative_int, default=None,
                   help="waiting sequences before new requests get 503 + Retry-After; "
                        "default: unbounded")
    s.add_argument("--num-scheduler-steps", type=_positive_int, default=None,
                   help="decode steps per scheduling round while every running request "
                        "only decodes (host work once per round; streams get up to this "
                        "many tokens per chunk); default: 8 on CUDA, 1 on CPU")

    h = p.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on")
    h.add_argument("--port", type=_port, default=8000, help="port (0: any free port)")
    # default None, read from the environment in main(): a default is printed by --help
    h.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every path but /health, "
                        f"/metrics and /version; default: ${API_KEY_ENV} if set, else no key")
    h.add_argument("--max-request-body-bytes", type=parse_size, default=16 * 2**20,
                   metavar="SIZE", help="larger request bodies get 413 (e.g. 16MiB)")
    h.add_argument("--graceful-shutdown-timeout", type=_seconds, default=30.0,
                   metavar="SECONDS", help="on SIGTERM/SIGINT, stop accepting and let "
                                           "in-flight requests finish for this long")
    h.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"],
                   default="info", help="log level of tpaserve and uvicorn")
    return p


def _bind(host: str, port: int) -> socket.socket:
    """Bound, not yet listening (uvicorn listens once the app is up): until then clients
    are refused rather than left hanging in the backlog while the model loads."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def _one_line(exc: BaseException) -> str:
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def fail(message: str):
        sys.stderr.write(f"tpaserve: error: {message}\n")
        raise SystemExit(EXIT_BAD_CONFIG)

    model = args.model
    if model is None:
        if not (DEMO_DIR / "config.json").is_file():
            fail(f"no --model given and the bundled demo model is missing ({DEMO_DIR}); "
                 f"pass --model DIR")
        model = str(DEMO_DIR)
    elif not Path(model).is_dir():
        fail(f"--model {model}: no such directory")
    names = args.served_model_name or [DEMO_NAME if args.model is None
                                       else Path(model).resolve().name]

    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")

    # heavy imports after the cheap checks: `tpaserve --help` and flag errors stay fast
    from tpaserve.config import ConfigError
    from tpaserve.models.chat_template import ChatTemplateError
    from tpaserve.models.loader import CheckpointError
    from tpaserve.models.tokenizer import TokenizerLoadError, TokenizerNotFoundError

    import torch

    from tpaserve.engine.factory import build_engine
    try:
        engine = build_engine(
            model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
            block_size=args.block_size, num_blocks=args.num_blocks,
            cache_memory=args.cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=args.enable_prefix_caching,
            max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len, max_queued_requests=args.max_queued_requests,
            seed=args.seed, enforce_eager=args.enforce_eager,
            num_scheduler_steps=args.num_scheduler_steps)
    except (ConfigError, CheckpointError, TokenizerNotFoundError, TokenizerLoadError,
            ChatTemplateError, ValueError, OSError, torch.OutOfMemoryError) as e:
        sock.close()
        fail(_one_line(e))

    import uvicorn

    from tpaserve.api.server import build_app
    from tpaserve.api.shutdown import DrainingServer
    app = build_app(engine, names, model_root=str(model), api_key=args.api_key,
                    max_request_body_bytes=args.max_request_body_bytes)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    logger.info("model %s (%s) from %s", names[0], ", ".join(names[1:]) or "no aliases", model)
    logger.info("dtype %s, device %s, max model len %d, tokenizer %s", engine.config.dtype,
                engine.config.device, engine.max_model_len,
                engine.tokenizer.name_or_path if engine.tokenizer is not None else "none")
    # (the factor-cache summary was logged by the engine as it sized the cache)
    logger.info("serving on http://%s:%d (API key %s)", url_host, port,
                "required" if args.api_key else "not required")
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout,
                            log_config=None)
    DrainingServer(config, app).run(sockets=[sock])


if __name__ == "__main__":
    main()
