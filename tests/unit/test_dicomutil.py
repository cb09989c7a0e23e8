"""Receive-path helpers: UID checks, storage keys, dataset sniffing and AE-title routing."""

from __future__ import annotations

import pytest

from kp_gateway.dicomutil import is_valid_uid, plausible_dataset_start, storage_key
from kp_gateway.errors import InvalidDicomError
from kp_gateway.scp import parse_called_ae, parse_calling_ae

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BIG = "1.2.840.10008.1.2.2"


@pytest.mark.parametrize(
    ("uid", "ok"),
    [
        ("1.2.840.10008.1.2", True),
        ("1.2.03.4", True),  # leading zero: non-conformant but harmless, tolerated
        ("1.2..3", False),
        ("../../etc", False),
        ("1.2.3/4", False),
        ("", False),
        ("1." * 40, False),
    ],
)
def test_is_valid_uid_cases(uid: str, ok: bool) -> None:
    """Only digits and dots, at most 64 characters, can become a path."""
    assert is_valid_uid(uid) is ok


def test_storage_key_layout_and_rejection() -> None:
    """Keys follow CONTRACT section 7; unsafe UIDs never become paths."""
    assert storage_key("1.2", "1.3", "1.4") == "dicom/1.2/1.3/1.4.dcm"
    with pytest.raises(InvalidDicomError, match="SeriesInstanceUID"):
        storage_key("1.2", "..", "1.4")


@pytest.mark.parametrize(
    ("head", "ts", "ok"),
    [
        (b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", EXPLICIT, True),
        (b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR", IMPLICIT, True),
        (b"\x01\x02\x03garbage-not", IMPLICIT, False),
        (b"\x00\x08\x00\x05CS\x00\x0aISO_IR 100", BIG, True),
        (b"\x08\x00\x05\x00\x01\x02\x0a\x00garbage!", EXPLICIT, False),
        (b"\x00\x00\x00\x00UL\x04\x00\x00\x00\x00\x00", EXPLICIT, False),
        (b"\x03\x00\x00\x00CS\x04\x00", EXPLICIT, False),
        (b"\x08\x00", EXPLICIT, False),
        (b"", EXPLICIT, False),
        (b"\x78\x9c\x01", "1.2.840.10008.1.2.1.99", True),
    ],
)
def test_plausible_dataset_start_cases(head: bytes, ts: str, ok: bool) -> None:
    """Garbage and empty datasets are caught without decoding; real starts pass."""
    assert plausible_dataset_start(head, ts, 1000) is ok


@pytest.mark.parametrize(
    ("called", "project"),
    [
        ("kp-lung", "lung"),
        ("KP-Lung", "lung"),
        ("Kp-x1 ", "x1"),
        ("ANY-SCP", "admin"),
        ("kp-", "admin"),
    ],
)
def test_parse_called_ae(called: str, project: str) -> None:
    """kp- prefix and project names are case-insensitive; no prefix means the default project."""
    assert parse_called_ae(called, "admin") == project


@pytest.mark.parametrize(
    ("calling", "dataset"),
    [
        ("kp-cohort1", "cohort1"),
        ("KP-Cohort", "cohort"),
        ("STORESCU", "storescu"),
        ("kp-a/b", "a_b"),
    ],
)
def test_parse_calling_ae(calling: str, dataset: str) -> None:
    """kp-<dataset> names the dataset; otherwise the calling AE title, lower case."""
    assert parse_calling_ae(calling) == dataset
