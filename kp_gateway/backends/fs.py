"""Filesystem object storage under the data directory, with atomic, fsynced writes."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from kp_gateway.datadir import DataDir
from kp_gateway.durable import fsync_dir, link_or_copy, write_atomic
from kp_gateway.errors import BackendRejectedError, BackendUnavailableError, ObjectNotFoundError

logger = logging.getLogger(__name__)

# ENOSPC and friends are transient from the sender's point of view: space may come back.
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EMFILE}


def _map_os_error(exc: OSError, what: str) -> Exception:
    if exc.errno in _TRANSIENT_ERRNOS:
        return BackendUnavailableError(f"{what}: {exc.strerror}")
    return BackendRejectedError(f"{what}: {exc}")


class FsStorage:
    """Objects as files under `root` (CONTRACT section 7 keys), written temp + fsync + rename.

    Spool files live on the same filesystem, so storing one is a hard link (no copy).
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self._root = root
        self._tmp = DataDir.at(root).scratch
        self._fsync = fsync

    async def open(self) -> None:
        await asyncio.to_thread(self._tmp.mkdir, parents=True, exist_ok=True)

    async def aclose(self) -> None:
        return None

    async def ping(self) -> None:
        ok = await asyncio.to_thread(os.access, self._root, os.W_OK)
        if not ok:
            raise BackendUnavailableError(f"data directory {self._root} is not writable")

    def _path(self, key: str) -> Path:
        # Keys are built from validated UIDs or sanitised names; this guards the contract anyway.
        if key.startswith("/") or ".." in key.split("/") or "\x00" in key:
            raise BackendRejectedError(f"unsafe object key {key!r}")
        return self._root / key

    def _make_parent(self, dst: Path) -> None:
        parent = dst.parent
        if parent.is_dir():
            return
        created: list[Path] = []
        probe = parent
        while not probe.exists():
            created.append(probe)
            probe = probe.parent
        parent.mkdir(parents=True, exist_ok=True)
        if self._fsync:
            # A new directory entry must reach the disk too, or the file inside can vanish.
            for directory in created:
                fsync_dir(directory.parent)

    def _put_file_sync(self, key: str, src: Path, *, sync_dir: bool = True) -> int:
        dst = self._path(key)
        try:
            self._make_parent(dst)
            tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
            link_or_copy(src, tmp, fsync=self._fsync)
            os.replace(tmp, dst)
            if self._fsync and sync_dir:
                fsync_dir(dst.parent)
            return dst.stat().st_size
        except OSError as exc:
            raise _map_os_error(exc, f"storing {key}") from exc

    async def put_file(self, key: str, src: Path) -> int:
        return await asyncio.to_thread(self._put_file_sync, key, src)

    def _put_files_sync(self, items: Sequence[tuple[str, Path]]) -> list[int]:
        sizes = [self._put_file_sync(key, src, sync_dir=False) for key, src in items]
        if self._fsync:
            # One fsync per directory for the whole batch: a series' instances share one.
            for directory in {self._path(key).parent for key, _ in items}:
                try:
                    fsync_dir(directory)
                except OSError as exc:
                    raise _map_os_error(exc, f"syncing {directory}") from exc
        return sizes

    async def put_files(self, items: Sequence[tuple[str, Path]]) -> list[int]:
        return await asyncio.to_thread(self._put_files_sync, items)

    def _put_bytes_sync(self, key: str, data: bytes) -> None:
        dst = self._path(key)
        try:
            self._make_parent(dst)
            write_atomic(dst, data, fsync=self._fsync)
        except OSError as exc:
            raise _map_os_error(exc, f"storing {key}") from exc

    async def put_bytes(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put_bytes_sync, key, data)

    async def size(self, key: str) -> int | None:
        path = self._path(key)
        try:
            return (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _map_os_error(exc, f"reading {key}") from exc

    async def read_chunks(self, key: str, chunk_bytes: int = 1 << 20) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            fh = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"no object {key}") from exc
        try:
            while chunk := await asyncio.to_thread(fh.read, chunk_bytes):
                yield chunk
        finally:
            fh.close()

    def _fetch_sync(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError as exc:
            dest.unlink(missing_ok=True)
            raise ObjectNotFoundError(f"no object {key}") from exc
        except OSError as exc:
            dest.unlink(missing_ok=True)
            raise _map_os_error(exc, f"reading {key}") from exc

    async def fetch_to_file(self, key: str, dest: Path) -> None:
        await asyncio.to_thread(self._fetch_sync, key, dest)

    def _list_dir_sync(self, folder: Path) -> list[tuple[str, bool]]:
        """Entries of `folder` as (name, is_dir), in the order of their full keys."""
        try:
            with os.scandir(folder) as entries:
                found = [
                    (e.name, e.is_dir(follow_symlinks=False))
                    for e in entries
                    # Leftover temp files of an interrupted atomic write are not objects.
                    if not (e.name.startswith(".") and e.name.endswith(".tmp"))
                ]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise _map_os_error(exc, f"listing {folder}") from exc
        # Sorting "name/" for folders orders every key below it correctly against its
        # siblings (e.g. "1.2.3/..." before "1.2/..."), so the walk yields keys in str order.
        found.sort(key=lambda entry: entry[0] + "/" if entry[1] else entry[0])
        return found

    async def iter_keys(self, prefix: str = "", start_after: str = "") -> AsyncIterator[str]:
        base = prefix.rpartition("/")[0]
        top = f"{base}/" if base else ""
        self._path(top or ".")  # rejects unsafe prefixes
        async for key in self._walk(top, prefix, start_after):
            yield key

    async def _walk(self, folder_key: str, prefix: str, start_after: str) -> AsyncIterator[str]:
        entries = await asyncio.to_thread(self._list_dir_sync, self._root / folder_key)
        for name, is_dir in entries:
            key = folder_key + name
            if is_dir:
                sub = key + "/"
                # Skip folders whose keys cannot match the prefix or all sort before start_after.
                if not (sub.startswith(prefix) or prefix.startswith(sub)):
                    continue
                if start_after and sub < start_after and not start_after.startswith(sub):
                    continue
                async for found in self._walk(sub, prefix, start_after):
                    yield found
            elif key.startswith(prefix) and key > start_after:
                yield key

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as exc:
            raise _map_os_error(exc, f"deleting {key}") from exc

    async def free_bytes(self) -> int | None:
        usage = await asyncio.to_thread(shutil.disk_usage, self._root)
        return usage.free
