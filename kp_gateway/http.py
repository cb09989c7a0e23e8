"""The aiohttp application: health, metrics, token authentication and the JSON API.

Handlers run on the event loop. Domain errors become JSON ``{"error", "detail"}`` responses in
one place, the error middleware, through :func:`kp_gateway.errors.http_status_for`.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kp_gateway.backends.base import SeriesQuery
from kp_gateway.config import PROJECT_NAME_RE, Config
from kp_gateway.errors import (
    BackendRejectedError,
    GatewayError,
    RejectedInputError,
    UnknownProjectError,
    error_code_for,
    http_status_for,
)
from kp_gateway.gallery import setup_gallery
from kp_gateway.pipeline.ingest import IngestService
from kp_gateway.pipeline.series_stages import SeriesPostProcessor
from kp_gateway.responses import json_error, stream_object
from kp_gateway.upload import UploadService, setup_uploads

logger = logging.getLogger(__name__)

SESSION_COOKIE = "kp_gateway_session"
MAX_PAGE = 500


@dataclass
class Health:
    """Readiness flags the app flips during start-up and shutdown."""

    ready: bool = False
    draining: bool = False


INGEST_KEY = web.AppKey("ingest", IngestService)
CONFIG_KEY = web.AppKey("config", Config)
TOKEN_KEY = web.AppKey("token", str)
HEALTH_KEY = web.AppKey("health", Health)
SERIES_STAGES_KEY = web.AppKey("series_stages", SeriesPostProcessor)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def load_or_create_token(cfg: Config) -> tuple[str, bool]:
    """The API token: ``KP_GATEWAY_HTTP_TOKEN``, else one stored in the data directory (0600).

    Blocking; call at start-up. Returns the token and whether it was generated just now.
    """
    if cfg.http.token:
        return cfg.http.token, False
    path = cfg.data_dir / "token"
    if path.exists():
        return path.read_text(encoding="utf-8").strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = path.open("x", encoding="utf-8")
    path.chmod(0o600)
    with fd:
        fd.write(token + "\n")
    return token, True


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate exceptions into JSON errors; the one place that does so for HTTP."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return json_error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
    except GatewayError as exc:
        status = http_status_for(exc)
        headers = {"Retry-After": "5"} if status == 503 else {}
        if status >= 500:
            logger.warning("%s %s failed: %s", request.method, request.path, exc)
        return json_error(status, error_code_for(exc), str(exc), **headers)
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(500, "internal", "internal error; see the gateway log")


def _is_public(path: str) -> bool:
    return path.startswith(("/health/", "/static/")) or path == "/metrics"


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token, session cookie, or ``?token=`` once (which sets the cookie)."""
    cfg = request.app[CONFIG_KEY]
    if not cfg.http.auth or _is_public(request.path) or request.path == "/login":
        return await handler(request)
    token = request.app[TOKEN_KEY]
    offered = ""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        offered = header[7:].strip()
    elif SESSION_COOKIE in request.cookies:
        offered = request.cookies[SESSION_COOKIE]
    elif "token" in request.query:
        offered = request.query["token"]
        if hmac.compare_digest(offered, token) and request.method == "GET":
            # As Jupyter does: trade the URL token for a cookie and drop it from the URL.
            query = {k: v for k, v in request.query.items() if k != "token"}
            response = web.HTTPFound(request.rel_url.with_query(query))
            response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict")
            raise response
    if offered and hmac.compare_digest(offered, token):
        return await handler(request)
    if request.path.startswith("/api/"):
        return json_error(
            401, "unauthorized", "missing or wrong token", **{"WWW-Authenticate": "Bearer"}
        )
    raise web.HTTPFound(f"/login?next={request.rel_url}")


async def get_login(request: web.Request) -> web.Response:
    """A minimal login form that sets the session cookie."""
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>kp-gateway login</title>"
        "<style>body{font-family:sans-serif;max-width:28rem;margin:4rem auto}"
        "input{width:100%;padding:.5rem;margin:.5rem 0}</style></head><body>"
        "<h1>kp-gateway</h1><p>Paste the token printed in the gateway's start-up log.</p>"
        "<form method='post'><input type='password' name='token' autofocus>"
        "<input type='submit' value='Log in'></form></body></html>"
    )
    return web.Response(text=page, content_type="text/html")


async def post_login(request: web.Request) -> web.Response:
    """Check the posted token and set the session cookie."""
    form = await request.post()
    offered = str(form.get("token", ""))
    if not hmac.compare_digest(offered, request.app[TOKEN_KEY]):
        return json_error(401, "unauthorized", "wrong token")
    target = request.query.get("next", "/")
    if not target.startswith("/") or target.startswith("//"):
        target = "/"
    response = web.HTTPFound(target)
    response.set_cookie(SESSION_COOKIE, offered, httponly=True, samesite="Strict")
    raise response


# -- health and metrics -------------------------------------------------------------------


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


# -- projects and datasets ----------------------------------------------------------------


async def _require_project(request: web.Request, name: str) -> str:
    name = name.lower()
    if not await request.app[INGEST_KEY].index.project_exists(name):
        raise UnknownProjectError(f"project {name!r} does not exist")
    return name


async def get_projects(request: web.Request) -> web.Response:
    """All projects with series counts."""
    return web.json_response({"items": await request.app[INGEST_KEY].index.list_projects()})


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RejectedInputError(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RejectedInputError("the body must be a JSON object")
    return body


async def post_project(request: web.Request) -> web.Response:
    """Create a project ``{"name", "description"?}``."""
    body = await _json_body(request)
    name = body.get("name")
    if not isinstance(name, str) or not PROJECT_NAME_RE.match(name):
        raise RejectedInputError(
            "name must match [a-z0-9][a-z0-9-]{0,12}: 'kp-' plus the name must fit the "
            "16-character AE title"
        )
    description = body.get("description", "")
    if not isinstance(description, str):
        raise RejectedInputError("description must be a string")
    index = request.app[INGEST_KEY].index
    if await index.project_exists(name):
        return json_error(409, "project_exists", f"project {name!r} already exists")
    try:
        project = await index.create_project(name, description)
    except BackendRejectedError:
        return json_error(409, "project_exists", f"project {name!r} already exists")
    return web.json_response(project, status=201)


async def delete_project(request: web.Request) -> web.Response:
    """Delete a project's mappings; ``admin`` and the default project cannot be deleted."""
    name = await _require_project(request, request.match_info["project"])
    protected = {"admin", request.app[CONFIG_KEY].dicom.default_project}
    if name in protected:
        return json_error(409, "protected_project", f"project {name!r} cannot be deleted")
    await request.app[INGEST_KEY].index.delete_project(name)
    return web.json_response({"deleted": name})


async def get_datasets(request: web.Request) -> web.Response:
    """Datasets of a project with series and instance counts."""
    name = await _require_project(request, request.match_info["project"])
    return web.json_response({"items": await request.app[INGEST_KEY].index.list_datasets(name)})


# -- series and instances -----------------------------------------------------------------


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RejectedInputError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise RejectedInputError(f"{name} must be between {lo} and {hi}")
    return value


def _series_urls(uid: str) -> dict[str, str]:
    return {
        "url": f"/api/series/{uid}",
        "instances_url": f"/api/series/{uid}/instances",
        "thumbnail_url": f"/api/series/{uid}/thumbnail",
        "report_url": f"/api/series/{uid}/validation",
    }


async def get_series_list(request: web.Request) -> web.Response:
    """One page of a project's series, filtered."""
    project = await _require_project(request, request.match_info["project"])
    q = request.query
    query = SeriesQuery(
        project=project,
        dataset=q.get("dataset") or None,
        modality=q.get("modality") or None,
        patient_id=q.get("patient_id") or None,
        study_uid=q.get("study_uid") or None,
        text=q.get("q") or None,
        limit=_int_param(request, "limit", 50, 1, MAX_PAGE),
        offset=_int_param(request, "offset", 0, 0, 10**9),
    )
    total, items = await request.app[INGEST_KEY].index.query_series(query)
    for item in items:
        item.update(_series_urls(item["series_uid"]))
    return web.json_response({"total": total, "items": items})


async def get_series(request: web.Request) -> web.Response:
    """The series' document, projects, datasets, counts, completion and links."""
    uid = request.match_info["series_uid"]
    series = await request.app[INGEST_KEY].index.get_series(uid)
    if series is None:
        return json_error(404, "not_found", f"no series {uid}")
    doc = series.get("document", {})
    series["validation"] = doc.get("00111001 ValidationResults_object")
    series.update(_series_urls(uid))
    return web.json_response(series)


async def get_series_instances(request: web.Request) -> web.Response:
    """SOPInstanceUIDs of a series with sizes."""
    uid = request.match_info["series_uid"]
    instances = await request.app[INGEST_KEY].index.list_instances(uid)
    if not instances:
        return json_error(404, "not_found", f"no series {uid}")
    for instance in instances:
        instance["url"] = f"/api/instances/{instance['sop_uid']}"
    return web.json_response({"total": len(instances), "items": instances})


async def _stream_object(
    request: web.Request, key: str, content_type: str, filename: str | None = None
) -> web.StreamResponse:
    headers = {"Content-Type": content_type}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return await stream_object(request, request.app[INGEST_KEY].storage, key, headers)


async def get_instance(request: web.Request) -> web.StreamResponse:
    """The stored bytes of one instance, ``application/dicom``."""
    sop = request.match_info["sop_uid"]
    key = await request.app[INGEST_KEY].index.instance_key(sop)
    if key is None:
        return json_error(404, "not_found", f"no instance {sop}")
    return await _stream_object(request, key, "application/dicom", f"{sop}.dcm")


async def get_thumbnail(request: web.Request) -> web.StreamResponse:
    """The series thumbnail PNG, once rendered."""
    uid = request.match_info["series_uid"]
    return await _stream_object(request, f"thumbnails/{uid}.png", "image/png")


async def get_validation_report(request: web.Request) -> web.StreamResponse:
    """The series validation report (HTML), once written."""
    uid = request.match_info["series_uid"]
    return await _stream_object(request, f"validation/{uid}.html", "text/html; charset=utf-8")


async def get_quarantine(request: web.Request) -> web.Response:
    """Items that kept failing, newest first."""
    return web.json_response({"items": await request.app[INGEST_KEY].index.list_quarantine()})


def make_app(
    cfg: Config,
    ingest: IngestService,
    token: str,
    health: Health,
    *,
    uploads: UploadService | None = None,
    series_stages: SeriesPostProcessor | None = None,
) -> web.Application:
    """Build the application; the caller runs it with AppRunner/TCPSite on its own loop."""
    app = web.Application(middlewares=[error_middleware, auth_middleware])
    app[CONFIG_KEY] = cfg
    app[INGEST_KEY] = ingest
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
    app.router.add_get("/api/series/{series_uid}/thumbnail", get_thumbnail)
    app.router.add_get("/api/series/{series_uid}/validation", get_validation_report)
    app.router.add_get("/api/instances/{sop_uid}", get_instance)
    app.router.add_get("/api/quarantine", get_quarantine)
    setup_gallery(app)
    if uploads is not None:
        # Routes for uploads, files, the upload page and /static/, plus the service lifecycle.
        setup_uploads(app, uploads)
    return app


__all__ = ["Health", "load_or_create_token", "make_app"]
