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

# name served -> (package file, media type); read once, at import (they never change)
_ASSETS = {"dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
           "dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
_STATIC = resources.files("tpaserve.api") / "static"
_PAGE = (_STATIC / "dashboard.html").read_bytes()
_BODIES = {name: (_STATIC / file).read_bytes() for name, (file, _) in _ASSETS.items()}
PATHS = frozenset({"/dashboard", *(f"/dashboard/{name}" for name in _ASSETS)})

# Same origin only: no inline script or style, nothing fetched elsewhere, never framed.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache"}


@router.get("/dashboard", include_in_schema=False)
async def page() -> Response:
    return Response(_PAGE, media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/dashboard/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in _ASSETS:
        return Response(status_code=404, headers=_HEADERS)
    return Response(_BODIES[name], media_type=_ASSETS[name][1], headers=_HEADERS)
