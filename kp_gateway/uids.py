"""UIDs from the network: the UI value check and the storage key built from valid UIDs.

Pure; used on association threads, the event loop and in worker processes alike.
"""

from __future__ import annotations

import re

from kp_gateway.errors import InvalidDicomError

# PS3.5 9.1 allows digits and dots only. Leading zeros in a component are tolerated: real
# modalities send them, and they cannot make a path unsafe.
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(uid: str) -> bool:
    """Return True when `uid` is digits and dots, at most 64 characters (PS3.5 9.1)."""
    # fullmatch: `$` would let a trailing newline through.
    return 0 < len(uid) <= 64 and _UID_RE.fullmatch(uid) is not None


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


__all__ = ["is_valid_uid", "storage_key"]
