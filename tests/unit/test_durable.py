"""The durable file primitives, on real files: atomic replace, link-or-copy, fsync, removal."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from kp_gateway import durable
from kp_gateway.durable import fsync_dir, fsync_file, link_or_copy, remove_paths, write_atomic

SHM = Path("/dev/shm")


def _other_filesystem() -> Path | None:
    """A writable folder on another filesystem than the tests' tmp_path, if the machine has one."""
    return SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else None


def test_write_atomic_bytes_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "object.bin"
    target.write_bytes(b"old")
    write_atomic(target, b"new bytes")
    assert target.read_bytes() == b"new bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["object.bin"]


def test_write_atomic_json_is_compact_and_reads_back(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    doc = {"project": "admin", "numbers": [1, 2], "done": True}
    write_atomic(target, doc)
    assert json.loads(target.read_text(encoding="utf-8")) == doc
    assert b" " not in target.read_bytes()


def test_write_atomic_without_fsync_still_replaces(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    write_atomic(target, [1], fsync=False)
    write_atomic(target, [2], fsync=False)
    assert json.loads(target.read_bytes()) == [2]


def test_write_atomic_that_fails_keeps_the_old_content_and_no_temp(tmp_path: Path) -> None:
    """The rename fails (the target is a folder): nothing changes, the temp file is gone."""
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_bytes(b"kept")
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert (target / "inside").read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_fsync_file_and_dir_on_real_paths(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fsync_file(path)
    fsync_file(str(path))
    fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        fsync_dir(path)


def test_link_or_copy_on_one_filesystem_is_a_hard_link(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"payload")
    link_or_copy(src, dst)
    assert dst.read_bytes() == b"payload"
    assert os.path.samefile(src, dst)
    assert src.stat().st_nlink == 2


def test_link_or_copy_across_filesystems_copies(tmp_path: Path) -> None:
    """A real cross-device link (tmp_path to /dev/shm) fails with EXDEV; the bytes are copied."""
    other = _other_filesystem()
    if other is None or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem to link across")
    src = tmp_path / "src"
    src.write_bytes(b"payload" * 1000)
    dst = other / f"kp-gateway-test-{os.getpid()}-{tmp_path.name}"
    try:
        link_or_copy(src, dst)
        assert dst.read_bytes() == src.read_bytes()
        assert not os.path.samefile(src, dst)
        assert src.stat().st_nlink == 1
    finally:
        dst.unlink(missing_ok=True)


def test_link_or_copy_fsyncs_the_copy_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forced EXDEV (fault injection): the copy is fsynced with fsync on, and not with it off."""

    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    synced: list[Path] = []
    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(durable, "fsync_file", lambda path: synced.append(Path(path)))
    src = tmp_path / "src"
    src.write_bytes(b"payload")
    link_or_copy(src, tmp_path / "synced")
    link_or_copy(src, tmp_path / "unsynced", fsync=False)
    assert (tmp_path / "synced").read_bytes() == (tmp_path / "unsynced").read_bytes() == b"payload"
    assert synced == [tmp_path / "synced"]


def test_link_or_copy_other_errors_propagate(tmp_path: Path) -> None:
    """An existing destination is not overwritten by a copy: EEXIST is the caller's problem."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        link_or_copy(src, dst)
    assert dst.read_bytes() == b"old"


def test_remove_paths_removes_files_and_trees_and_ignores_missing(tmp_path: Path) -> None:
    file, tree = tmp_path / "file", tmp_path / "tree"
    file.write_bytes(b"x")
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "leaf").write_bytes(b"y")
    remove_paths(file, tree, tmp_path / "never-existed")
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_mode_holds_whatever_the_umask(tmp_path: Path) -> None:
    """A secret written with mode 0600 is never readable by others, not even the temp file."""
    previous = os.umask(0o022)
    try:
        target = tmp_path / "secret.json"
        write_atomic(target, {"k": "v"}, mode=0o600)
        assert target.stat().st_mode & 0o777 == 0o600
        write_atomic(tmp_path / "plain.bin", b"x")
        assert (tmp_path / "plain.bin").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)
