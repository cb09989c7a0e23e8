"""The aiohttp application: the app factory, the error and token-authentication middlewares
and the login form. The routes live in :mod:`~kp_gateway.http.api`,
:mod:`~kp_gateway.http.health`, :mod:`~kp_gateway.http.pages` and
:mod:`~kp_gateway.http.uploads`.

Handlers run on the event loop. Domain errors become JSON ``{"error", "detail"}`` responses in
one place, the error middleware, through :func:`kp_gateway.errors.http_status_for`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from yarl import URL

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
    TOKEN_KEY,
    Health,
    PipelineHealth,
)
from kp_gateway.http.health import get_live, get_metrics, get_ready
from kp_gateway.http.pages import setup_gallery
from kp_gateway.http.responses import json_error
from kp_gateway.http.security import (
    LOOPBACK_HOSTS,
    add_security_headers,
    check_host,
    check_same_origin,
    safe_redirect_target,
)
from kp_gateway.http.uploads import TUS_BASE, TUS_VERSION, DicomEndpoint, setup_uploads
from kp_gateway.kaapana.keys import ADMIN_PROJECT
from kp_gateway.metrics import Metrics
from kp_gateway.pipeline.series_stages import SeriesPostProcessor
from kp_gateway.upload.service import UploadService

logger = logging.getLogger(__name__)

SESSION_COOKIE = "kp_gateway_session"
ALLOWED_HOSTS_KEY = web.AppKey("allowed_hosts", frozenset)


def allowed_hosts(cfg: HttpConfig) -> frozenset[str]:
    """Host names served when authentication is off: loopback, the bind address, the public
    host name."""
    names = set(LOOPBACK_HOSTS)
    names.update(h.lower() for h in (cfg.host, cfg.public_host) if h and h not in ("0.0.0.0", "::"))
    return frozenset(names)


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


def _is_public(path: str) -> bool:
    return path.startswith(("/health/", "/static/")) or path == "/metrics"


def _tokens_equal(offered: str, token: str) -> bool:
    # Bytes: compare_digest refuses str with non-ASCII characters (a 500 before).
    return hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), token.encode())


def is_api_path(path: str) -> bool:
    """Routes for programs (the JSON API, DICOMweb): a 401, never a redirect to the login."""
    if path.startswith(("/api/", "/dicomweb/")) or path == "/dicomweb":
        return True
    parts = path.split("/")  # /projects/<p>/dicomweb/...
    return len(parts) >= 4 and parts[1] == "projects" and parts[3] == "dicomweb"


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token, session cookie, or ``?token=``; the Host check when auth is off.

    On pages, ``?token=`` is traded once for the session cookie (a redirect, as Jupyter does);
    on ``/api/`` routes it answers the request itself, since a script wants the data, not a
    redirect and a cookie. A write authenticated by the cookie must come from this origin
    (:func:`~kp_gateway.http.security.check_same_origin`), and so must the login form.
    """
    if not request.app[HTTP_CONFIG_KEY].auth:
        check_host(request, request.app[ALLOWED_HOSTS_KEY])
        return await handler(request)
    if _is_public(request.path):
        return await handler(request)
    if request.path == "/login":
        check_same_origin(request)
        return await handler(request)
    token = request.app[TOKEN_KEY]
    offered = ""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        offered = header[7:].strip()
    elif SESSION_COOKIE in request.cookies:
        offered = request.cookies[SESSION_COOKIE]
        check_same_origin(request)
    elif "token" in request.query:
        offered = request.query["token"]
        if (
            _tokens_equal(offered, token)
            and request.method == "GET"
            and not is_api_path(request.path)
        ):
            # As Jupyter does: trade the URL token for a cookie and drop it from the URL.
            query = {k: v for k, v in request.query.items() if k != "token"}
            response = web.HTTPFound(request.rel_url.with_query(query))
            response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict")
            raise response
    if offered and _tokens_equal(offered, token):
        return await handler(request)
    if is_api_path(request.path):
        return json_error(
            401, "unauthorized", "missing or wrong token", **{"WWW-Authenticate": "Bearer"}
        )
    raise web.HTTPFound(URL("/login").with_query(next=str(request.rel_url)))


async def get_login(request: web.Request) -> web.Response:
    """A minimal login form that sets the session cookie."""
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>kp-gateway login</title><link rel='stylesheet' href='/static/style.css'>"
        "</head><body>"
        "<header class='top'><h1>kp-gateway</h1></header><main class='login'>"
        "<section class='card'><h2>Log in</h2><p>Paste the API token: the file "
        "<code>token</code> in the gateway's data directory, or the value of "
        "<code>KP_GATEWAY_HTTP_TOKEN</code>.</p>"
        "<form method='post'><input type='password' name='token' autofocus "
        "aria-label='API token'><input type='submit' value='Log in'></form>"
        "</section></main></body></html>"
    )
    return web.Response(text=page, content_type="text/html")


async def post_login(request: web.Request) -> web.Response:
    """Check the posted token and set the session cookie."""
    form = await request.post()
    offered = str(form.get("token", ""))
    if not _tokens_equal(offered, request.app[TOKEN_KEY]):
        return json_error(401, "unauthorized", "wrong token")
    response = web.HTTPFound(safe_redirect_target(request.query.get("next", "/")))
    response.set_cookie(SESSION_COOKIE, offered, httponly=True, samesite="Strict")
    raise response


def make_app(
    cfg: HttpConfig,
    *,
    index: IndexBackend,
    storage: StorageBackend,
    pipeline: PipelineHealth,
    metrics: Metrics,
    token: str,
    health: Health,
    default_project: str,
    dicom_endpoint: DicomEndpoint,
    min_free_bytes: int = 0,
    uploads: UploadService | None = None,
    series_stages: SeriesPostProcessor | None = None,
) -> web.Application:
    """Build the application; the caller runs it with AppRunner/TCPSite on its own loop.

    `pipeline` is asked only for its readiness; `default_project` (the DICOM default) joins
    ``admin`` among the projects the API refuses to delete.
    """
    app = web.Application(middlewares=[error_middleware, auth_middleware])
    app.on_response_prepare.append(add_security_headers)
    app[HTTP_CONFIG_KEY] = cfg
    app[ALLOWED_HOSTS_KEY] = allowed_hosts(cfg)
    app[INDEX_KEY] = index
    app[STORAGE_KEY] = storage
    app[PIPELINE_KEY] = pipeline
    app[MIN_FREE_BYTES_KEY] = min_free_bytes
    app[REGISTRY_KEY] = metrics.registry
    app[PROTECTED_PROJECTS_KEY] = frozenset({ADMIN_PROJECT, default_project})
    app[TOKEN_KEY] = token
    app[HEALTH_KEY] = health
    if series_stages is not None:
        app[SERIES_STAGES_KEY] = series_stages
    app.router.add_get("/health/live", get_live)
    app.router.add_get("/health/ready", get_ready)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/login", get_login)
    app.router.add_post("/login", post_login)
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
