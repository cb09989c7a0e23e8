"""Part-10 bytes on the receive path: dataset sniffing and where a received dataset starts."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from kp_gateway.dicom.part10 import (
    InstanceUids,
    Reader,
    check_instance,
    plausible_dataset_start,
    read_file_meta,
    received_dataset_head,
)
from kp_gateway.dicom.receive_files import SpoolFile
from kp_gateway.errors import InvalidDicomError
from tests.conftest import make_ct_series

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


# -- check_instance: the whole-instance check both receive paths run -------------------------

_STUDY_UI = b"\x20\x00\x0d\x00UI"
_SERIES_UI = b"\x20\x00\x0e\x00UI"
_SOP_INSTANCE_UI = b"\x08\x00\x18\x00UI"
_SOP_CLASS_UI = b"\x08\x00\x16\x00UI"


def _check_bytes(data: bytes) -> InstanceUids:
    """check_instance over a whole Part-10 file held in memory."""
    read = _reader(data)
    dataset_start, transfer_syntax = read_file_meta(read)
    return check_instance(read, len(data), dataset_start, transfer_syntax)


def _reader(data: bytes) -> Reader:
    return lambda offset, count: data[offset : offset + count]


def _with_uid(data: bytes, tag_and_vr: bytes, value: bytes) -> bytes:
    """A Part-10 file (explicit VR little endian) with one dataset UI value replaced."""
    at = data.index(tag_and_vr, 144)
    (old_length,) = struct.unpack_from("<H", data, at + 6)
    value += b"\x00" * (len(value) % 2)
    return (
        data[:at] + tag_and_vr + struct.pack("<H", len(value)) + value + data[at + 8 + old_length :]
    )


@pytest.fixture
def ct_bytes(tmp_path: Path) -> bytes:
    (path,) = make_ct_series(tmp_path / "ct", 1, rows=64)
    return path.read_bytes()


def _rle(ct: bytes, tmp_path: Path) -> bytes:
    """The CT with its Pixel Data encapsulated (RLE Lossless): two fragments, a delimiter."""
    source = tmp_path / "native.dcm"
    source.write_bytes(ct)
    ds = pydicom.dcmread(source)
    frame = bytes(ds.PixelData)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([frame[:4000], frame[4000:]], fragments_per_frame=2)
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    return (tmp_path / "rle.dcm").read_bytes()


def test_check_instance_returns_the_uids(ct_bytes: bytes, tmp_path: Path) -> None:
    """A whole CT passes and its four UIDs come back as the store stage reads them."""
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(ct_bytes))
    assert _check_bytes(ct_bytes) == InstanceUids(
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID
    )
    _check_bytes(_rle(ct_bytes, tmp_path))


@pytest.mark.parametrize(
    ("tag_and_vr", "value"),
    [
        (_STUDY_UI, b"../../etc/passwd"),
        (_SERIES_UI, b"1.2/3.4"),
        (_SOP_INSTANCE_UI, b"1.2\x003.4"),
        (_STUDY_UI, b"1.2.3.\xe9"),
        (_SERIES_UI, b"1." + b"2" * 63),
        (_STUDY_UI, b""),
        (_SOP_CLASS_UI, b"1.2..3"),
        (_SOP_INSTANCE_UI, b"1.2.3\\1.2.4"),
    ],
    ids=["dotdot", "slash", "nul", "non-ascii", "65-chars", "empty", "empty-component", "multi"],
)
def test_check_instance_refuses_each_bad_uid(
    ct_bytes: bytes, tag_and_vr: bytes, value: bytes
) -> None:
    """Every UID form the store stage refuses is refused here (kp_gateway.uids rule)."""
    with pytest.raises(InvalidDicomError, match="not a valid UID"):
        _check_bytes(_with_uid(ct_bytes, tag_and_vr, value))


def test_check_instance_accepts_a_64_character_uid_with_padding(ct_bytes: bytes) -> None:
    """The longest valid UID (64 characters) passes; its trailing NUL pad is not part of it."""
    uid = b"1." + b"2" * 62
    assert _check_bytes(_with_uid(ct_bytes, _SERIES_UI, uid)).series_instance_uid == uid.decode()


def test_check_instance_refuses_a_missing_uid(ct_bytes: bytes) -> None:
    """A dataset without a StudyInstanceUID cannot be placed: refused."""
    at = ct_bytes.index(_STUDY_UI, 144)
    (length,) = struct.unpack_from("<H", ct_bytes, at + 6)
    with pytest.raises(InvalidDicomError, match="StudyInstanceUID '' is missing"):
        _check_bytes(ct_bytes[:at] + ct_bytes[at + 8 + length :])


@pytest.mark.parametrize("inside", [1, 4, 7, 9, 30])
def test_check_instance_refuses_a_dataset_cut_mid_element(ct_bytes: bytes, inside: int) -> None:
    """Cut inside an element's header or value (the Study UID element here): refused."""
    at = ct_bytes.index(_STUDY_UI, 144)
    with pytest.raises(InvalidDicomError, match="cut off"):
        _check_bytes(ct_bytes[: at + inside])


@pytest.mark.parametrize("cut", [1, 2, 1000, 8190])
def test_check_instance_refuses_native_pixel_data_cut(ct_bytes: bytes, cut: int) -> None:
    """Native Pixel Data shorter than its declared length: refused."""
    with pytest.raises(InvalidDicomError, match="cut off"):
        _check_bytes(ct_bytes[:-cut])


def test_check_instance_refuses_native_pixel_data_declared_short(ct_bytes: bytes) -> None:
    """Native Pixel Data whose own length is shorter than Rows x Columns x Bits: refused."""
    at = ct_bytes.index(b"\xe0\x7f\x10\x00OW")
    (length,) = struct.unpack_from("<I", ct_bytes, at + 8)
    short = ct_bytes[: at + 8] + struct.pack("<I", length - 2) + ct_bytes[at + 12 : -2]
    with pytest.raises(InvalidDicomError, match="Pixel Data holds 8190 of 8192 bytes"):
        _check_bytes(short)


def test_check_instance_refuses_an_image_without_pixel_data(ct_bytes: bytes) -> None:
    """An image cut exactly before its Pixel Data element: refused."""
    with pytest.raises(InvalidDicomError, match="no pixel data"):
        _check_bytes(ct_bytes[: ct_bytes.index(b"\xe0\x7f\x10\x00OW")])


@pytest.mark.parametrize("cut", [1, 7, 100, 4000, 8010])
def test_check_instance_refuses_encapsulated_pixel_data_cut(
    ct_bytes: bytes, tmp_path: Path, cut: int
) -> None:
    """Encapsulated Pixel Data cut inside its delimiter, a fragment or a fragment header."""
    rle = _rle(ct_bytes, tmp_path)
    with pytest.raises(InvalidDicomError, match="cut off"):
        _check_bytes(rle[:-cut])


def test_check_instance_refuses_encapsulated_pixel_data_without_delimiter(
    ct_bytes: bytes, tmp_path: Path
) -> None:
    """Encapsulated Pixel Data whose fragments are whole but whose delimiter is missing."""
    rle = _rle(ct_bytes, tmp_path)
    assert rle[-8:] == b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    with pytest.raises(InvalidDicomError, match="cut off"):
        _check_bytes(rle[:-8])


def test_check_instance_refuses_an_unterminated_sequence(ct_bytes: bytes) -> None:
    """An undefined-length sequence that never reaches its delimiter: refused."""
    at = ct_bytes.index(b"\xe0\x7f\x10\x00OW")
    sequence = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    with pytest.raises(InvalidDicomError, match="cut off"):
        _check_bytes(ct_bytes[:at] + sequence)


def test_check_instance_reads_only_headers(ct_bytes: bytes, tmp_path: Path) -> None:
    """A 512x512 CT is checked with one 16 KiB read after the file meta: Pixel Data unread."""
    (path,) = make_ct_series(tmp_path / "big", 1, rows=512)
    data = path.read_bytes()
    reads: list[int] = []

    def read(offset: int, count: int) -> bytes:
        reads.append(count)
        return data[offset : offset + count]

    dataset_start, transfer_syntax = read_file_meta(_reader(data))
    check_instance(read, len(data), dataset_start, transfer_syntax)
    assert reads == [16384]


# pydicom's files that are not whole, identifiable Part-10 instances, and why.
NOT_INSTANCES = {
    "ExplVR_BigEndNoMeta.dcm": "no DICM", "ExplVR_LitEndNoMeta.dcm": "no DICM",
    "no_meta.dcm": "no DICM", "rtstruct.dcm": "no DICM",
    "meta_missing_tsyntax.dcm": "Transfer Syntax UID",
    "JPEGLSNearLossless_08.dcm": "StudyInstanceUID",
    "JPEGLSNearLossless_16.dcm": "StudyInstanceUID",
    "SC_rgb_jls_lossy_line.dcm": "StudyInstanceUID",
    "SC_rgb_jls_lossy_sample.dcm": "StudyInstanceUID",
    "UN_sequence.dcm": "SOPClassUID", "DICOMDIR-empty.dcm": "SOPClassUID",
    "empty_charset_LEI.dcm": "SOPClassUID", "nested_priv_SQ.dcm": "SOPClassUID",
    "no_meta_group_length.dcm": "SOPClassUID", "priv_SQ.dcm": "SOPClassUID",
    "MR_truncated.dcm": "cut off", "rtplan_truncated.dcm": "cut off",
}  # fmt: skip
TESTDATA = sorted({Path(p).name: Path(p) for p in get_testdata_files("*.dcm")}.items())


def test_testdata_covers_every_encoding() -> None:
    """The files below include big endian, implicit, deflated, JPEG, JPEG-LS, J2K and RLE."""
    names = {name for name, _ in TESTDATA}
    assert {"MR_small_bigendian.dcm", "MR_small_implicit.dcm", "image_dfl.dcm", "JPEG2000.dcm",
            "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm",
            "SC_rgb_rle_2frame.dcm", "rtplan.dcm", "waveform_ecg.dcm"} <= names  # fmt: skip
    assert len(TESTDATA) > 70


@pytest.mark.parametrize(("name", "path"), TESTDATA, ids=[name for name, _ in TESTDATA])
def test_check_instance_over_pydicom_testdata(name: str, path: Path) -> None:
    """Every whole instance among pydicom's files passes (native, big endian, implicit,
    deflated, JPEG, JPEG-LS, J2K, RLE, multi-frame, RT, waveforms, nested sequences); the
    others are refused for their known flaw."""
    data = path.read_bytes()
    if name not in NOT_INSTANCES:
        _check_bytes(data)
        return
    with pytest.raises(InvalidDicomError) as refused:
        _check_bytes(data)
    assert NOT_INSTANCES[name] in str(refused.value)
