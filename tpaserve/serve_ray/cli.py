"""`tpaserve ray`: serve a T6 checkpoint from N replicas on Ray Serve, one endpoint.

    tpaserve ray --replicas 2 --port 8000                       # a local Ray cluster
    tpaserve ray --min-replicas 1 --max-replicas 4 --ray-address auto --model ckpt/

Every engine and server flag of `tpaserve` applies to each replica (`--api-server-count`
excepted: a replica's API runs in its Ray actor); --host and --port are Ray Serve's HTTP
proxy's. As with `tpaserve`, a bad value ends the program with one line on stderr and
status 2, before Ray starts. SIGINT or SIGTERM deletes the application (each replica
drains, then stops its engine core) and exits 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass, fields

from tpaserve.api.cli import EXIT_ENGINE_DIED, _bind, _Parser, fail
from tpaserve.args import (
    API_KEY_ENV,
    DEMO_NAME,
    EngineArgs,
    HelpFormatter,
    ServerArgs,
    _arg,
    _float,
    _int,
    add_fields,
)
from tpaserve.exceptions import (
    ChatTemplateError,
    CheckpointError,
    ConfigError,
    TokenizerLoadError,
    TokenizerNotFoundError,
    one_line,
)

logger = logging.getLogger("tpaserve")

ROUTING = ["prefix", "round-robin", "power-of-two"]


@dataclass
class FleetArgs:
    replicas: int = _arg(2, "replicas, each a whole tpaserve server with its own engine core "
                         "(unused with --max-replicas)", group="fleet", parse=_int,
                         metavar="N")
    min_replicas: int = _arg(1, "autoscaling: the fewest replicas", group="fleet",
                             parse=_int, metavar="N")
    max_replicas: int | None = _arg(
        None, "autoscale between --min-replicas and this many replicas on queue length "
        "(see --target-ongoing-requests). Default: a fixed --replicas", group="fleet",
        parse=_int, metavar="N")
    target_ongoing_requests: float = _arg(
        8.0, "autoscaling: the requests in flight per replica (its engine's running + "
        "waiting ones) Ray Serve scales toward", group="fleet", parse=_float, metavar="X")
    max_ongoing_requests: int = _arg(
        64, "requests in flight one replica accepts; beyond, a request goes to another "
        "replica or waits at the ingress", group="fleet", parse=_int, metavar="N")
    routing: str = _arg("prefix", "prefix: a prompt's first --prefix-chars characters pick "
                        "its replica (rendezvous hashing), so shared prefixes hit one "
                        "replica's prefix cache; round-robin; power-of-two: Ray Serve's "
                        "default (two random replicas, the shorter queue)", group="fleet",
                        choices=ROUTING)
    prefix_chars: int = _arg(256, "prefix routing: characters of the prompt (chat: of its "
                             "messages as 'role: content' lines) that pick the replica",
                             group="fleet", parse=_int, metavar="N")
    routing_imbalance: int = _arg(
        8, "prefix routing: the chosen replica yields to the least loaded one when its queue "
        "is longer by more than this many requests", group="fleet", parse=_int, metavar="N")
    max_retries: int = _arg(
        2, "times a request is sent again when its replica dies before the response has "
        "started", group="fleet", parse=_int, metavar="N")
    num_cpus_per_replica: float = _arg(1.0, "Ray CPUs reserved per replica", group="fleet",
                                       parse=_float, metavar="X")
    num_gpus_per_replica: float | None = _arg(
        None, "Ray GPUs per replica. Default: 1 when --device is cuda, or auto and the Ray "
        "cluster has GPUs; else 0", group="fleet", parse=_float, metavar="X")
    ray_address: str | None = _arg(
        None, "the Ray cluster to join (auto, or ray://HOST:10001). Default: start a local "
        "one in this process", group="fleet", metavar="ADDRESS")
    app_name: str = _arg("tpaserve", "Ray Serve application name", group="fleet",
                         metavar="NAME")

    def validate(self) -> None:
        """ConfigError naming the flag and its value."""
        at_least = [("--replicas", self.replicas, 1), ("--min-replicas", self.min_replicas, 0),
                    ("--max-ongoing-requests", self.max_ongoing_requests, 1),
                    ("--prefix-chars", self.prefix_chars, 1),
                    ("--routing-imbalance", self.routing_imbalance, 0),
                    ("--max-retries", self.max_retries, 0),
                    ("--num-cpus-per-replica", self.num_cpus_per_replica, 0),
                    ("--num-gpus-per-replica", self.num_gpus_per_replica or 0, 0)]
        for flag, value, low in at_least:
            if not value >= low:
                raise ConfigError(f"{flag} must be >= {low}, got {value}")
        if not self.target_ongoing_requests > 0:
            raise ConfigError(f"--target-ongoing-requests must be > 0, got "
                              f"{self.target_ongoing_requests}")
        if self.max_replicas is not None and self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(f"--max-replicas must be >= 1 and >= --min-replicas "
                              f"({self.min_replicas}), got {self.max_replicas}")

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> FleetArgs:
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tpaserve ray", formatter_class=HelpFormatter,
                description="Serve a T6 model from several tpaserve replicas on Ray Serve "
                            "behind one OpenAI-compatible endpoint (pip install "
                            "'tpaserve[ray]').")
    EngineArgs.add_cli_args(p)
    add_fields(p, ServerArgs)
    add_fields(p, FleetArgs)
    return p


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    engine_args, server_args = EngineArgs.from_cli_args(ns), ServerArgs.from_cli_args(ns)
    fleet = FleetArgs.from_cli_args(ns)
    server_args.api_key = server_args.api_key or os.environ.get(API_KEY_ENV) or None
    logging.basicConfig(level=server_args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server_args.validate()
        fleet.validate()
        if server_args.api_server_count != 1:
            raise ConfigError(f"--api-server-count is not used by tpaserve ray (got "
                              f"{server_args.api_server_count}): scale with --replicas")
        model_dir = engine_args.check_model()
        engine_args.create_engine_config(engine_args.load_tokenizer())
    except (ConfigError, CheckpointError, TokenizerNotFoundError, TokenizerLoadError,
            ChatTemplateError) as e:
        fail(one_line(e))
    try:
        import ray
        from ray import serve
    except ImportError:
        fail("tpaserve ray needs Ray Serve: pip install 'tpaserve[ray]'")
    try:                                      # fail fast on a busy port, before Ray starts
        _bind(server_args.host, server_args.port).close()
    except OSError as e:
        fail(f"cannot listen on {server_args.host}:{server_args.port}: {e.strerror or e}")
    names = server_args.served_model_name or [
        DEMO_NAME if engine_args.model is None else model_dir.resolve().name]

    from tpaserve.serve_ray.deployments import build_app
    ray.init(address=fleet.ray_address, logging_level=logging.WARNING)
    if fleet.num_gpus_per_replica is None:
        gpus = ray.cluster_resources().get("GPU", 0)
        fleet.num_gpus_per_replica = 1.0 if engine_args.device == "cuda" or (
            engine_args.device == "auto" and gpus > 0) else 0.0
    serve.start(http_options={"host": server_args.host, "port": server_args.port})
    try:
        serve.run(build_app(engine_args, server_args, names, fleet), name=fleet.app_name,
                  route_prefix="/")
    except Exception as e:                  # noqa: BLE001 - a replica could not start
        serve.shutdown()
        fail(f"the application did not start: {one_line(e)}", EXIT_ENGINE_DIED)
    host = f"[{server_args.host}]" if ":" in server_args.host else server_args.host
    logger.info("serving %s on http://%s:%d from %s replicas (routing %s)", names[0], host,
                server_args.port, fleet.replicas if fleet.max_replicas is None else
                f"{fleet.min_replicas}..{fleet.max_replicas}", fleet.routing)
    signal.sigwait(_wait_for_stop())
    logger.info("stopping: draining the replicas")
    serve.delete(fleet.app_name)
    if fleet.ray_address is None:
        serve.shutdown()
    sys.exit(0)


def _wait_for_stop() -> set[int]:
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    return stop

