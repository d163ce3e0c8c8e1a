"""GET /dashboard: a live status page for a person without Grafana (issue #19).

The page (api/static/dashboard.*) is static: its script polls /metrics every second and
parses the Prometheus text itself, so it shows nothing the metrics module does not define
and needs no endpoint of its own. Everything it loads comes from this server (no CDN: the
machines it runs on may have no internet), which the Content-Security-Policy also enforces.
Open like /metrics (server.OPEN_PATHS); `--disable-dashboard` leaves the router out.
"""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

router = APIRouter()
_STATIC = resources.files("tpaserve.api") / "static"
# the page's own files, each at its own route (anything else under /dashboard/ is a 404, and
# not open); name -> media type
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8"}
PATHS = frozenset({"/dashboard", *(f"/dashboard/{name}" for name in ASSETS)})

# Same origin only: no inline script or style, nothing fetched elsewhere, never framed.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache"}


def _serve(path: str, file: str, media_type: str) -> None:
    body = (_STATIC / file).read_bytes()        # read once: package data never changes

    async def endpoint() -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)

    router.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False,
                         name=f"dashboard:{file}")


_serve("/dashboard", "dashboard.html", "text/html; charset=utf-8")
for _name, _type in ASSETS.items():
    _serve(f"/dashboard/{_name}", _name, _type)
