"""Health and metrics: ``GET /health/live``, ``GET /health/ready`` and ``GET /metrics``.

Handlers run on the event loop; none needs the API token.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kp_gateway.errors import GatewayError
from kp_gateway.http.appkeys import HEALTH_KEY, INGEST_KEY, SERIES_STAGES_KEY


async def get_live(request: web.Request) -> web.Response:
    """200 while the process runs."""
    return web.json_response({"status": "alive"})


async def get_ready(request: web.Request) -> web.Response:
    """200 when storage, index and pipeline accept work, else 503 with each component."""
    ingest = request.app[INGEST_KEY]
    health = request.app[HEALTH_KEY]
    components: dict[str, dict[str, Any]] = {}
    try:
        await ingest.index.ping()
        components["index"] = {"ok": True}
    except GatewayError as exc:
        components["index"] = {"ok": False, "detail": str(exc)}
    try:
        await ingest.storage.ping()
        free = await ingest.storage.free_bytes()
        components["storage"] = {"ok": True, "free_bytes": free}
    except (GatewayError, OSError) as exc:
        components["storage"] = {"ok": False, "detail": str(exc)}
    pipeline = ingest.pipeline
    components["pipeline"] = {
        "ok": pipeline.accepting and health.ready and not health.draining,
        "in_flight": pipeline.in_flight,
        "queues": pipeline.queue_depths(),
        "series_pending_completion": ingest.tracker.pending_count(),
    }
    if (stages := request.app.get(SERIES_STAGES_KEY)) is not None:
        components["series_stages"] = stages.readiness()
    ok = all(c["ok"] for c in components.values())
    return web.json_response(
        {"status": "ready" if ok else "not ready", "components": components},
        status=200 if ok else 503,
    )


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    registry = request.app[INGEST_KEY].metrics.registry
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


__all__ = ["get_live", "get_metrics", "get_ready"]
