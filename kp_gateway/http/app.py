"""The aiohttp application: the app factory and the error middleware. Authentication, sessions
and access checks live in :mod:`~kp_gateway.http.auth`; the routes in
:mod:`~kp_gateway.http.api`, :mod:`~kp_gateway.http.token_api`,
:mod:`~kp_gateway.http.health`, :mod:`~kp_gateway.http.pages` and
:mod:`~kp_gateway.http.uploads`.

Handlers run on the event loop. Domain errors become JSON ``{"error", "detail"}`` responses in
one place, the error middleware, through :func:`kp_gateway.errors.http_status_for`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kp_gateway.backends.base import IndexBackend, StorageBackend
from kp_gateway.config import HttpConfig
from kp_gateway.errors import GatewayError, error_code_for, http_status_for
from kp_gateway.http.api import (
    delete_project,
    get_datasets,
    get_instance,
    get_projects,
    get_quarantine,
    get_series,
    get_series_instance,
    get_series_instances,
    get_series_list,
    get_thumbnail,
    get_validation_report,
    post_project,
)
from kp_gateway.http.appkeys import (
    HEALTH_KEY,
    HTTP_CONFIG_KEY,
    INDEX_KEY,
    MIN_FREE_BYTES_KEY,
    PIPELINE_KEY,
    PROTECTED_PROJECTS_KEY,
    REGISTRY_KEY,
    SERIES_STAGES_KEY,
    STORAGE_KEY,
    Health,
    PipelineHealth,
)
from kp_gateway.http.auth import auth_middleware, setup_auth
from kp_gateway.http.health import get_live, get_metrics, get_ready
from kp_gateway.http.pages import setup_gallery
from kp_gateway.http.responses import json_error
from kp_gateway.http.security import add_security_headers
from kp_gateway.http.token_api import setup_token_api
from kp_gateway.http.uploads import TUS_BASE, TUS_VERSION, DicomEndpoint, setup_uploads
from kp_gateway.kaapana.keys import ADMIN_PROJECT
from kp_gateway.metrics import Metrics
from kp_gateway.pipeline.series_stages import SeriesPostProcessor
from kp_gateway.tokens import TokenStore
from kp_gateway.upload.service import UploadService

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate exceptions into JSON errors; the one place that does so for HTTP.

    Under the tus endpoint every error also carries ``Tus-Resumable`` (tus 1.0 requires it on
    every response but OPTIONS).
    """
    headers = {"Tus-Resumable": TUS_VERSION} if request.path.startswith(TUS_BASE) else {}
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        code = exc.reason.lower().replace(" ", "_")
        return json_error(exc.status, code, exc.text or exc.reason, **headers)
    except GatewayError as exc:
        status = http_status_for(exc)
        if status == 503:
            headers["Retry-After"] = "5"
        if status >= 500:
            logger.warning("%s %s failed: %s", request.method, request.path, exc)
        return json_error(status, error_code_for(exc), str(exc), **headers)
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(500, "internal", "internal error; see the gateway log", **headers)


def make_app(
    cfg: HttpConfig,
    *,
    index: IndexBackend,
    storage: StorageBackend,
    pipeline: PipelineHealth,
    metrics: Metrics,
    token: str,
    tokens: TokenStore,
    health: Health,
    default_project: str,
    dicom_endpoint: DicomEndpoint,
    min_free_bytes: int = 0,
    uploads: UploadService | None = None,
    series_stages: SeriesPostProcessor | None = None,
) -> web.Application:
    """Build the application; the caller runs it with AppRunner/TCPSite on its own loop.

    `pipeline` is asked only for its readiness; `default_project` (the DICOM default) joins
    ``admin`` among the projects the API refuses to delete. `token` is the admin token,
    `tokens` the project tokens (:mod:`kp_gateway.tokens`).
    """
    app = web.Application(middlewares=[error_middleware, auth_middleware])
    app.on_response_prepare.append(add_security_headers)
    app[HTTP_CONFIG_KEY] = cfg
    app[INDEX_KEY] = index
    app[STORAGE_KEY] = storage
    app[PIPELINE_KEY] = pipeline
    app[MIN_FREE_BYTES_KEY] = min_free_bytes
    app[REGISTRY_KEY] = metrics.registry
    app[PROTECTED_PROJECTS_KEY] = frozenset({ADMIN_PROJECT, default_project})
    app[HEALTH_KEY] = health
    if series_stages is not None:
        app[SERIES_STAGES_KEY] = series_stages
    app.router.add_get("/health/live", get_live)
    app.router.add_get("/health/ready", get_ready)
    app.router.add_get("/metrics", get_metrics)
    setup_auth(app, cfg, token=token, tokens=tokens)
    app.router.add_get("/api/projects", get_projects)
    app.router.add_post("/api/projects", post_project)
    app.router.add_delete("/api/projects/{project}", delete_project)
    app.router.add_get("/api/projects/{project}/datasets", get_datasets)
    app.router.add_get("/api/projects/{project}/series", get_series_list)
    app.router.add_get("/api/series/{series_uid}", get_series)
    app.router.add_get("/api/series/{series_uid}/instances", get_series_instances)
    app.router.add_get("/api/series/{series_uid}/instances/{sop_uid}", get_series_instance)
    app.router.add_get("/api/series/{series_uid}/thumbnail", get_thumbnail)
    app.router.add_get("/api/series/{series_uid}/validation", get_validation_report)
    app.router.add_get("/api/instances/{sop_uid}", get_instance)
    app.router.add_get("/api/quarantine", get_quarantine)
    setup_token_api(app)
    setup_gallery(app)
    if uploads is not None:
        # Routes for uploads, files, the upload page and /static/, plus the service lifecycle.
        setup_uploads(
            app,
            uploads,
            storage=storage,
            dicom_endpoint=dicom_endpoint,
            body_timeout_s=cfg.body_timeout_s,
        )
    return app


def limit_connections(server: web.Server, limit: int) -> None:
    """Close connections past `limit` as they open. Runs on the loop.

    aiohttp has no connection limit of its own; without one, idle connections take file
    descriptors until the process runs out. Wraps the server's ``connection_made`` (the hook
    aiohttp calls for each accepted connection).
    """
    admit = server.connection_made
    refused = 0

    def connection_made(handler: Any, transport: Any) -> None:
        nonlocal refused
        admit(handler, transport)
        if len(server.connections) > limit:
            refused += 1
            if refused == 1 or refused % 1000 == 0:
                logger.warning(
                    "HTTP connection limit of %d reached: closed %d new connections so far "
                    "(http.max_connections)",
                    limit,
                    refused,
                )
            transport.close()

    server.connection_made = connection_made  # type: ignore[method-assign]


__all__ = ["limit_connections", "make_app"]
