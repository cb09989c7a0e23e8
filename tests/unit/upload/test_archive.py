"""Unit tests for kp_gateway.upload.archive: attack table, extraction, ZIP64, streaming memory."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import stat
import struct
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kp_gateway.config import UploadConfig
from kp_gateway.errors import PayloadTooLargeError, UnsafeArchiveError
from kp_gateway.upload.archive import (
    ArchiveLimits,
    ArchiveMember,
    is_zip,
    list_members,
    normalise_member_name,
    open_member,
)
from kp_gateway.upload.importer import spool_member

DEFAULT = UploadConfig()


def extracted(archive: Path, member: ArchiveMember, spool: Path) -> bytes:
    """The member's bytes as the importer extracts them into the spool."""
    spool.mkdir(exist_ok=True)
    path, _ = spool_member(archive, member, DEFAULT, spool)
    return path.read_bytes()


Entry = tuple[str | zipfile.ZipInfo, bytes]
Builder = Callable[[Path], Path]

# Offsets inside a central directory header (APPNOTE 4.3.12).
CD_FLAGS, CD_METHOD, CD_USIZE, CD_OFFSET = 8, 10, 24, 42
LOCAL_USIZE = 22  # same field in the local file header (APPNOTE 4.3.7)


def make_zip(
    path: Path,
    entries: list[Entry],
    compression: int = zipfile.ZIP_DEFLATED,
    force_zip64: bool = False,
) -> Path:
    """Write `entries` (name or ZipInfo, data) into a zip at `path`."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in entries:
            with zf.open(name, "w", force_zip64=force_zip64) as out:
                out.write(data)
    return path


def patch_header(path: Path, magic: bytes, index: int, offset: int, fmt: str, value: int) -> None:
    """Overwrite one field of the `index`-th header starting with `magic`."""
    raw = bytearray(path.read_bytes())
    start = -1
    for _ in range(index + 1):
        start = raw.index(magic, start + 1)
    struct.pack_into(fmt, raw, start + offset, value)
    path.write_bytes(bytes(raw))


def patch_central(path: Path, index: int, offset: int, fmt: str, value: int) -> None:
    """Overwrite one field of the `index`-th central directory header."""
    patch_header(path, b"PK\x01\x02", index, offset, fmt, value)


def _named(name: str) -> Builder:
    return lambda p: make_zip(p, [(name, b"x")])


def _symlink(p: Path) -> Path:
    info = zipfile.ZipInfo("link.dcm")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return make_zip(p, [(info, b"/etc/passwd")])


def _encrypted(p: Path) -> Path:
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("secret.dcm", b"x")
        # zipfile clears flag_bits when writing the local header; the central copy is ours.
        zf.filelist[0].flag_bits |= 0x1
    return p


def _nul(p: Path) -> Path:
    make_zip(p, [("evil.dcmQ.txt", b"x")])
    p.write_bytes(p.read_bytes().replace(b"evil.dcmQ.txt", b"evil.dcm\x00.txt"))
    return p


def _method(p: Path) -> Path:
    make_zip(p, [("odd.dcm", b"x")])
    patch_central(p, 0, CD_METHOD, "<H", 99)
    return p


def _overlap(p: Path) -> Path:
    make_zip(p, [("a.dcm", b"a" * 100), ("b.dcm", b"b" * 100)], zipfile.ZIP_STORED)
    patch_central(p, 1, CD_OFFSET, "<L", 0)
    return p


def _outside(p: Path) -> Path:
    make_zip(p, [("far.dcm", b"x")])
    patch_central(p, 0, CD_OFFSET, "<L", 0xFFFFFF00)
    return p


def _truncated(p: Path) -> Path:
    make_zip(p, [("a.dcm", os.urandom(4000))])
    p.write_bytes(p.read_bytes()[:2000])
    return p


def _bomb(p: Path) -> Path:
    return make_zip(p, [("bomb.dcm", bytes(4 << 20))])


def _spread_bomb(p: Path) -> Path:
    # Each member stays under the per-member ratio floor; only the overall check catches it.
    return make_zip(p, [(f"part{i}.dcm", bytes(512 << 10)) for i in range(8)])


ATTACKS = [
    ("dotdot", _named("../x"), DEFAULT, UnsafeArchiveError, "'../x' escapes the archive root"),
    ("absolute", _named("/abs"), DEFAULT, UnsafeArchiveError, "'/abs' has an absolute path"),
    ("nested_dotdot", _named("a/../../x"), DEFAULT, UnsafeArchiveError, "'a/../../x' escapes"),
    ("inner_dotdot", _named("a/../x"), DEFAULT, UnsafeArchiveError, "'a/../x' has a '..'"),
    ("drive", _named("C:\\x"), DEFAULT, UnsafeArchiveError, "'C:\\\\x' has an absolute path"),
    ("backslash", _named("a\\..\\..\\x"), DEFAULT, UnsafeArchiveError, "escapes the archive"),
    ("unc", _named("\\\\server\\share\\x"), DEFAULT, UnsafeArchiveError, "absolute path"),
    ("nul", _nul, DEFAULT, UnsafeArchiveError, "'evil.dcm\\x00.txt' has a control character"),
    ("symlink", _symlink, DEFAULT, UnsafeArchiveError, "'link.dcm' is a symbolic link"),
    ("encrypted", _encrypted, DEFAULT, UnsafeArchiveError, "'secret.dcm' is encrypted"),
    ("method", _method, DEFAULT, UnsafeArchiveError, "'odd.dcm' uses unsupported compression"),
    (
        "duplicate",
        lambda p: make_zip(p, [("a/b.dcm", b"1"), ("./a//b.dcm", b"2")]),
        DEFAULT,
        UnsafeArchiveError,
        "'./a//b.dcm' has the same path as 'a/b.dcm'",
    ),
    (
        "file_and_folder",
        lambda p: make_zip(p, [("a", b"1"), ("a/b.dcm", b"2")]),
        DEFAULT,
        UnsafeArchiveError,
        "'a' is both a file and a folder",
    ),
    ("overlap", _overlap, DEFAULT, UnsafeArchiveError, "'a.dcm' overlaps another member"),
    ("outside", _outside, DEFAULT, UnsafeArchiveError, "'far.dcm' lies outside the archive"),
    ("truncated", _truncated, DEFAULT, UnsafeArchiveError, "not a readable zip archive"),
    (
        "too_many",
        lambda p: make_zip(p, [(f"{i}.dcm", b"x") for i in range(4)]),
        UploadConfig(max_members=3),
        PayloadTooLargeError,
        "4 entries, over the limit of 3",
    ),
    ("bomb", _bomb, DEFAULT, PayloadTooLargeError, "'bomb.dcm' expands"),
    ("spread_bomb", _spread_bomb, DEFAULT, PayloadTooLargeError, "the archive expands"),
    (
        "total_cap",
        lambda p: make_zip(p, [("a.dcm", b"1" * 600), ("b.dcm", b"2" * 600)]),
        UploadConfig(max_total_uncompressed_bytes=1000),
        PayloadTooLargeError,
        "at member 'b.dcm'",
    ),
    (
        "member_cap",
        lambda p: make_zip(p, [("big.dcm", b"1" * 200)]),
        UploadConfig(max_member_bytes=100),
        PayloadTooLargeError,
        "'big.dcm' is 200 bytes, over the limit of 100",
    ),
]


@pytest.mark.parametrize(
    ("build", "limits", "error", "fragment"),
    [a[1:] for a in ATTACKS],
    ids=[a[0] for a in ATTACKS],
)
def test_list_members_attack_rejected(
    tmp_path: Path,
    build: Builder,
    limits: ArchiveLimits,
    error: type[Exception],
    fragment: str,
) -> None:
    """Each hostile archive is refused, before extraction, with a message naming the cause."""
    archive = build(tmp_path / "upload.zip")
    with pytest.raises(error) as excinfo:
        list_members(archive, limits)
    assert type(excinfo.value) is error
    assert fragment in str(excinfo.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload.zip"]


def test_list_members_small_compressible_member_allowed(tmp_path: Path) -> None:
    """A tiny, highly compressible member is under the ratio floor and accepted."""
    archive = make_zip(tmp_path / "u.zip", [("blank.dcm", bytes(100_000))])
    assert [m.name for m in list_members(archive, DEFAULT)] == ["blank.dcm"]


def test_list_members_nested_folders_skips_junk(tmp_path: Path) -> None:
    """Folders, __MACOSX/ and dot-files are skipped; nested files keep their relative path."""
    archive = tmp_path / "u.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.mkdir("study1")
        zf.writestr("study1/series2/IM0001.dcm", b"one")
        zf.writestr("study1\\series3\\IM0001.dcm", b"two")
        zf.writestr("__MACOSX/study1/._IM0001.dcm", b"junk")
        zf.writestr(".DS_Store", b"junk")
        zf.writestr("study1/.git/config", b"junk")
    members = list_members(archive, DEFAULT)
    assert [m.name for m in members] == ["study1/series2/IM0001.dcm", "study1/series3/IM0001.dcm"]
    assert [extracted(archive, m, tmp_path / "spool") for m in members] == [b"one", b"two"]


@pytest.mark.parametrize(
    "method",
    [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA],
    ids=["stored", "deflate", "bzip2", "lzma"],
)
def test_extraction_round_trips_every_compression_method(tmp_path: Path, method: int) -> None:
    """Every supported method extracts byte for byte."""
    data = os.urandom(3000) + bytes(70_000) + b"tail"
    archive = make_zip(tmp_path / "u.zip", [("a/b.dcm", data), ("empty.dcm", b"")], method)
    members = list_members(archive, DEFAULT)
    assert [extracted(archive, m, tmp_path / "spool") for m in members] == [data, b""]


def test_list_members_zip64_extracts(tmp_path: Path) -> None:
    """A ZIP64 archive (forced extra fields) lists and extracts."""
    archive = make_zip(tmp_path / "u.zip", [("z.dcm", b"zip64" * 1000)], force_zip64=True)
    with zipfile.ZipFile(archive) as zf:
        assert zf.infolist()[0].extract_version >= zipfile.ZIP64_VERSION
    (member,) = list_members(archive, DEFAULT)
    assert extracted(archive, member, tmp_path / "spool") == b"zip64" * 1000


def test_open_member_lying_header_raises(tmp_path: Path) -> None:
    """Data longer than the declared size is cut off with PayloadTooLargeError, no file left."""
    archive = make_zip(tmp_path / "u.zip", [("liar.dcm", os.urandom(500) * 20)])
    patch_central(archive, 0, CD_USIZE, "<L", 100)
    patch_header(archive, b"PK\x03\x04", 0, LOCAL_USIZE, "<L", 100)
    (member,) = list_members(archive, DEFAULT)
    assert member.file_size == 100
    with pytest.raises(
        PayloadTooLargeError, match=re.escape("'liar.dcm' holds more data than the 100")
    ):
        extracted(archive, member, tmp_path / "spool")
    assert list((tmp_path / "spool").iterdir()) == []


def test_open_member_short_data_raises(tmp_path: Path) -> None:
    """Data shorter than the declared size is reported as truncated."""
    archive = make_zip(tmp_path / "u.zip", [("short.dcm", b"abc" * 100)])
    patch_central(archive, 0, CD_USIZE, "<L", 301)
    (member,) = list_members(archive, DEFAULT)
    with open_member(archive, member, DEFAULT) as src, pytest.raises(UnsafeArchiveError) as exc:
        src.read()
    assert "'short.dcm' is truncated: 300 of 301 bytes" in str(exc.value)


def test_open_member_crc_mismatch_raises(tmp_path: Path) -> None:
    """A flipped data byte fails the CRC check, naming the member."""
    archive = make_zip(tmp_path / "u.zip", [("crc.dcm", b"A" * 64)], zipfile.ZIP_STORED)
    archive.write_bytes(archive.read_bytes().replace(b"A" * 64, b"A" * 63 + b"B", 1))
    (member,) = list_members(archive, DEFAULT)
    expected = re.escape("'crc.dcm' failed its CRC check")
    with (
        open_member(archive, member, DEFAULT) as src,
        pytest.raises(UnsafeArchiveError, match=expected),
    ):
        src.read()


@pytest.mark.parametrize(
    "method",
    [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA],
    ids=["deflate", "bzip2", "lzma"],
)
def test_open_member_corrupt_stream_raises(tmp_path: Path, method: int) -> None:
    """Damaged compressed data is an UnsafeArchiveError naming the member, never a codec error."""
    archive = make_zip(
        tmp_path / "u.zip", [("bad.dcm", random.Random(0).randbytes(2000) * 3)], method
    )
    (member,) = list_members(archive, DEFAULT)
    raw = bytearray(archive.read_bytes())
    data_start = member.header_offset + 30 + len("bad.dcm")
    for i in range(data_start + 8, data_start + member.compress_size // 2, 7):
        raw[i] ^= 0xFF
    archive.write_bytes(bytes(raw))
    with open_member(archive, member, DEFAULT) as src, pytest.raises(UnsafeArchiveError) as exc:
        src.read()
    assert "'bad.dcm'" in str(exc.value)


def test_list_members_empty_archive_returns_nothing(tmp_path: Path) -> None:
    """An archive without entries is valid and yields no members."""
    assert list_members(make_zip(tmp_path / "u.zip", []), DEFAULT) == []


def test_open_member_forged_offset_raises(tmp_path: Path) -> None:
    """A member pointing at another entry's local header is refused."""
    archive = make_zip(tmp_path / "u.zip", [("a.dcm", b"a"), ("b.dcm", b"b")])
    a, b = list_members(archive, DEFAULT)
    forged = dataclasses.replace(b, header_offset=a.header_offset)
    with pytest.raises(
        UnsafeArchiveError, match=re.escape("'b.dcm' does not match its local header")
    ):
        extracted(archive, forged, tmp_path / "spool")
    assert list((tmp_path / "spool").iterdir()) == []


@pytest.mark.parametrize(
    ("method", "make_chunk", "limits"),
    [
        (zipfile.ZIP_STORED, lambda: os.urandom(1 << 20), DEFAULT),
        (zipfile.ZIP_DEFLATED, lambda: bytes(1 << 20), UploadConfig(max_compression_ratio=1e6)),
    ],
    ids=["stored", "deflate"],
)
def test_extraction_of_50mb_keeps_memory_flat(
    tmp_path: Path, method: int, make_chunk: Callable[[], bytes], limits: ArchiveLimits
) -> None:
    """Extracting a 50 MB member keeps the tracemalloc peak under 5 MB."""
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", compression=method) as zf, zf.open("big.dcm", "w") as out:
        for _ in range(50):
            out.write(make_chunk())
    (member,) = list_members(archive, limits)
    tracemalloc.start()
    try:
        target, _ = spool_member(archive, member, limits, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert target.stat().st_size == 50 << 20
    assert peak < 5 << 20


def test_is_zip_detects_zip(tmp_path: Path) -> None:
    """is_zip is true for a zip and false for other bytes."""
    other = tmp_path / "x.dcm"
    other.write_bytes(b"\0" * 128 + b"DICM")
    assert is_zip(make_zip(tmp_path / "u.zip", [("a", b"1")]))
    assert not is_zip(other)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a/b.dcm", "a/b.dcm"),
        ("./a//b.dcm", "a/b.dcm"),
        ("a\\b.dcm", "a/b.dcm"),
        ("a/", None),
        ("a/.", None),
        ("__MACOSX/a/._b", None),
        ("a/.hidden/b.dcm", None),
        ("...", None),
    ],
)
def test_normalise_member_name_table(raw: str, expected: str | None) -> None:
    """Known names normalise or skip as documented."""
    assert normalise_member_name(raw) == expected


NAME_PIECES = st.sampled_from(["a", "b.dcm", ".", "..", "/", "\\", "C:", ":", "\x00", " ", "é"])
NAMES = st.lists(NAME_PIECES | st.text(max_size=3), max_size=8).map("".join)


@settings(max_examples=200, deadline=None)
@given(NAMES)
def test_normalise_member_name_never_escapes(raw: str) -> None:
    """Results are relative, free of '..' and backslashes, and idempotent."""
    try:
        name = normalise_member_name(raw)
    except UnsafeArchiveError:
        return
    if name is None:
        return
    parts = name.split("/")
    assert not name.startswith("/")
    assert ".." not in parts
    assert "\\" not in name
    assert all(parts)
    assert normalise_member_name(name) == name
