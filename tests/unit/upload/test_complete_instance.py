"""check_complete_instance: whole instances pass, cut-off and garbage files are refused."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from kp_gateway.errors import InvalidDicomError
from kp_gateway.upload.sniff import check_complete_instance
from tests.conftest import make_ct_series

# Native and compressed images, multi-frame, YBR_FULL_422 (subsampled), RT objects, SR.
WHOLE = [
    "CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
    "SC_ybr_full_422_uncompressed.dcm", "rtplan.dcm", "rtdose.dcm", "image_dfl.dcm",
]  # fmt: skip


@pytest.mark.parametrize("name", WHOLE)
def test_whole_instances_pass(name: str) -> None:
    """pydicom's own files, uncut, are whole instances."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_complete_instance(Path(str(get_testdata_file(name))))


def test_pydicom_truncated_rtplan_is_refused() -> None:
    """pydicom's rtplan_truncated.dcm (a value running past the end) is refused."""
    with pytest.raises(InvalidDicomError, match="cut off"):
        check_complete_instance(Path(str(get_testdata_file("rtplan_truncated.dcm"))))


@pytest.mark.parametrize("cut", [1, 2000, 8000])
def test_ct_cut_inside_pixel_data_is_refused(tmp_path: Path, cut: int) -> None:
    """A synthetic CT cut 1, 2000 or 8000 bytes short of its end is refused."""
    (path,) = make_ct_series(tmp_path / "ct", 1, rows=64)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(InvalidDicomError, match="cut off"):
        check_complete_instance(path)


def test_preamble_over_garbage_is_refused(tmp_path: Path) -> None:
    """A DICOM preamble and DICM followed by no dataset is not an instance."""
    path = tmp_path / "garbage.dcm"
    path.write_bytes(bytes(128) + b"DICM" + b"not a dataset at all" * 10)
    with pytest.raises(InvalidDicomError):
        check_complete_instance(path)


def test_large_values_are_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check reads element headers, never a whole file's Pixel Data (memory follows the
    header): a 512x512 CT is checked with at most 16 KiB read."""
    (path,) = make_ct_series(tmp_path / "ct", 1, rows=512)
    read_counts: list[int] = []
    real_pread = os.pread

    def recording_pread(fd: int, count: int, offset: int) -> bytes:
        read_counts.append(count)
        return real_pread(fd, count, offset)

    monkeypatch.setattr(os, "pread", recording_pread)
    check_complete_instance(path)  # 512 KiB of pixels: passes without loading them
    assert 0 < sum(read_counts) <= 16384 + 4096, read_counts
    assert path.stat().st_size > 500_000
