"""The Ray Serve application: one ingress in front of N tpaserve replicas.

    Ray's HTTP proxy ──▶ FleetIngress ──handle, routed by──▶ TpaReplica x N
                         reads the body, its   PrefixAffinity  a whole tpaserve server: its
                         prompt's routing key, Router (or      engine core process, AsyncLLM
                         retries a request     RoundRobin)     and OpenAI app, called in-process
                         whose replica died                    (forward.serve_asgi)

A replica is the CLI's server without the socket: every API feature works as on one server.
If its engine core dies, the replica process exits at once (as the CLI's server exits 1):
Ray replaces it, and every request it had not answered fails over at the ingress.

Retry rule: a request is sent again, to the replicas that remain, when its replica died
(RayActorError) before the first byte of the response body reached the client, up to
--max-retries times (then a 503 OpenAI error, code replica_unavailable). After that byte
the client has part of an answer and the stream is cut instead. Generation has no side
effect a retry could repeat.
"""
from __future__ import annotations

import asyncio
import logging
import os

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tpaserve.api.errors import APIError
from tpaserve.args import EngineArgs, ServerArgs
from tpaserve.serve_ray.cli import FleetArgs
from tpaserve.serve_ray.forward import ForwardedRequest, ResponseHead, routing_key, serve_asgi
from tpaserve.serve_ray.routing import ROUTERS

logger = logging.getLogger("tpaserve.serve_ray")

REPLICA_HEADER = "x-tpaserve-replica"       # which replica answered
ATTEMPTS_HEADER = "x-tpaserve-attempts"     # 1, or more after a replica died under it
REPLICA_DEPLOYMENT = "TpaReplica"
# a replica that died must be gone from the router before a retry: Ray learns it from the
# failed call at once; the back-off covers a replica the controller is still replacing
RETRY_BACKOFF_S = 0.2


@serve.deployment(name=REPLICA_DEPLOYMENT, health_check_period_s=2)
class TpaReplica:
    async def __init__(self, engine_args: EngineArgs, server_args: ServerArgs,
                       names: list[str]):
        from tpaserve.api.server import build_app
        from tpaserve.frontend.async_llm import AsyncLLM
        logging.basicConfig(level=server_args.log_level.upper())
        tokenizer = engine_args.load_tokenizer()
        config = engine_args.create_engine_config(tokenizer)
        self.llm = AsyncLLM(config, tokenizer, log_level=server_args.log_level)
        await asyncio.to_thread(self.llm.wait_ready)
        self.app = build_app(self.llm, names, server_args)
        self.app.state.on_engine_dead = self._engine_died
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def _engine_died(self, exc) -> None:
        # no error bodies: the ingress sees this process gone and retries elsewhere
        logger.error("replica %s: %s; exiting for Ray to replace it", self.replica_id, exc)
        os._exit(1)

    async def forward(self, req: ForwardedRequest):
        """The response to `req`: a ResponseHead, then body chunks (a streaming call)."""
        async for item in serve_asgi(self.app, req):
            if isinstance(item, ResponseHead):
                item.headers.append((REPLICA_HEADER.encode(), self.replica_id.encode()))
            yield item

    def check_health(self) -> None:
        if not self.llm.ready:
            raise RuntimeError(f"the engine is not serving ({self.llm.dead or 'not ready'})")

    def record_routing_stats(self) -> dict:
        """This replica's counters (Ray's routers may read them as `routing_stats`;
        replica_stats() reads them for tests and benchmarks)."""
        s = self.llm.stats
        return {"replica": self.replica_id, "pid": os.getpid(), "core_pid": self.llm.core.pid,
                "num_running": s.num_running if s else 0,
                "num_waiting": s.num_waiting if s else 0,
                "prefix_queries": s.prefix_queries if s else 0,
                "prefix_hits": s.prefix_hits if s else 0}

    async def __del__(self):
        await self._lifespan.__aexit__(None, None, None)
        await asyncio.to_thread(self.llm.shutdown)


@serve.deployment(name="FleetIngress", ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=100_000)
class FleetIngress:
    def __init__(self, replicas: DeploymentHandle, prefix_chars: int, max_retries: int):
        self.replicas = replicas.options(method_name="forward", stream=True)
        self.prefix_chars, self.max_retries = prefix_chars, max_retries

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        # Ray mounts the app at its route prefix: the path below it is tpaserve's path
        root = request.scope.get("root_path", "").rstrip("/")
        path = request.scope["path"][len(root):] if root else request.scope["path"]
        req = ForwardedRequest(
            method=request.method, path=path, query_string=request.url.query.encode(),
            headers=list(request.headers.raw), body=body,
            routing_key=routing_key(path, body, self.prefix_chars))
        for attempt in range(1, self.max_retries + 2):
            stream = self.replicas.remote(req)
            try:
                head = await stream.__anext__()
                first = await anext(stream, b"")        # the replica's answer has begun
                break
            except (RayActorError, ActorUnavailableError) as e:
                stream.cancel()
                if attempt > self.max_retries:
                    return APIError(503, f"the replica serving this request died {attempt} "
                                         f"time(s) before answering ({type(e).__name__}); "
                                         f"retry later", code="replica_unavailable",
                                    headers={ATTEMPTS_HEADER: str(attempt)}).response()
                logger.warning("attempt %d of a %s %s: its replica died (%s); retrying",
                               attempt, request.method, path, type(e).__name__)
                await asyncio.sleep(RETRY_BACKOFF_S * attempt)

        async def body_chunks():
            try:
                if first:
                    yield first
                async for chunk in stream:
                    yield chunk
            finally:
                stream.cancel()          # a no-op once it finished; else the client left

        # the body streams through as it comes; the proxy frames it (chunked)
        headers = [(k, v) for k, v in head.headers if k.lower() != b"content-length"]
        headers.append((ATTEMPTS_HEADER.encode(), str(attempt).encode()))
        response = StreamingResponse(body_chunks(), status_code=head.status)
        response.raw_headers = headers          # the replica's, in order, duplicates kept
        return response


def build_app(engine_args: EngineArgs, server_args: ServerArgs, names: list[str],
              fleet: FleetArgs) -> serve.Application:
    """The application (serve.run it). With --max-replicas: autoscaled between
    --min-replicas and it on each replica's ongoing requests (its engine's running and
    waiting ones: the queue); else --replicas replicas."""
    kwargs = {"imbalance": fleet.routing_imbalance} if fleet.routing == "prefix" else {}
    options = dict(
        max_ongoing_requests=fleet.max_ongoing_requests,
        ray_actor_options={"num_cpus": fleet.num_cpus_per_replica,
                           "num_gpus": fleet.num_gpus_per_replica or 0},
        request_router_config=RequestRouterConfig(request_router_class=ROUTERS[fleet.routing],
                                                  request_router_kwargs=kwargs),
        graceful_shutdown_timeout_s=server_args.graceful_shutdown_timeout)
    if fleet.max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": fleet.min_replicas, "max_replicas": fleet.max_replicas,
            "initial_replicas": max(1, fleet.min_replicas),
            "target_ongoing_requests": fleet.target_ongoing_requests}
    else:
        options["num_replicas"] = fleet.replicas
    replica = TpaReplica.options(**options).bind(engine_args, server_args, names)
    return FleetIngress.bind(replica, fleet.prefix_chars, fleet.max_retries)


def replica_stats(app_name: str) -> list[dict]:
    """Every live replica's record_routing_stats() of application `app_name` (the Ray
    cluster this process is connected to)."""
    prefix = f"SERVE_REPLICA::{app_name}#{REPLICA_DEPLOYMENT}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(prefix)]
    refs = [ray.get_actor(n, namespace="serve").record_routing_stats.remote() for n in names]
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref, timeout=30))
        except ray.exceptions.RayError:
            continue                  # dying, or a replacement still loading its engine
    return out
