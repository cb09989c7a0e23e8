"""The HTML pages: the gallery page (CONTRACT section 5), ``GET /gallery`` and its script, style
and one helper, and the token page ``GET /tokens``. (The upload page is served by
:mod:`kp_gateway.http.uploads`.)

The pages are static HTML with a small script that reads the JSON API (``/api/projects``,
``/api/projects/{p}/datasets``, ``/api/projects/{p}/series``, ``/api/series/{uid}``, the token
routes) with the session cookie; nothing is rendered on the server, and the API decides what
the session's principal sees. Scripts and styles are served from ``/gallery/…`` so the pages
do not depend on a ``/static`` route. Handlers run on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from kp_gateway.backends.base import SeriesQuery, iter_series
from kp_gateway.errors import RejectedInputError
from kp_gateway.http.appkeys import INDEX_KEY
from kp_gateway.http.auth import require_read
from kp_gateway.kaapana.keys import ADMIN_PROJECT

WEB_DIR = Path(__file__).parent / "static"
# Offered in the modality filter even before such a series exists.
COMMON_MODALITIES = ("CT", "MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "SEG", "RTSTRUCT", "SM")
# The modality list pages through series summaries; beyond this many it stops (and says so).
_MODALITY_SCAN_MAX = 5000
_MODALITY_CACHE_S = 10.0
_PAGE = 500
_NO_CACHE = {"Cache-Control": "no-cache"}

_FILES = {
    "gallery.html": "text/html",
    "gallery.js": "text/javascript",
    "gallery.css": "text/css",
    "tokens.html": "text/html",
    "tokens.js": "text/javascript",
}
_ModalityCache = dict[tuple[str, str | None], tuple[float, dict[str, Any]]]
_CACHE_KEY: web.AppKey[_ModalityCache] = web.AppKey("gallery_modality_cache")


def _file_handler(name: str) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    content_type = _FILES[name]

    async def handler(request: web.Request) -> web.FileResponse:
        """One file of http/static/, revalidated on every load (no build step, no hashes)."""
        return web.FileResponse(
            WEB_DIR / name, headers={"Content-Type": f"{content_type}; charset=utf-8", **_NO_CACHE}
        )

    return handler


async def get_modalities(request: web.Request) -> web.Response:
    """``{"items": [...], "partial": bool}``: modalities present in a project (and dataset).

    Pages through the series summaries (at most 5000 series, cached 10 s per filter) because
    the index has no facet query; common modalities are added so the filter is never empty.
    """
    project = request.query.get("project", ADMIN_PROJECT).lower()
    dataset = request.query.get("dataset") or None
    if len(project) > 64 or (dataset is not None and len(dataset) > 256):
        raise RejectedInputError("project or dataset name too long")
    require_read(request, project)
    index = request.app[INDEX_KEY]
    if not await index.project_exists(project):
        raise web.HTTPNotFound(text=f"project {project!r} does not exist")
    cache = request.app[_CACHE_KEY]
    key = (project, dataset)
    hit = cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < _MODALITY_CACHE_S:
        return web.json_response(hit[1])
    present: set[str] = set()
    scanned = 0
    query = SeriesQuery(project=project, dataset=dataset)
    # One more than the cap: whether it is reached tells if the scan was partial.
    async for item in iter_series(index, query, page=_PAGE, at_most=_MODALITY_SCAN_MAX + 1):
        scanned += 1
        if item.get("modality"):
            present.add(str(item["modality"]))
    body = {
        "items": sorted(present | set(COMMON_MODALITIES)),
        "present": sorted(present),
        "partial": scanned > _MODALITY_SCAN_MAX,
    }
    cache[key] = (time.monotonic(), body)
    return web.json_response(body)


def setup_gallery(app: web.Application) -> None:
    """Add the gallery and token-page routes to `app` (built by
    :func:`kp_gateway.http.app.make_app`)."""
    app[_CACHE_KEY] = {}
    app.router.add_get("/gallery", _file_handler("gallery.html"))
    app.router.add_get("/gallery/gallery.js", _file_handler("gallery.js"))
    app.router.add_get("/gallery/gallery.css", _file_handler("gallery.css"))
    app.router.add_get("/gallery/api/modalities", get_modalities)
    app.router.add_get("/tokens", _file_handler("tokens.html"))
    app.router.add_get("/gallery/tokens.js", _file_handler("tokens.js"))


__all__ = ["setup_gallery"]
