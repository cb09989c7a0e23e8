"""Part-10 bytes on the receive path: dataset sniffing and where a received dataset starts."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from kp_gateway.dicom.part10 import plausible_dataset_start, received_dataset_head
from kp_gateway.dicom.receive_files import SpoolFile

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BIG = "1.2.840.10008.1.2.2"


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


def _part10(path: Path, private_information: bytes = b"") -> bytes:
    """A small Part-10 file as pydicom writes it; a long file meta with `private_information`."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if private_information:
        ds.file_meta.PrivateInformationCreatorUID = "1.2.3"
        ds.file_meta.PrivateInformation = private_information
    ds.PatientName = "Head^Test"
    ds.PatientID = "P1"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


@pytest.mark.parametrize("meta_padding", [0, 3000])
def test_received_dataset_head_with_short_and_long_file_meta(
    tmp_path: Path, meta_padding: int
) -> None:
    """The dataset's first bytes, from memory, or read back when the meta outgrows the head."""
    data = _part10(tmp_path / "in.dcm", b"\x01" * meta_padding)
    # The dataset's first element is (0010,0010) PatientName, explicit VR little endian.
    start = data.index(b"\x10\x00\x10\x00PN")
    spool_file = SpoolFile(
        str(tmp_path / "rx.part"), os.open(tmp_path / "rx.part", os.O_RDWR | os.O_CREAT, 0o600)
    )
    for offset in range(0, len(data), 100):  # as PDV fragments arrive
        spool_file.write(data[offset : offset + 100])
    head, dataset_start = received_dataset_head(spool_file)
    spool_file.close()
    assert dataset_start == start
    assert head == data[start : start + 16]
    assert (meta_padding > SpoolFile.HEAD_BYTES) == (dataset_start > SpoolFile.HEAD_BYTES)
