"""`tpaserve`: serve a T6 checkpoint over an OpenAI-compatible HTTP API.

    tpaserve                                  # the bundled demo model, as "t6-demo"
    tpaserve --model ckpt/ --tokenizer gpt2/ --port 8000 --cache-memory 4GiB
    tpaserve ray --replicas 2                 # N replicas on Ray Serve (serve_ray/cli.py)

Two processes: this one (HTTP, tokenization, output processing) and the engine core
process it spawns (scheduler, cache, model; frontend/core_client.py). The flags come from
tpaserve/args.py (EngineArgs, ServerArgs).

Any bad value (a flag, the checkpoint, the tokenizer) ends the program with one line on
stderr and status 2, never a traceback. The listening socket is bound before the model
loads, so a busy port fails fast, and the URL logged is the one really bound (--port 0
picks a free port). If the engine core process dies while serving, every open request gets
an error, /health turns 503 and the program exits with status 1.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from tpaserve.args import (  # noqa: F401
    API_KEY_ENV,
    DEMO_DIR,
    DEMO_NAME,
    EngineArgs,
    HelpFormatter,
    ServerArgs,
    add_fields,
    parse_size,
)
from tpaserve.exceptions import (
    ChatTemplateError,
    CheckpointError,
    ConfigError,
    TokenizerLoadError,
    TokenizerNotFoundError,
    one_line,
)

EXIT_BAD_CONFIG = 2
EXIT_ENGINE_DIED = 1

logger = logging.getLogger("tpaserve")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):          # one line, no usage block
        self.exit(EXIT_BAD_CONFIG, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tpaserve", formatter_class=HelpFormatter,
                description="Serve a Tensor Product Attention (T6) model over an "
                            "OpenAI-compatible HTTP API (/v1/completions, "
                            "/v1/chat/completions).")
    EngineArgs.add_cli_args(p)
    add_fields(p, ServerArgs)
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


def fail(message: str, code: int = EXIT_BAD_CONFIG):
    sys.stderr.write(f"tpaserve: error: {message}\n")
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ray"]:                  # `tpaserve ray ...`: a fleet on Ray Serve
        from tpaserve.serve_ray.cli import main as ray_main
        return ray_main(argv[1:])
    ns = build_parser().parse_args(argv)
    engine_args, server_args = EngineArgs.from_cli_args(ns), ServerArgs.from_cli_args(ns)
    server_args.api_key = server_args.api_key or os.environ.get(API_KEY_ENV) or None
    logging.basicConfig(level=server_args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server_args.validate()
        model_dir = engine_args.check_model()
        engine_args.create_engine_config()          # every range, before anything starts
    except (ConfigError, CheckpointError) as e:
        fail(one_line(e))
    names = server_args.served_model_name or [
        DEMO_NAME if engine_args.model is None else model_dir.resolve().name]
    try:
        sock = _bind(server_args.host, server_args.port)
    except OSError as e:
        fail(f"cannot listen on {server_args.host}:{server_args.port}: {e.strerror or e}")

    try:
        tokenizer = engine_args.load_tokenizer()
        config = engine_args.create_engine_config(tokenizer)
    except (ConfigError, TokenizerNotFoundError, TokenizerLoadError, ChatTemplateError) as e:
        sock.close()
        fail(one_line(e))

    from tpaserve.frontend.core_client import CoreProcess, CoreStartError
    n_api = server_args.api_server_count
    if n_api > 1:
        from tpaserve.api.workers import metrics_dir
        metrics_dir()                     # before any API process imports prometheus_client
    core = CoreProcess(config, num_clients=n_api, log_level=server_args.log_level)
    logger.info("engine core process %d: loading %s", core.pid, model_dir)
    try:
        info = core.wait_ready()
    except CoreStartError as e:
        sock.close()
        fail(str(e), EXIT_BAD_CONFIG if e.user_error else EXIT_ENGINE_DIED)
    except KeyboardInterrupt:
        core.kill()
        raise SystemExit(130) from None

    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    logger.info("model %s (%s) from %s", names[0], ", ".join(names[1:]) or "no aliases",
                model_dir)
    logger.info("dtype %s, device %s, max model len %d, scheduler steps %d, async scheduling "
                "%s, tokenizer %s", info.dtype, info.device, info.max_model_len,
                info.num_scheduler_steps, "on" if info.async_scheduling else "off",
                tokenizer.name_or_path)
    logger.info(info.cache_summary)
    logger.info("serving on http://%s:%d (API key %s, %d API process%s)", url_host, port,
                "required" if server_args.api_key else "not required", n_api,
                "es" if n_api > 1 else "")
    if n_api > 1:
        from tpaserve.api.workers import serve_with_workers
        sys.exit(serve_with_workers(engine_args, server_args, config, core, sock, names))

    from tpaserve.api.shutdown import make_server
    from tpaserve.frontend.async_llm import AsyncLLM
    server = make_server(AsyncLLM(config, tokenizer, core=core), names, server_args)
    server.run(sockets=[sock])
    if server.exit_code:
        sys.exit(server.exit_code)
    if not server.started:                # the app's start-up failed (uvicorn logged why)
        sys.exit(EXIT_ENGINE_DIED)


if __name__ == "__main__":
    main()
