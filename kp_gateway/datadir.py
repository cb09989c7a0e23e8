"""The data directory (``storage.path``): its layout, its lock and the generated admin token.

::

    <data dir>/
        .lock                     held by ``serve`` and ``reindex`` for their whole run
        token                     the generated API token (0600) when KP_GATEWAY_HTTP_TOKEN is unset
        tokens.json               project tokens, hashed (0600; :mod:`kp_gateway.tokens`)
        spool/                    the durable spool (:mod:`kp_gateway.pipeline.spool`)
            tmp/                  partial files and scratch folders; emptied at start-up
        quarantine/<stage>/       spool files that kept failing
        uploads-state/            upload records and bodies (:mod:`kp_gateway.upload.record`)
        reindex.checkpoint.json   an interrupted ``kp-gateway reindex`` (:mod:`kp_gateway.reindex`)
        index.sqlite3             the SQLite index, unless ``index.sqlite_path`` moves it
        dicom/ thumbnails/ validation/ uploads/ routing/
                                  objects of the filesystem storage backend (CONTRACT section 7)

Functions are blocking; call them via ``asyncio.to_thread`` at start-up.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kp_gateway.durable import fsync_dir
from kp_gateway.errors import DataDirLockedError


@dataclass(frozen=True, slots=True, kw_only=True)
class DataDir:
    """The paths of one data directory, computed by :meth:`at` (nothing is created here)."""

    root: Path
    lock_file: Path
    token_file: Path
    project_tokens_file: Path
    spool: Path
    scratch: Path
    quarantine: Path
    uploads_state: Path

    @classmethod
    def at(cls, root: Path) -> DataDir:
        """The layout under `root` (see the module docstring)."""
        spool = root / "spool"
        return cls(
            root=root,
            lock_file=root / ".lock",
            token_file=root / "token",
            project_tokens_file=root / "tokens.json",
            spool=spool,
            # On the spool's filesystem, so a finished file is renamed into place, not copied.
            scratch=spool / "tmp",
            quarantine=root / "quarantine",
            uploads_state=root / "uploads-state",
        )


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Take the exclusive lock of a data directory; close the returned file to release it.

    Blocking; call via asyncio.to_thread. ``serve`` and ``reindex`` both hold it for their
    whole run, so neither can start on a data directory the other is using (``flock``: the
    kernel drops it when the process dies, so a crash never leaves a stale lock).

    Raises
    ------
    DataDirLockedError
        Another process holds the lock.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = DataDir.at(data_dir).lock_file
    handle = open(path, "ab")  # noqa: SIM115 - held until the caller closes it
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        # Worded as a config error: the fix is another storage.path or stopping the other process.
        raise DataDirLockedError(
            f"Config 'storage.path' has value {str(data_dir)!r}: the data directory is in use "
            "by another kp-gateway process (serve or reindex); stop it first."
        ) from None
    return handle


def load_or_create_token(data_dir: Path, configured: str = "") -> tuple[str, bool]:
    """The API token: `configured` (``KP_GATEWAY_HTTP_TOKEN``), else the one stored in the
    data directory, else a new one stored there (mode 0600).

    Blocking; call at start-up, with the data directory locked. Returns the token and whether
    it was generated just now.
    """
    if configured:
        return configured, False
    path = DataDir.at(data_dir).token_file
    if path.exists():
        return path.read_text(encoding="utf-8").strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # Created 0600 (never readable by others, not even empty) and fsynced: an empty token file
    # after a power cut would be read back as the token "".
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(path.parent)
    return token, True


__all__ = ["DataDir", "load_or_create_token", "lock_data_dir"]
