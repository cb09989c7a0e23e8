"""Entry points that run in the process pool, away from the receiving interpreter, and the
header read they run (:func:`read_instance`, the store stage's parse).

One busy Python thread beside pynetdicom's receive loop cuts its rate several-fold (the GIL),
so header parsing and metadata extraction run here. Functions are module-level so they pickle.
Nothing here touches asyncio, backends or the network.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
from collections.abc import MutableMapping
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError

from kp_gateway.dicomweb.attributes import level_attributes_json
from kp_gateway.errors import GatewayError, InvalidDicomError
from kp_gateway.model import InstanceRecord
from kp_gateway.uids import storage_key

logger = logging.getLogger(__name__)

# Tags the header read needs; reading stops before the pixel data.
_HEADER_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "InstanceNumber",
    "NumberOfFrames",
    "PatientID",
    "SeriesDescription",
    "SeriesDate",
)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int_or_none(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def read_instance(
    path: str | os.PathLike[str],
    *,
    project: str,
    dataset: str,
    documented_series: MutableMapping[tuple[str, str, str], None] | None,
    site_timezone: str = "UTC",
    arrived_at: float | None = None,
) -> InstanceRecord:
    """Read the header of one stored Part-10 file into an :class:`InstanceRecord`.

    Blocking and CPU-bound; call in a worker process.

    `documented_series` remembers which (series, project, dataset) already got a metadata
    document from this process; ``None`` means never build one.

    Raises
    ------
    InvalidDicomError
        The file is not decodable DICOM or lacks the UIDs that place it.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        sop_class_uid = _text(ds, "SOPClassUID") or _text(ds.file_meta, "MediaStorageSOPClassUID")
        sop_instance_uid = _text(ds, "SOPInstanceUID") or _text(
            ds.file_meta, "MediaStorageSOPInstanceUID"
        )
        study = _text(ds, "StudyInstanceUID")
        series = _text(ds, "SeriesInstanceUID")
        transfer_syntax = _text(ds.file_meta, "TransferSyntaxUID")
    except (PydicomInvalidDicomError, ValueError, TypeError, EOFError, OSError, KeyError) as exc:
        raise InvalidDicomError(f"cannot decode DICOM header: {exc}") from exc
    if not (sop_instance_uid and study and series):
        raise InvalidDicomError(
            "missing StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID in the dataset"
        )
    key = storage_key(study, series, sop_instance_uid)
    document: dict[str, Any] | None = None
    # The series document (about a millisecond of pure Python) is built once per series and
    # routing per worker process; the index merges it into what it already holds.
    series_key = (series, project, dataset)
    if documented_series is not None and series_key not in documented_series:
        documented_series[series_key] = None
        from kp_gateway.kaapana.document import build_series_document

        when = datetime.fromtimestamp(arrived_at, UTC) if arrived_at else datetime.now(UTC)
        document = build_series_document(
            ds, project=project, dataset=dataset, arrived_at=when, site_timezone=site_timezone
        )
    return InstanceRecord(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid=transfer_syntax,
        modality=_text(ds, "Modality"),
        instance_number=_int_or_none(ds, "InstanceNumber"),
        number_of_frames=_int_or_none(ds, "NumberOfFrames"),
        patient_id=_text(ds, "PatientID"),
        series_description=_text(ds, "SeriesDescription"),
        series_date=_text(ds, "SeriesDate"),
        size_bytes=Path(path).stat().st_size,
        storage_key=key,
        document=document,
        dicomweb_json=level_attributes_json(ds),
    )


# (series, project, dataset) combinations remembered: a few hundred thousand instances' worth
# of series at a few MB of memory per process.
RECENT_SERIES_MAX = 20_000


class RecentSeries(collections.OrderedDict[tuple[str, str, str], None]):
    """A bounded set of recently seen (series, project, dataset) keys (order = recency).

    Used by each worker process for the series it built a document for, and by the ingest
    service for the routing records it stored.
    """

    def __setitem__(self, key: tuple[str, str, str], value: None) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > RECENT_SERIES_MAX:
            self.popitem(last=False)


_documented = RecentSeries()


def inspect_instance(
    path: str, project: str, dataset: str, site_timezone: str, arrived_at: float
) -> InstanceRecord:
    """Read one spooled instance's header, with the series document on first sight.

    Runs in a worker process.
    """
    return read_instance(
        path,
        project=project,
        dataset=dataset,
        documented_series=_documented,
        site_timezone=site_timezone,
        arrived_at=arrived_at,
    )


def inspect_instances(
    jobs: list[tuple[str, str, str, str, float]],
) -> list[InstanceRecord | GatewayError]:
    """:func:`inspect_instance` for a batch: one inter-process round trip for many files.

    Runs in a worker process. A file that fails gives its error in its place; the others
    are unaffected.
    """
    results: list[InstanceRecord | GatewayError] = []
    for job in jobs:
        try:
            results.append(inspect_instance(*job))
        except GatewayError as exc:
            results.append(exc)
    return results


def worker_pid() -> int:
    """Runs in a worker process; answers once its imports are done (start-up warm-up)."""
    return os.getpid()


def _set_nice(increment: int) -> None:
    """Pool initializer; runs in each new worker process."""
    with contextlib.suppress(OSError):
        os.nice(increment)


def make_process_pool(workers: int, *, nice: int = 0) -> ProcessPoolExecutor:
    """A bounded pool of spawned worker processes. Blocking; call at start-up.

    spawn, not fork or forkserver: workers never inherit the SCP's threads or locks, and no
    socket is needed in tempfile's directory (which the SCP points at its spool). `nice` > 0
    lowers the workers' priority (background rendering must not slow the receive path).
    """
    context = multiprocessing.get_context("spawn")
    if nice:
        return ProcessPoolExecutor(workers, context, initializer=_set_nice, initargs=(nice,))
    return ProcessPoolExecutor(workers, context)
