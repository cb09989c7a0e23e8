"""Spool files for pynetdicom's chunked receive: gathered writes, head, precreated reserve."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from kp_gateway.dicom.receive_files import PrecreatedFiles, SpoolFile


def _open_spool_file(path: Path) -> SpoolFile:
    return SpoolFile(str(path), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _wait_for(predicate: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_spool_file_writes_what_pynetdicom_writes_at_its_flush(tmp_path: Path) -> None:
    """Writes wait for ``file.flush()`` (as pynetdicom calls it), then land in order."""
    path = tmp_path / "a.part"
    spool_file = _open_spool_file(path)
    spool_file.write(b"\x00" * 128)
    spool_file.write(b"DICM")
    spool_file.write(bytearray(b"meta"))
    assert path.read_bytes() == b""  # gathered, not written yet
    spool_file.file.flush()
    assert path.read_bytes() == b"\x00" * 128 + b"DICMmeta"
    spool_file.write(memoryview(b"dataset"))
    spool_file.close()
    spool_file.close()  # pynetdicom closes again after our handler
    assert path.read_bytes() == b"\x00" * 128 + b"DICMmetadataset"
    assert spool_file.size == 128 + 4 + 4 + 7
    assert spool_file.closed
    with pytest.raises(ValueError, match="closed"):
        spool_file.write(b"late")


def test_spool_file_keeps_only_its_first_bytes_in_memory(tmp_path: Path) -> None:
    spool_file = _open_spool_file(tmp_path / "b.part")
    payload = bytes(range(256)) * 40  # 10 KiB, in uneven pieces
    for start in range(0, len(payload), 700):
        spool_file.write(payload[start : start + 700])
    spool_file.sync()
    assert spool_file.head == payload[: SpoolFile.HEAD_BYTES]
    assert spool_file.size == len(payload)
    spool_file.close()
    assert (tmp_path / "b.part").read_bytes() == payload


def test_spool_file_flushes_early_past_its_bounds(tmp_path: Path) -> None:
    """Large or many writes without a flush still reach the file: memory stays bounded."""
    path = tmp_path / "c.part"
    spool_file = _open_spool_file(path)
    big = b"x" * (2 << 20)
    spool_file.write(big)
    assert path.stat().st_size == len(big)
    for _ in range(64):
        spool_file.write(b"y")
    assert path.stat().st_size == len(big) + 64
    spool_file.close()


def test_precreated_files_fill_the_reserve_and_hand_out_open_files(tmp_path: Path) -> None:
    reserve = PrecreatedFiles(tmp_path, depth=4)
    reserve.start()
    try:
        _wait_for(lambda: reserve.available == 4)
        taken = reserve.take()
        assert Path(taken.name).parent == tmp_path
        assert stat.S_IMODE(os.stat(taken.name).st_mode) == 0o600
        assert os.stat(taken.name).st_size == 0
        taken.write(b"received")
        taken.close()
        assert Path(taken.name).read_bytes() == b"received"
        # The reserve is topped up again; the file handed out is the caller's.
        _wait_for(lambda: reserve.available == 4)
        assert reserve.created_in_place == 0
        # Ready files, at most one more in the filling thread's hands, and the one taken.
        assert 5 <= len(list(tmp_path.glob("*.part"))) <= 6
    finally:
        reserve.stop()
    # Untaken files are deleted at stop; the one taken stays with its owner.
    assert [p.name for p in tmp_path.glob("*.part")] == [Path(taken.name).name]


def test_precreated_files_create_in_place_when_the_reserve_is_empty(tmp_path: Path) -> None:
    reserve = PrecreatedFiles(tmp_path, depth=2)  # not started: the reserve stays empty
    first, second = reserve.take(), reserve.take()
    assert reserve.created_in_place == 2
    assert first.name != second.name
    for spool_file in (first, second):
        spool_file.close()
        assert Path(spool_file.name).exists()
    with pytest.raises(ValueError, match="depth"):
        PrecreatedFiles(tmp_path, depth=0)


def test_precreated_files_report_an_unwritable_directory(tmp_path: Path) -> None:
    """A file that cannot be created comes back failed (the receive path answers 0xA700)."""
    reserve = PrecreatedFiles(tmp_path / "missing", depth=2)
    spool_file = reserve.take()
    assert isinstance(spool_file.error, FileNotFoundError)
    spool_file.write(b"x" * 10)
    spool_file.flush()
    assert spool_file.size == 10
    with pytest.raises(FileNotFoundError):
        spool_file.sync()
    spool_file.close()


def test_spool_file_keeps_a_write_error_for_the_receive_path(tmp_path: Path) -> None:
    """A full disk does not raise on the DUL thread; the error waits for the fsync."""
    full = tmp_path / "full"
    full.symlink_to("/dev/full")
    spool_file = SpoolFile(str(full), os.open(full, os.O_WRONLY))
    spool_file.write(b"\x00" * 132)
    spool_file.flush()  # ENOSPC, kept
    assert isinstance(spool_file.error, OSError)
    spool_file.write(b"more")  # still counted, no longer written
    spool_file.flush()
    assert spool_file.size == 136
    with pytest.raises(OSError, match="No space left"):
        spool_file.sync()
    spool_file.close()


def test_spool_file_dropped_unserved_gives_back_descriptor_and_file(tmp_path: Path) -> None:
    """A received data set nobody served (its association ended first) leaks nothing."""
    path = tmp_path / "unserved.part"
    spool_file = _open_spool_file(path)
    spool_file.write(b"data")
    fd = spool_file.fd
    del spool_file
    assert not path.exists()
    with pytest.raises(OSError):
        os.fstat(fd)
