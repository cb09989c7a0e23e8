"""HTTP uploads: streamed receiving (``POST /api/uploads`` and tus 1.0), durable status
records, uploaded files, the upload page and its static files.

Handlers and :class:`UploadService` run on the event loop; file writes go to worker threads.
The import itself (zip members into the pipeline) lives in :mod:`kp_gateway.upload.importer`.

Routes (:func:`setup_uploads`)::

    POST   /api/uploads                 multipart (field "file") or raw body -> 202 {id, status_url}
    GET    /api/uploads[?project=&state=&limit=]    GET /api/uploads/{id}
    OPTIONS/POST /api/uploads/tus       HEAD/PATCH/DELETE /api/uploads/tus/{id}   (tus 1.0.0)
    GET    /api/files?project=          GET /api/files/{upload id}/{path}
    GET    /api/config/public           GET /   GET /static/...
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import logging
import re
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry, Histogram

from kp_gateway.config import Config
from kp_gateway.datadir import DataDir
from kp_gateway.durable import fsync_file, remove_paths, write_atomic
from kp_gateway.errors import (
    GatewayError,
    PayloadTooLargeError,
    RejectedInputError,
    ShuttingDownError,
    UnknownProjectError,
    UnsafeArchiveError,
    error_code_for,
    http_status_for,
)
from kp_gateway.http.responses import json_error, stream_object
from kp_gateway.kaapana.keys import ADMIN_PROJECT
from kp_gateway.names import DATASET_NAME_RULE, is_dataset_name
from kp_gateway.pipeline.ingest import IngestService
from kp_gateway.upload.archive import ArchiveLimits, normalise_member_name
from kp_gateway.upload.importer import NiftiImporter, UploadImporter
from kp_gateway.upload.record import DONE, FAILED, IMPORTING, KINDS, RECEIVING, Upload, read_records
from kp_gateway.upload.sniff import inspect_body

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "http" / "static"
TUS_VERSION = "1.0.0"
TUS_BASE = "/api/uploads/tus"
_EXTENSION_RE = re.compile(r"^\.?[a-z0-9._-]{1,16}$")
_QUERY_KEYS = {"project", "dataset", "kind", "extension", "filename", "token"}
_READ_ERRORS = (ConnectionError, HttpProcessingError, asyncio.IncompleteReadError)
_TUS_IDLE_FLUSH_S = 0.2  # a paused PATCH writes its buffer, so HEAD reports every byte
_SAVE_INTERVAL_S = 0.5  # how stale a status document may get while importing
_IMPORT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)
_histograms: weakref.WeakKeyDictionary[CollectorRegistry, Histogram] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadLimits:
    """Bounds of the upload path (the ``[upload]`` config section)."""

    max_upload_bytes: int = 64 * 2**30  # also what tus offers as Tus-Max-Size
    archive: ArchiveLimits = field(default_factory=ArchiveLimits)
    # Imports are disk- and pipeline-bound; two keep the pipeline busy, more only interleave.
    max_concurrent_imports: int = 2
    admission_wait_s: float = 20.0  # per submit attempt; a full pipeline is waited out
    write_chunk_bytes: int = 1 << 20  # received bytes are buffered up to this per write
    tus_expiry_s: float = 7 * 86400.0  # an unfinished tus upload idle this long is dropped


@dataclass(frozen=True, slots=True)
class _Params:
    project: str
    dataset: str
    kind: str
    extension: str
    filename: str


def _safe_filename(raw: str) -> str:
    """The last path component of a client-supplied file name, or ``upload.bin``."""
    base = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    try:
        name = normalise_member_name(base) if base else None
    except UnsafeArchiveError:
        name = None
    return name or "upload.bin"


class _BodyWriter:
    """Appends streamed bytes to a file from a worker thread, with a running byte cap."""

    def __init__(
        self, path: Path, *, offset: int, cap: int, chunk: int, on_bytes: Callable[[int], None]
    ) -> None:
        self.path = path
        self.position = offset  # bytes durably handed to the file so far
        self._cap = cap
        self._chunk = chunk
        self._on_bytes = on_bytes
        self._buf = bytearray()
        self._fh: Any = None

    async def open(self) -> None:
        def _open() -> Any:
            fh = open(self.path, "r+b" if self.position else "wb")  # noqa: SIM115 - closed in close()
            fh.truncate(self.position)
            fh.seek(self.position)
            return fh

        self._fh = await asyncio.to_thread(_open)

    async def write(self, data: bytes) -> None:
        if self.position + len(self._buf) + len(data) > self._cap:
            raise PayloadTooLargeError(f"the upload exceeds the limit of {self._cap} bytes")
        self._buf += data
        if len(self._buf) >= self._chunk:
            await self.flush()

    async def flush(self) -> None:
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            await asyncio.to_thread(self._fh.write, data)
            self.position += len(data)
            self._on_bytes(len(data))

    async def close(self, *, sync: bool) -> None:
        fh, self._fh = self._fh, None
        if fh is None:
            return

        def _close() -> None:
            try:
                fh.flush()
                if sync:
                    fsync_file(self.path)
            finally:
                fh.close()

        await asyncio.to_thread(_close)

    async def pump(
        self, read: Callable[[int], Awaitable[bytes]], *, idle_flush_s: float | None = None
    ) -> None:
        """Copy everything `read` yields, then flush. Constant memory whatever the size.

        With `idle_flush_s`, buffered bytes are written out whenever the sender pauses that
        long, so the offset a resuming tus client asks for is exact.
        """
        while True:
            if idle_flush_s is None:
                data = await read(self._chunk)
            else:
                try:
                    async with asyncio.timeout(idle_flush_s):
                        data = await read(self._chunk)
                except TimeoutError:
                    await self.flush()
                    continue
            if not data:
                break
            await self.write(data)
        await self.flush()


class UploadService:
    """Receives uploads, keeps their status records, and runs bounded background imports.

    Construct it before ``IngestService.start()`` so that instances recovered from the spool
    are attributed to their upload; :func:`setup_uploads` starts and stops it with the app.
    Runs on the event loop.
    """

    def __init__(
        self,
        cfg: Config,
        ingest: IngestService,
        *,
        limits: UploadLimits | None = None,
        nifti_importer: NiftiImporter | None = None,
    ) -> None:
        self._cfg = cfg
        self._ingest = ingest
        self.limits = limits or UploadLimits()
        self._nifti = nifti_importer
        self.state_dir = DataDir.at(cfg.data_dir).uploads_state
        self._fsync = cfg.storage.fsync
        self._importer = UploadImporter(
            ingest,
            limits=self.limits.archive,
            admission_wait_s=self.limits.admission_wait_s,
            nifti_importer=nifti_importer,
            on_change=self._changed,
        )
        self.records = self._importer.records
        self._dirty: set[str] = set()
        self._save_lock = asyncio.Lock()
        self._tus_locks: dict[str, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(self.limits.max_concurrent_imports)
        self._tasks: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        metrics = ingest.metrics
        self._import_seconds = _histograms.get(metrics.registry)
        if self._import_seconds is None:
            self._import_seconds = Histogram(
                "kp_gateway_upload_import_seconds",
                "Time from an upload's last byte to the end of its import.",
                buckets=_IMPORT_BUCKETS,
                registry=metrics.registry,
            )
            _histograms[metrics.registry] = self._import_seconds

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the records; resume imports a stop interrupted, fail POSTs cut short."""
        await asyncio.to_thread(self.state_dir.mkdir, parents=True, exist_ok=True)
        for upload in await asyncio.to_thread(read_records, self.state_dir):
            self._importer.adopt(upload)
            if upload.state == RECEIVING:
                await self._recover_receiving(upload)
            if upload.state == IMPORTING:
                upload.resumes += 1
                logger.info("resuming the import of upload %s", upload.id)
                await self._save(upload)
                self._spawn_import(upload)
        self._flusher = asyncio.create_task(self._flush_loop(), name="upload-status-flusher")

    async def _recover_receiving(self, upload: Upload) -> None:
        body, part = self._body(upload.id), self._part(upload.id)
        if await asyncio.to_thread(body.exists):
            upload.state = IMPORTING  # fully received and checked; the crash hit the hand-over
            return
        expired = time.time() - upload.updated_at > self.limits.tus_expiry_s
        if upload.protocol == "tus" and not expired and await asyncio.to_thread(part.exists):

            def _trim() -> None:
                # Bytes after the last recorded offset were never fsynced or acknowledged.
                with open(part, "r+b") as fh:
                    fh.truncate(upload.bytes_received)

            await asyncio.to_thread(_trim)
            return
        await asyncio.to_thread(remove_paths, part)
        why = "expired" if expired and upload.protocol == "tus" else "was interrupted"
        self._finish(
            upload,
            FAILED,
            f"the upload {why} after {upload.bytes_received} bytes (the gateway stopped before "
            "the last byte arrived); upload it again",
        )
        await self._save(upload)

    async def aclose(self) -> None:
        """Stop imports (they resume at the next start) and write every record."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._flush_dirty()

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: start with the app, stop before it is torn down."""
        await self.start()
        yield
        await self.aclose()

    # -- records --------------------------------------------------------------------------

    def _body(self, upload_id: str) -> Path:
        return self.state_dir / f"{upload_id}.body"

    def _part(self, upload_id: str) -> Path:
        return self.state_dir / f"{upload_id}.part"

    def _changed(self, upload: Upload) -> None:
        upload.updated_at = time.time()
        self._dirty.add(upload.id)

    async def _save(self, upload: Upload) -> None:
        self._dirty.discard(upload.id)
        upload.updated_at = time.time()
        async with self._save_lock:
            if upload.id in self.records:  # not discarded meanwhile
                doc = upload.to_dict()
                path = self.state_dir / f"{upload.id}.json"
                await asyncio.to_thread(write_atomic, path, doc, fsync=self._fsync)

    async def _flush_dirty(self) -> None:
        for upload_id in list(self._dirty):
            upload = self.records.get(upload_id)
            if upload is not None:
                await self._save(upload)
            self._dirty.discard(upload_id)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(_SAVE_INTERVAL_S)
            try:
                await self._flush_dirty()
            except OSError:
                logger.exception("writing upload status failed; will retry")

    async def _discard(self, upload: Upload) -> None:
        """Forget a rejected or terminated upload entirely: record, body, partial body."""
        self.records.pop(upload.id, None)
        self._dirty.discard(upload.id)
        self._tus_locks.pop(upload.id, None)
        async with self._save_lock:
            json_path = self.state_dir / f"{upload.id}.json"
            await asyncio.to_thread(
                remove_paths, json_path, self._body(upload.id), self._part(upload.id)
            )

    def _finish(self, upload: Upload, state: str, detail: str) -> None:
        upload.state, upload.detail, upload.finished_at = state, detail, time.time()
        self._ingest.metrics.uploads_total.labels(state=state).inc()

    # -- receiving ------------------------------------------------------------------------

    async def _params(self, query: Any) -> _Params:
        unknown = set(query) - _QUERY_KEYS
        if unknown:
            raise RejectedInputError(
                f"unknown parameter(s) {', '.join(sorted(unknown))}; "
                f"use {', '.join(sorted(_QUERY_KEYS - {'token'}))}"
            )
        project = (query.get("project") or ADMIN_PROJECT).strip().lower()
        default_dataset = f"upload-{datetime.date.today():%Y%m%d}"
        dataset = (query.get("dataset") or default_dataset).strip().lower()
        if not is_dataset_name(dataset):
            raise RejectedInputError(f"dataset {dataset!r} is not valid: {DATASET_NAME_RULE}")
        kind = (query.get("kind") or "auto").strip().lower()
        if kind not in KINDS:
            raise RejectedInputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        extension = (query.get("extension") or "").strip().lower()
        if extension and not _EXTENSION_RE.match(extension):
            raise RejectedInputError(f"extension {extension!r} is not a file extension")
        if extension and not extension.startswith("."):
            extension = "." + extension
        if not await self._ingest.index.project_exists(project):
            raise UnknownProjectError(f"project {project!r} does not exist")
        if kind == "nifti" and self._nifti is None:
            raise _NotImplementedUpload()
        filename = _safe_filename(query.get("filename") or "")
        return _Params(project, dataset, kind, extension, filename)

    def _new_upload(self, params: _Params, protocol: str, expected: int | None) -> Upload:
        now = time.time()
        upload = Upload(
            id=f"{time.strftime('%Y%m%d')}-{uuid.uuid4().hex[:12]}",
            protocol=protocol,
            project=params.project,
            dataset=params.dataset,
            kind=params.kind,
            extension=params.extension,
            filename=params.filename,
            created_at=now,
            updated_at=now,
            bytes_expected=expected,
        )
        self.records[upload.id] = upload
        return upload

    def _writer(self, upload: Upload, *, cap: int) -> _BodyWriter:
        metric = self._ingest.metrics.upload_bytes

        def counted(n: int) -> None:
            upload.bytes_received += n
            metric.inc(n)

        return _BodyWriter(
            self._part(upload.id),
            offset=upload.bytes_received,
            cap=cap,
            chunk=self.limits.write_chunk_bytes,
            on_bytes=counted,
        )

    async def _accept(self, upload: Upload) -> None:
        """The last byte arrived: check the body, then hand it to a background import.

        Raises RejectedInputError (the caller discards the upload) for unsafe or unusable
        content, before anything is stored.
        """
        part, body = self._part(upload.id), self._body(upload.id)
        container, members = await asyncio.to_thread(
            inspect_body, part, upload.filename, upload.kind, upload.extension, self.limits.archive
        )
        await asyncio.to_thread(part.rename, body)
        upload.container, upload.members_total = container, members
        upload.state = IMPORTING
        upload.detail = "waiting for an import slot" if self._slots.locked() else ""
        await self._save(upload)
        self._spawn_import(upload)

    def _spawn_import(self, upload: Upload) -> None:
        task = asyncio.create_task(self._import(upload), name=f"upload-import-{upload.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _import(self, upload: Upload) -> None:
        async with self._slots:
            upload.detail = ""
            started = time.monotonic()
            try:
                await self._importer.run(upload, self._body(upload.id), self.state_dir)
            except (asyncio.CancelledError, ShuttingDownError):
                # Stopping: the record stays "importing" and resumes at the next start.
                await self._save(upload)
                raise
            except RejectedInputError as exc:
                self._finish(upload, FAILED, str(exc))
            # A background task is a boundary: whatever went wrong belongs in the record.
            except Exception as exc:
                logger.exception("import of upload %s failed", upload.id)
                self._finish(upload, FAILED, f"import failed: {type(exc).__name__}: {exc}")
            else:
                # Files came in, none of them became anything and some failed: that upload
                # failed, whatever the per-file details say.
                nothing = not (
                    upload.instances_imported or upload.files_stored or upload.cases_done
                )
                state = FAILED if nothing and upload.errors_total else DONE
                self._finish(upload, state, _summary(upload))
            assert self._import_seconds is not None
            self._import_seconds.observe(time.monotonic() - started)
            await asyncio.to_thread(remove_paths, self._body(upload.id))
            await self._save(upload)
            logger.info("upload %s %s: %s", upload.id, upload.state, upload.detail)

    async def post_upload(self, request: web.Request) -> web.Response:
        """``POST /api/uploads``: stream the body to disk, check it, answer 202.

        Raises UnknownProjectError (404) before reading the body, PayloadTooLargeError (413)
        as soon as the cap is passed, UnsafeArchiveError/InvalidDicomError (400) and
        UnsupportedMediaError (415) after it; nothing of a refused upload stays behind.
        """
        self._check_open()
        params = await self._params(request.query)
        cap = self.limits.max_upload_bytes
        if request.content_length is not None and request.content_length > cap:
            raise PayloadTooLargeError(f"the upload exceeds the limit of {cap} bytes")
        multipart = request.content_type.startswith("multipart/")
        # A multipart Content-Length counts boundaries and headers too: no exact size then.
        expected = None if multipart else request.content_length
        upload = self._new_upload(params, "post", expected)
        writer = self._writer(upload, cap=cap)
        try:
            await self._save(upload)
            await writer.open()
            if multipart:
                reader = await _multipart(request)
                fields, part = await _form_fields_until_file(reader)
                if part.filename and "filename" not in request.query:
                    upload.filename = _safe_filename(part.filename)
                await writer.pump(part.read_chunk)
                fields.update(await _form_fields_after_file(reader))
                if fields:
                    # Form fields name the project/dataset too; the query string wins.
                    routed = await self._params({**fields, **request.query})
                    upload.project, upload.dataset = routed.project, routed.dataset
                    upload.kind, upload.extension = routed.kind, routed.extension
            else:
                await writer.pump(request.content.read)
            await writer.close(sync=self._fsync)
            await self._accept(upload)
        except BaseException as exc:
            await writer.close(sync=False)
            await self._discard(upload)
            self._ingest.metrics.uploads_total.labels(state="rejected").inc()
            if isinstance(exc, _READ_ERRORS):
                raise RejectedInputError(f"the upload was cut off: {exc}") from exc
            raise
        return web.json_response(
            {"id": upload.id, "status_url": f"/api/uploads/{upload.id}", "state": upload.state},
            status=202,
        )

    def _check_open(self) -> None:
        if self._closing:
            raise ShuttingDownError("the gateway is shutting down")

    # -- tus 1.0.0: core, creation, termination -------------------------------------------

    def _tus_headers(self) -> dict[str, str]:
        return {
            "Tus-Resumable": TUS_VERSION,
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": "creation,termination",
            "Tus-Max-Size": str(self.limits.max_upload_bytes),
        }

    def _tus_upload(self, request: web.Request) -> Upload:
        upload = self.records.get(request.match_info["id"])
        if upload is None or upload.protocol != "tus":
            raise web.HTTPNotFound(text="no such tus upload")
        return upload

    async def options_tus(self, request: web.Request) -> web.Response:
        """tus discovery: versions, extensions and the size limit."""
        return web.Response(status=204, headers=self._tus_headers())

    async def post_tus(self, request: web.Request) -> web.Response:
        """tus creation: ``Upload-Length`` and ``Upload-Metadata`` (base64 project, dataset,
        kind, filename, extension) -> 201 with ``Location``."""
        self._check_open()
        if "Upload-Concat" in request.headers:
            # Not advertised in Tus-Extension: a client splitting a file into partial uploads
            # (tus-js-client's parallelUploads) would otherwise get each part imported alone.
            raise RejectedInputError(
                "Upload-Concat (the tus concatenation extension) is not supported; "
                "send the file as one upload (tus-js-client: parallelUploads 1)"
            )
        length = _int_header(request, "Upload-Length")
        if length == 0:
            raise RejectedInputError("Upload-Length is 0: the upload is empty")
        if length > self.limits.max_upload_bytes:
            raise PayloadTooLargeError(
                f"Upload-Length {length} exceeds the limit of {self.limits.max_upload_bytes}"
            )
        params = await self._params(_tus_metadata(request.headers.get("Upload-Metadata", "")))
        upload = self._new_upload(params, "tus", length)
        try:
            await asyncio.to_thread(self._part(upload.id).touch)
            await self._save(upload)
        except BaseException:
            await self._discard(upload)
            raise
        location = f"{TUS_BASE}/{upload.id}"
        return web.Response(
            status=201,
            headers={"Location": location, "Upload-Offset": "0", "Tus-Resumable": TUS_VERSION},
        )

    async def head_tus(self, request: web.Request) -> web.Response:
        """tus offset discovery: ``Upload-Offset`` and ``Upload-Length``."""
        upload = self._tus_upload(request)
        if upload.state == FAILED:
            raise web.HTTPGone(text=f"the upload failed: {upload.detail}")
        return web.Response(
            status=200,
            headers={
                "Upload-Offset": str(upload.bytes_received),
                "Upload-Length": str(upload.bytes_expected),
                "Cache-Control": "no-store",
                "Tus-Resumable": TUS_VERSION,
            },
        )

    async def patch_tus(self, request: web.Request) -> web.Response:
        """tus append: bytes at ``Upload-Offset``; 409 when it is not the current offset.

        The last byte triggers the same checks and import as ``POST /api/uploads``.
        """
        self._check_open()
        upload = self._tus_upload(request)
        if request.content_type != "application/offset+octet-stream":
            raise web.HTTPUnsupportedMediaType(
                text="PATCH needs Content-Type: application/offset+octet-stream"
            )
        offset = _int_header(request, "Upload-Offset")
        lock = self._tus_locks.setdefault(upload.id, asyncio.Lock())
        try:
            async with asyncio.timeout(10):
                await lock.acquire()
        except TimeoutError:
            raise web.HTTPConflict(text="another PATCH of this upload is in progress") from None
        try:
            if upload.state != RECEIVING or offset != upload.bytes_received:
                return json_error(
                    409,
                    "offset_mismatch",
                    f"Upload-Offset is {offset}, the upload is at {upload.bytes_received}",
                    **{"Upload-Offset": str(upload.bytes_received), "Tus-Resumable": TUS_VERSION},
                )
            assert upload.bytes_expected is not None
            writer = self._writer(upload, cap=upload.bytes_expected)
            await writer.open()
            try:
                await writer.pump(request.content.read, idle_flush_s=_TUS_IDLE_FLUSH_S)
            except _READ_ERRORS:
                logger.info("tus upload %s cut off at %d bytes", upload.id, writer.position)
            finally:
                await writer.flush()
                await writer.close(sync=self._fsync)
                await self._save(upload)  # the offset is durable only once saved after fsync
            if upload.bytes_received == upload.bytes_expected:
                try:
                    await self._accept(upload)
                except BaseException:
                    await self._discard(upload)
                    self._ingest.metrics.uploads_total.labels(state="rejected").inc()
                    raise
        finally:
            lock.release()
        return web.Response(
            status=204,
            headers={"Upload-Offset": str(upload.bytes_received), "Tus-Resumable": TUS_VERSION},
        )

    async def delete_tus(self, request: web.Request) -> web.Response:
        """tus termination: drop an unfinished (or finished) upload and its bytes."""
        upload = self._tus_upload(request)
        if upload.state == IMPORTING:
            raise web.HTTPConflict(text="the upload is being imported; wait until it finishes")
        await self._discard(upload)
        return web.Response(status=204, headers={"Tus-Resumable": TUS_VERSION})

    # -- status, files, config ------------------------------------------------------------

    async def get_uploads(self, request: web.Request) -> web.Response:
        """Uploads, newest first, optionally filtered by ``project`` and ``state``."""
        project, state = request.query.get("project"), request.query.get("state")
        try:
            limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
        except ValueError:
            raise RejectedInputError("limit must be an integer") from None
        items = [
            _public(u, full=False)
            for u in sorted(self.records.values(), key=lambda u: -u.created_at)
            if (not project or u.project == project.lower()) and (not state or u.state == state)
        ]
        return web.json_response({"total": len(items), "items": items[:limit]})

    async def get_upload(self, request: web.Request) -> web.Response:
        """One upload's status: state, bytes, files, instances, series (with links), errors."""
        upload = self.records.get(request.match_info["id"])
        if upload is None:
            return json_error(404, "not_found", f"no upload {request.match_info['id']}")
        return web.json_response(_public(upload, full=True))

    async def get_files(self, request: web.Request) -> web.Response:
        """Files kept in object storage from uploads (``kind=files`` and non-DICOM members)."""
        project = (request.query.get("project") or "").lower()
        items = []
        for upload in sorted(self.records.values(), key=lambda u: -u.created_at):
            if project and upload.project != project:
                continue
            for entry in upload.files:
                items.append(_file_entry(upload, entry))
        return web.json_response({"total": len(items), "items": items})

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        """The bytes of one uploaded file: ``/api/files/<upload id>/<relative path>``."""
        upload_id, _, rel = request.match_info["path"].partition("/")
        upload = self.records.get(upload_id)
        if upload is None or not any(f["path"] == rel for f in upload.files):
            return json_error(404, "not_found", f"no uploaded file {request.match_info['path']}")
        storage = self._ingest.storage
        key = f"uploads/{upload_id}/{rel}"
        name = quote(rel.rsplit("/", 1)[-1])
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"attachment; filename*=UTF-8''{name}",
        }
        return await stream_object(request, storage, key, headers)

    async def get_public_config(self, request: web.Request) -> web.Response:
        """What the upload page needs to build the ``dcmsend`` command and its uploads."""
        dicom = self._cfg.dicom
        return web.json_response(
            {
                "public_host": self._cfg.http.public_host,
                "dicom_port": dicom.public_port or dicom.port,
                "max_upload_bytes": self.limits.max_upload_bytes,
                "tus_endpoint": TUS_BASE,
                "nifti_import": self._nifti is not None,
            }
        )


class _NotImplementedUpload(GatewayError):
    """kind=nifti while no NIfTI importer is installed (answered 501 by `_tus_errors`)."""


def _summary(upload: Upload) -> str:
    parts = [
        f"{upload.instances_imported} instances in {len(upload.series)} series",
        f"{upload.files_stored} files stored",
    ]
    if upload.cases_total:
        parts.append(
            f"{upload.cases_done} of {upload.cases_total} NIfTI cases converted"
            + (f" ({upload.cases_failed} failed)" if upload.cases_failed else "")
        )
    if upload.errors_total:
        parts.append(f"{upload.errors_total} files with errors")
    return ", ".join(parts)


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


# Form fields that may stand beside the file (the query string's own names), and how long a
# value may be: they are read into memory.
_FORM_FIELDS = frozenset({"project", "dataset", "kind", "extension"})
_MAX_FIELD_BYTES = 256


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


def _int_header(request: web.Request, name: str) -> int:
    raw = request.headers.get(name, "")
    if not raw.isdigit():
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


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _tus_errors(handler: Handler) -> Handler:
    """Give tus and upload errors their JSON body plus ``Tus-Resumable``; 501 for NIfTI."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        tus = {"Tus-Resumable": TUS_VERSION} if request.path.startswith(TUS_BASE) else {}
        try:
            return await handler(request)
        except _NotImplementedUpload:
            return json_error(
                501,
                "not_implemented",
                "kind=nifti needs the NIfTI importer, which is not installed in this gateway; "
                "upload DICOM, or use kind=files to keep the NIfTI files as they are",
                **tus,
            )
        except GatewayError as exc:
            status = http_status_for(exc)
            extra = {"Retry-After": "5"} if status == 503 else {}
            return json_error(status, error_code_for(exc), str(exc), **tus, **extra)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = exc.reason.lower().replace(" ", "_")
            return json_error(exc.status, code, exc.text or exc.reason, **tus)

    return wrapped


async def get_page(request: web.Request) -> web.FileResponse:
    """``GET /``: the upload page."""
    return web.FileResponse(WEB_DIR / "upload.html", headers={"Cache-Control": "no-cache"})


def setup_uploads(app: web.Application, service: UploadService) -> None:
    """Add the upload routes, the page and ``/static/``; start/stop `service` with `app`."""
    r = app.router
    s = service
    r.add_route("OPTIONS", TUS_BASE, _tus_errors(s.options_tus))
    r.add_route("OPTIONS", TUS_BASE + "/{id}", _tus_errors(s.options_tus))
    r.add_post(TUS_BASE, _tus_errors(s.post_tus))
    r.add_route("HEAD", TUS_BASE + "/{id}", _tus_errors(s.head_tus))
    r.add_patch(TUS_BASE + "/{id}", _tus_errors(s.patch_tus))
    r.add_delete(TUS_BASE + "/{id}", _tus_errors(s.delete_tus))
    r.add_post("/api/uploads", _tus_errors(s.post_upload))
    r.add_get("/api/uploads", s.get_uploads)
    r.add_get("/api/uploads/{id}", s.get_upload)
    r.add_get("/api/files", s.get_files)
    r.add_get("/api/files/{path:.+}", s.get_file)
    r.add_get("/api/config/public", s.get_public_config)
    r.add_get("/", get_page)
    r.add_static("/static/", WEB_DIR)
    app.cleanup_ctx.append(s.lifecycle)


__all__ = ["NiftiImporter", "UploadLimits", "UploadService", "setup_uploads"]
