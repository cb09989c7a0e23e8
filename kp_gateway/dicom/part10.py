"""Part-10 bytes on the receive path: the file meta written in front of a received dataset,
where that dataset starts in the file, a cheap check of how it starts, and the whole-instance
check (:func:`check_instance`) that both the C-STORE path and the upload path run before they
accept an instance.

Pure, except the functions documented as blocking (they read a file back); the receive path
runs it on association and DUL threads, the upload path in worker threads.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from typing import NamedTuple

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from kp_gateway.dicom.receive_files import SpoolFile
from kp_gateway.errors import InvalidDicomError
from kp_gateway.uids import is_valid_uid

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


# -- the whole-instance check ----------------------------------------------------------------

Reader = Callable[[int, int], bytes]
"""``read(offset, count)``: up to `count` bytes of a file from `offset` (fewer at its end)."""


class InstanceUids(NamedTuple):
    """The UIDs that place an instance (storage key, index) and name its SOP class."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


_EXPLICIT_LE = "1.2.840.10008.1.2.1"
# Transfer syntaxes whose Pixel Data is native (PS3.5 A.1-A.5); every other one encapsulates it.
_NATIVE_SYNTAXES = frozenset((_IMPLICIT_LE, _EXPLICIT_LE, _EXPLICIT_BE, _DEFLATED))
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_VRS = _LONG_VRS | frozenset(
    (b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
     b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US")
)  # fmt: skip
_UID_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_SAMPLES_PER_PIXEL = 0x00280002
_PHOTOMETRIC = 0x00280004
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS_ALLOCATED = 0x00280100
# Top-level values the check reads: the UIDs and what the native Pixel Data length follows from.
_READ_TAGS = frozenset(
    (*_UID_TAGS, _SAMPLES_PER_PIXEL, _PHOTOMETRIC, _NUMBER_OF_FRAMES, _ROWS, _COLUMNS,
     _BITS_ALLOCATED)
)  # fmt: skip
# Longer than any value of those (a UID is at most 64 characters, an IS 12): over it, a value
# is kept as this marker, which no rule accepts, rather than read.
_READ_VALUE_MAX = 80
_TOO_LONG = b"\xff"
# One read covers a typical header (1 to 8 KiB) and the Pixel Data element's header after it,
# so a whole CT is checked with a single pread; the rest is read only as the walk needs it.
_BLOCK_BYTES = 16384
# Nested sequences deeper than this are not real data (real ones go 3 to 5 deep).
_MAX_DEPTH = 32
# A file meta is a few hundred bytes; one longer than this is not one.
_FILE_META_MAX = 1 << 20
_FILE_META_BLOCK_BYTES = 512  # a typical file meta (200 to 300 bytes) in one read


def _cut(what: str) -> InvalidDicomError:
    return InvalidDicomError(f"the file is cut off: {what}")


class _Walk:
    """One walk over a dataset's elements, skipping values; raises InvalidDicomError."""

    __slots__ = (
        "_block",
        "_block_at",
        "_block_bytes",
        "_read",
        "end",
        "pixel_length",
        "pixel_tags",
        "values",
    )

    def __init__(self, read: Reader, end: int, block_bytes: int = _BLOCK_BYTES) -> None:
        self._read = read
        self.end = end
        self._block_bytes = block_bytes
        self._block = b""
        self._block_at = 0
        self.values: dict[int, bytes] = {}
        self.pixel_tags: set[int] = set()
        self.pixel_length: int | None = None  # of a native (defined length) Pixel Data

    def bytes_at(self, offset: int, count: int) -> bytes:
        if offset + count > self.end:
            raise _cut(f"{offset + count - self.end} bytes missing at offset {offset}")
        at = offset - self._block_at
        if at < 0 or at + count > len(self._block):
            self._block = self._read(offset, max(count, self._block_bytes))
            self._block_at, at = offset, 0
            if len(self._block) < count:
                raise _cut(f"the file ends before offset {offset + count}")
        return self._block[at : at + count]

    def header(self, offset: int, implicit: bool, little: bool) -> tuple[int, bytes, int, int]:
        """(tag, VR or b"", value length, value offset) of the element at `offset`."""
        head = self.bytes_at(offset, 8)
        group, element = struct.unpack("<HH" if little else ">HH", head[:4])
        tag = group << 16 | element
        if implicit or group == 0xFFFE:  # items and delimiters have no VR (PS3.5 7.5)
            return tag, b"", struct.unpack("<I" if little else ">I", head[4:])[0], offset + 8
        vr = head[4:6]
        if vr in _LONG_VRS:
            length = struct.unpack("<I" if little else ">I", self.bytes_at(offset + 8, 4))[0]
            return tag, vr, length, offset + 12
        if vr not in _VRS:
            raise InvalidDicomError(f"no valid element at offset {offset} (VR {vr!r})")
        return tag, vr, struct.unpack("<H" if little else ">H", head[6:])[0], offset + 8

    def dataset(
        self, offset: int, end: int | None, implicit: bool, little: bool, depth: int
    ) -> int:
        """Walk a dataset from `offset` to `end`, or to its item delimiter when `end` is None;
        returns the offset after it."""
        top = depth == 0
        while end is None or offset < end:
            tag, vr, length, value_at = self.header(offset, implicit, little)
            if tag == _ITEM_DELIMITER and end is None:
                return value_at
            if tag >> 16 == 0xFFFE:
                raise InvalidDicomError(f"an item tag where an element belongs (offset {offset})")
            if length == _UNDEFINED_LENGTH:
                if top and tag == _PIXEL_DATA:
                    self.pixel_tags.add(tag)
                    offset = self.fragments(value_at)
                else:
                    # The content of UN with undefined length is implicit VR little endian
                    # (PS3.5 6.2.2).
                    nested_implicit = implicit or vr == b"UN"
                    nested_little = little or vr == b"UN"
                    offset = self.sequence(value_at, nested_implicit, nested_little, depth + 1)
                continue
            offset = value_at + length
            if offset > self.end:
                raise _cut(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end")
            if not top:
                continue
            if tag in _READ_TAGS:
                long_value = length > _READ_VALUE_MAX
                self.values[tag] = _TOO_LONG if long_value else self.bytes_at(value_at, length)
            elif tag == _PIXEL_DATA or tag in _FLOAT_PIXEL_DATA:
                self.pixel_tags.add(tag)
                if tag == _PIXEL_DATA:
                    self.pixel_length = length
        if offset != end:
            raise InvalidDicomError(f"an element overruns its item (offset {offset})")
        return offset

    def sequence(self, offset: int, implicit: bool, little: bool, depth: int) -> int:
        """Walk the items of an undefined-length sequence; the offset after its delimiter."""
        if depth > _MAX_DEPTH:
            raise InvalidDicomError(f"sequences nested deeper than {_MAX_DEPTH}")
        while True:
            tag, _, length, value_at = self.header(offset, True, little)
            if tag == _SEQUENCE_DELIMITER:
                return value_at
            if tag != _ITEM:
                raise InvalidDicomError(f"no item or sequence delimiter at offset {offset}")
            if length == _UNDEFINED_LENGTH:
                offset = self.dataset(value_at, None, implicit, little, depth)
            else:
                offset = value_at + length
                if offset > self.end:
                    raise _cut(f"a sequence item runs past the end (offset {value_at})")

    def fragments(self, offset: int) -> int:
        """Walk encapsulated Pixel Data (PS3.5 A.4): items with a length, then the sequence
        delimiter; only the 8-byte item headers are read."""
        while True:
            tag, _, length, value_at = self.header(offset, True, True)
            if tag == _SEQUENCE_DELIMITER:
                return value_at
            if tag != _ITEM or length == _UNDEFINED_LENGTH:
                raise InvalidDicomError(f"no fragment item in the Pixel Data (offset {offset})")
            offset = value_at + length
            if offset > self.end:
                raise _cut(f"a Pixel Data fragment runs past the end (offset {value_at})")


def _text(raw: bytes | None) -> str:
    # As pydicom decodes a UI/IS/CS value (its default encoding, trailing NULs and spaces
    # dropped) and the store stage then strips it.
    return "" if raw is None else raw.decode("latin-1").rstrip("\x00 ").strip()


def _us(raw: bytes | None, little: bool) -> int | None:
    if raw is None or len(raw) != 2:
        return None
    return int(struct.unpack("<H" if little else ">H", raw)[0])


def _native_pixel_bytes(walk: _Walk, little: bool) -> int | None:
    """Bytes a native Pixel Data must hold (PS3.5 8.1.1), None when the attributes that say
    so are missing or unreadable."""
    rows = _us(walk.values.get(_ROWS), little)
    columns = _us(walk.values.get(_COLUMNS), little)
    bits = _us(walk.values.get(_BITS_ALLOCATED), little)
    if rows is None or columns is None or bits is None:
        return None
    samples = _us(walk.values.get(_SAMPLES_PER_PIXEL), little) or 1
    if _text(walk.values.get(_PHOTOMETRIC)) == "YBR_FULL_422":
        samples = 2  # chroma subsampled 2:1 horizontally: two values per pixel (PS3.3 C.7.6.3.1.2)
    try:
        frames = int(_text(walk.values.get(_NUMBER_OF_FRAMES)) or 1)
    except ValueError:
        return None
    return (rows * columns * samples * max(frames, 1) * bits + 7) // 8


def _bytes_reader(data: bytes) -> Reader:
    view = memoryview(data)
    return lambda offset, count: bytes(view[offset : offset + count])


def check_instance(
    read: Reader,
    size: int,
    dataset_start: int,
    transfer_syntax: str,
    sop_class_if_absent: str = "",
) -> InstanceUids:
    """Refuse a dataset that is not a whole, identifiable instance; return its UIDs.

    Blocking (it reads through `read`) and cheap: it walks the elements' headers from
    `dataset_start` to `size`, reads only the values it checks (the UIDs and the image
    attributes) and skips every other value, Pixel Data included: a whole CT costs one read.
    A deflated dataset is inflated in memory first (as the store stage's parse does).

    The rules are those the store stage applies (:func:`kp_gateway.uids.is_valid_uid` on each
    UID), so that what passes here is stored, not quarantined: valid SOP Class, SOP Instance,
    Study and Series UIDs; every element ends inside the file; a sequence or encapsulated
    Pixel Data with undefined length ends in its delimiter; a native Pixel Data is as long as
    Rows, Columns, Samples per Pixel, Bits Allocated and Number of Frames call for; an image
    (Rows and Columns) has pixel data.

    Raises
    ------
    InvalidDicomError
        Any of those rules broken; the message says which.
    """
    little = transfer_syntax != _EXPLICIT_BE
    implicit = transfer_syntax == _IMPLICIT_LE
    if transfer_syntax == _DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflater.decompress(read(dataset_start, size - dataset_start))
        except zlib.error as exc:
            raise InvalidDicomError(f"the deflated dataset does not inflate ({exc})") from exc
        if not inflater.eof:
            raise _cut("the deflated dataset ends early")
        read, size, dataset_start = _bytes_reader(data), len(data), 0
    if size <= dataset_start:
        raise InvalidDicomError("the dataset is empty")
    # A dataset encoded otherwise than its transfer syntax says is read as it is encoded, as
    # pydicom (the store stage) reads it.
    walk = _Walk(read, size)
    if little:
        implicit = walk.bytes_at(dataset_start, 8)[4:6] not in _VRS
    walk.dataset(dataset_start, size, implicit, little, 0)
    uids = InstanceUids(*(_text(walk.values.get(tag)) for tag in _UID_TAGS))
    if 0x00080016 not in walk.values and sop_class_if_absent:
        # The store stage reads a missing SOP Class UID from the file meta (the request's).
        uids = uids._replace(sop_class_uid=sop_class_if_absent)
    for name, uid in zip(_UID_TAGS.values(), uids, strict=True):
        if not is_valid_uid(uid):
            raise InvalidDicomError(f"{name} {uid[:80]!r} is missing or not a valid UID")
    if _ROWS in walk.values and _COLUMNS in walk.values:
        if not walk.pixel_tags:
            raise InvalidDicomError("the image has no pixel data (the file is cut off)")
        expected = _native_pixel_bytes(walk, little)
        if (
            transfer_syntax in _NATIVE_SYNTAXES
            and walk.pixel_length is not None
            and expected is not None
            and walk.pixel_length < expected
        ):
            raise _cut(f"Pixel Data holds {walk.pixel_length} of {expected} bytes")
    return uids


def read_file_meta(read: Reader) -> tuple[int, str]:
    """Where the dataset of a Part-10 file starts, and its transfer syntax. Blocking.

    Walks the file meta elements (explicit VR little endian, PS3.10 7.1) rather than trusting
    its group length, which some writers get wrong or leave out.

    Raises
    ------
    InvalidDicomError
        No "DICM" prefix, a file meta cut off, or no Transfer Syntax UID.
    """
    if read(128, 4) != b"DICM":
        raise InvalidDicomError("not a Part-10 file (no DICM prefix at offset 128)")
    walk = _Walk(read, _FILE_META_MAX, _FILE_META_BLOCK_BYTES)
    offset, transfer_syntax = 132, ""
    while struct.unpack("<H", walk.bytes_at(offset, 2))[0] == 0x0002:
        tag, _, length, value_at = walk.header(offset, False, True)
        if length == _UNDEFINED_LENGTH:
            raise InvalidDicomError("a file meta element of undefined length")
        if tag == 0x00020010:
            transfer_syntax = _text(walk.bytes_at(value_at, min(length, _READ_VALUE_MAX)))
        offset = value_at + length
    if not is_valid_uid(transfer_syntax):
        raise InvalidDicomError("the file meta names no valid Transfer Syntax UID")
    return offset, transfer_syntax


def fd_reader(fd: int) -> Reader:
    """A :data:`Reader` over an open file descriptor (``os.pread``: no shared file offset)."""
    return lambda offset, count: os.pread(fd, count, offset)


__all__ = [
    "InstanceUids",
    "PlainFileMeta",
    "Reader",
    "check_instance",
    "dataset_head_from_file",
    "encode_file_meta",
    "fd_reader",
    "padded",
    "plausible_dataset_start",
    "read_file_meta",
    "received_dataset_head",
]
