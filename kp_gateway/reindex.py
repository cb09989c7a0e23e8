"""``kp-gateway reindex``: rebuild the configured index from the configured object store.

Used after moving from SQLite to OpenSearch, or after losing the index. The stored DICOM
objects are the source of truth for everything in the headers; the project and dataset a
series was routed to are not in them (objects are never modified), so they come from the
routing records the index stage writes before each commit
(:mod:`kp_gateway.kaapana.routing_record`)::

    routing/<SeriesInstanceUID>/<sha1(project NUL dataset)>.json
        {"project", "dataset", "calling_ae_title", "called_ae_title",
         "series_instance_uid", "document_sop_instance_uid", "received_at"}

The run lists ``dicom/`` in sorted key order (every instance of a series is contiguous),
fetches each object (or reads the local file), parses headers in a process pool, writes
through ``IndexBackend.write_instances`` in batches, completes each series when its last
instance is written, and finally runs the series stages (completeness, thumbnail,
validation) so the documents carry their derived fields again. Each series document is
rebuilt from the same instance the gateway built it from (``document_sop_instance_uid``),
with the recorded arrival time, so the documents come out the same.

Resumable: after every committed batch the last key is written to
``<data dir>/reindex.checkpoint.json``; a rerun continues after it (``--restart`` ignores it).
The gateway must not run on the same index meanwhile: reindex takes the data directory's
lock, which ``serve`` takes as well. Gateways sharing an OpenSearch index from other data
directories are not covered by that lock; stop them too.

Runs on the event loop, except :func:`parse_for_reindex` (a worker process).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from kp_gateway.backends.base import (
    IndexBackend,
    IndexedInstance,
    SeriesQuery,
    StorageBackend,
    iter_series,
)
from kp_gateway.config import Config
from kp_gateway.datadir import DataDir, lock_data_dir
from kp_gateway.durable import write_atomic
from kp_gateway.errors import BackendError, InvalidDicomError, ObjectNotFoundError
from kp_gateway.kaapana.keys import ADMIN_PROJECT
from kp_gateway.kaapana.routing_record import ROUTING_PREFIX, RoutingRecord
from kp_gateway.model import InstanceRecord, Routing
from kp_gateway.pipeline.process_pool import make_process_pool, read_instance

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "reindex.checkpoint.json"
DICOM_PREFIX = "dicom/"
# Series without any routing record (stored before records existed) land here.
FALLBACK_DATASET = "reindexed"
# Objects fetched at once from an object store (each streams to its own scratch file).
FETCH_CONCURRENCY = 8


# --- worker-process side ----------------------------------------------------------------------


def parse_for_reindex(
    path: str, documents: list[tuple[str, str, float]], site_timezone: str
) -> tuple[InstanceRecord, list[dict[str, Any] | None]]:
    """Runs in a worker process. The header record of one object, plus series documents.

    Parameters
    ----------
    path : str
        Local file holding the object.
    documents : list of (project, dataset, arrived_at)
        One series document is built per entry, each with a fresh document cache.
    site_timezone : str
        As ``index.site_timezone``.

    Raises
    ------
    InvalidDicomError
        The object is not decodable DICOM.
    """
    record = read_instance(
        path, project="", dataset="", documented_series=None, site_timezone=site_timezone
    )
    built: list[dict[str, Any] | None] = []
    for project, dataset, arrived_at in documents:
        with_doc = read_instance(
            path,
            project=project,
            dataset=dataset,
            documented_series={},
            site_timezone=site_timezone,
            arrived_at=arrived_at,
        )
        built.append(with_doc.document)
    return record, built


# --- value types -------------------------------------------------------------------------------


@dataclass
class _Series:
    """The series whose keys are being listed, with its routings and rebuilt documents."""

    prefix: str
    series_uid: str
    routes: list[RoutingRecord]
    first_key: str | None = None
    indexed: int = 0
    # index into routes -> document built from that route's document source
    documents: dict[int, tuple[InstanceRecord, dict[str, Any]]] = field(default_factory=dict)


@dataclass
class ReindexReport:
    """What a run did."""

    objects: int = 0
    skipped: int = 0
    series: int = 0
    unrouted_series: int = 0
    series_stages: int = 0
    resumed_after: str = ""
    seconds: float = 0.0


class _Progress:
    """One stderr line per second: done of total, rate, ETA."""

    def __init__(self, stream: TextIO, total: int, done: int, what: str) -> None:
        self._stream = stream
        self.total = total
        self.done = done
        self._what = what
        self._start_done = done
        self._started = time.monotonic()
        self._tty = stream.isatty()

    def line(self) -> str:
        elapsed = max(1e-6, time.monotonic() - self._started)
        rate = (self.done - self._start_done) / elapsed
        left = max(0, self.total - self.done)
        eta = f"{int(left / rate) // 60}:{int(left / rate) % 60:02d}" if rate > 0 else "?"
        share = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"reindex: {self._what} {self.done} of {self.total} ({share:.0f} %), "
            f"{rate:.1f}/s, ETA {eta}"
        )

    def emit(self, final: bool = False) -> None:
        end = "\n" if final or not self._tty else ""
        prefix = "\r" if self._tty else ""
        print(prefix + self.line(), end=end, file=self._stream, flush=True)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.emit()


@contextlib.asynccontextmanager
async def _progress(
    stream: TextIO | None, total: int, done: int, what: str
) -> AsyncIterator[_Progress]:
    progress = _Progress(stream or sys.stderr, total, done, what)
    task = asyncio.create_task(progress.run()) if stream is not None else None
    try:
        yield progress
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            progress.emit(final=True)


# --- checkpoint --------------------------------------------------------------------------------


def _storage_identity(cfg: Config) -> str:
    if cfg.storage.backend == "s3":
        return f"s3:{cfg.storage.s3_endpoint_url or 'aws'}/{cfg.storage.s3_bucket}"
    return f"fs:{cfg.data_dir}"


def read_checkpoint(cfg: Config) -> dict[str, Any] | None:
    """The checkpoint of an unfinished run on this storage, or None. Blocking."""
    path = cfg.data_dir / CHECKPOINT_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable reindex checkpoint %s: %s", path, exc)
        return None
    if not isinstance(doc, dict) or doc.get("storage") != _storage_identity(cfg):
        logger.warning("ignoring reindex checkpoint %s: it is for another object store", path)
        return None
    return doc


def write_checkpoint(cfg: Config, last_key: str, *, keys_done: bool = False) -> None:
    """Atomically record the last key whose batch is committed. Blocking."""
    doc = {"storage": _storage_identity(cfg), "last_key": last_key, "keys_done": keys_done}
    write_atomic(cfg.data_dir / CHECKPOINT_FILE, doc)


# --- the run -----------------------------------------------------------------------------------


class Reindexer:
    """One reindex run over opened backends; see the module docstring.

    Parameters
    ----------
    cfg : Config
        The gateway configuration (its storage and index are the ones rebuilt from/into).
    storage, index :
        Opened backends.
    pool : concurrent.futures.Executor
        Process pool for :func:`parse_for_reindex`.
    workers : int
        Its size (how many parses to keep in flight).
    scratch : Path
        Folder for objects fetched from an object store (removed by the caller).
    progress : TextIO or None
        Where the progress line goes (None: nowhere).
    """

    def __init__(
        self,
        cfg: Config,
        storage: StorageBackend,
        index: IndexBackend,
        pool: Executor,
        workers: int,
        scratch: Path,
        progress: TextIO | None,
    ) -> None:
        self._cfg = cfg
        self._workers = workers
        self._storage = storage
        self._index = index
        self._pool = pool
        self._scratch = scratch
        self._stream = progress
        self._fetch_limit = asyncio.Semaphore(FETCH_CONCURRENCY)
        self._batch: list[IndexedInstance] = []
        self._to_complete: list[str] = []
        self.last_key = ""
        self._projects: set[str] = set()
        self._scratch_names = 0
        self.report = ReindexReport()

    async def run_keys(self, start_after: str) -> None:
        """Index every ``dicom/`` object after `start_after`, completing series on the way."""
        total = done = 0
        async for key in self._storage.iter_keys(DICOM_PREFIX):
            total += 1
            if start_after and key <= start_after:
                done += 1
        self.report.resumed_after = start_after
        # Enough parses in flight to keep every worker busy while objects are fetched.
        window_size = 4 * max(1, self._workers)
        window: collections.deque[tuple[str, _Series, asyncio.Task[Any]]] = collections.deque()
        current: _Series | None = None
        consumed: _Series | None = None
        if start_after:
            # The checkpoint's series may have ended exactly there, before it was closed
            # (documents, completion): reopen it so it is closed like any other.
            current = await self._open_series(start_after.rpartition("/")[0])
            current.first_key = start_after  # a key known to exist, as document fallback
            current.indexed = 1
            consumed = current
        async with _progress(self._stream, total, done, "objects") as progress:
            try:
                async for key in self._storage.iter_keys(DICOM_PREFIX, start_after):
                    prefix = key.rpartition("/")[0]
                    if current is None or current.prefix != prefix:
                        current = await self._open_series(prefix)
                    if current.first_key is None:
                        current.first_key = key
                    wanted = [i for i, _ in self._documents_from(current, key)]
                    window.append(
                        (key, current, asyncio.create_task(self._parse(key, wanted, current)))
                    )
                    if len(window) >= window_size:
                        consumed = await self._consume(*window.popleft(), consumed)
                        progress.done += 1
                while window:
                    consumed = await self._consume(*window.popleft(), consumed)
                    progress.done += 1
                if consumed is not None:
                    await self._close_series(consumed)
                await self._flush()
            finally:
                for _, _, task in window:
                    task.cancel()
                for _, _, task in window:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    def _documents_from(self, series: _Series, key: str) -> list[tuple[int, RoutingRecord]]:
        sop = key.rpartition("/")[2].removesuffix(".dcm")
        return [
            (i, route)
            for i, route in enumerate(series.routes)
            if route.document_sop_instance_uid == sop
        ]

    async def _open_series(self, prefix: str) -> _Series:
        series_uid = prefix.rpartition("/")[2]
        routes: list[RoutingRecord] = []
        async for key in self._storage.iter_keys(f"{ROUTING_PREFIX}{series_uid}/"):
            data = b"".join([chunk async for chunk in self._storage.read_chunks(key)])
            try:
                routes.append(RoutingRecord.parse(data, source_id=f"reindex-{series_uid}"))
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("ignoring malformed routing record %s: %s", key, exc)
        if not routes:
            self.report.unrouted_series += 1
            logger.warning(
                "series %s has no routing record; indexed under %s/%s",
                series_uid,
                self._cfg.dicom.default_project,
                FALLBACK_DATASET,
            )
            fallback = Routing(
                self._cfg.dicom.default_project, FALLBACK_DATASET, f"reindex-{series_uid}"
            )
            routes.append(RoutingRecord(fallback, "", time.time()))
        # The index merges documents "new over old": replay them in arrival order.
        routes.sort(key=lambda r: r.received_at)
        for route in routes:
            await self._ensure_project(route.routing.project)
        return _Series(prefix, series_uid, routes)

    async def _ensure_project(self, name: str) -> None:
        if name in self._projects:
            return
        if not await self._index.project_exists(name):
            # Descriptions live only in the index; the project itself comes back empty-handed.
            await self._index.create_project(name)
            logger.info("re-created project %s", name)
        self._projects.add(name)

    @contextlib.asynccontextmanager
    async def _local(self, key: str) -> AsyncIterator[Path]:
        local = self._storage.local_path(key)
        if local is not None:
            yield local
            return
        self._scratch_names += 1
        target = self._scratch / f"{self._scratch_names}.dcm"
        try:
            async with self._fetch_limit:
                await self._storage.fetch_to_file(key, target)
            yield target
        finally:
            await asyncio.to_thread(target.unlink, missing_ok=True)

    async def _parse(
        self, key: str, route_indexes: list[int], series: _Series
    ) -> tuple[InstanceRecord, list[dict[str, Any] | None]] | None:
        """Header record of `key` and the documents of the given routes; None if unusable."""
        docs = [
            (
                series.routes[i].routing.project,
                series.routes[i].routing.dataset,
                series.routes[i].received_at,
            )
            for i in route_indexes
        ]
        loop = asyncio.get_running_loop()
        try:
            async with self._local(key) as path:
                record, built = await loop.run_in_executor(
                    self._pool, parse_for_reindex, str(path), docs, self._cfg.index.site_timezone
                )
        except ObjectNotFoundError:
            logger.warning("object %s vanished while reindexing; skipped", key)
            return None
        except InvalidDicomError as exc:
            logger.warning("object %s is not decodable DICOM; skipped: %s", key, exc)
            return None
        if record.storage_key != key:
            record = dataclasses.replace(record, storage_key=key)
        for i, doc in zip(route_indexes, built, strict=True):
            if doc is not None:
                series.documents[i] = (record, doc)
        return record, built

    async def _consume(
        self, key: str, series: _Series, task: asyncio.Task[Any], previous: _Series | None
    ) -> _Series:
        if previous is not None and previous is not series:
            await self._close_series(previous)
        result = await task
        self.last_key = key
        if result is None:
            self.report.skipped += 1
        else:
            record: InstanceRecord = result[0]
            self.report.objects += 1
            series.indexed += 1
            for route in series.routes:
                self._batch.append(IndexedInstance(record, route.routing, route.received_at))
        if len(self._batch) >= self._cfg.index.batch_max_items:
            await self._flush()
        return series

    async def _close_series(self, series: _Series) -> None:
        """All keys of `series` consumed: add its documents, mark it for completion."""
        for i, route in enumerate(series.routes):
            if i in series.documents:
                continue
            # The source was indexed before a resume, or is gone: rebuild from a key we have.
            source = (
                f"{series.prefix}/{route.document_sop_instance_uid}.dcm"
                if route.document_sop_instance_uid
                else None
            )
            for key in (source, series.first_key):
                if key is not None and await self._parse(key, [i], series) is not None:
                    break
        if not series.indexed and not series.documents:
            return  # nothing of it was decodable
        for i, route in enumerate(series.routes):
            if i in series.documents:
                record, doc = series.documents[i]
                with_doc = dataclasses.replace(record, document=doc)
                self._batch.append(IndexedInstance(with_doc, route.routing, route.received_at))
        self._to_complete.append(series.series_uid)
        self.report.series += 1

    async def _flush(self) -> None:
        """Commit the batch, complete finished series, then move the checkpoint."""
        if self._batch:
            await self._index.write_instances(self._batch)
            self._batch = []
        for uid in self._to_complete:
            await self._index.complete_series(uid)
        self._to_complete = []
        if self.last_key:
            await asyncio.to_thread(write_checkpoint, self._cfg, self.last_key)

    async def run_series_stages(self) -> None:
        """Thumbnail, validation and completeness extras for complete series lacking them."""
        from kp_gateway.datadir import DataDir
        from kp_gateway.metrics import Metrics
        from kp_gateway.pipeline.series_stages import SeriesPostProcessor

        stages = SeriesPostProcessor(
            self._cfg.series,
            storage=self._storage,
            index=self._index,
            scratch_dir=DataDir.at(self._cfg.data_dir).scratch,
            metrics=Metrics(),
            site_timezone=self._cfg.index.site_timezone,
            # enqueue() then waits for queue space instead of dropping the series.
            enqueue_wait_s=24 * 3600.0,
            rescan_on_start=False,
        )
        todo = [uid async for uid in self._series_lacking_results()]
        await stages.start()
        try:
            async with _progress(self._stream, len(todo), 0, "series stages") as progress:
                for uid in todo:
                    await stages.enqueue(uid)
                    progress.done += 1
                while not stages.idle:
                    await asyncio.sleep(0.1)
                progress.done = len(todo)
        finally:
            await stages.aclose()
        self.report.series_stages = len(todo)

    async def _series_lacking_results(self) -> AsyncIterator[str]:
        async for item in iter_series(self._index, SeriesQuery(project=ADMIN_PROJECT)):
            if item.get("complete") and not (
                item.get("has_thumbnail") and item.get("validation") is not None
            ):
                yield str(item["series_uid"])


def _clear_stale_scratch(tmp: Path) -> None:
    """Remove scratch folders of earlier runs that were killed. Blocking."""
    if tmp.is_dir():
        for stale in tmp.glob("reindex-*"):
            shutil.rmtree(stale, ignore_errors=True)


async def reindex(
    cfg: Config,
    *,
    restart: bool = False,
    series_stages: bool = True,
    progress: TextIO | None = sys.stderr,
) -> ReindexReport:
    """Rebuild the configured index from the configured object store; see the module docstring.

    Runs on the loop.

    Raises
    ------
    DataDirLockedError
        The data directory is locked (the gateway or another reindex runs on it).
    BackendError
        The object store or the index failed; the checkpoint keeps what was committed.
    """
    from kp_gateway.backends import make_index, make_storage

    started = time.monotonic()
    lock: IO[bytes] = await asyncio.to_thread(lock_data_dir, cfg.data_dir)
    storage = make_storage(cfg)
    index = make_index(cfg)
    workers = cfg.pipeline.process_pool_size or os.cpu_count() or 2
    pool = make_process_pool(workers)
    scratch = DataDir.at(cfg.data_dir).scratch / f"reindex-{os.getpid()}"
    try:
        await asyncio.to_thread(_clear_stale_scratch, scratch.parent)
        await asyncio.to_thread(scratch.mkdir, parents=True, exist_ok=True)
        await storage.open()
        await index.open()
        checkpoint = None if restart else await asyncio.to_thread(read_checkpoint, cfg)
        runner = Reindexer(cfg, storage, index, pool, workers, scratch, progress)
        start_after = str(checkpoint.get("last_key", "")) if checkpoint else ""
        if checkpoint and checkpoint.get("keys_done"):
            logger.info("every object was indexed by an earlier run; finishing its series stages")
        else:
            if start_after:
                logger.info("resuming after %s", start_after)
            await runner.run_keys(start_after)
            last = runner.last_key or start_after
            await asyncio.to_thread(write_checkpoint, cfg, last, keys_done=True)
        if series_stages and cfg.series.enabled:
            await runner.run_series_stages()
        await asyncio.to_thread((cfg.data_dir / CHECKPOINT_FILE).unlink, missing_ok=True)
        runner.report.seconds = time.monotonic() - started
        return runner.report
    finally:
        await index.aclose()
        await storage.aclose()
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(shutil.rmtree, scratch, True)
        lock.close()


def main(cfg: Config, *, restart: bool, series_stages: bool) -> int:
    """Run a reindex from the command line; returns the exit code. Blocking."""
    try:
        report = asyncio.run(reindex(cfg, restart=restart, series_stages=series_stages))
    except BackendError as exc:
        print(f"kp-gateway reindex: {exc}; rerun to resume from the checkpoint", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kp-gateway reindex: interrupted; rerun to resume", file=sys.stderr)
        return 130
    print(
        f"reindexed {report.objects} objects in {report.series} series "
        f"({report.skipped} skipped, {report.unrouted_series} without routing record, "
        f"{report.series_stages} series through the series stages) in {report.seconds:.1f} s",
        file=sys.stderr,
    )
    return 0


__all__ = [
    "CHECKPOINT_FILE",
    "ReindexReport",
    "Reindexer",
    "parse_for_reindex",
    "reindex",
]
