"""Unit tests for kp_gateway.upload.sniff: content sniffing, Part-10 rewriting, body checks."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from kp_gateway.config import UploadConfig
from kp_gateway.errors import (
    InvalidDicomError,
    RejectedInputError,
    UnsafeArchiveError,
    UnsupportedMediaError,
)
from kp_gateway.upload.sniff import (
    HEAD_BYTES,
    MemberKind,
    inspect_body,
    is_dicomdir,
    looks_like_zip,
    read_head,
    sniff,
    to_part10,
)
from tests.conftest import make_ct_series

LIMITS = UploadConfig()
# (implicit VR, little endian) -> the transfer syntax a rewritten file must name.
ENCODINGS = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


def ct_file(folder: Path) -> Path:
    """One small synthetic CT slice, Part-10."""
    (path,) = make_ct_series(folder, 1, rows=8)
    return path


def raw_bytes(ds: pydicom.Dataset, *, implicit: bool, little: bool) -> bytes:
    """`ds` encoded without preamble and without file meta (what some tools export)."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_dataset(fp, ds)
    return fp.getvalue()


def raw_ct(folder: Path, *, implicit: bool = False, little: bool = True) -> Path:
    """A synthetic CT as a dataset without preamble, beside its Part-10 original."""
    ds = pydicom.dcmread(ct_file(folder / "src"))
    del ds.file_meta
    path = folder / "raw.dcm"
    path.write_bytes(raw_bytes(ds, implicit=implicit, little=little))
    return path


def nifti_bytes() -> bytes:
    """A tiny NIfTI-1 image (348-byte header, "n+1" magic)."""
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.int16), np.eye(4))  # type: ignore[no-untyped-call]
    data: bytes = img.to_bytes()
    return data


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- sniff ------------------------------------------------------------------------------


def test_sniff_part10_is_dicom_whatever_the_name(tmp_path: Path) -> None:
    """A Part-10 file is DICOM by its "DICM" magic, even under a NIfTI or text name."""
    head = read_head(ct_file(tmp_path))
    for name in ("slice.dcm", "IM0001", "notes.txt", "brain.nii"):
        assert sniff(head, name) == MemberKind.DICOM


@pytest.mark.parametrize(("implicit", "little"), list(ENCODINGS))
def test_sniff_dataset_without_preamble_is_raw_dicom(
    tmp_path: Path, implicit: bool, little: bool
) -> None:
    """Implicit VR, explicit VR little and big endian datasets without preamble."""
    head = read_head(raw_ct(tmp_path, implicit=implicit, little=little))
    assert head[128:132] != b"DICM"
    assert sniff(head, "IM0001") == MemberKind.RAW_DICOM


def test_sniff_file_meta_without_preamble_is_raw_dicom(tmp_path: Path) -> None:
    """A file that starts straight with the group 0002 file meta (preamble stripped)."""
    head = read_head(ct_file(tmp_path))[132:]
    assert head[:2] == b"\x02\x00"
    assert sniff(head, "IM0001") == MemberKind.RAW_DICOM


@pytest.mark.parametrize(
    "name",
    ["brain.nii", "BRAIN.NII.GZ", "case1/brain.nii.gz", "dataset.json", "case1/seg-info.json"],
)
def test_sniff_nifti_by_name(name: str) -> None:
    """NIfTI images and their JSON side-cars are recognised by name (gzip or not)."""
    head = gzip.compress(nifti_bytes()) if name.lower().endswith(".gz") else nifti_bytes()
    assert sniff(head[:HEAD_BYTES], name) == MemberKind.NIFTI


def test_sniff_nifti_under_another_name_is_other() -> None:
    """NIfTI is recognised by its name only: its header does not pass for a dataset."""
    head = nifti_bytes()[:HEAD_BYTES]
    assert head[344:348] == b"n+1\x00"
    assert sniff(head, "brain.img") == MemberKind.OTHER
    assert sniff(gzip.compress(nifti_bytes())[:HEAD_BYTES], "brain.gz") == MemberKind.OTHER


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (zip_bytes({"a.txt": b"hello"}), "archive.zip"),
        (b'{"patient": "P1", "series": [1, 2, 3]}', "meta.json"),
        (bytes(range(255, 0, -1)) * 8, "blob.bin"),
        (b"%PDF-1.7\n" + b"x" * 2000, "report.pdf"),
        (b"\x08\x00\x16\x00", "short.dcm"),  # a group 0008 tag, but too short to be a dataset
        (b"", "empty.dcm"),
    ],
)
def test_sniff_other_content(head: bytes, name: str) -> None:
    """Zip, JSON, garbage and files too short for a dataset are OTHER."""
    assert sniff(head[:HEAD_BYTES], name) == MemberKind.OTHER


def test_looks_like_zip_by_magic_or_name() -> None:
    data = zip_bytes({"a.txt": b"hello"})
    assert looks_like_zip(data[:HEAD_BYTES], "upload.bin")
    assert looks_like_zip(zip_bytes({})[:HEAD_BYTES], "upload.bin")  # empty: end record only
    assert looks_like_zip(b"not a zip", "Study.ZIP")
    assert not looks_like_zip(b"not a zip", "study.dcm")


def test_read_head_reads_at_most_head_bytes(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = bytes(range(256)) * 20
    path.write_bytes(data)
    assert read_head(path) == data[:HEAD_BYTES]
    path.write_bytes(data[:10])
    assert read_head(path) == data[:10]


# -- to_part10 --------------------------------------------------------------------------


@pytest.mark.parametrize(("implicit", "little"), list(ENCODINGS))
def test_to_part10_rewrites_raw_dataset(tmp_path: Path, implicit: bool, little: bool) -> None:
    """The rewritten file reads back as Part-10 with the same elements and a matching meta."""
    path = raw_ct(tmp_path, implicit=implicit, little=little)
    original = pydicom.dcmread(path, force=True)
    assert to_part10(path) == path
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    ds = pydicom.dcmread(path)  # no force: a conformant Part-10 file
    meta = ds.file_meta
    assert meta.TransferSyntaxUID == ENCODINGS[(implicit, little)]
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert [e.tag for e in ds] == [e.tag for e in original]
    for elem in original:
        assert ds[elem.tag].value == elem.value, elem.keyword
    assert not any(e.tag.group == 0x0002 for e in ds)
    assert listing(tmp_path) == ["raw.dcm", "src"]  # no temporary file left beside it


def test_to_part10_file_meta_without_preamble_is_not_duplicated(tmp_path: Path) -> None:
    """A stripped preamble with the meta kept: one group 0002, the dataset unchanged."""
    src = ct_file(tmp_path)
    path = tmp_path / "nopreamble.dcm"
    path.write_bytes(src.read_bytes()[132:])
    to_part10(path)
    ds = pydicom.dcmread(path)
    original = pydicom.dcmread(src)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert not any(e.tag.group == 0x0002 for e in ds)
    assert ds == original


def test_to_part10_keeps_a_compressed_transfer_syntax(tmp_path: Path) -> None:
    """A JPEG 2000 file with its preamble stripped keeps its transfer syntax."""
    src = Path(str(get_testdata_file("JPEG2000.dcm")))
    path = tmp_path / "j2k.dcm"
    path.write_bytes(src.read_bytes()[132:])
    to_part10(path)
    expected = pydicom.dcmread(src).file_meta.TransferSyntaxUID
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == expected


@pytest.mark.parametrize(
    "content",
    [
        b"\x08\x00\x16\x00" + b"garbage after a plausible tag " * 20,
        b'{"not": "dicom"}',
        bytes(range(256)) * 4,
    ],
)
def test_to_part10_refuses_non_dicom_and_leaves_no_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "upload.part"
    path.write_bytes(content)
    with pytest.raises(InvalidDicomError):
        to_part10(path)
    assert path.read_bytes() == content
    assert listing(tmp_path) == ["upload.part"]


def test_to_part10_refuses_dataset_without_series_uid(tmp_path: Path) -> None:
    """A parsable dataset still needs valid SOP, Study and Series UIDs."""
    ds = pydicom.dcmread(ct_file(tmp_path / "ct"))
    del ds.file_meta
    del ds.SeriesInstanceUID
    path = tmp_path / "raw.dcm"
    path.write_bytes(raw_bytes(ds, implicit=True, little=True))
    with pytest.raises(InvalidDicomError, match="no valid"):
        to_part10(path)
    assert listing(tmp_path) == ["ct", "raw.dcm"]


# -- inspect_body ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["auto", "dicom", "files"])
def test_inspect_single_part10_file(tmp_path: Path, kind: str) -> None:
    path = ct_file(tmp_path)
    before = path.read_bytes()
    assert inspect_body(path, "slice.dcm", kind, "", LIMITS) == ("file", 1)
    assert path.read_bytes() == before


def test_inspect_raw_dataset_under_kind_dicom_is_converted_in_place(tmp_path: Path) -> None:
    path = raw_ct(tmp_path, implicit=True)
    assert inspect_body(path, "IM0001", "dicom", "", LIMITS) == ("file", 1)
    assert path.read_bytes()[128:132] == b"DICM"


def test_inspect_raw_dataset_under_kind_auto_is_left_for_the_import(tmp_path: Path) -> None:
    """Only kind=dicom converts (and refuses) synchronously; auto may hold anything."""
    path = raw_ct(tmp_path, implicit=True)
    before = path.read_bytes()
    assert inspect_body(path, "IM0001", "auto", "", LIMITS) == ("file", 1)
    assert path.read_bytes() == before


def test_inspect_zip_counts_members(tmp_path: Path) -> None:
    """Every regular file counts, whatever it holds; dot-files and folders do not."""
    ct = ct_file(tmp_path / "ct").read_bytes()
    files = {
        "study/a.dcm": ct,
        "study/b.dcm": ct,
        "readme.txt": b"hello",
        ".DS_Store": b"x",
        "__MACOSX/study/._a.dcm": b"x",
    }
    body = tmp_path / "upload.part"
    body.write_bytes(zip_bytes(files))
    # By magic, whatever the name says.
    assert inspect_body(body, "upload.bin", "auto", "", LIMITS) == ("zip", 3)
    assert inspect_body(body, "study.zip", "dicom", ".dcm", LIMITS) == ("zip", 3)


@pytest.mark.parametrize(
    ("files", "filename", "kind", "extension", "error", "match"),
    [
        ({"a.txt": b"hello"}, "u.zip", "dicom", "", UnsupportedMediaError, "no DICOM files"),
        ({"a.ima": b"CT"}, "u.zip", "dicom", ".dcm", UnsupportedMediaError, "ending in .dcm"),
        ({"a.dcm": b"CT"}, "u.zip", "nifti", "", UnsupportedMediaError, ".nii"),
        ({".hidden": b"x"}, "u.zip", "auto", "", UnsupportedMediaError, "no files"),
        ({"a.dcm": b"CT"}, "brain.nii", "nifti", "", UnsupportedMediaError, ".nii"),
    ],
)
def test_inspect_refuses_kind_mismatches(
    tmp_path: Path,
    files: dict[str, bytes],
    filename: str,
    kind: str,
    extension: str,
    error: type[Exception],
    match: str,
) -> None:
    """A zip (or file) with nothing the requested kind can import is refused before 202.

    In the table, b"CT" stands for a Part-10 CT slice; a lone entry named like a file that
    is not a zip is uploaded as that single file.
    """
    ct = ct_file(tmp_path / "ct").read_bytes()
    contents = {name: ct if data == b"CT" else data for name, data in files.items()}
    body = tmp_path / "upload.part"
    if filename.endswith(".zip"):
        body.write_bytes(zip_bytes(contents))
    else:
        (data,) = contents.values()
        body.write_bytes(data)
    with pytest.raises(error, match=match):
        inspect_body(body, filename, kind, extension, LIMITS)


@pytest.mark.parametrize(
    ("content", "filename", "match"),
    [
        (b"just some text, not an image", "notes.txt", "no DICM header"),
        (None, "brain.nii", "no DICM header"),  # NIfTI under kind=dicom
        (b"\x08\x00\x16\x00" + b"garbage after a plausible tag " * 20, "x.dcm", "not DICOM"),
    ],
)
def test_inspect_single_non_dicom_under_kind_dicom(
    tmp_path: Path, content: bytes | None, filename: str, match: str
) -> None:
    """Refused synchronously, the body left as it came (the service then removes it)."""
    body = tmp_path / "upload.part"
    data = nifti_bytes() if content is None else content
    body.write_bytes(data)
    with pytest.raises(InvalidDicomError, match=match):
        inspect_body(body, filename, "dicom", "", LIMITS)
    assert body.read_bytes() == data
    assert listing(tmp_path) == ["upload.part"]


def test_inspect_nifti_file_under_kind_nifti(tmp_path: Path) -> None:
    body = tmp_path / "upload.part"
    body.write_bytes(gzip.compress(nifti_bytes()))
    assert inspect_body(body, "brain.nii.gz", "nifti", "", LIMITS) == ("file", 1)


def test_inspect_empty_upload_is_rejected(tmp_path: Path) -> None:
    body = tmp_path / "upload.part"
    body.write_bytes(b"")
    with pytest.raises(RejectedInputError, match="empty"):
        inspect_body(body, "x.dcm", "auto", "", LIMITS)


def test_inspect_zip_name_over_non_zip_bytes_is_unsafe(tmp_path: Path) -> None:
    """A .zip name is opened as a zip; bytes that are not one are refused as such."""
    body = tmp_path / "upload.part"
    body.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(UnsafeArchiveError, match="not a readable zip"):
        inspect_body(body, "study.zip", "auto", "", LIMITS)


# -- is_dicomdir ----------------------------------------------------------------------


def test_is_dicomdir_on_a_real_dicomdir() -> None:
    assert is_dicomdir(Path(str(get_testdata_file("DICOMDIR"))))


def test_is_dicomdir_false_for_instances_and_other_files(tmp_path: Path) -> None:
    assert not is_dicomdir(ct_file(tmp_path / "ct"))
    assert not is_dicomdir(raw_ct(tmp_path / "raw"))
    text = tmp_path / "notes.txt"
    text.write_bytes(b"hello")
    assert not is_dicomdir(text)
    assert not is_dicomdir(tmp_path / "missing.dcm")
