"""Small pure DICOM helpers: UID checks, storage keys and the minimal header read.

Nothing here touches asyncio, backends or the network.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError

from kp_gateway.errors import InvalidDicomError
from kp_gateway.model import InstanceRecord

# PS3.5 9.1 allows digits and dots only. Leading zeros in a component are tolerated: real
# modalities send them, and they cannot make a path unsafe.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

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


def is_valid_uid(uid: str) -> bool:
    """Return True when `uid` is digits and dots, at most 64 characters (PS3.5 9.1)."""
    return 0 < len(uid) <= 64 and _UID_RE.match(uid) is not None


def storage_key(study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> str:
    """Return the object key ``dicom/<study>/<series>/<sop>.dcm`` (CONTRACT section 7).

    Raises
    ------
    InvalidDicomError
        When a UID is not a valid UI value; a UID from the network never becomes a path unchecked.
    """
    for name, uid in (
        ("StudyInstanceUID", study_instance_uid),
        ("SeriesInstanceUID", series_instance_uid),
        ("SOPInstanceUID", sop_instance_uid),
    ):
        if not is_valid_uid(uid):
            raise InvalidDicomError(f"{name} {uid!r} is not a valid UID")
    return f"dicom/{study_instance_uid}/{series_instance_uid}/{sop_instance_uid}.dcm"


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


_DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"


def plausible_dataset_start(head: bytes, transfer_syntax_uid: str, dataset_length: int) -> bool:
    """Cheap check that `head` (the first bytes of a dataset) starts like a DICOM element.

    Pure and fast; runs on association threads. It does not decode the dataset (the receive
    path never does): it rejects garbage, an empty dataset, and impossible first elements.
    A deflated dataset cannot be checked without inflating it and passes.
    """
    if transfer_syntax_uid == _DEFLATED:
        return len(head) > 0
    if len(head) < 8:
        return False
    fmt = ">HH" if transfer_syntax_uid == _EXPLICIT_BE else "<HH"
    group, _element = struct.unpack(fmt, head[:4])
    # Group 0000 is the command set and never appears in a dataset; odd groups below 0008 do
    # not exist. Group 0002 (file meta) sometimes appears in sloppy datasets: tolerate it.
    if group < 0x0002 or (group < 0x0008 and group % 2):
        return False
    if transfer_syntax_uid == _IMPLICIT_LE:
        # No VR to check: the first value length must be even and fit in what was received.
        length = int.from_bytes(head[4:8], "little")
        return length == 0xFFFFFFFF or (length % 2 == 0 and 8 + length <= dataset_length)
    vr = head[4:6]
    return len(vr) == 2 and all(65 <= b <= 90 for b in vr)
