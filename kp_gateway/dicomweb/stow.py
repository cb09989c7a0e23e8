"""STOW-RS (PS3.18 §10.5): the parts of one request, each through the durable path C-STORE
takes, and the response dataset.

Each part is streamed into the spool's scratch folder (flat memory: ``BodyWriter``), checked
whole (:func:`kp_gateway.dicom.part10.check_instance`, as C-STORE and uploads are), fsynced,
committed into ``spool/incoming/stow-<id>/`` and admitted to the pipeline before the next part
is read. The response is written after the last part, so every instance it lists as stored
survives a crash from then on. No aiohttp here: the HTTP layer hands each part over as a
``read(n)`` coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from kp_gateway.dicom.part10 import InstanceUids, check_instance, fd_reader, read_file_meta
from kp_gateway.errors import InvalidDicomError, PipelineFull, ShuttingDownError
from kp_gateway.model import IngestItem, Routing
from kp_gateway.pipeline.ingest import Intake
from kp_gateway.pipeline.spool import Spool, unique_name
from kp_gateway.upload.service import BodyRead, BodyWriter

# FailureReason values (PS3.18 table 10.5.3-3 and PS3.4 annex B).
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_STUDY_MISMATCH = 0xC409  # the instance belongs to another study than the path names
DICOM_PART = "application/dicom"

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_CLASS = "00081150"
REFERENCED_SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"
RETRIEVE_URL = "00081190"


@dataclass(frozen=True, slots=True)
class PartResult:
    """What became of one part: stored (``failure`` None) or refused with a FailureReason."""

    uids: InstanceUids | None
    failure: int | None = None
    detail: str = ""


@dataclass
class StowLimits:
    """Bounds of one part: its size and the free space the disk keeps."""

    max_instance_bytes: int
    reserve_bytes: int
    admission_wait_s: float


def _check_part(path: Path) -> InstanceUids:
    """Blocking. The UIDs of a whole Part-10 instance, or InvalidDicomError."""
    try:
        with open(path, "rb") as fh:
            read = fd_reader(fh.fileno())
            dataset_start, transfer_syntax = read_file_meta(read)
            return check_instance(
                read, os.fstat(fh.fileno()).st_size, dataset_start, transfer_syntax
            )
    except OSError as exc:
        raise InvalidDicomError(f"cannot read the part back ({exc})") from exc


@dataclass
class StowRequest:
    """One STOW-RS request on its way in. Loop only."""

    receiver: StowReceiver
    routing: Routing
    study_uid: str | None
    results: list[PartResult] = field(default_factory=list)
    _folder: Path | None = None

    async def store(self, content_type: str, read: BodyRead) -> PartResult:
        """Receive one part; the result is appended to :attr:`results` and returned.

        Raises
        ------
        PayloadTooLargeError, InsufficientStorageError
            The part is over ``dicom.max_dataset_bytes`` or the disk is at its reserve: the
            request ends there (413 / 507); parts stored before stay stored.
        """
        result = await self._store(content_type.split(";")[0].strip().lower(), read)
        self.results.append(result)
        return result

    async def _store(self, media_type: str, read: BodyRead) -> PartResult:
        if media_type != DICOM_PART:
            while await read(1 << 16):
                pass  # the part is not kept; read past it to the next
            return PartResult(None, FAILURE_CANNOT_UNDERSTAND, f"a {media_type!r} part")
        limits = self.receiver.limits
        spool = self.receiver.spool
        tmp = spool.tmp / f"{unique_name()}.part"
        writer = BodyWriter(
            tmp, offset=0, cap=limits.max_instance_bytes, on_bytes=_ignore,
            reserve=limits.reserve_bytes,
        )  # fmt: skip
        committed: Path | None = None
        try:
            await writer.open()
            try:
                await writer.pump(read)
            finally:
                await writer.close(sync=spool.fsync)
            try:
                uids = await asyncio.to_thread(_check_part, tmp)
            except InvalidDicomError as exc:
                return PartResult(None, FAILURE_CANNOT_UNDERSTAND, str(exc))
            if self.study_uid is not None and uids.study_instance_uid != self.study_uid:
                return PartResult(
                    uids, FAILURE_STUDY_MISMATCH,
                    f"the instance is of study {uids.study_instance_uid}",
                )  # fmt: skip
            if self._folder is None:
                self._folder = await asyncio.to_thread(spool.open_source, self.routing)
            committed = await asyncio.to_thread(
                spool.commit_file, tmp, self._folder, already_synced=True
            )
            item = IngestItem(committed, self.routing, time.time())
            try:
                await self.receiver.intake.submit(item, timeout_s=limits.admission_wait_s)
            except (PipelineFull, ShuttingDownError) as exc:
                await asyncio.to_thread(spool.discard, committed)  # not acknowledged
                return PartResult(uids, FAILURE_OUT_OF_RESOURCES, str(exc))
            committed = None
            return PartResult(uids)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            if committed is not None:
                await asyncio.to_thread(spool.discard, committed)

    async def close(self) -> None:
        """The request is over: its series may complete once idle."""
        if self._folder is not None:
            self.receiver.intake.source_closed(self.routing.source_id)


def _ignore(_: int) -> None:
    pass


class StowReceiver:
    """Receives STOW-RS requests into the spool and the pipeline. Loop only."""

    def __init__(self, *, spool: Spool, intake: Intake, limits: StowLimits) -> None:
        self.spool = spool
        self.intake = intake
        self.limits = limits

    @contextlib.asynccontextmanager
    async def request(
        self, project: str, dataset: str, study_uid: str | None
    ) -> AsyncIterator[StowRequest]:
        routing = Routing(project, dataset, source_id=f"stow-{uuid.uuid4().hex}")
        request = StowRequest(self, routing, study_uid)
        try:
            yield request
        finally:
            await request.close()


def response_status(results: list[PartResult]) -> int:
    """200 when every part was stored, 409 when none was, 202 in between (PS3.18 10.5.3)."""
    failed = sum(1 for r in results if r.failure is not None)
    if not failed:
        return 200
    return 409 if failed == len(results) else 202


def response_json(results: list[PartResult], root: str, study_uid: str | None) -> str:
    """The Store Instances Response dataset (PS3.18 table 10.5.3-2) as DICOM JSON."""
    stored, failed = [], []
    for r in results:
        item: dict[str, object] = {}
        if r.uids is not None:
            item[REFERENCED_SOP_CLASS] = {"vr": "UI", "Value": [r.uids.sop_class_uid]}
            item[REFERENCED_SOP_INSTANCE] = {"vr": "UI", "Value": [r.uids.sop_instance_uid]}
        if r.failure is None and r.uids is not None:
            url = (
                f"{root}/studies/{r.uids.study_instance_uid}/series/"
                f"{r.uids.series_instance_uid}/instances/{r.uids.sop_instance_uid}"
            )
            item[RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
            stored.append(item)
        else:
            item[FAILURE_REASON] = {"vr": "US", "Value": [r.failure]}
            failed.append(item)
    body: dict[str, object] = {}
    studies = {r.uids.study_instance_uid for r in results if r.uids and r.failure is None}
    study = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
    if study is not None:
        body[RETRIEVE_URL] = {"vr": "UR", "Value": [f"{root}/studies/{study}"]}
    if stored:
        body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": stored}
    if failed:
        body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    return json.dumps(body, separators=(",", ":"))
