"""tpaserve on Ray Serve: N tpaserve replicas behind one OpenAI-compatible endpoint, routed
by prompt prefix, autoscaled on queue length, with failover when a replica dies.

    pip install 'tpaserve[ray]'
    tpaserve ray --replicas 2 --port 8000                  # or: python -m tpaserve.serve_ray

forward.py      the request as the ingress sends it; a replica serves it with its own app
routing.py      the request routers (prefix affinity, round robin) for Ray Serve's handle
deployments.py  the ingress and replica deployments, build_app, replica_stats
cli.py          `tpaserve ray`: flags, checks, a local (or given) Ray cluster, serve.run

Only this package imports ray; nothing else of tpaserve imports it.
"""
