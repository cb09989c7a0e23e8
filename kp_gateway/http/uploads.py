"""The upload routes: ``POST /api/uploads`` (raw or multipart), tus 1.0, upload status, kept
files, the page's public configuration, and the upload page with its static files.

Views parse the request and call :class:`kp_gateway.upload.service.UploadService`; errors go
to the app's one error middleware (which adds ``Tus-Resumable`` under :data:`TUS_BASE`).
Uploading needs write access to the target project, and uploads and files of projects the
principal may not read are not listed and answer 404 (:mod:`kp_gateway.http.auth`).
Handlers run on the event loop.

Routes (:func:`setup_uploads`)::

    POST   /api/uploads                 multipart (field "file") or raw body -> 202 {id, status_url}
    GET    /api/uploads[?project=&state=&limit=]    GET /api/uploads/{id}
    OPTIONS/POST /api/uploads/tus       HEAD/PATCH/DELETE /api/uploads/tus/{id}   (tus 1.0.0)
    GET    /api/files?project=          GET /api/files/{upload id}/{path}
    GET    /api/config/public           GET /   GET /static/...
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import BodyPartReader, MultipartReader, web

from kp_gateway.backends.base import StorageBackend
from kp_gateway.errors import (
    RejectedInputError,
    UnknownUploadError,
    UnsupportedMediaError,
    UploadOffsetError,
)
from kp_gateway.http.auth import principal_of, require_write
from kp_gateway.http.responses import json_error, stream_object, timed_body_read
from kp_gateway.kaapana.keys import ADMIN_PROJECT
from kp_gateway.upload.record import Upload
from kp_gateway.upload.service import (
    BodyRead,
    BodyWriter,
    UploadService,
    safe_filename,
)

WEB_DIR = Path(__file__).resolve().parent / "static"
TUS_VERSION = "1.0.0"
TUS_BASE = "/api/uploads/tus"
# Form fields that may stand beside the file (the query string's own names), and how long a
# value may be: they are read into memory.
_FORM_FIELDS = frozenset({"project", "dataset", "kind", "extension"})
_MAX_FIELD_BYTES = 256


# What aiohttp raises when a client stops sending mid-body.
@dataclass(frozen=True, slots=True)
class DicomEndpoint:
    """Where senders reach the DICOM port from outside; shown by the upload page."""

    public_host: str
    port: int


SERVICE_KEY = web.AppKey("uploads", UploadService)
STORAGE_KEY = web.AppKey("upload_storage", StorageBackend)
ENDPOINT_KEY = web.AppKey("dicom_endpoint", DicomEndpoint)
BODY_TIMEOUT_KEY = web.AppKey("body_timeout_s", float)


def _body_read(request: web.Request, read: BodyRead) -> BodyRead:
    return timed_body_read(read, request.app[BODY_TIMEOUT_KEY])


def _query_routing(request: web.Request) -> dict[str, str]:
    # ``token`` authenticates (see the auth middleware); it is not an upload parameter.
    return {k: v for k, v in request.query.items() if k != "token"}


def _require_upload_write(request: web.Request, routing: Mapping[str, str]) -> None:
    """Write access to the project `routing` names (``admin`` when none, as the service)."""
    require_write(request, (routing.get("project") or ADMIN_PROJECT).strip())


def _readable_upload(request: web.Request, upload: Upload) -> Upload:
    """`upload`, when the principal may read its project; else 404 as for no upload."""
    if not principal_of(request).can_read(upload.project):
        raise UnknownUploadError(f"no upload {upload.id}")
    return upload


# -- POST /api/uploads ------------------------------------------------------------------


async def post_upload(request: web.Request) -> web.Response:
    """``POST /api/uploads``: stream the body to disk, check it, answer 202.

    Errors as :meth:`UploadService.receive`; an unknown project is refused (404) before the
    body is read, and so is one the token may not write (404 when it may not read it either,
    403 ``read_only``); a project named in a form field is checked as the field arrives.
    """
    service = request.app[SERVICE_KEY]
    service.check_open()
    query = _query_routing(request)
    multipart = request.content_type.startswith("multipart/")
    if "project" in query or not multipart:
        # Refused before a byte of the body is read; form fields are checked as they come.
        _require_upload_write(request, query)
    params = await service.params(query)

    async def copy_body(upload: Upload, writer: BodyWriter) -> Mapping[str, str] | None:
        if not multipart:
            await writer.pump(_body_read(request, request.content.read))
            return None
        reader = await _multipart(request)
        fields, part = await _form_fields_until_file(reader)
        _require_upload_write(request, {**fields, **query})
        if part.filename and "filename" not in query:
            upload.filename = safe_filename(part.filename)
        await writer.pump(_body_read(request, part.read_chunk))
        fields.update(await _form_fields_after_file(reader))
        _require_upload_write(request, {**fields, **query})
        # Form fields name the project/dataset too; the query string wins.
        return {**fields, **query} if fields else None

    # A multipart Content-Length counts boundaries and headers too: no exact size then.
    expected = None if multipart else request.content_length
    upload = await service.receive(params, copy_body, expected=expected)
    return web.json_response(
        {"id": upload.id, "status_url": f"/api/uploads/{upload.id}", "state": upload.state},
        status=202,
    )


async def _multipart(request: web.Request) -> MultipartReader:
    try:
        return await request.multipart()
    except (ValueError, AssertionError, RuntimeError) as exc:
        raise RejectedInputError(f"malformed multipart body: {exc}") from exc


async def _next_part(reader: MultipartReader) -> BodyPartReader | None:
    try:
        part = await reader.next()
    except (ValueError, AssertionError, RuntimeError) as exc:
        raise RejectedInputError(f"malformed multipart body: {exc}") from exc
    if part is not None and not isinstance(part, BodyPartReader):
        raise RejectedInputError("nested multipart bodies are not supported")
    return part


async def _form_field(part: BodyPartReader) -> tuple[str, str] | None:
    """A small form field this endpoint knows (project, dataset, kind, extension), else None."""
    if part.name not in _FORM_FIELDS or part.filename:
        await part.release()
        return None
    value = bytearray()
    while chunk := await part.read_chunk(1024):
        value += chunk
        if len(value) > _MAX_FIELD_BYTES:
            raise RejectedInputError(
                f"form field {part.name!r} is longer than {_MAX_FIELD_BYTES} bytes"
            )
    return str(part.name), value.decode("utf-8", "replace")


async def _form_fields_until_file(
    reader: MultipartReader,
) -> tuple[dict[str, str], BodyPartReader]:
    """The known form fields before the part named ``file``, and that part (not yet read)."""
    fields: dict[str, str] = {}
    while (part := await _next_part(reader)) is not None:
        if part.name == "file":
            return fields, part
        field = await _form_field(part)
        if field is not None:
            fields[field[0]] = field[1]
    raise RejectedInputError("the multipart body has no part named 'file'")


async def _form_fields_after_file(reader: MultipartReader) -> dict[str, str]:
    """The known form fields after the file; a second file refuses the whole request.

    Importing only the first of several files would drop the others silently (curl -F file=@a
    -F file=@b); one upload is one file or one zip.
    """
    fields: dict[str, str] = {}
    while (part := await _next_part(reader)) is not None:
        if part.name == "file" or part.filename:
            await part.release()
            raise RejectedInputError(
                "the request carries more than one file; send one file per upload, or a zip"
            )
        field = await _form_field(part)
        if field is not None:
            fields[field[0]] = field[1]
    return fields


# -- tus 1.0.0: core, creation, termination ---------------------------------------------


def _tus_headers(service: UploadService) -> dict[str, str]:
    return {
        "Tus-Resumable": TUS_VERSION,
        "Tus-Version": TUS_VERSION,
        "Tus-Extension": "creation,termination",
        "Tus-Max-Size": str(service.cfg.max_upload_bytes),
    }


async def options_tus(request: web.Request) -> web.Response:
    """tus discovery: versions, extensions and the size limit."""
    return web.Response(status=204, headers=_tus_headers(request.app[SERVICE_KEY]))


async def post_tus(request: web.Request) -> web.Response:
    """tus creation: ``Upload-Length`` and ``Upload-Metadata`` (base64 project, dataset,
    kind, filename, extension) -> 201 with ``Location``."""
    service = request.app[SERVICE_KEY]
    service.check_open()
    if "Upload-Concat" in request.headers:
        # Not advertised in Tus-Extension: a client splitting a file into partial uploads
        # (tus-js-client's parallelUploads) would otherwise get each part imported alone.
        raise RejectedInputError(
            "Upload-Concat (the tus concatenation extension) is not supported; "
            "send the file as one upload (tus-js-client: parallelUploads 1)"
        )
    length = _int_header(request, "Upload-Length")
    metadata = _tus_metadata(request.headers.get("Upload-Metadata", ""))
    _require_upload_write(request, metadata)
    params = await service.params(metadata)
    upload = await service.create_tus(params, length)
    return web.Response(
        status=201,
        headers={
            "Location": f"{TUS_BASE}/{upload.id}",
            "Upload-Offset": "0",
            "Tus-Resumable": TUS_VERSION,
        },
    )


async def head_tus(request: web.Request) -> web.Response:
    """tus offset discovery: ``Upload-Offset`` and ``Upload-Length``."""
    service = request.app[SERVICE_KEY]
    upload = _readable_upload(request, service.tus_upload(request.match_info["id"]))
    return web.Response(
        status=200,
        headers={
            "Upload-Offset": str(service.tus_offset(upload)),
            "Upload-Length": str(upload.bytes_expected),
            "Cache-Control": "no-store",
            "Tus-Resumable": TUS_VERSION,
        },
    )


async def patch_tus(request: web.Request) -> web.Response:
    """tus append: bytes at ``Upload-Offset``; 409 when it is not the current offset."""
    service = request.app[SERVICE_KEY]
    service.check_open()
    upload = _readable_upload(request, service.tus_upload(request.match_info["id"]))
    require_write(request, upload.project)
    if request.content_type != "application/offset+octet-stream":
        raise UnsupportedMediaError("PATCH needs Content-Type: application/offset+octet-stream")
    offset = _int_header(request, "Upload-Offset")
    try:
        await service.append_tus(upload, offset, _body_read(request, request.content.read))
    except UploadOffsetError as exc:
        # tus 1.0: the 409 tells the client where to resume.
        return json_error(
            409,
            "offset_mismatch",
            str(exc),
            **{"Upload-Offset": str(exc.offset), "Tus-Resumable": TUS_VERSION},
        )
    return web.Response(
        status=204,
        headers={"Upload-Offset": str(upload.bytes_received), "Tus-Resumable": TUS_VERSION},
    )


async def delete_tus(request: web.Request) -> web.Response:
    """tus termination: drop an unfinished (or finished) upload and its bytes."""
    service = request.app[SERVICE_KEY]
    upload = _readable_upload(request, service.tus_upload(request.match_info["id"]))
    require_write(request, upload.project)
    await service.terminate_tus(upload)
    return web.Response(status=204, headers={"Tus-Resumable": TUS_VERSION})


def _int_header(request: web.Request, name: str) -> int:
    raw = request.headers.get(name, "")
    # isascii: str.isdigit() accepts "²" and other digits int() refuses.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 20):
        raise RejectedInputError(f"header {name} must be a non-negative integer, got {raw!r}")
    return int(raw)


def _tus_metadata(raw: str) -> dict[str, str]:
    """Decode ``Upload-Metadata``: comma-separated ``key base64value`` pairs (tus 1.0)."""
    values: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in raw.split(","))):
        key, _, encoded = pair.partition(" ")
        try:
            values[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise RejectedInputError(f"Upload-Metadata value of {key!r} is not base64") from None
    # tus-js-client sends "filename" or "name"; both mean the same here.
    if "name" in values and "filename" not in values:
        values["filename"] = values.pop("name")
    values.pop("filetype", None)
    return values


# -- status, files, config --------------------------------------------------------------


async def get_uploads(request: web.Request) -> web.Response:
    """Uploads of the projects the principal may read, newest first, optionally filtered by
    ``project`` and ``state``."""
    principal = principal_of(request)
    project, state = request.query.get("project"), request.query.get("state")
    try:
        limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
    except ValueError:
        raise RejectedInputError("limit must be an integer") from None
    records = request.app[SERVICE_KEY].records.values()
    items = [
        _public(u, full=False)
        for u in sorted(records, key=lambda u: -u.created_at)
        if principal.can_read(u.project)
        and (not project or u.project == project.lower())
        and (not state or u.state == state)
    ]
    return web.json_response({"total": len(items), "items": items[:limit]})


async def get_upload(request: web.Request) -> web.Response:
    """One upload's status: state, bytes, files, instances, series (with links), errors."""
    upload = _readable_upload(request, request.app[SERVICE_KEY].get(request.match_info["id"]))
    return web.json_response(_public(upload, full=True))


async def get_files(request: web.Request) -> web.Response:
    """Files kept in object storage from uploads (``kind=files`` and non-DICOM members), of
    the projects the principal may read."""
    principal = principal_of(request)
    project = (request.query.get("project") or "").lower()
    items = [
        _file_entry(upload, entry)
        for upload in sorted(request.app[SERVICE_KEY].records.values(), key=lambda u: -u.created_at)
        if principal.can_read(upload.project) and (not project or upload.project == project)
        for entry in upload.files
    ]
    return web.json_response({"total": len(items), "items": items})


async def get_file(request: web.Request) -> web.StreamResponse:
    """The bytes of one uploaded file: ``/api/files/<upload id>/<relative path>``."""
    upload_id, _, rel = request.match_info["path"].partition("/")
    upload = request.app[SERVICE_KEY].records.get(upload_id)
    if (
        upload is None
        or not principal_of(request).can_read(upload.project)
        or not any(f["path"] == rel for f in upload.files)
    ):
        return json_error(404, "not_found", f"no uploaded file {request.match_info['path']}")
    name = quote(rel.rsplit("/", 1)[-1])
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f"attachment; filename*=UTF-8''{name}",
    }
    key = f"uploads/{upload_id}/{rel}"
    return await stream_object(request, request.app[STORAGE_KEY], key, headers)


async def get_public_config(request: web.Request) -> web.Response:
    """What the upload page needs to build the ``dcmsend`` command and its uploads."""
    service = request.app[SERVICE_KEY]
    endpoint = request.app[ENDPOINT_KEY]
    return web.json_response(
        {
            "public_host": endpoint.public_host,
            "dicom_port": endpoint.port,
            "max_upload_bytes": service.cfg.max_upload_bytes,
            "tus_endpoint": TUS_BASE,
            "nifti_import": service.nifti_available,
        }
    )


async def get_page(request: web.Request) -> web.FileResponse:
    """``GET /``: the upload page."""
    return web.FileResponse(WEB_DIR / "upload.html", headers={"Cache-Control": "no-cache"})


def _file_entry(upload: Upload, entry: dict[str, Any]) -> dict[str, Any]:
    path = f"{upload.id}/{entry['path']}"
    return {
        "path": path,
        "name": entry["path"],
        "size": entry["size"],
        "upload_id": upload.id,
        "project": upload.project,
        "dataset": upload.dataset,
        "uploaded_at": upload.finished_at or upload.updated_at,
        "url": f"/api/files/{quote(path)}",
    }


def _public(upload: Upload, *, full: bool) -> dict[str, Any]:
    doc = upload.to_dict()
    for private in ("series", "files", "errors", "warnings", "members_done", "resumes"):
        doc.pop(private)
    doc["members_done"] = upload.members_done
    doc["series_created"] = len(upload.series)
    doc["status_url"] = f"/api/uploads/{upload.id}"
    if upload.protocol == "tus":
        doc["tus_url"] = f"{TUS_BASE}/{upload.id}"
    if full:
        doc["series"] = [
            {
                "series_uid": uid,
                "url": f"/api/series/{uid}",
                "gallery_url": f"/gallery?series={uid}",
            }
            for uid in upload.series
        ]
        doc["files"] = [_file_entry(upload, f) for f in upload.files]
        doc["errors"] = upload.errors
        doc["warnings"] = upload.warnings
    return doc


def setup_uploads(
    app: web.Application,
    service: UploadService,
    *,
    storage: StorageBackend,
    dicom_endpoint: DicomEndpoint,
    body_timeout_s: float = 60.0,
) -> None:
    """Add the upload routes, the page and ``/static/``; start/stop `service` with `app`."""
    app[SERVICE_KEY] = service
    app[BODY_TIMEOUT_KEY] = body_timeout_s
    app[STORAGE_KEY] = storage
    app[ENDPOINT_KEY] = dicom_endpoint
    r = app.router
    r.add_route("OPTIONS", TUS_BASE, options_tus)
    r.add_route("OPTIONS", TUS_BASE + "/{id}", options_tus)
    r.add_post(TUS_BASE, post_tus)
    r.add_route("HEAD", TUS_BASE + "/{id}", head_tus)
    r.add_patch(TUS_BASE + "/{id}", patch_tus)
    r.add_delete(TUS_BASE + "/{id}", delete_tus)
    r.add_post("/api/uploads", post_upload)
    r.add_get("/api/uploads", get_uploads)
    r.add_get("/api/uploads/{id}", get_upload)
    r.add_get("/api/files", get_files)
    r.add_get("/api/files/{path:.+}", get_file)
    r.add_get("/api/config/public", get_public_config)
    r.add_get("/", get_page)
    r.add_static("/static/", WEB_DIR)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.aclose()

    app.cleanup_ctx.append(lifecycle)


__all__ = ["TUS_BASE", "TUS_VERSION", "DicomEndpoint", "setup_uploads"]
