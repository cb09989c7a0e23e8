"""Part-10 bytes on the receive path: the file meta written in front of a received dataset,
where that dataset starts in the file, and a cheap check of how it starts.

Pure, except the functions documented as blocking (they read a file back); all of it runs on
association and DUL threads.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from kp_gateway.dicom.receive_files import SpoolFile

_DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"


def plausible_dataset_start(head: bytes, transfer_syntax_uid: str, dataset_length: int) -> bool:
    """Cheap check that `head` (the first bytes of a dataset) starts like a DICOM element.

    Pure and fast; runs on association threads. It does not decode the dataset (the receive
    path never does): it rejects garbage, an empty dataset, and impossible first elements.
    A deflated dataset cannot be checked without inflating it and passes.
    """
    if transfer_syntax_uid == _DEFLATED:
        return len(head) > 0
    if len(head) < 8:
        return False
    fmt = ">HH" if transfer_syntax_uid == _EXPLICIT_BE else "<HH"
    group, _element = struct.unpack(fmt, head[:4])
    # Group 0000 is the command set and never appears in a dataset; odd groups below 0008 do
    # not exist. Group 0002 (file meta) sometimes appears in sloppy datasets: tolerate it.
    if group < 0x0002 or (group < 0x0008 and group % 2):
        return False
    if transfer_syntax_uid == _IMPLICIT_LE:
        # No VR to check: the first value length must be even and fit in what was received.
        length = int.from_bytes(head[4:8], "little")
        return length == 0xFFFFFFFF or (length % 2 == 0 and 8 + length <= dataset_length)
    vr = head[4:6]
    return len(vr) == 2 and all(65 <= b <= 90 for b in vr)


# A Part-10 file: 128-byte preamble, "DICM", then (0002,0000) UL in explicit VR little endian.
_GROUP_LENGTH_AT = 128 + 4
_GROUP_LENGTH_ELEMENT = 12


def _dataset_head(part10_head: bytes) -> tuple[bytes, int]:
    """The first (up to) 16 bytes of the dataset in the start of a Part-10 file, and where the
    dataset starts. Pure."""
    element = part10_head[_GROUP_LENGTH_AT : _GROUP_LENGTH_AT + _GROUP_LENGTH_ELEMENT]
    if len(element) < _GROUP_LENGTH_ELEMENT:
        return b"", 0
    (meta_length,) = struct.unpack("<I", element[8:12])
    start = _GROUP_LENGTH_AT + _GROUP_LENGTH_ELEMENT + meta_length
    return part10_head[start : start + 16], start


def received_dataset_head(received: SpoolFile) -> tuple[bytes, int]:
    """The first (up to) 16 bytes of the dataset in a spool file pynetdicom wrote, and where
    the dataset starts; from the bytes kept in memory when they reach that far. Blocking only
    when the file meta is longer than :attr:`SpoolFile.HEAD_BYTES` (not one pynetdicom writes).
    """
    head, start = _dataset_head(received.head)
    if len(head) < 16 and start + len(head) < received.size:
        received.flush()
        return dataset_head_from_file(received.fd)
    return head, start


def dataset_head_from_file(fd: int) -> tuple[bytes, int]:
    """As :func:`_dataset_head`, read from a Part-10 file. Blocking."""
    element = os.pread(fd, _GROUP_LENGTH_ELEMENT, _GROUP_LENGTH_AT)
    if len(element) < _GROUP_LENGTH_ELEMENT:
        return b"", 0
    _, start = _dataset_head(bytes(_GROUP_LENGTH_AT) + element)
    return os.pread(fd, 16, start), start


class PlainFileMeta(NamedTuple):
    """What pynetdicom's ``create_file_meta`` puts in a received dataset's file meta."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION


def _explicit(tag_element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # OB has a reserved field and a 4-byte length (PS3.5 7.1.2)
        return struct.pack("<HH2s2xI", 0x0002, tag_element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_element, vr, len(value)) + value


def padded(text: str, pad: bytes) -> bytes:
    """`text` in ASCII, padded with `pad` to an even length (PS3.5 6.2). Pure."""
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(meta: PlainFileMeta) -> bytes:
    """The file meta group (without preamble and prefix), explicit VR little endian."""
    body = b"".join(
        (
            _explicit(0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, b"UI", padded(meta.sop_class_uid, b"\x00")),
            _explicit(0x0003, b"UI", padded(meta.sop_instance_uid, b"\x00")),
            _explicit(0x0010, b"UI", padded(meta.transfer_syntax, b"\x00")),
            _explicit(0x0012, b"UI", padded(meta.implementation_uid, b"\x00")),
            _explicit(0x0013, b"SH", padded(meta.implementation_version, b" ")),
        )
    )
    return _explicit(0x0000, b"UL", struct.pack("<I", len(body))) + body


__all__ = [
    "PlainFileMeta",
    "dataset_head_from_file",
    "encode_file_meta",
    "padded",
    "plausible_dataset_start",
    "received_dataset_head",
]
