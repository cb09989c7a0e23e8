"""Durable file primitives: fsync, atomic replace, link-or-copy, removal.

Every function is blocking; call it via ``asyncio.to_thread`` or from a thread that may block
(an association thread). The ``fsync`` switches exist for ``storage.fsync = false`` (tests and
throw-away deployments); with them off nothing here is durable across a power cut.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

# link() fails with these where a copy still works: another filesystem (EXDEV), a filesystem
# without hard links (EPERM), or a file at its link limit (EMLINK).
_NO_LINK_ERRNOS = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK})


def fsync_file(path: Path | str) -> None:
    """Blocking. fsync one file by name, so its bytes survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Blocking. fsync a directory, so a rename or a new entry in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path,
    data: bytes | dict[str, Any] | list[Any],
    *,
    fsync: bool = True,
    mode: int | None = None,
) -> None:
    """Blocking. Replace `path` with `data` atomically: temp file, fsync, rename, fsync folder.

    Readers see the old content or the new, never a mix. `data` is written as is when it is
    bytes, else as compact JSON. The temp file (``.<name>.<hex>.tmp`` beside `path`, a name
    that directory listings skip) is removed when the write fails. `mode` (e.g. ``0o600`` for
    secrets) is set on the temp file before anything is written, whatever the umask.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        payload = bytes(data)
    else:
        payload = json.dumps(data, separators=(",", ":")).encode()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def link_or_copy(src: Path, dst: Path, *, fsync: bool = True) -> None:
    """Blocking. Give `src` the new name `dst` (which must not exist): a hard link, else a copy.

    A hard link shares the bytes `src` already made durable. A copy (across filesystems) is new
    bytes, so it is fsynced when `fsync` is on; the caller still fsyncs `dst`'s folder.
    """
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
        try:
            shutil.copyfile(src, dst)
            if fsync:
                fsync_file(dst)
        except BaseException:
            dst.unlink(missing_ok=True)  # a partial copy is nobody's file
            raise


def remove_paths(*paths: Path) -> None:
    """Blocking. Unlink files and remove folders, ignoring what is already gone."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


__all__ = ["fsync_dir", "fsync_file", "link_or_copy", "remove_paths", "write_atomic"]
