"""The one naming rule for datasets, shared by the DICOM and the upload paths.

Pure. A dataset name is what an upload names in ``?dataset=`` and what a sender's calling AE
title names (``kp-<dataset>``); both paths accept and produce exactly the names of
:data:`DATASET_NAME_RE`, so a dataset a sender created can be named in an upload.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from typing import Final

DATASET_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
DATASET_NAME_RULE: Final = "1-64 characters of a-z 0-9 . _ -, starting with a letter or digit"
AE_PREFIX: Final = "kp-"

_NOT_ALLOWED = re.compile(r"[^a-z0-9._-]+")


def is_dataset_name(name: str) -> bool:
    """True if `name` follows the dataset naming rule (a full match, no trailing newline)."""
    return DATASET_NAME_RE.fullmatch(name) is not None


def default_dataset_name() -> str:
    """The dataset of an upload or STOW-RS request that names none: ``upload-<YYYYMMDD>``."""
    return f"upload-{datetime.date.today():%Y%m%d}"


def dataset_name_for_ae_title(calling_ae_title: str) -> str:
    """The dataset a calling AE title names: ``kp-<dataset>``, else the whole title.

    Lower case (AE titles name datasets case-insensitively). A title that is already a valid
    name is used as it is. Otherwise each run of characters outside the rule becomes ``_`` and
    8 hex digits of the title's SHA-1 are appended, so that titles differing only in those
    characters (``MR SCAN1``, ``MR/SCAN1``, ``MR_SCAN1``) stay three datasets.
    """
    title = calling_ae_title.strip()
    if title.lower().startswith(AE_PREFIX) and len(title) > len(AE_PREFIX):
        title = title[len(AE_PREFIX) :]
    name = title.lower()
    if is_dataset_name(name):
        return name
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    base = _NOT_ALLOWED.sub("_", name).strip("._-")[:55]
    return f"{base}-{digest}" if base else f"ae-{digest}"


__all__ = [
    "AE_PREFIX",
    "DATASET_NAME_RE",
    "DATASET_NAME_RULE",
    "dataset_name_for_ae_title",
    "is_dataset_name",
]
