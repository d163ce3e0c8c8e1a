"""Which replica serves a request: two policies written against Ray Serve's request-router
API (`ray.serve.request_router.RequestRouter`), run by the ingress's handle to the replicas.

    PrefixAffinityRouter  rendezvous (highest-random-weight) hashing of the request's routing
                          key, the first `--prefix-chars` characters of its prompt: requests
                          that share that much of a prompt go to the same replica, whose
                          prefix cache holds it. The chosen replica yields to the least loaded
                          one when its queue is `imbalance` requests longer.
    RoundRobinRouter      the replicas in turn, blind to the prompt (the baseline).

Invariant: `choose_replicas` returns ranks of one replica each, most preferred first; Ray
sends the request to the first rank whose replica accepts it (its queue below
max_ongoing_requests), so a full replica is skipped, never waited for.

Why not Ray's own PrefixCacheAffinityRouter (ray.serve.llm): it needs `ray[llm]` (pyarrow
and more) for a character tree kept in one more actor, and its router blocks its event loop
on that actor (`ray.get`) for every request. Rendezvous hashing needs no shared state:
several ingress replicas agree on the replica for a key without talking, and a replica that
joins or leaves moves only the keys it wins or held (about 1/N of them).
"""
from __future__ import annotations

import hashlib
import itertools

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def _score(key: bytes, replica: RunningReplica) -> bytes:
    return hashlib.blake2b(key + replica.replica_id.unique_id.encode(), digest_size=8).digest()


def routing_key(pending_request: PendingRequest | None) -> str | None:
    """The `routing_key` of the request's ForwardedRequest (None: a request without a
    prompt, e.g. GET /v1/models, or an empty one)."""
    if pending_request is None:
        return None
    for arg in pending_request.args:
        key = getattr(arg, "routing_key", None)
        if key:
            return key
    return None


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 8) -> None:
        self.imbalance = imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        key = routing_key(pending_request)
        if key is None:                       # no prompt: the least loaded one, by Ray
            return [candidate_replicas]
        digest = key.encode()
        ranked = sorted(candidate_replicas, key=lambda r: _score(digest, r), reverse=True)
        # queue lengths as the router last saw them (an unknown one counts as 0: the first
        # request to a replica is probed by Ray before it is sent)
        cache = self.replica_queue_len_cache
        queue = {r.replica_id: cache.get(r.replica_id) or 0 for r in ranked}
        least = min(ranked, key=lambda r: queue[r.replica_id])
        if queue[ranked[0].replica_id] - queue[least.replica_id] > self.imbalance:
            ranked.remove(least)
            ranked.insert(0, least)
        return [[r] for r in ranked]


class RoundRobinRouter(RequestRouter):
    def initialize_state(self) -> None:
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not ordered:
            return []
        start = next(self._turn) % len(ordered)
        return [[r] for r in ordered[start:] + ordered[:start]]


ROUTERS = {
    "prefix": f"{__name__}:PrefixAffinityRouter",
    "round-robin": f"{__name__}:RoundRobinRouter",
    # Ray Serve's default: two random replicas, the shorter queue wins
    "power-of-two": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
}
