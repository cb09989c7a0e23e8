"""DICOMweb (PS3.18) on the HTTP port: QIDO-RS and WADO-RS at ``/dicomweb`` (every series, as
``admin`` sees it) and at ``/projects/{project}/dicomweb`` (that project's series only).

Handlers run on the event loop. Searches are one index call; stored instances stream from
storage; metadata, frames and bulk data are read in the DICOMweb process pool
(:mod:`kp_gateway.dicomweb.instances`), never in the receiving interpreter. Errors are domain
exceptions the error middleware turns into statuses (400 bad query, 404, 406).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp_cors
from aiohttp import BodyPartReader, MultipartWriter, web
from aiohttp.payload import AsyncIterablePayload, BytesPayload

from kp_gateway.backends.base import IndexBackend
from kp_gateway.dicomweb import instances as pool_tasks
from kp_gateway.dicomweb.attributes import Level
from kp_gateway.dicomweb.media import (
    DICOM_JSON,
    check_instances_accept,
    choose_frames,
    choose_json,
    frame_media_type,
    parse_accept,
)
from kp_gateway.dicomweb.qido import parse_query, response_json, warnings_for
from kp_gateway.dicomweb.reader import DicomWebReader
from kp_gateway.dicomweb.stow import StowReceiver
from kp_gateway.dicomweb.stow import response_json as stow_response_json
from kp_gateway.dicomweb.stow import response_status as stow_response_status
from kp_gateway.errors import (
    BadQueryError,
    NotAcceptableError,
    UnknownResourceError,
    UnsupportedMediaError,
)
from kp_gateway.http.appkeys import HTTP_CONFIG_KEY, INDEX_KEY, STORAGE_KEY
from kp_gateway.http.auth import is_api_path
from kp_gateway.http.responses import timed_body_read
from kp_gateway.kaapana.keys import ADMIN_PROJECT
from kp_gateway.names import DATASET_NAME_RULE, default_dataset_name, is_dataset_name
from kp_gateway.uids import is_valid_uid

T = TypeVar("T")
logger = logging.getLogger(__name__)

ROOT = "/dicomweb"
PROJECT_ROOT = "/projects/{project}/dicomweb"
# Frames one request may name: a viewer asks for one; a whole multi-frame at most.
MAX_FRAMES_PER_REQUEST = 10_000


READER_KEY = web.AppKey("dicomweb_reader", DicomWebReader)
STOW_KEY = web.AppKey("dicomweb_stow", StowReceiver)


@dataclass(frozen=True, slots=True)
class Scope:
    """Which series a request sees (`project`) and the root URL its links are written under."""

    project: str
    root: str


async def _scope(request: web.Request) -> Scope:
    origin = f"{request.scheme}://{request.host}"
    project = request.match_info.get("project")
    if project is None:
        return Scope(ADMIN_PROJECT, origin + ROOT)
    if not await request.app[INDEX_KEY].project_exists(project):
        raise UnknownResourceError(f"no project {project[:40]!r}")
    return Scope(project, origin + PROJECT_ROOT.format(project=project))


def _uid(request: web.Request, name: str) -> str | None:
    uid = request.match_info.get(name)
    if uid is not None and not is_valid_uid(uid):
        raise UnknownResourceError(f"no such UID {uid[:80]!r}")
    return uid


def _json(body: str, content_type: str, **headers: str) -> web.Response:
    return web.Response(
        body=body.encode(), headers={"Content-Type": content_type, **headers}, charset=None
    )


# -- QIDO-RS ---------------------------------------------------------------------------------


def _search(level: Level) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        content_type = choose_json(request.headers.get("Accept"))
        scope = await _scope(request)
        query = parse_query(
            level,
            scope.project,
            list(request.query.items()),
            study_uid=_uid(request, "study"),
            series_uid=_uid(request, "series"),
        )
        rows, more = await request.app[INDEX_KEY].qido(query)
        warnings = warnings_for(query, len(rows), more)
        response = _json(response_json(level, rows, scope.root), content_type)
        for warning in warnings:
            response.headers.add("Warning", warning)
        return response

    handler.__doc__ = f"QIDO-RS search for {level.value} (PS3.18 10.6)."
    return handler


# -- WADO-RS: instances -------------------------------------------------------------------


async def _instances(request: web.Request, scope: Scope) -> list[dict[str, Any]]:
    study = _uid(request, "study")
    assert study is not None
    series, sop = _uid(request, "series"), _uid(request, "instance")
    found = await request.app[INDEX_KEY].dicomweb_instances(scope.project, study, series, sop)
    if not found:
        what = f"instance {sop}" if sop else f"series {series}" if series else f"study {study}"
        raise UnknownResourceError(f"no {what} here")
    return found


def _boundary() -> str:
    return uuid.uuid4().hex


async def _send_multipart(
    request: web.Request, part_type: str, parts: MultipartWriter, boundary: str
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": f'multipart/related; type="{part_type}"; boundary={boundary}'}
    )
    await response.prepare(request)
    await parts.write(response)  # type: ignore[arg-type]
    await response.write_eof()
    return response


async def retrieve(request: web.Request) -> web.StreamResponse:
    """WADO-RS retrieval of a study, series or instance: the stored Part-10 bytes, one part
    each, streamed from storage."""
    scope = await _scope(request)
    found = await _instances(request, scope)
    check_instances_accept(
        request.headers.get("Accept"), {str(i["transfer_syntax_uid"]) for i in found}
    )
    storage = request.app[STORAGE_KEY]
    boundary = _boundary()
    with MultipartWriter("related", boundary=boundary) as parts:
        for item in found:
            chunks = storage.read_chunks(str(item["storage_key"]))
            syntax = item["transfer_syntax_uid"]
            parts.append_payload(
                AsyncIterablePayload(
                    chunks, content_type=f"application/dicom; transfer-syntax={syntax}"
                )
            )
    return await _send_multipart(request, "application/dicom", parts, boundary)


async def metadata(request: web.Request) -> web.Response:
    """WADO-RS metadata of a study, series or instance: DICOM JSON, bulk data by URI.

    A series' metadata is kept in storage while current
    (:meth:`~kp_gateway.dicomweb.reader.DicomWebReader.series_metadata`), so a 500-slice CT
    costs one read of one object.
    """
    content_type = choose_json(request.headers.get("Accept"))
    scope = await _scope(request)
    found = await _instances(request, scope)
    reader = request.app[READER_KEY]
    if request.match_info.get("instance") is not None:
        text = await reader.build_metadata(found)
    else:
        by_series: dict[str, list[dict[str, Any]]] = {}
        for item in found:
            by_series.setdefault(str(item["series_uid"]), []).append(item)
        parts = [await reader.series_metadata(items) for items in by_series.values()]
        text = "[" + ",".join(p[1:-1] for p in parts if len(p) > 2) + "]"
    return _json(text.replace(pool_tasks.ROOT_PLACEHOLDER, scope.root), content_type)


def _frame_list(raw: str) -> list[int]:
    try:
        numbers = [int(n) for n in raw.split(",")]
    except ValueError:
        raise BadQueryError(
            f"frames must be a comma-separated list of numbers: {raw[:80]!r}"
        ) from None
    if not numbers or len(numbers) > MAX_FRAMES_PER_REQUEST or min(numbers) < 1:
        raise BadQueryError(f"frame numbers start at 1; at most {MAX_FRAMES_PER_REQUEST}")
    return numbers


async def frames(request: web.Request) -> web.StreamResponse:
    """WADO-RS frames: as stored when the Accept header allows it (``transfer-syntax=*``),
    else decoded to native little endian."""
    numbers = _frame_list(request.match_info["frames"])
    scope = await _scope(request)
    (item,) = await _instances(request, scope)
    stored = str(item["transfer_syntax_uid"])
    choice = choose_frames(request.headers.get("Accept"), stored)
    reader = request.app[READER_KEY]
    async with reader.local_files([str(item["storage_key"])]) as (path,):
        data, syntax = await reader.run(pool_tasks.read_frames, path, numbers, decode=choice.decode)
    media = frame_media_type(syntax)
    boundary = _boundary()
    with MultipartWriter("related", boundary=boundary) as parts:
        for frame in data:
            parts.append_payload(
                BytesPayload(frame, content_type=f"{media}; transfer-syntax={syntax}")
            )
    return await _send_multipart(request, media, parts, boundary)


async def bulkdata(request: web.Request) -> web.StreamResponse:
    """The value of one top-level element a metadata BulkDataURI names."""
    try:
        tag = int(request.match_info["tag"], 16)
    except ValueError:
        raise UnknownResourceError("not a tag") from None
    scope = await _scope(request)
    (item,) = await _instances(request, scope)
    reader = request.app[READER_KEY]
    async with reader.local_files([str(item["storage_key"])]) as (path,):
        value = await reader.run(pool_tasks.read_bulkdata, path, tag)
    boundary = _boundary()
    with MultipartWriter("related", boundary=boundary) as parts:
        parts.append_payload(BytesPayload(value, content_type="application/octet-stream"))
    return await _send_multipart(request, "application/octet-stream", parts, boundary)


# -- WADO-RS: rendered -----------------------------------------------------------------------

THUMBNAIL_PX = 256
MAX_VIEWPORT_PX = 4096


def _viewport(raw: str | None, default: tuple[int, int] | None) -> tuple[int, int] | None:
    if raw is None:
        return default
    try:
        columns, rows = (int(v) for v in raw.split(",")[:2])
    except ValueError:
        raise BadQueryError(f"viewport must be columns,rows: {raw[:40]!r}") from None
    if not (0 < columns <= MAX_VIEWPORT_PX and 0 < rows <= MAX_VIEWPORT_PX):
        raise BadQueryError(f"viewport sides must be 1-{MAX_VIEWPORT_PX} pixels")
    return columns, rows


def _window(raw: str | None) -> tuple[float, float] | None:
    if raw is None:
        return None
    values = raw.split(",")
    try:
        center, width = float(values[0]), float(values[1])
    except (ValueError, IndexError):
        raise BadQueryError(f"window must be center,width[,function]: {raw[:40]!r}") from None
    function = values[2].strip().lower() if len(values) > 2 else "linear"
    if function not in ("linear", "linear-exact") or width <= 0:
        raise BadQueryError("window: a positive width and the linear function are supported")
    return center, width


def _rendered_media(header: str | None) -> str:
    for accepted in parse_accept(header):
        for media_type in ("image/jpeg", "image/png"):
            if accepted.matches(media_type):
                return media_type
    raise NotAcceptableError(f"rendered images are image/jpeg or image/png, not {header!r}")


def _rendering(thumbnail: bool) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        media = _rendered_media(request.headers.get("Accept"))
        query = request.query
        viewport = _viewport(
            query.get("viewport"), (THUMBNAIL_PX, THUMBNAIL_PX) if thumbnail else None
        )
        window = _window(query.get("window"))
        quality = None
        if media == "image/jpeg":
            raw = query.get("quality", "90")
            quality = int(raw) if raw.isdigit() else 0
            if not 1 <= quality <= 100:
                raise BadQueryError(f"quality must be 1-100, got {raw[:10]!r}")
        frame = _frame_list(request.match_info.get("frames", "1"))
        if len(frame) != 1:
            raise BadQueryError("one frame is rendered at a time")
        scope = await _scope(request)
        found = await _instances(request, scope)
        # A study or series is shown by its middle instance, as the gallery's thumbnail is.
        item = found[len(found) // 2]
        reader = request.app[READER_KEY]
        async with reader.local_files([str(item["storage_key"])]) as (path,):
            image = await reader.run(
                pool_tasks.render, path, frame[0], viewport=viewport, window=window,
                jpeg_quality=quality, max_frame_bytes=reader.max_frame_bytes,
            )  # fmt: skip
        return web.Response(body=image, content_type=media)

    handler.__doc__ = "WADO-RS " + ("thumbnail" if thumbnail else "rendered") + " (PS3.18 8.3.5)."
    return handler


# -- STOW-RS ---------------------------------------------------------------------------------


async def store(request: web.Request) -> web.Response:
    """STOW-RS: every ``application/dicom`` part through the durable path C-STORE takes; the
    answer (after the last fsync) lists what was stored and what failed, and why."""
    receiver = request.app[STOW_KEY]
    content_type = choose_json(request.headers.get("Accept"))
    scope = await _scope(request)
    study = _uid(request, "study")
    if request.content_type != "multipart/related":
        raise UnsupportedMediaError(
            f'STOW-RS takes multipart/related; type="application/dicom", not '
            f"{request.content_type!r}"
        )
    part_type = request.headers.get("Content-Type", "").lower()
    if "type=" in part_type and "application/dicom" not in part_type.replace('"', ""):
        raise UnsupportedMediaError("only application/dicom parts are stored (no JSON/XML)")
    dataset = (request.query.get("dataset") or default_dataset_name()).strip().lower()
    if not is_dataset_name(dataset):
        raise BadQueryError(f"dataset {dataset!r} is not valid: {DATASET_NAME_RULE}")
    reader = await request.multipart()
    idle_s = request.app[HTTP_CONFIG_KEY].body_timeout_s
    async with receiver.request(scope.project, dataset, study) as stow:
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadQueryError("nested multipart parts are not instances")
            await stow.store(
                part.headers.get("Content-Type", ""), timed_body_read(part.read_chunk, idle_s)
            )
        results = stow.results
    if not results:
        raise BadQueryError("the request holds no part")
    return web.Response(
        body=stow_response_json(results, scope.root, study).encode(),
        status=stow_response_status(results),
        headers={"Content-Type": content_type},
    )


def setup_dicomweb(
    app: web.Application, *, index: IndexBackend, reader: DicomWebReader, stow: StowReceiver,
    cors_origins: str = "",
) -> None:  # fmt: skip
    """Add the DICOMweb routes under both roots; with `cors_origins`, let pages of those
    origins call them (CORS, preflight included)."""
    app[INDEX_KEY] = index
    app[STOW_KEY] = stow
    app[READER_KEY] = reader

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        reader.start()
        yield
        await reader.aclose()

    app.cleanup_ctx.append(lifecycle)
    for root in (ROOT, PROJECT_ROOT):
        r = app.router
        study = root + "/studies/{study}"
        series = study + "/series/{series}"
        instance = series + "/instances/{instance}"
        r.add_get(root + "/studies", _search(Level.STUDY))
        r.add_get(root + "/series", _search(Level.SERIES))
        r.add_get(root + "/instances", _search(Level.INSTANCE))
        r.add_get(study + "/series", _search(Level.SERIES))
        r.add_get(study + "/instances", _search(Level.INSTANCE))
        r.add_get(series + "/instances", _search(Level.INSTANCE))
        for resource in (study, series, instance):
            r.add_get(resource, retrieve)
            r.add_get(resource + "/metadata", metadata)
        r.add_get(instance + "/frames/{frames}", frames)
        r.add_get(instance + "/bulkdata/{tag}", bulkdata)
        r.add_get(instance + "/rendered", _rendering(thumbnail=False))
        r.add_get(instance + "/frames/{frames}/rendered", _rendering(thumbnail=False))
        for resource in (study, series, instance):
            r.add_get(resource + "/thumbnail", _rendering(thumbnail=True))
        r.add_post(root + "/studies", store)
        r.add_post(study, store)
    origins = [o.strip().rstrip("/") for o in cors_origins.split(",") if o.strip()]
    if origins:
        _allow_origins(app, origins)


def _allow_origins(app: web.Application, origins: list[str]) -> None:
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False,  # bearer tokens only: the session cookie stays same-origin
        allow_headers=("Authorization", "Accept", "Content-Type"),
        allow_methods=("GET", "POST"),
        expose_headers=("Warning", "Content-Type"),
        max_age=600,
    )
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(origins, options))
    for route in list(app.router.routes()):
        info = route.resource.get_info() if route.resource is not None else {}
        path = str(info.get("formatter") or info.get("path") or "")
        if is_api_path(path.replace("{project}", "p")) and "dicomweb" in path:
            cors.add(route)


__all__ = ["DICOM_JSON", "PROJECT_ROOT", "ROOT", "setup_dicomweb"]
