"""The import half of HTTP uploads: member spooling and the importer that feeds a received
upload into the ingest pipeline. The record is in :mod:`~kp_gateway.upload.record`, content
sniffing in :mod:`~kp_gateway.upload.sniff`, the durable-file helpers in :mod:`kp_gateway.durable`.

Functions documented as blocking run on a worker thread via ``asyncio.to_thread``; the
:class:`UploadImporter` coroutines run on the event loop. :mod:`kp_gateway.upload.service`
receives and checks the body and calls :meth:`UploadImporter.run`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from kp_gateway.backends.base import StorageBackend
from kp_gateway.durable import link_or_copy, remove_paths
from kp_gateway.errors import (
    ConversionError,
    InvalidDicomError,
    RejectedInputError,
    ShuttingDownError,
)
from kp_gateway.metrics import Metrics
from kp_gateway.model import IngestItem, Routing
from kp_gateway.pipeline.ingest import Intake
from kp_gateway.pipeline.spool import Spool
from kp_gateway.upload.archive import ArchiveLimits, ArchiveMember, list_members, open_member
from kp_gateway.upload.record import MAX_LISTED_FILES, Upload
from kp_gateway.upload.sniff import (
    HEAD_BYTES,
    MemberKind,
    check_complete_instance,
    is_dicomdir,
    read_head,
    sniff,
    to_part10,
)

logger = logging.getLogger(__name__)

_COPY_CHUNK_BYTES = 1 << 20
# Zip members extracted and admitted concurrently by one import (bounded: each holds one
# extracted member in the spool and one worker thread).
IMPORT_WINDOW = 4


# -- blocking helpers (worker threads) ----------------------------------------------------


def spool_member(
    archive: Path, member: ArchiveMember, limits: ArchiveLimits, tmp_dir: Path
) -> tuple[Path, MemberKind]:
    """Blocking. Extract one member to a fresh ``tmp_dir/<uuid>.part`` (not yet fsynced).

    Raises as :func:`kp_gateway.upload.archive.open_member`; the partial file is removed on error.
    """
    dst = tmp_dir / f"{uuid.uuid4().hex}.part"
    head = b""
    try:
        with open_member(archive, member, limits) as src, open(dst, "wb") as out:
            while chunk := src.read(_COPY_CHUNK_BYTES):
                if len(head) < HEAD_BYTES:
                    head += chunk[: HEAD_BYTES - len(head)]
                out.write(chunk)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return dst, sniff(head, member.name)


def has_spooled_files(folders: list[Path]) -> bool:
    """Blocking. Whether any of `folders` still holds acknowledged, unindexed instances."""
    return any(any(f.glob("*.dcm")) for f in folders if f.is_dir())


# -- the importer (event loop) ------------------------------------------------------------


def _no_progress(cases_total: int, cases_done: int, cases_failed: int) -> None:
    return None


def _no_warning(message: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class NiftiJob:
    """What the NIfTI importer gets: an extracted tree, its routing, and how to emit DICOM.

    ``emit(path, name)`` spools one Part-10 file the importer wrote into ``tmp_dir`` (same
    filesystem as the spool; ownership passes to the gateway) and admits it to the pipeline,
    waiting while the pipeline is saturated. `name` attributes per-file errors.
    ``progress(cases_total, cases_done, cases_failed)`` reports absolute case counts and
    ``warn(message)`` a conversion warning, both into the upload status. ``cases_done`` and
    ``cases_failed`` are what an interrupted earlier run of this import finished: the cases
    before ``cases_done + cases_failed`` in plan order are skipped. All callables run on the
    loop.
    """

    tree: Path
    routing: Routing
    tmp_dir: Path
    emit: Callable[[Path, str], Awaitable[None]]
    progress: Callable[[int, int, int], None] = _no_progress
    warn: Callable[[str], None] = _no_warning
    cases_done: int = 0
    cases_failed: int = 0


# Returns per-file errors as (relative path, human-readable reason); runs on the event loop.
NiftiImporter = Callable[[NiftiJob], Awaitable[list[tuple[str, str]]]]


@dataclass(slots=True)
class _Progress:
    """In-memory bookkeeping of one running import (the record holds the durable counters)."""

    upload: Upload
    submitted: int = 0
    settled: int = 0
    names: dict[str, str] = field(default_factory=dict)  # spool path -> member name
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class UploadImporter:
    """Feeds received uploads into the pipeline; one :meth:`run` per upload, on the loop.

    Parameters
    ----------
    intake : Intake
        The pipeline's admission; its settlement hook counts instances to their uploads.
    spool : Spool
        Where members are extracted (``tmp/``) and committed (``incoming/``) before admission.
    storage : StorageBackend
        Where non-DICOM files are kept (``uploads/<id>/<name>``).
    metrics : Metrics
        ``instances_total{source="upload"}``.
    limits : ArchiveLimits
        Caps re-checked while extracting each member.
    admission_wait_s : float
        How long one ``submit`` waits for pipeline space before it is retried (backpressure:
        the import slows down, it never drops an instance).
    nifti_importer : NiftiImporter, optional
        Converts NIfTI trees; ``None`` keeps NIfTI members as plain files under ``kind=auto``.

    ``on_change`` is called with an upload whenever its counters moved; the upload service
    sets it to persist the record lazily.
    """

    def __init__(
        self,
        *,
        intake: Intake,
        spool: Spool,
        storage: StorageBackend,
        metrics: Metrics,
        limits: ArchiveLimits,
        admission_wait_s: float,
        nifti_importer: NiftiImporter | None,
    ) -> None:
        self._intake = intake
        self.spool = spool
        self.storage = storage
        self._metrics = metrics
        self.limits = limits
        self._admission_wait_s = admission_wait_s
        self.nifti = nifti_importer
        self.on_change: Callable[[Upload], None] = _ignore_change
        self._running: dict[str, _Progress] = {}
        intake.add_item_settled_hook(self._item_settled)
        # Settlements of items recovered from the spool before their record was loaded.
        self._early: dict[str, list[tuple[IngestItem, BaseException | None]]] = {}
        self.records: dict[str, Upload] = {}

    # -- settlement (pipeline hook, loop) -------------------------------------------------

    @staticmethod
    def upload_id_of(source_id: str) -> str | None:
        """The upload id of a spool source ``upload-<id>`` or ``upload-<id>.<resume>``."""
        if not source_id.startswith("upload-"):
            return None
        return source_id[len("upload-") :].split(".", 1)[0]

    def _item_settled(self, item: IngestItem, exc: BaseException | None) -> None:
        upload_id = self.upload_id_of(item.routing.source_id)
        if upload_id is None:
            return
        upload = self.records.get(upload_id)
        if upload is None:
            self._early.setdefault(upload_id, []).append((item, exc))
            return
        progress = self._running.get(upload_id)
        name = progress.names.pop(str(item.spool_path), "") if progress else ""
        self.apply_settlement(upload, item, exc, name)
        if progress is not None:
            progress.settled += 1
            if progress.settled >= progress.submitted:
                progress.idle.set()

    def apply_settlement(
        self, upload: Upload, item: IngestItem, exc: BaseException | None, name: str = ""
    ) -> None:
        """Count one settled item of `upload`. Loop only."""
        if exc is None:
            upload.instances_imported += 1
            if item.record is not None:
                upload.add_series(item.record.series_instance_uid)
        else:
            upload.instances_failed += 1
            upload.add_error(name or f"(spooled as {item.spool_path.name})", exc)
        self.on_change(upload)

    def adopt(self, upload: Upload) -> None:
        """Register a loaded record and apply settlements that arrived before it. Loop only."""
        self.records[upload.id] = upload
        for item, exc in self._early.pop(upload.id, []):
            self.apply_settlement(upload, item, exc)

    # -- running one import ---------------------------------------------------------------

    async def run(self, upload: Upload, body: Path, work_dir: Path) -> None:
        """Import a fully received upload. Runs on the loop; blocking work goes to threads.

        Per-member problems become per-file errors in the record. Raises RejectedInputError
        when the upload as a whole cannot be imported, ShuttingDownError when the pipeline
        closes (the record stays ``importing`` and resumes at the next start).
        """
        spool = self.spool
        suffix = f".{upload.resumes}" if upload.resumes else ""
        routing = Routing(upload.project, upload.dataset, source_id=f"upload-{upload.id}{suffix}")
        progress = _Progress(upload)
        progress.idle.set()
        self._running[upload.id] = progress
        folder: Path | None = None
        if upload.kind != "files":
            folder = await asyncio.to_thread(spool.open_source, routing)
        try:
            ctx = _Run(self, upload, routing, folder, progress, body, work_dir)
            if upload.container == "zip":
                await ctx.import_zip()
            else:
                await ctx.import_single()
            # The tree survives a stop, so a resumed import converts it even when every
            # member was extracted before the stop.
            if self.nifti is not None and (
                ctx.nifti_names or await asyncio.to_thread(ctx.nifti_dir.is_dir)
            ):
                await ctx.import_nifti()
            await progress.idle.wait()
            if upload.resumes:
                await self._wait_for_earlier_sources(upload)
        except (asyncio.CancelledError, ShuttingDownError):
            raise  # the extracted NIfTI tree stays for the resumed import
        except BaseException:
            await asyncio.to_thread(remove_paths, work_dir / f"{upload.id}.nifti")
            raise
        finally:
            self._running.pop(upload.id, None)
            self._intake.source_closed(routing.source_id)
            if folder is not None:
                await asyncio.to_thread(spool.remove_source_if_empty, routing.source_id)

    async def _wait_for_earlier_sources(self, upload: Upload) -> None:
        # Instances spooled before the crash are re-queued by IngestService.recover; the
        # upload is done only when they have settled too.
        incoming = self.spool.incoming
        folders = [incoming / f"upload-{upload.id}"]
        folders += [incoming / f"upload-{upload.id}.{n}" for n in range(1, upload.resumes)]
        while await asyncio.to_thread(has_spooled_files, folders):
            await asyncio.sleep(0.25)

    async def submit(self, progress: _Progress, path: Path, routing: Routing, name: str) -> None:
        """Admit one spooled instance, waiting (never dropping) while the pipeline is full."""
        item = IngestItem(path, routing, time.time())
        progress.names[str(path)] = name
        progress.submitted += 1
        progress.idle.clear()
        await self._intake.submit(item, timeout_s=self._admission_wait_s, wait_forever=True)
        progress.upload.instances_submitted += 1
        self._metrics.instances_total.labels(source="upload").inc()


class _Run:
    """The state of one :meth:`UploadImporter.run` call. Loop only."""

    def __init__(
        self,
        importer: UploadImporter,
        upload: Upload,
        routing: Routing,
        folder: Path | None,
        progress: _Progress,
        body: Path,
        work_dir: Path,
    ) -> None:
        self.importer = importer
        self.spool = importer.spool
        self.limits = importer.limits
        self.upload = upload
        self.routing = routing
        self.folder = folder
        self.progress = progress
        self.body = body
        self.nifti_dir = work_dir / f"{upload.id}.nifti"
        self.nifti_names: list[str] = []

    def _dicom_allowed(self, name: str) -> bool:
        ext = self.upload.extension.lower()
        return self.upload.kind in ("auto", "dicom") and (not ext or name.lower().endswith(ext))

    async def import_zip(self) -> None:
        upload = self.upload
        members = await asyncio.to_thread(list_members, self.body, self.limits)
        upload.members_total = len(members)
        # A few members in flight at once: one member's extraction overlaps another's fsync
        # and admission. The checkpoint only moves past a window once all of it is admitted.
        for start in range(upload.members_done, len(members), IMPORT_WINDOW):
            window = members[start : start + IMPORT_WINDOW]
            await asyncio.gather(*(self._import_member(member) for member in window))
            upload.members_done = start + len(window)
            self.importer.on_change(upload)

    async def _import_member(self, member: ArchiveMember) -> None:
        upload = self.upload
        if upload.kind == "dicom" and not self._dicom_allowed(member.name):
            upload.files_skipped += 1
            return
        upload.files_seen += 1
        try:
            path, kind = await asyncio.to_thread(
                spool_member, self.body, member, self.limits, self.spool.tmp
            )
        except RejectedInputError as exc:
            upload.add_error(member.name, exc)
        else:
            await self._dispatch(path, kind, member.name)

    async def import_single(self) -> None:
        upload = self.upload
        upload.members_total = 1
        if upload.members_done:
            return
        upload.files_seen = 1
        head = await asyncio.to_thread(read_head, self.body)
        path = self.spool.tmp / f"{uuid.uuid4().hex}.part"
        # fsync=False: the spool commit fsyncs a DICOM file; nothing else is acknowledged from
        # this copy (storage writes its own, NIfTI is converted).
        await asyncio.to_thread(link_or_copy, self.body, path, fsync=False)
        await self._dispatch(path, sniff(head, upload.filename), upload.filename)
        upload.members_done = 1
        self.importer.on_change(upload)

    async def _dispatch(self, path: Path, kind: MemberKind, name: str) -> None:
        """Route one extracted file (a spool tmp file we own) to the pipeline or storage."""
        upload = self.upload
        try:
            is_dicom = kind in (MemberKind.DICOM, MemberKind.RAW_DICOM)
            if kind == MemberKind.DICOM and await asyncio.to_thread(is_dicomdir, path):
                upload.add_skipped(name, "a DICOMDIR: the index of the other files, not an image")
                return
            if is_dicom and self._dicom_allowed(name):
                if kind == MemberKind.RAW_DICOM:
                    try:
                        await asyncio.to_thread(to_part10, path)
                    except InvalidDicomError as exc:
                        if upload.kind == "dicom":
                            raise
                        logger.debug("%s looked like DICOM but is not: %s", name, exc)
                        kind = MemberKind.OTHER
                if kind != MemberKind.OTHER:
                    # A file cut off or with a DICOM header over garbage is refused here, per
                    # file, rather than acknowledged and found broken by the store stage.
                    await asyncio.to_thread(check_complete_instance, path)
                    assert self.folder is not None
                    spooled = await asyncio.to_thread(self.spool.commit_file, path, self.folder)
                    await self.importer.submit(self.progress, spooled, self.routing, name)
                    return
            if upload.kind == "dicom":
                raise InvalidDicomError("not a DICOM file (no DICM header, no dataset)")
            if (
                upload.kind in ("auto", "nifti")
                and kind == MemberKind.NIFTI
                and self.importer.nifti
            ):
                await asyncio.to_thread(_move_into, path, self.nifti_dir / name)
                self.nifti_names.append(name)
                return
            if upload.kind == "nifti":
                raise RejectedInputError("not part of a NIfTI tree (.nii, .nii.gz or its JSON)")
            await self._store_file(path, name)
        except RejectedInputError as exc:
            upload.add_error(name, exc)
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)

    async def _store_file(self, path: Path, name: str) -> None:
        upload = self.upload
        size = await self.importer.storage.put_file(f"uploads/{upload.id}/{name}", path)
        upload.files_stored += 1
        if len(upload.files) < MAX_LISTED_FILES:
            upload.files.append({"path": name, "size": size})

    async def import_nifti(self) -> None:
        """Convert the extracted tree. The tree is removed when the import ends, except
        when the gateway stops (cancelled or shutting down): the resumed import uses it.

        Raises ConversionError under ``kind=nifti`` when no case could even be planned.
        """
        importer = self.importer.nifti
        assert importer is not None
        upload = self.upload

        async def emit(path: Path, name: str) -> None:
            assert self.folder is not None
            spooled = await asyncio.to_thread(self.spool.commit_file, path, self.folder)
            await self.importer.submit(self.progress, spooled, self.routing, name)

        def progress(cases_total: int, cases_done: int, cases_failed: int) -> None:
            upload.cases_total = cases_total
            upload.cases_done = cases_done
            upload.cases_failed = cases_failed
            self.importer.on_change(upload)

        def warn(message: str) -> None:
            upload.add_warning(message)
            self.importer.on_change(upload)

        job = NiftiJob(
            self.nifti_dir,
            self.routing,
            self.spool.tmp,
            emit,
            progress=progress,
            warn=warn,
            cases_done=upload.cases_done,
            cases_failed=upload.cases_failed,
        )
        try:
            errors = await importer(job)
        except (asyncio.CancelledError, ShuttingDownError):
            raise
        except BaseException:
            await asyncio.to_thread(remove_paths, self.nifti_dir)
            raise
        await asyncio.to_thread(remove_paths, self.nifti_dir)
        for name, reason in errors:
            upload.add_error(name, reason, "conversion")
        if errors and upload.kind == "nifti" and upload.cases_total == 0:
            # Nothing was even planned (invalid JSON, no layout): the upload as a whole failed.
            raise ConversionError(errors[0][1])


def _ignore_change(upload: Upload) -> None:
    """The default ``on_change``: nothing persists the record."""


def _move_into(src: Path, dst: Path) -> None:
    """Blocking. Move `src` to `dst`, creating parent folders."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


__all__ = ["NiftiImporter", "NiftiJob", "UploadImporter"]
