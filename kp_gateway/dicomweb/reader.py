"""Reading stored instances for WADO-RS: the DICOMweb process pool, local copies of objects
that are not local files, and the series metadata kept in storage.

Loop only (it awaits the pool, storage and the index). A series' metadata is built once in the
pool and kept at ``dicomweb/metadata/<study>/<series>.json`` under a fingerprint of its
instances: when a series completes it is built ahead (so a viewer's first open reads one
object), and a request that finds the fingerprint changed (an instance arrived or was
replaced since) builds it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

from kp_gateway.backends.base import IndexBackend, StorageBackend
from kp_gateway.dicomweb import instances as pool_tasks
from kp_gateway.errors import BackendError, GatewayError, ObjectNotFoundError
from kp_gateway.kaapana.keys import ADMIN_PROJECT

T = TypeVar("T")
logger = logging.getLogger(__name__)

# Series waiting to have their metadata built ahead; beyond this, a series' metadata is
# built when it is first asked for instead.
PREBUILD_QUEUE = 1024


def _call(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    return fn(*args, **kwargs)


def instance_path(item: dict[str, Any]) -> str:
    """``studies/<s>/series/<se>/instances/<i>`` of an index row."""
    return f"studies/{item['study_uid']}/series/{item['series_uid']}/instances/{item['sop_uid']}"


def fingerprint(found: Sequence[dict[str, Any]]) -> str:
    """Changes when an instance of the series arrives, leaves or is replaced."""
    digest = hashlib.sha256()
    for i in sorted(found, key=lambda i: str(i["sop_uid"])):
        digest.update(
            f"{i['sop_uid']}|{i['size']}|{i['received_at']}|{i['storage_key']}\n".encode()
        )
    return digest.hexdigest()


class DicomWebReader:
    """The pool-side reads of WADO-RS, bounded (`backlog` tasks wait for the pool at once)."""

    def __init__(
        self, *, pool: Executor, storage: StorageBackend, index: IndexBackend, scratch_dir: Path,
        backlog: int, max_frame_bytes: int,
    ) -> None:  # fmt: skip
        self.storage = storage
        self.index = index
        self.max_frame_bytes = max_frame_bytes
        self._pool = pool
        self._scratch_dir = scratch_dir
        self._pending = asyncio.Semaphore(backlog)
        self._prebuild: asyncio.Queue[str] = asyncio.Queue(PREBUILD_QUEUE)
        self._worker: asyncio.Task[None] | None = None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` in the pool; waits (bounded) while the pool is busy."""
        async with self._pending:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, _call, fn, args, kwargs)

    @contextlib.asynccontextmanager
    async def local_files(self, keys: Sequence[str]) -> AsyncIterator[list[str]]:
        """Paths of the objects `keys` the pool can open: storage's own files, or copies in a
        scratch folder (removed afterwards) for a backend that has none (S3)."""
        local = [self.storage.local_path(k) for k in keys]
        if all(p is not None for p in local):
            yield [str(p) for p in local]
            return
        with tempfile.TemporaryDirectory(dir=self._scratch_dir, prefix="dicomweb-") as folder:
            paths = []
            for n, key in enumerate(keys):
                dest = Path(folder) / f"{n}.dcm"
                await self.storage.fetch_to_file(key, dest)
                paths.append(str(dest))
            yield paths

    async def build_metadata(self, found: Sequence[dict[str, Any]]) -> str:
        """The metadata of `found` (index rows) as one JSON array text, built in the pool."""
        async with self.local_files([str(i["storage_key"]) for i in found]) as paths:
            items = [(path, instance_path(i)) for path, i in zip(paths, found, strict=True)]
            return await self.run(pool_tasks.series_metadata, items)

    async def series_metadata(self, found: Sequence[dict[str, Any]]) -> str:
        """The metadata of one series' instances `found`, as kept when still current."""
        first = found[0]
        key = f"dicomweb/metadata/{first['study_uid']}/{first['series_uid']}.json"
        wanted = fingerprint(found).encode()
        try:
            kept = b"".join([chunk async for chunk in self.storage.read_chunks(key)])
        except ObjectNotFoundError:
            kept = b""
        head, _, body = kept.partition(b"\n")
        if head == wanted:
            return body.decode()
        text = await self.build_metadata(found)
        # A cache: a failed write costs the next request a rebuild, nothing else.
        try:
            await self.storage.put_bytes(key, wanted + b"\n" + text.encode())
        except BackendError:
            logger.warning("could not keep the metadata of series %s", first["series_uid"])
        return text

    # -- building ahead ------------------------------------------------------------------------

    async def on_series_complete(self, series_uid: str, fields: dict[str, object]) -> None:
        """The ingest hook: build the series' metadata ahead, when the queue has room."""
        try:
            self._prebuild.put_nowait(series_uid)
        except asyncio.QueueFull:
            logger.debug("metadata of %s will be built when first asked for", series_uid)

    def start(self) -> None:
        self._worker = asyncio.create_task(self._prebuild_forever(), name="dicomweb-prebuild")

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _prebuild_forever(self) -> None:
        while True:
            series_uid = await self._prebuild.get()
            try:
                series = await self.index.get_series(series_uid)
                if series is None:
                    continue
                found = await self.index.dicomweb_instances(
                    ADMIN_PROJECT, str(series["study_uid"]), series_uid
                )
                if found:
                    await self.series_metadata(found)
            except (GatewayError, OSError) as exc:
                # Built when first asked for instead; never fatal to the gateway.
                logger.warning("building the metadata of %s ahead failed: %s", series_uid, exc)
