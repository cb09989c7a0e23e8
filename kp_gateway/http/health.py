"""Health and metrics: ``GET /health/live``, ``GET /health/ready`` and ``GET /metrics``.

Handlers run on the event loop; none needs the API token.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kp_gateway.errors import GatewayError
from kp_gateway.http.appkeys import (
    HEALTH_KEY,
    INDEX_KEY,
    MIN_FREE_BYTES_KEY,
    PIPELINE_KEY,
    REGISTRY_KEY,
    SERIES_STAGES_KEY,
    STORAGE_KEY,
)


async def get_live(request: web.Request) -> web.Response:
    """200 while the process runs."""
    return web.json_response({"status": "alive"})


async def get_ready(request: web.Request) -> web.Response:
    """200 when storage, index and pipeline accept work, else 503 with each component."""
    index, storage = request.app[INDEX_KEY], request.app[STORAGE_KEY]
    health = request.app[HEALTH_KEY]
    components: dict[str, dict[str, Any]] = {}
    try:
        await index.ping()
        components["index"] = {"ok": True}
    except GatewayError as exc:
        components["index"] = {"ok": False, "detail": str(exc)}
    try:
        await storage.ping()
        free = await storage.free_bytes()
        low = request.app[MIN_FREE_BYTES_KEY]
        components["storage"] = {"ok": free is None or free >= low, "free_bytes": free}
        if free is not None and free < low:
            components["storage"]["detail"] = (
                f"{free} bytes free, below dicom.min_free_bytes ({low}): C-STOREs get 0xA700"
            )
    except (GatewayError, OSError) as exc:
        components["storage"] = {"ok": False, "detail": str(exc)}
    pipeline = request.app[PIPELINE_KEY].readiness()
    pipeline["ok"] = pipeline["ok"] and health.ready and not health.draining
    components["pipeline"] = pipeline
    if (stages := request.app.get(SERIES_STAGES_KEY)) is not None:
        components["series_stages"] = stages.readiness()
    ok = all(c["ok"] for c in components.values())
    return web.json_response(
        {"status": "ready" if ok else "not ready", "components": components},
        status=200 if ok else 503,
    )


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    registry = request.app[REGISTRY_KEY]
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


__all__ = ["get_live", "get_metrics", "get_ready"]
