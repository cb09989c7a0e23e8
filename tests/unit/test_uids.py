"""UID checks and storage keys."""

from __future__ import annotations

import pytest

from kp_gateway.errors import InvalidDicomError
from kp_gateway.uids import is_valid_uid, storage_key


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
