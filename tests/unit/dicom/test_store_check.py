"""The C-STORE path's check before it answers: the dataset must be the instance requested."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from kp_gateway.dicom.part10 import read_file_meta
from kp_gateway.dicom.scp import _check_received, _RequestedInstance
from kp_gateway.errors import DatasetMismatchError, InvalidDicomError, dimse_status_for
from tests.conftest import make_ct_series

EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture
def ct(tmp_path: Path) -> tuple[bytes, pydicom.Dataset]:
    (path,) = make_ct_series(tmp_path / "ct", 1)
    return path.read_bytes(), pydicom.dcmread(path, stop_before_pixels=True)


def _check(data: bytes, sop_class: str, sop_instance: str) -> None:
    def read(offset: int, count: int) -> bytes:
        return data[offset : offset + count]

    start, _ = read_file_meta(read)
    _check_received(read, len(data), start, _RequestedInstance(sop_class, sop_instance, EXPLICIT))


def test_the_requested_instance_passes(ct: tuple[bytes, pydicom.Dataset]) -> None:
    """Request and dataset agree: no refusal."""
    data, ds = ct
    _check(data, ds.SOPClassUID, ds.SOPInstanceUID)


def test_another_sop_instance_uid_is_refused_with_a900(ct: tuple[bytes, pydicom.Dataset]) -> None:
    """A dataset whose SOPInstanceUID is not the command's would be stored under another UID
    than the one confirmed: refused, 0xA900."""
    data, ds = ct
    with pytest.raises(DatasetMismatchError, match="SOPInstanceUID") as refused:
        _check(data, ds.SOPClassUID, ds.SOPInstanceUID + ".1")
    assert dimse_status_for(refused.value) == 0xA900


def test_another_sop_class_uid_is_refused_with_a900(ct: tuple[bytes, pydicom.Dataset]) -> None:
    """A dataset of another SOP class than requested: refused, 0xA900 (as DCMTK's storescp)."""
    data, ds = ct
    with pytest.raises(DatasetMismatchError, match="SOPClassUID") as refused:
        _check(data, "1.2.840.10008.5.1.4.1.1.4", ds.SOPInstanceUID)
    assert dimse_status_for(refused.value) == 0xA900


def test_a_cut_dataset_is_refused_with_c210(ct: tuple[bytes, pydicom.Dataset]) -> None:
    """A dataset cut off is 0xC210 (cannot understand), whatever the request says."""
    data, ds = ct
    with pytest.raises(InvalidDicomError, match="cut off") as refused:
        _check(data[:-10], ds.SOPClassUID, ds.SOPInstanceUID)
    assert dimse_status_for(refused.value) == 0xC210
