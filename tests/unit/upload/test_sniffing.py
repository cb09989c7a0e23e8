"""Upload sniffing and Part-10 rewriting (kp_gateway.upload.sniff), on real files."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from kp_gateway.config import UploadConfig
from kp_gateway.errors import InvalidDicomError, UnsupportedMediaError
from kp_gateway.upload.sniff import (
    HEAD_BYTES,
    MemberKind,
    inspect_body,
    is_dicomdir,
    read_head,
    sniff,
    to_part10,
)

CT = Path(str(get_testdata_file("CT_small.dcm")))
LIMITS = UploadConfig()


def _raw_dataset(path: Path, *, implicit: bool, little: bool) -> Path:
    """The CT's dataset without preamble or file meta, as some exports write it."""
    ds = pydicom.dcmread(CT)
    del ds.file_meta
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit, little
    write_dataset(buffer, ds)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.mark.parametrize(
    ("name", "data", "kind"),
    [
        ("a.dcm", CT.read_bytes(), MemberKind.DICOM),
        ("no-extension", CT.read_bytes(), MemberKind.DICOM),
        ("scan.nii.gz", gzip.compress(b"\x5c\x01\x00\x00" + bytes(344)), MemberKind.NIFTI),
        ("scan.nii", b"\x5c\x01\x00\x00" + bytes(344), MemberKind.NIFTI),
        ("meta_data.json", b'{"global_tags": {}}', MemberKind.NIFTI),
        ("notes.txt", b"hello, this is not an image", MemberKind.OTHER),
        ("empty", b"", MemberKind.OTHER),
    ],
)
def test_sniff_by_content_and_nifti_names(
    tmp_path: Path, name: str, data: bytes, kind: MemberKind
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    head = read_head(path)
    assert len(head) <= HEAD_BYTES
    assert sniff(head, name) is kind


@pytest.mark.parametrize(("implicit", "little"), [(True, True), (False, True), (False, False)])
def test_raw_dataset_is_recognised_and_rewritten_as_part10(
    tmp_path: Path, implicit: bool, little: bool
) -> None:
    path = _raw_dataset(tmp_path / "raw", implicit=implicit, little=little)
    assert sniff(read_head(path), "raw") is MemberKind.RAW_DICOM
    assert to_part10(path) == path
    rewritten = pydicom.dcmread(path)
    original = pydicom.dcmread(CT)
    expected_syntax = (
        ImplicitVRLittleEndian
        if implicit
        else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    )
    assert rewritten.file_meta.TransferSyntaxUID == expected_syntax
    assert rewritten.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert rewritten.file_meta.MediaStorageSOPClassUID == original.SOPClassUID
    assert rewritten.PixelData == original.PixelData
    assert [e.tag for e in rewritten] == [e.tag for e in original if e.tag.group != 0x0002]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_to_part10_refuses_what_merely_starts_like_a_dataset(tmp_path: Path) -> None:
    path = tmp_path / "fake"
    data = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + b"garbage " * 10
    path.write_bytes(data)
    assert sniff(read_head(path), "fake") is MemberKind.RAW_DICOM
    with pytest.raises(InvalidDicomError, match="not DICOM"):
        to_part10(path)
    assert path.read_bytes() == data and list(tmp_path.iterdir()) == [path]


def test_dicomdir_is_told_apart_from_an_image() -> None:
    assert is_dicomdir(Path(str(get_testdata_file("DICOMDIR"))))
    assert not is_dicomdir(CT)


def test_inspect_body_single_files_and_zips(tmp_path: Path) -> None:
    assert inspect_body(CT, "ct.dcm", "dicom", "", LIMITS) == ("file", 1)
    raw = _raw_dataset(tmp_path / "raw", implicit=True, little=True)
    assert inspect_body(raw, "raw", "dicom", "", LIMITS) == ("file", 1)
    assert raw.read_bytes()[128:132] == b"DICM"  # rewritten in place under kind=dicom
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(CT, "study/1.dcm")
        zipped.writestr("study/readme.txt", "hello")
        zipped.writestr("__MACOSX/._1.dcm", "resource fork")
    assert inspect_body(archive, "a.zip", "auto", "", LIMITS) == ("zip", 2)
    assert inspect_body(archive, "upload.bin", "dicom", ".dcm", LIMITS) == ("zip", 2)
    with pytest.raises(UnsupportedMediaError, match=r"no DICOM files ending in \.ima"):
        inspect_body(archive, "a.zip", "dicom", ".ima", LIMITS)
    with pytest.raises(UnsupportedMediaError, match=r"no \.nii"):
        inspect_body(archive, "a.zip", "nifti", "", LIMITS)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InvalidDicomError):
        inspect_body(text, "notes.txt", "dicom", "", LIMITS)
    assert inspect_body(text, "notes.txt", "files", "", LIMITS) == ("file", 1)
