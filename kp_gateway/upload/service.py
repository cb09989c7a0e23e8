"""The upload service: streamed receiving into the upload state folder, durable status records,
the checks before acceptance, and bounded background imports.

It knows nothing of HTTP: :mod:`kp_gateway.http.uploads` parses requests (multipart, tus
headers) and calls the coroutines here with the body as a ``read(n)`` coroutine. Everything here
runs on the event loop; file writes go to worker threads. The import itself (zip members into
the pipeline) lives in :mod:`kp_gateway.upload.importer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kp_gateway.config import UploadConfig
from kp_gateway.durable import fsync_file, remove_paths, write_atomic
from kp_gateway.errors import (
    FeatureUnavailableError,
    InsufficientStorageError,
    PayloadTooLargeError,
    RejectedInputError,
    ShuttingDownError,
    UnknownProjectError,
    UnknownUploadError,
    UnsafeArchiveError,
    UploadConflictError,
    UploadFailedError,
    UploadOffsetError,
    UploadQuotaError,
)
from kp_gateway.kaapana.keys import ADMIN_PROJECT
from kp_gateway.metrics import Metrics
from kp_gateway.names import DATASET_NAME_RULE, default_dataset_name, is_dataset_name
from kp_gateway.upload.archive import normalise_member_name
from kp_gateway.upload.importer import UploadImporter
from kp_gateway.upload.record import (
    DONE,
    FAILED,
    IMPORTING,
    KINDS,
    RECEIVING,
    Upload,
    UploadState,
    read_records,
)
from kp_gateway.upload.sniff import inspect_body

logger = logging.getLogger(__name__)

# The routing parameters an upload may carry (query string, form fields, tus metadata).
ROUTING_KEYS = frozenset({"project", "dataset", "kind", "extension", "filename"})
_EXTENSION_RE = re.compile(r"^\.?[a-z0-9._-]{1,16}$")
_WRITE_CHUNK_BYTES = 1 << 20  # received bytes are buffered up to this per write
_TUS_IDLE_FLUSH_S = 0.2  # a paused PATCH writes its buffer, so HEAD reports every byte
_TUS_LOCK_WAIT_S = 10.0  # a second PATCH of one upload waits this long for the first
_SAVE_INTERVAL_S = 0.5  # how stale a status document may get while importing
_EXPIRY_SWEEP_MAX_S = 60.0  # how often unfinished tus uploads are checked for expiry, at most

# Reads a chunk of at most n bytes of the body; b"" at its end. A body cut off raises
# ConnectionError (the HTTP layer translates its own read errors into one).
BodyRead = Callable[[int], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class UploadParams:
    """Where an upload goes and how to read it, checked by :meth:`UploadService.params`."""

    project: str
    dataset: str
    kind: str
    extension: str
    filename: str


def safe_filename(raw: str) -> str:
    """The last path component of a client-supplied file name, or ``upload.bin``."""
    base = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    try:
        name = normalise_member_name(base) if base else None
    except UnsafeArchiveError:
        name = None
    return name or "upload.bin"


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Turn "no space left" (and an exhausted quota) into InsufficientStorageError (507)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL_ERRNOS:
            raise InsufficientStorageError(f"the gateway's disk is full: {exc.strerror}") from exc
        raise


def check_free_space(folder: Path, reserve: int, more: int = 0) -> None:
    """Blocking. InsufficientStorageError unless `folder`'s filesystem keeps `reserve` bytes
    free after `more` are written."""
    if reserve <= 0:
        return
    free = shutil.disk_usage(folder).free
    if free - more < reserve:
        raise InsufficientStorageError(
            f"the gateway's disk has {free} bytes free; {more} more would leave less than "
            f"the reserve of {reserve} bytes (dicom.min_free_bytes)"
        )


class BodyWriter:
    """Appends streamed bytes to a file from a worker thread, with a running byte cap.

    Every write first checks that the filesystem keeps `reserve` bytes free (one statvfs per
    MiB written); a full disk is InsufficientStorageError (507), never a traceback.
    """

    def __init__(
        self,
        path: Path,
        *,
        offset: int,
        cap: int,
        on_bytes: Callable[[int], None],
        reserve: int = 0,
    ) -> None:
        self.path = path
        self.position = offset  # bytes durably handed to the file so far
        self._cap = cap
        self._on_bytes = on_bytes
        self._reserve = reserve
        self._buf = bytearray()
        self._fh: Any = None

    async def open(self) -> None:
        def _open() -> Any:
            with storage_errors():
                if not self.position:
                    return open(self.path, "wb")
                fh = open(self.path, "r+b")  # noqa: SIM115 - closed in close()
                # Bytes after the last recorded offset were never fsynced or acknowledged.
                fh.truncate(self.position)
            fh.seek(self.position)
            return fh

        self._fh = await asyncio.to_thread(_open)

    async def write(self, data: bytes) -> None:
        if self.position + len(self._buf) + len(data) > self._cap:
            raise PayloadTooLargeError(f"the upload exceeds the limit of {self._cap} bytes")
        self._buf += data
        if len(self._buf) >= _WRITE_CHUNK_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            await asyncio.to_thread(self._write, data)
            self.position += len(data)
            self._on_bytes(len(data))

    def _write(self, data: bytes) -> None:
        check_free_space(self.path.parent, self._reserve, len(data))
        with storage_errors():
            self._fh.write(data)
            self._fh.flush()  # a full disk shows here, not later in close()

    async def close(self, *, sync: bool) -> None:
        fh, self._fh = self._fh, None
        if fh is None:
            return

        def _close() -> None:
            try:
                with storage_errors():
                    fh.flush()
                    if sync:
                        fsync_file(self.path)
            finally:
                with contextlib.suppress(OSError):  # the flush above said what went wrong
                    fh.close()

        await asyncio.to_thread(_close)

    async def pump(self, read: BodyRead, *, idle_flush_s: float | None = None) -> None:
        """Copy everything `read` yields, then flush. Constant memory whatever the size.

        With `idle_flush_s`, buffered bytes are written out whenever the sender pauses that
        long, so the offset a resuming tus client asks for is exact.
        """
        while True:
            if idle_flush_s is None:
                data = await read(_WRITE_CHUNK_BYTES)
            else:
                try:
                    async with asyncio.timeout(idle_flush_s):
                        data = await read(_WRITE_CHUNK_BYTES)
                except TimeoutError:
                    await self.flush()
                    continue
            if not data:
                break
            await self.write(data)
        await self.flush()


# Receives a whole body into the writer: the HTTP layer's part (raw body or multipart). It may
# name the file, and returns routing parameters found after the file (form fields), if any.
BodyCopier = Callable[[Upload, BodyWriter], Awaitable[Mapping[str, str] | None]]


class UploadService:
    """Receives uploads, keeps their status records, and runs bounded background imports.

    Construct it before ``IngestService.start()`` so that instances recovered from the spool
    are attributed to their upload (the importer's settlement hook counts them). Started and
    stopped by the HTTP app's lifecycle. Runs on the event loop.

    Parameters
    ----------
    cfg : UploadConfig
        The ``[upload]`` section: size caps, import slots, admission wait, tus expiry.
    state_dir : Path
        Where records (``<id>.json``) and bodies (``.part`` while receiving, ``.body``) live.
    fsync : bool
        ``storage.fsync``: whether an accepted body and its record are fsynced first.
    importer : UploadImporter
        Imports accepted bodies into the pipeline; it owns the records' dictionary.
    project_exists : callable
        The index's project lookup (an upload into an unknown project is refused).
    metrics : Metrics
        ``uploads_total``, ``upload_bytes`` and ``upload_import_seconds``.
    nifti_available : bool
        Whether ``kind=nifti`` can be converted (else 501).
    min_free_bytes : int
        ``dicom.min_free_bytes``: uploads keep this much of the data filesystem free too
        (507 otherwise), checked while the bytes arrive.
    """

    def __init__(
        self,
        cfg: UploadConfig,
        *,
        state_dir: Path,
        fsync: bool,
        importer: UploadImporter,
        project_exists: Callable[[str], Awaitable[bool]],
        metrics: Metrics,
        nifti_available: bool,
        min_free_bytes: int = 0,
    ) -> None:
        self.cfg = cfg
        self._reserve = min_free_bytes
        self.state_dir = state_dir
        self.nifti_available = nifti_available
        self._fsync = fsync
        self._importer = importer
        self._project_exists = project_exists
        self._metrics = metrics
        self.records = importer.records
        self._dirty: set[str] = set()
        self._save_lock = asyncio.Lock()
        self._tus_locks: dict[str, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(cfg.max_concurrent_imports)
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        importer.on_change = self._changed

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
        # Unfinished tus uploads expire while running, not only at the next start.
        expiry_sweep_s = min(self.cfg.tus_expiry_s / 4, _EXPIRY_SWEEP_MAX_S)
        for job in (
            self._every(_SAVE_INTERVAL_S, self._flush_dirty, "writing upload status"),
            self._every(expiry_sweep_s, self.expire_unfinished, "removing expired uploads"),
        ):
            self._background.add(asyncio.create_task(job))

    async def _recover_receiving(self, upload: Upload) -> None:
        body, part = self._body(upload.id), self._part(upload.id)
        if await asyncio.to_thread(body.exists):
            upload.state = IMPORTING  # fully received and checked; the crash hit the hand-over
            return
        expired = time.time() - upload.updated_at > self.cfg.tus_expiry_s
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
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        await self._flush_dirty()

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
                with storage_errors():
                    await asyncio.to_thread(write_atomic, path, doc, fsync=self._fsync)

    async def _flush_dirty(self) -> None:
        for upload_id in list(self._dirty):
            upload = self.records.get(upload_id)
            if upload is not None:
                await self._save(upload)
            self._dirty.discard(upload_id)

    @staticmethod
    async def _every(interval_s: float, job: Callable[[], Awaitable[object]], what: str) -> None:
        """Run `job` every `interval_s` until cancelled; a disk error is logged and retried."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await job()
            except OSError:
                logger.exception("%s failed; will retry", what)

    async def expire_unfinished(self) -> int:
        """Fail and trim every unfinished tus upload idle past ``tus_expiry_s``; their count.

        An upload whose PATCH is running right now is not idle, whatever its record says.
        """
        cutoff = time.time() - self.cfg.tus_expiry_s
        expired = [
            upload
            for upload in self._unfinished_tus()
            if upload.updated_at < cutoff and not self._patch_running(upload.id)
        ]
        for upload in expired:
            await asyncio.to_thread(remove_paths, self._part(upload.id))
            self._tus_locks.pop(upload.id, None)
            self._finish(
                upload,
                FAILED,
                f"the upload expired: no data for {self.cfg.tus_expiry_s:g} s after "
                f"{upload.bytes_received} of {upload.bytes_expected} bytes; upload it again",
            )
            await self._save(upload)
            logger.info("tus upload %s expired", upload.id)
        return len(expired)

    def _patch_running(self, upload_id: str) -> bool:
        lock = self._tus_locks.get(upload_id)
        return lock is not None and lock.locked()

    def _unfinished_tus(self) -> list[Upload]:
        return [u for u in self.records.values() if u.protocol == "tus" and u.state == RECEIVING]

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

    async def _reject(self, upload: Upload) -> None:
        await self._discard(upload)
        self._metrics.uploads_total.labels(state="rejected").inc()

    def _finish(self, upload: Upload, state: UploadState, detail: str) -> None:
        upload.state, upload.detail, upload.finished_at = state, detail, time.time()
        self._metrics.uploads_total.labels(state=state).inc()

    def get(self, upload_id: str) -> Upload:
        """The record of `upload_id`; UnknownUploadError (404) when there is none."""
        upload = self.records.get(upload_id)
        if upload is None:
            raise UnknownUploadError(f"no upload {upload_id}")
        return upload

    # -- receiving ------------------------------------------------------------------------

    def check_open(self) -> None:
        """ShuttingDownError (503) once the gateway stops taking uploads."""
        if self._closing:
            raise ShuttingDownError("the gateway is shutting down")

    async def params(self, values: Mapping[str, str]) -> UploadParams:
        """Check routing parameters; raises RejectedInputError (400), UnknownProjectError (404)
        or FeatureUnavailableError (501 for ``kind=nifti`` without the importer)."""
        unknown = set(values) - ROUTING_KEYS
        if unknown:
            raise RejectedInputError(
                f"unknown parameter(s) {', '.join(sorted(unknown))}; "
                f"use {', '.join(sorted(ROUTING_KEYS))}"
            )
        project = (values.get("project") or ADMIN_PROJECT).strip().lower()
        dataset = (values.get("dataset") or default_dataset_name()).strip().lower()
        if not is_dataset_name(dataset):
            raise RejectedInputError(f"dataset {dataset!r} is not valid: {DATASET_NAME_RULE}")
        kind = (values.get("kind") or "auto").strip().lower()
        if kind not in KINDS:
            raise RejectedInputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        extension = (values.get("extension") or "").strip().lower()
        if extension and not _EXTENSION_RE.match(extension):
            raise RejectedInputError(f"extension {extension!r} is not a file extension")
        if extension and not extension.startswith("."):
            extension = "." + extension
        if not await self._project_exists(project):
            raise UnknownProjectError(f"project {project!r} does not exist")
        if kind == "nifti" and not self.nifti_available:
            raise FeatureUnavailableError(
                "kind=nifti needs the NIfTI importer, which is not installed in this gateway; "
                "upload DICOM, or use kind=files to keep the NIfTI files as they are"
            )
        filename = safe_filename(values.get("filename") or "")
        return UploadParams(project, dataset, kind, extension, filename)

    def _new_upload(self, params: UploadParams, protocol: str, expected: int | None) -> Upload:
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

    def _writer(self, upload: Upload, *, cap: int) -> BodyWriter:
        metric = self._metrics.upload_bytes

        def counted(n: int) -> None:
            upload.bytes_received += n
            metric.inc(n)

        return BodyWriter(
            self._part(upload.id), offset=upload.bytes_received, cap=cap, on_bytes=counted
        )

    async def receive(
        self, params: UploadParams, copy_body: BodyCopier, *, expected: int | None
    ) -> Upload:
        """Receive a whole upload in one request, check it, and hand it to an import.

        `copy_body` streams the body into the writer it is given and may return routing
        parameters that came after the file (they replace `params`' routing; the caller merges
        its own precedence in). Raises PayloadTooLargeError (413) as soon as the cap is
        passed, UnsafeArchiveError/InvalidDicomError (400) and UnsupportedMediaError (415)
        after it; RejectedInputError when the body was cut off. Nothing of a refused upload
        stays behind.
        """
        self.check_open()
        cap = self.cfg.max_upload_bytes
        if expected is not None and expected > cap:
            raise PayloadTooLargeError(f"the upload exceeds the limit of {cap} bytes")
        await asyncio.to_thread(check_free_space, self.state_dir, self._reserve, expected or 0)
        upload = self._new_upload(params, "post", expected)
        writer = self._writer(upload, cap=cap)
        try:
            await self._save(upload)
            await writer.open()
            routing = await copy_body(upload, writer)
            if routing:
                routed = await self.params({**routing, "filename": upload.filename})
                upload.project, upload.dataset = routed.project, routed.dataset
                upload.kind, upload.extension = routed.kind, routed.extension
            await writer.close(sync=self._fsync)
            await self._accept(upload)
        except BaseException as exc:
            await writer.close(sync=False)
            await self._reject(upload)
            if isinstance(exc, ConnectionError):
                raise RejectedInputError(f"the upload was cut off: {exc}") from exc
            raise
        return upload

    async def _accept(self, upload: Upload) -> None:
        """The last byte arrived: check the body, then hand it to a background import.

        Raises RejectedInputError (the caller discards the upload) for unsafe or unusable
        content, before anything is stored.
        """
        part, body = self._part(upload.id), self._body(upload.id)
        container, members = await asyncio.to_thread(
            inspect_body, part, upload.filename, upload.kind, upload.extension, self.cfg
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
                self._finish(upload, state, summary(upload))
            self._metrics.upload_import_seconds.observe(time.monotonic() - started)
            await asyncio.to_thread(remove_paths, self._body(upload.id))
            await self._save(upload)
            logger.info("upload %s %s: %s", upload.id, upload.state, upload.detail)

    # -- tus 1.0.0: core, creation, termination -------------------------------------------

    def tus_upload(self, upload_id: str) -> Upload:
        """The tus upload `upload_id`; UnknownUploadError (404) for anything else."""
        upload = self.records.get(upload_id)
        if upload is None or upload.protocol != "tus":
            raise UnknownUploadError("no such tus upload")
        return upload

    async def create_tus(self, params: UploadParams, length: int) -> Upload:
        """tus creation: an empty partial body and a durable record for `length` bytes."""
        self.check_open()
        if length == 0:
            raise RejectedInputError("Upload-Length is 0: the upload is empty")
        if length > self.cfg.max_upload_bytes:
            raise PayloadTooLargeError(
                f"Upload-Length {length} exceeds the limit of {self.cfg.max_upload_bytes}"
            )
        await asyncio.to_thread(check_free_space, self.state_dir, self._reserve, length)
        unfinished = self._unfinished_tus()
        if len(unfinished) >= self.cfg.tus_max_unfinished:
            raise UploadQuotaError(
                f"{len(unfinished)} resumable uploads are unfinished (the limit is "
                f"{self.cfg.tus_max_unfinished}); finish or delete one, or wait until they expire"
            )
        declared = sum(u.bytes_expected or 0 for u in unfinished)
        if declared + length > self.cfg.tus_max_unfinished_bytes:
            raise UploadQuotaError(
                f"unfinished resumable uploads already declare {declared} bytes; {length} more "
                f"would pass the limit of {self.cfg.tus_max_unfinished_bytes}"
            )
        upload = self._new_upload(params, "tus", length)
        try:
            await asyncio.to_thread(self._part(upload.id).touch)
            await self._save(upload)
        except BaseException:
            await self._discard(upload)
            raise
        return upload

    def tus_offset(self, upload: Upload) -> int:
        """tus offset discovery; UploadFailedError (410) when the upload failed."""
        if upload.state == FAILED:
            raise UploadFailedError(f"the upload failed: {upload.detail}")
        return upload.bytes_received

    async def append_tus(self, upload: Upload, offset: int, read: BodyRead) -> None:
        """tus append: the bytes `read` yields, at `offset`, durable before this returns.

        A body cut off keeps what arrived (the client resumes from the offset). The last byte
        triggers the same checks and import as :meth:`receive`. Raises UploadOffsetError (409)
        when `offset` is not the current offset, UploadConflictError (409) while another
        append of the same upload runs past ``_TUS_LOCK_WAIT_S``.
        """
        self.check_open()
        lock = self._tus_locks.setdefault(upload.id, asyncio.Lock())
        try:
            async with asyncio.timeout(_TUS_LOCK_WAIT_S):
                await lock.acquire()
        except TimeoutError:
            raise UploadConflictError("another PATCH of this upload is in progress") from None
        try:
            if upload.state == FAILED:
                raise UploadFailedError(f"the upload failed: {upload.detail}")
            if upload.state != RECEIVING or offset != upload.bytes_received:
                raise UploadOffsetError(
                    f"Upload-Offset is {offset}, the upload is at {upload.bytes_received}",
                    offset=upload.bytes_received,
                )
            assert upload.bytes_expected is not None
            writer = self._writer(upload, cap=upload.bytes_expected)
            await writer.open()
            try:
                await writer.pump(read, idle_flush_s=_TUS_IDLE_FLUSH_S)
            except ConnectionError:
                logger.info("tus upload %s cut off at %d bytes", upload.id, writer.position)
            finally:
                try:
                    await writer.flush()
                finally:
                    await writer.close(sync=self._fsync)
                    # The offset is durable only once saved after the fsync; a resumed PATCH
                    # truncates whatever came after it.
                    await self._save(upload)
            if upload.bytes_received == upload.bytes_expected:
                try:
                    await self._accept(upload)
                except BaseException:
                    await self._reject(upload)
                    raise
        finally:
            lock.release()

    async def terminate_tus(self, upload: Upload) -> None:
        """tus termination: drop an unfinished (or finished) upload and its bytes."""
        if upload.state == IMPORTING:
            raise UploadConflictError("the upload is being imported; wait until it finishes")
        await self._discard(upload)


def summary(upload: Upload) -> str:
    """One line on what an import did, for the record's ``detail``."""
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


__all__ = [
    "ROUTING_KEYS",
    "BodyCopier",
    "BodyRead",
    "BodyWriter",
    "UploadParams",
    "UploadService",
    "check_free_space",
    "safe_filename",
    "storage_errors",
    "summary",
]
