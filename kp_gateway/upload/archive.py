"""Safe handling of an already-spooled zip upload: validated enumeration and capped extraction."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from kp_gateway.errors import PayloadTooLargeError, UnsafeArchiveError

if TYPE_CHECKING:
    from _typeshed import StrPath, WriteableBuffer

logger = logging.getLogger(__name__)

# Members below this size skip the per-member ratio check: a blank mask or a zero-padded DICOM
# header legitimately compresses past 200:1, and a 1 MiB member cannot hurt us on its own. Many
# of them together are still caught by the overall ratio check and the total-size cap.
_RATIO_FLOOR_BYTES = 1 << 20
_INPUT_CHUNK_BYTES = 64 * 1024
_OUTPUT_CHUNK_BYTES = 256 * 1024  # per decompress call, so peak memory does not track chunk_bytes
_MAX_LZMA_DICT_BYTES = 64 << 20  # xz -9; liblzma allocates the declared dictionary up front
_MAX_COMPONENT_BYTES = 255  # NAME_MAX on every filesystem we extract to
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # APPNOTE 4.3.7, 30 bytes
_FLAG_ENCRYPTED = 0x1 | 0x40  # traditional and strong encryption (APPNOTE 4.4.4)
_FLAG_UTF8 = 0x800
_DOS_DIRECTORY = 0x10
_DRIVE = re.compile(r"^[A-Za-z]:")

_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
# bz2/lzma are optional in CPython builds; accept them only when the interpreter can decode them.
if importlib.util.find_spec("bz2") is not None:
    _METHODS[zipfile.ZIP_BZIP2] = "bzip2"
if importlib.util.find_spec("lzma") is not None:
    _METHODS[zipfile.ZIP_LZMA] = "lzma"


class ArchiveLimits(Protocol):
    """Caps applied to every archive; all are checked before anything is extracted.

    The ``[upload]`` config section (:class:`kp_gateway.config.UploadConfig`) is one; its
    defaults are the only ones. The ratio applies per member and overall; members under
    ``_RATIO_FLOOR_BYTES`` are exempt (see its comment).
    """

    @property
    def max_members(self) -> int: ...
    @property
    def max_total_uncompressed_bytes(self) -> int: ...
    @property
    def max_member_bytes(self) -> int: ...
    @property
    def max_compression_ratio(self) -> float: ...


@dataclass(frozen=True, slots=True)
class ArchiveMember:
    """One regular file in a validated archive, as returned by `list_members`.

    The keyword-only locator fields let `open_member` seek straight to the data instead of
    re-parsing the central directory for every member (quadratic for large archives).
    """

    name: str
    file_size: int
    compress_size: int
    _: KW_ONLY
    crc: int
    compress_type: int
    header_offset: int


def normalise_member_name(raw: str) -> str | None:
    """Blocking; call via asyncio.to_thread.

    Turn a raw zip entry name into a relative POSIX path, or None for entries to skip
    (folders, ``__MACOSX/``, any path component starting with "."). Raises UnsafeArchiveError
    for control characters, absolute paths, drive letters, ``..`` and overlong components.
    """
    # NUL hides an extension from scanners; other controls and lone surrogates break logs/paths.
    if any(ord(c) < 0x20 or c == "\x7f" or 0xD800 <= ord(c) < 0xE000 for c in raw):
        raise UnsafeArchiveError(f"member {raw!r} has a control character in its name")
    # APPNOTE 4.4.17 mandates "/", but Windows tools write "\", and so would a Windows extractor.
    parts = raw.replace("\\", "/").split("/")
    kept = [p for p in parts if p not in ("", ".")]
    if (parts[0] == "" and len(parts) > 1) or (kept and _DRIVE.match(kept[0])):
        raise UnsafeArchiveError(f"member {raw!r} has an absolute path")
    depth = 0
    for part in kept:
        depth += -1 if part == ".." else 1
        if depth < 0:
            raise UnsafeArchiveError(f"member {raw!r} escapes the archive root")
    if ".." in kept:
        raise UnsafeArchiveError(f"member {raw!r} has a '..' path component")
    if not kept or parts[-1] in ("", "."):
        return None
    if kept[0] == "__MACOSX" or any(p.startswith(".") for p in kept):
        return None
    if any(len(p.encode()) > _MAX_COMPONENT_BYTES for p in kept):
        raise UnsafeArchiveError(f"member {raw!r} has a path component over 255 bytes")
    return "/".join(kept)


def is_zip(path: StrPath) -> bool:
    """Blocking; call via asyncio.to_thread.

    True if `path` ends with a zip end-of-central-directory record.
    """
    return zipfile.is_zipfile(path)


def list_members(path: StrPath, limits: ArchiveLimits) -> list[ArchiveMember]:
    """Blocking; call via asyncio.to_thread.

    Validate the whole central directory before anything is extracted and return the regular
    files to import, in archive order.

    Raises
    ------
    UnsafeArchiveError
        Corrupt zip, traversal, symlink or special file, encryption, unsupported compression,
        duplicate paths, overlapping members.
    PayloadTooLargeError
        Too many entries, a member or the total too large, compression ratio over the limit.
    """
    archive_bytes = Path(path).stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    # zipfile signals a damaged central directory through all of these.
    except (zipfile.BadZipFile, EOFError, ValueError, struct.error, NotImplementedError) as exc:
        raise UnsafeArchiveError(f"the upload is not a readable zip archive ({exc})") from exc
    if len(infos) > limits.max_members:
        raise PayloadTooLargeError(
            f"the archive has {len(infos)} entries, over the limit of {limits.max_members}"
        )
    _check_extents(infos, archive_bytes)
    members: list[ArchiveMember] = []
    seen: dict[str, str] = {}
    total = 0
    for info in infos:
        raw = info.orig_filename  # before zipfile truncates at NUL, which hides the trick
        name = normalise_member_name(raw)
        mode = info.external_attr >> 16
        is_dir = info.is_dir() or stat.S_ISDIR(mode) or bool(info.external_attr & _DOS_DIRECTORY)
        if name is None or (is_dir and info.file_size == 0):
            logger.debug("skipping archive entry %r", raw)
            continue
        if stat.S_ISLNK(mode):
            raise UnsafeArchiveError(f"member {raw!r} is a symbolic link")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise UnsafeArchiveError(f"member {raw!r} is not a regular file")
        if info.flag_bits & _FLAG_ENCRYPTED:
            raise UnsafeArchiveError(f"member {raw!r} is encrypted; upload it without a password")
        if info.compress_type not in _METHODS:
            raise UnsafeArchiveError(
                f"member {raw!r} uses unsupported compression method {info.compress_type}; "
                f"use one of: {', '.join(_METHODS.values())}"
            )
        if name in seen:
            raise UnsafeArchiveError(f"member {raw!r} has the same path as {seen[name]!r}")
        seen[name] = raw
        _check_member_size(raw, info.file_size, info.compress_size, limits)
        total += info.file_size
        if total > limits.max_total_uncompressed_bytes:
            raise PayloadTooLargeError(
                f"the archive expands to more than {limits.max_total_uncompressed_bytes} bytes "
                f"(limit reached at member {raw!r})"
            )
        members.append(
            ArchiveMember(
                name,
                info.file_size,
                info.compress_size,
                crc=info.CRC,
                compress_type=info.compress_type,
                header_offset=info.header_offset,
            )
        )
    # "a" as a file and "a/b" inside it cannot both be written; refuse rather than half-extract.
    for member in members:
        parent = member.name.rpartition("/")[0]
        while parent:
            if parent in seen:
                raise UnsafeArchiveError(f"member {seen[parent]!r} is both a file and a folder")
            parent = parent.rpartition("/")[0]
    ratio_limit = limits.max_compression_ratio
    if total > _RATIO_FLOOR_BYTES and total > ratio_limit * archive_bytes:
        raise PayloadTooLargeError(
            f"the archive expands {total / archive_bytes:.0f}:1, over the limit of "
            f"{ratio_limit:.0f}:1 (a zip bomb?)"
        )
    logger.debug("archive %s: %d members, %d bytes uncompressed", path, len(members), total)
    return members


def _check_member_size(raw: str, size: int, compressed: int, limits: ArchiveLimits) -> None:
    if size > limits.max_member_bytes:
        raise PayloadTooLargeError(
            f"member {raw!r} is {size} bytes, over the limit of {limits.max_member_bytes}"
        )
    if size > _RATIO_FLOOR_BYTES and size > limits.max_compression_ratio * compressed:
        raise PayloadTooLargeError(
            f"member {raw!r} expands {size / max(compressed, 1):.0f}:1, over the limit of "
            f"{limits.max_compression_ratio:.0f}:1 (a zip bomb?)"
        )


def _check_extents(infos: list[zipfile.ZipInfo], archive_bytes: int) -> None:
    # Overlapping entries (Fifield's "better zip bomb") reuse one compressed blob many times.
    # Every entry needs at least a 30-byte local header plus its compressed data before the
    # next one starts, whatever its name and extra-field lengths.
    ordered = sorted(infos, key=lambda i: i.header_offset)
    for i, info in enumerate(ordered):
        end = info.header_offset + _LOCAL_HEADER.size + info.compress_size
        if info.header_offset < 0 or end > archive_bytes:
            raise UnsafeArchiveError(
                f"member {info.orig_filename!r} lies outside the archive (truncated or corrupt?)"
            )
        if i + 1 < len(ordered) and end > ordered[i + 1].header_offset:
            raise UnsafeArchiveError(f"member {info.orig_filename!r} overlaps another member")


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def needs_input(self) -> bool: ...
    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _Stored:
    # The stored method as a pass-through decompressor, so readinto has a single loop.
    eof = False

    def __init__(self) -> None:
        self._buf = b""

    @property
    def needs_input(self) -> bool:
        return not self._buf

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        buf = self._buf + data
        max_length = len(buf) if max_length < 0 else max_length
        self._buf = buf[max_length:]
        return buf[:max_length]


class _Inflater:
    # zlib.decompressobj has no needs_input/eof pair like bz2 and lzma; this adds them.
    def __init__(self) -> None:
        self._d = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, no zlib header

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def needs_input(self) -> bool:
        return not self._d.unconsumed_tail

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        return self._d.decompress(self._d.unconsumed_tail + data, max(max_length, 0))


class _MemberReader(io.RawIOBase):
    """Decompresses one member, holding it to its declared size and CRC."""

    def __init__(self, fh: BinaryIO, member: ArchiveMember) -> None:
        self._fh = fh
        self._member = member
        self._left = member.compress_size
        self._produced = 0
        self._crc = 0
        self._done = False
        self._decomp = self._make_decompressor()

    def _make_decompressor(self) -> _Decompressor:
        method = self._member.compress_type
        if method == zipfile.ZIP_DEFLATED:
            return _Inflater()
        if method == zipfile.ZIP_BZIP2:
            import bz2

            return bz2.BZ2Decompressor()
        if method == zipfile.ZIP_LZMA:
            import lzma

            # APPNOTE 5.8.8: 2-byte version, 2-byte properties size, then LZMA1 properties.
            head = self._read_input(4)
            props = self._read_input(int.from_bytes(head[2:4], "little"))
            if len(props) < 5:
                raise UnsafeArchiveError(f"member {self._member.name!r} is corrupt")
            # A dictionary larger than the member is never needed, so clamp the declared one.
            lc_lp_pb = props[0]
            dict_size = min(int.from_bytes(props[1:5], "little"), max(self._member.file_size, 4096))
            if dict_size > _MAX_LZMA_DICT_BYTES:
                raise UnsafeArchiveError(f"member {self._member.name!r} needs too much memory")
            lc, lp, pb = lc_lp_pb % 9, lc_lp_pb // 9 % 5, lc_lp_pb // 45
            filt = {"id": lzma.FILTER_LZMA1, "lc": lc, "lp": lp, "pb": pb, "dict_size": dict_size}
            try:
                return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[filt])
            except lzma.LZMAError as exc:
                raise UnsafeArchiveError(f"member {self._member.name!r} is corrupt") from exc
        if method == zipfile.ZIP_STORED:
            return _Stored()
        raise UnsafeArchiveError(f"member {self._member.name!r} uses an unsupported compression")

    def _read_input(self, size: int) -> bytes:
        chunk = self._fh.read(min(size, self._left))
        if len(chunk) < min(size, self._left):
            raise UnsafeArchiveError(f"member {self._member.name!r} is truncated")
        self._left -= len(chunk)
        return chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        name = self._member.name
        while not self._done:
            if self._decomp.eof or (self._decomp.needs_input and self._left == 0):
                self._finish()
                break
            data = self._read_input(_INPUT_CHUNK_BYTES) if self._decomp.needs_input else b""
            try:
                out = self._decomp.decompress(data, min(len(view), _OUTPUT_CHUNK_BYTES))
            # zlib.error, OSError (bz2), LZMAError, EOFError: all mean corrupt input; the call
            # runs only C decoders on the sender's bytes, so nothing else can hide here.
            except Exception as exc:
                raise UnsafeArchiveError(f"member {name!r} is corrupt ({exc})") from exc
            if out:
                self._produced += len(out)
                if self._produced > self._member.file_size:
                    raise PayloadTooLargeError(
                        f"member {name!r} holds more data than the "
                        f"{self._member.file_size} bytes its header declares"
                    )
                self._crc = zlib.crc32(out, self._crc)
                view[: len(out)] = out
                return len(out)
        return 0

    def _finish(self) -> None:
        self._done = True
        name = self._member.name
        if self._produced != self._member.file_size:
            raise UnsafeArchiveError(
                f"member {name!r} is truncated: {self._produced} of {self._member.file_size} bytes"
            )
        if self._crc != self._member.crc:
            raise UnsafeArchiveError(f"member {name!r} failed its CRC check; the zip is corrupt")

    def close(self) -> None:
        self._fh.close()
        super().close()


def _open_reader(fh: BinaryIO, member: ArchiveMember) -> _MemberReader:
    corrupt = UnsafeArchiveError(f"member {member.name!r} has a corrupt local header")
    fh.seek(member.header_offset)
    header = fh.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise corrupt
    fields = _LOCAL_HEADER.unpack(header)
    flags, name_len, extra_len = fields[2], fields[9], fields[10]
    try:
        local_raw = fh.read(name_len).decode("utf-8" if flags & _FLAG_UTF8 else "cp437")
    except UnicodeDecodeError as exc:
        raise corrupt from exc
    # The central directory is what list_members validated; a different local entry is forged.
    if flags & _FLAG_ENCRYPTED or normalise_member_name(local_raw) != member.name:
        raise UnsafeArchiveError(f"member {member.name!r} does not match its local header")
    fh.seek(extra_len, os.SEEK_CUR)
    return _MemberReader(fh, member)


@contextlib.contextmanager
def open_member(path: StrPath, member: ArchiveMember, limits: ArchiveLimits) -> Iterator[BinaryIO]:
    """Blocking; call via asyncio.to_thread.

    Open a member returned by `list_members` as a non-seekable binary stream.

    Raises
    ------
    PayloadTooLargeError
        The data expands past the member's declared size (a lying header).
    UnsafeArchiveError
        CRC mismatch, truncated or corrupt data, a local header that disagrees with the
        central directory.
    """
    _check_member_size(member.name, member.file_size, member.compress_size, limits)
    fh = open(path, "rb")  # noqa: SIM115 - owned and closed by the reader
    try:
        reader = _open_reader(fh, member)
    except BaseException:
        fh.close()
        raise
    with io.BufferedReader(reader, buffer_size=_INPUT_CHUNK_BYTES) as stream:
        yield stream
