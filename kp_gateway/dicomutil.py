"""The minimal header read of a stored instance (UID checks are in :mod:`kp_gateway.uids`).

Nothing here touches asyncio, backends or the network.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError

from kp_gateway.errors import InvalidDicomError
from kp_gateway.model import InstanceRecord
from kp_gateway.uids import storage_key

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
        from kp_gateway.metadata import build_series_document

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
    )
