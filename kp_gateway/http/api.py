"""The JSON API: projects, datasets, series, instances, thumbnails, validation reports and
the quarantine.

Every handler asks :mod:`kp_gateway.http.auth` whether the request's principal may see what it
names: listings show only the principal's projects, another project's series are 404, and
creating or deleting projects and the quarantine are for the admin token (403 otherwise).
Handlers run on the event loop. The domain errors they raise become JSON responses in the
error middleware (:mod:`kp_gateway.http.app`).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from kp_gateway.backends.base import SeriesQuery
from kp_gateway.config import PROJECT_NAME_RE
from kp_gateway.errors import (
    BackendRejectedError,
    RejectedInputError,
    UnknownProjectError,
    UnsupportedMediaError,
)
from kp_gateway.http.appkeys import INDEX_KEY, PROTECTED_PROJECTS_KEY, STORAGE_KEY
from kp_gateway.http.auth import (
    SESSIONS_KEY,
    TOKENS_KEY,
    can_read_series,
    principal_of,
    require_admin,
    require_read,
)
from kp_gateway.http.responses import json_error, stream_object
from kp_gateway.kaapana.keys import (
    KEY_THUMBNAIL,
    KEY_THUMBNAIL_ERROR,
    KEY_VALIDATION,
)
from kp_gateway.uids import is_valid_uid

MAX_PAGE = 500


# -- projects and datasets ----------------------------------------------------------------


async def require_project(request: web.Request, name: str) -> str:
    """The project's name, lower case, when it exists and the principal may read it; else
    UnknownProjectError (404), the same answer either way."""
    name = name.lower()
    require_read(request, name)
    if not await request.app[INDEX_KEY].project_exists(name):
        raise UnknownProjectError(f"project {name!r} does not exist")
    return name


async def get_projects(request: web.Request) -> web.Response:
    """The projects the principal may read, with series counts."""
    principal = principal_of(request)
    items = await request.app[INDEX_KEY].list_projects()
    return web.json_response({"items": [p for p in items if principal.can_read(p["name"])]})


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; 415 for another content type, 400 for anything not an
    object."""
    # A browser form may send text/plain or urlencoded bodies to any site without asking
    # first; a JSON content type it may not (CORS preflight).
    if request.content_type != "application/json":
        raise UnsupportedMediaError(
            f"send the body as Content-Type: application/json, not {request.content_type!r}"
        )
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RejectedInputError(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RejectedInputError("the body must be a JSON object")
    return body


async def post_project(request: web.Request) -> web.Response:
    """Create a project ``{"name", "description"?}``; admin only."""
    require_admin(request)
    body = await json_body(request)
    name = body.get("name")
    if not isinstance(name, str) or not PROJECT_NAME_RE.fullmatch(name):
        raise RejectedInputError(
            "name must match [a-z0-9][a-z0-9-]{0,12}: 'kp-' plus the name must fit the "
            "16-character AE title"
        )
    description = body.get("description", "")
    if not isinstance(description, str):
        raise RejectedInputError("description must be a string")
    index = request.app[INDEX_KEY]
    if await index.project_exists(name):
        return json_error(409, "project_exists", f"project {name!r} already exists")
    try:
        project = await index.create_project(name, description)
    except BackendRejectedError:
        return json_error(409, "project_exists", f"project {name!r} already exists")
    return web.json_response(project, status=201)


async def delete_project(request: web.Request) -> web.Response:
    """Delete a project's mappings and revoke its tokens (their sessions end); admin only.
    ``admin`` and the default project cannot be deleted."""
    require_admin(request)
    name = await require_project(request, request.match_info["project"])
    protected = request.app[PROTECTED_PROJECTS_KEY]
    if name in protected:
        return json_error(409, "protected_project", f"project {name!r} cannot be deleted")
    await request.app[INDEX_KEY].delete_project(name)
    # A project created later under the same name must not open to the old tokens.
    revoked = await request.app[TOKENS_KEY].revoke_project(name)
    request.app[SESSIONS_KEY].end_for_tokens(set(revoked))
    return web.json_response({"deleted": name, "tokens_revoked": len(revoked)})


async def get_datasets(request: web.Request) -> web.Response:
    """Datasets of a project with series and instance counts."""
    name = await require_project(request, request.match_info["project"])
    return web.json_response({"items": await request.app[INDEX_KEY].list_datasets(name)})


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
    project = await require_project(request, request.match_info["project"])
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
    total, items = await request.app[INDEX_KEY].query_series(query)
    for item in items:
        item.update(_series_urls(item["series_uid"]))
    return web.json_response({"total": total, "items": items})


def _uid(request: web.Request, name: str) -> str:
    """The UID in the path; anything but digits and dots names nothing here (404)."""
    uid = request.match_info[name]
    if not is_valid_uid(uid):
        raise web.HTTPNotFound(text=f"no such UID {uid[:80]!r}")
    return uid


def _no_series(uid: str) -> web.Response:
    return json_error(404, "not_found", f"no series {uid}")


async def get_series(request: web.Request) -> web.Response:
    """The series' document, projects, datasets, counts, completion and links; a project
    token sees only its own project among the projects and datasets."""
    uid = _uid(request, "series_uid")
    principal = principal_of(request)
    series = await request.app[INDEX_KEY].get_series(uid)
    if series is None or not principal.readable(series.get("projects") or []):
        return _no_series(uid)
    if not principal.is_admin:
        series["projects"] = principal.readable(series.get("projects") or [])
        series["datasets"] = [
            d for d in series.get("datasets") or [] if principal.can_read(d["project"])
        ]
    doc = series.get("document", {})
    series["validation"] = doc.get(KEY_VALIDATION)
    # The same processing fields as the series listing, so the gallery renders either alike.
    series["has_thumbnail"] = KEY_THUMBNAIL in doc
    series["thumbnail_error"] = doc.get(KEY_THUMBNAIL_ERROR)
    series.update(_series_urls(uid))
    return web.json_response(series)


async def get_series_instances(request: web.Request) -> web.Response:
    """SOPInstanceUIDs of a series with sizes."""
    uid = _uid(request, "series_uid")
    if not await can_read_series(request, uid):
        return _no_series(uid)
    instances = await request.app[INDEX_KEY].list_instances(uid)
    if not instances:
        return _no_series(uid)
    for instance in instances:
        instance["url"] = _instance_url(uid, instance["sop_uid"])
    return web.json_response({"total": len(instances), "items": instances})


def _instance_url(series_uid: str, sop_uid: str) -> str:
    return f"/api/series/{series_uid}/instances/{sop_uid}"


async def _stream_object(
    request: web.Request, key: str, content_type: str, filename: str | None = None
) -> web.StreamResponse:
    headers = {"Content-Type": content_type}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return await stream_object(request, request.app[STORAGE_KEY], key, headers)


async def get_series_instance(request: web.Request) -> web.StreamResponse:
    """The stored bytes of one instance of a series, ``application/dicom``."""
    series, sop = _uid(request, "series_uid"), _uid(request, "sop_uid")
    key = await request.app[INDEX_KEY].instance_key(series, sop)
    if key is None or not await can_read_series(request, series):
        return json_error(404, "not_found", f"no instance {sop} in series {series}")
    return await _stream_object(request, key, "application/dicom", f"{sop}.dcm")


async def get_instance(request: web.Request) -> web.StreamResponse:
    """The stored bytes of the instance of that SOPInstanceUID, ``application/dicom``.

    A sender that reused the SOPInstanceUID in several series made several instances; then
    the answer is 409 with the URL of each (that the token may read), rather than a guess.
    """
    sop = _uid(request, "sop_uid")
    copies = [
        c
        for c in await request.app[INDEX_KEY].find_instance(sop)
        if await can_read_series(request, str(c["series_uid"]))
    ]
    if not copies:
        return json_error(404, "not_found", f"no instance {sop}")
    if len(copies) > 1:
        urls = [_instance_url(c["series_uid"], sop) for c in copies]
        return web.json_response(
            {
                "error": "ambiguous_instance",
                "detail": f"SOPInstanceUID {sop} was received in {len(copies)} series",
                "urls": urls,
            },
            status=409,
        )
    key = str(copies[0]["storage_key"])
    return await _stream_object(request, key, "application/dicom", f"{sop}.dcm")


async def get_thumbnail(request: web.Request) -> web.StreamResponse:
    """The series thumbnail PNG, once rendered."""
    uid = _uid(request, "series_uid")
    if not await can_read_series(request, uid):
        return _no_series(uid)
    return await _stream_object(request, f"thumbnails/{uid}.png", "image/png")


async def get_validation_report(request: web.Request) -> web.StreamResponse:
    """The series validation report (HTML), once written."""
    uid = _uid(request, "series_uid")
    if not await can_read_series(request, uid):
        return _no_series(uid)
    return await _stream_object(request, f"validation/{uid}.html", "text/html; charset=utf-8")


async def get_quarantine(request: web.Request) -> web.Response:
    """Items that kept failing, newest first; admin only (they span projects)."""
    require_admin(request)
    return web.json_response({"items": await request.app[INDEX_KEY].list_quarantine()})


__all__ = [
    "delete_project",
    "get_datasets",
    "get_instance",
    "get_projects",
    "get_quarantine",
    "get_series",
    "get_series_instance",
    "get_series_instances",
    "get_series_list",
    "get_thumbnail",
    "get_validation_report",
    "json_body",
    "post_project",
    "require_project",
]
