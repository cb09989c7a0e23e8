"""The ingest service: spool -> store -> index, plus series completion and crash recovery.

This is where the DICOM-aware stage handlers live; the generic machinery is in ``core``.
Runs on the event loop, except the functions documented as running on association threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Protocol

from kp_gateway.backends.base import IndexBackend, IndexedInstance, StorageBackend
from kp_gateway.config import IndexConfig, PipelineConfig
from kp_gateway.errors import (
    BackendError,
    BackendUnavailableError,
    GatewayError,
    InvalidDicomError,
    PipelineFull,
)
from kp_gateway.kaapana.routing_record import routing_record, routing_record_key
from kp_gateway.metrics import Metrics
from kp_gateway.model import IngestItem, Routing
from kp_gateway.pipeline.completion import SeriesTracker
from kp_gateway.pipeline.core import Pipeline, RetryPolicy, Stage, StageObserver
from kp_gateway.pipeline.process_pool import RecentSeries, inspect_instances
from kp_gateway.pipeline.spool import Spool

logger = logging.getLogger(__name__)


SeriesHook = Callable[[str, dict[str, object]], Awaitable[None]]
# Called with the item and None when it finished, or the exception that quarantined it.
ItemHook = Callable[[IngestItem, BaseException | None], None]


class Intake(Protocol):
    """What a receiver on the loop needs of the pipeline (the upload importer is one).

    :class:`IngestService` is the implementation; receivers get it as this narrow interface.
    """

    async def submit(
        self, item: IngestItem, *, timeout_s: float, wait_forever: bool = False
    ) -> None: ...

    def source_closed(self, source_id: str) -> None: ...

    def add_item_settled_hook(self, hook: ItemHook) -> None: ...


class ThreadIntake(Protocol):
    """What the DICOM receive path, on association threads, needs of the pipeline and index.

    :class:`IngestService` is the implementation; the SCP gets it as this narrow interface.
    """

    def submit_from_thread(self, item: IngestItem, timeout_s: float) -> None: ...

    def source_closed_from_thread(self, source_id: str) -> None: ...

    def project_exists_from_thread(self, name: str, timeout_s: float) -> bool: ...


class _MetricsObserver(StageObserver[IngestItem]):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_stage_done(self, stage: str, batch: Sequence[IngestItem], seconds: float) -> None:
        self._metrics.stage_items.labels(stage=stage, outcome="ok").inc(len(batch))
        self._metrics.stage_seconds.labels(stage=stage).observe(seconds)

    def on_retry(self, stage: str, item: IngestItem, exc: BaseException) -> None:
        self._metrics.stage_items.labels(stage=stage, outcome="retry").inc()


@contextlib.asynccontextmanager
async def _measured(metrics: Metrics, backend: str, operation: str) -> AsyncIterator[None]:
    """Observe one backend call's latency, and count it when it fails."""
    started = time.monotonic()
    try:
        yield
    except BackendError:
        metrics.backend_errors.labels(backend=backend, operation=operation).inc()
        raise
    finally:
        metrics.backend_seconds.labels(backend=backend, operation=operation).observe(
            time.monotonic() - started
        )


class IngestService:
    """Owns the pipeline for received instances; see the module docstring."""

    def __init__(
        self,
        cfg: PipelineConfig,
        *,
        index_cfg: IndexConfig,
        storage_backend: str,
        storage: StorageBackend,
        index: IndexBackend,
        process_pool: Executor,
        metrics: Metrics,
        spool: Spool,
    ) -> None:
        self._cfg = cfg
        self._index_cfg = index_cfg
        self._storage_backend = storage_backend  # the metrics' backend label
        self._storage = storage
        self._index_backend = index
        self._pool = process_pool
        self._metrics = metrics
        self._spool = spool
        self.series_complete_hooks: list[SeriesHook] = []
        self.item_settled_hooks: list[ItemHook] = []
        p = cfg
        # (name, handler, workers, batch_max): every stage shares the queue size and linger.
        stages = (
            ("store", self._store, p.store_workers, p.store_batch_max),
            ("index", self._index, p.index_workers, index_cfg.batch_max_items),
        )
        self.pipeline: Pipeline[IngestItem] = Pipeline(
            [
                Stage(name, handler, workers, p.queue_size, batch_max, p.batch_linger_s)
                for name, handler, workers, batch_max in stages
            ],
            retry=RetryPolicy(p.max_attempts, p.retry_backoff_s, p.retry_backoff_max_s),
            on_finished=self._finished,
            on_quarantine=self._quarantine,
            observer=_MetricsObserver(metrics),
        )
        self.tracker = SeriesTracker(idle_s=p.series_idle_s, on_complete=self._complete_series)
        self.loop: asyncio.AbstractEventLoop | None = None
        # (series, project, dataset) whose routing record this process has stored (LRU).
        self._routed = RecentSeries()
        metrics.bind_queue_depths(self.pipeline.queue_depths)
        metrics.in_flight.set_function(lambda: float(self.pipeline.in_flight))

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start workers and the completion tracker, then re-queue what a crash left behind."""
        self.loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._spool.create)
        self.pipeline.start()
        self.tracker.start()
        for uid in await self._index_backend.incomplete_series():
            self.tracker.track_existing(uid)
        await self.recover()

    async def recover(self) -> int:
        """Submit every acknowledged but unfinished instance found in the spool."""
        pending = await asyncio.to_thread(self._spool.pending)
        count = 0
        for routing, files in pending:
            for path in files:
                # No admission timeout: these were acknowledged already and must not be lost.
                item = IngestItem(path, routing, path.stat().st_mtime)
                await self.submit(item, timeout_s=0.0, wait_forever=True)
                count += 1
            self.tracker.source_closed(routing.source_id)
        if count:
            logger.info("recovering %d acknowledged instances from the spool", count)
        return count

    async def drain(self) -> bool:
        """Finish queued work (bounded by ``pipeline.drain_timeout_s``) and stop."""
        finished = await self.pipeline.drain(self._cfg.drain_timeout_s)
        if finished:
            # Give completion a chance for what just finished, without waiting the idle time.
            await self.tracker.check_once()
        await self.tracker.aclose()
        return finished

    # -- intake ---------------------------------------------------------------------------

    async def submit(
        self, item: IngestItem, *, timeout_s: float, wait_forever: bool = False
    ) -> None:
        """Admit one spooled instance; raises PipelineFull / ShuttingDownError. Loop only.

        With `wait_forever` (acknowledged or accepted work), a full pipeline is waited out in
        attempts of `timeout_s` (60 s when 0), never given up on.
        """
        if wait_forever:
            while True:
                try:
                    await self.pipeline.submit(item, timeout_s=timeout_s or 60.0)
                    break
                except PipelineFull:
                    logger.info("pipeline full; %s waits", item.routing.source_id)
        else:
            await self.pipeline.submit(item, timeout_s=timeout_s)
        self.tracker.source_item_admitted(item.routing.source_id)

    def source_closed(self, source_id: str) -> None:
        """An association or upload ended. Loop only."""
        self.tracker.source_closed(source_id)

    def readiness(self) -> dict[str, Any]:
        """Whether the pipeline accepts work and its backends answer, with its load (for
        ``/health/ready``). A stage waiting out a backend error is not ready: senders are
        being slowed down, and the error says why."""
        outages = dict(self.pipeline.outages)
        info: dict[str, Any] = {
            "ok": self.pipeline.accepting and not outages,
            "in_flight": self.pipeline.in_flight,
            "queues": self.pipeline.queue_depths(),
            "series_pending_completion": self.tracker.pending_count(),
        }
        if outages:
            info["detail"] = "; ".join(f"{stage}: {error}" for stage, error in outages.items())
        return info

    def add_item_settled_hook(self, hook: ItemHook) -> None:
        """Call `hook` on the loop with each item as it finishes or is quarantined."""
        self.item_settled_hooks.append(hook)

    def add_series_complete_hook(self, hook: SeriesHook) -> None:
        """Await `hook(series_uid, completion_fields)` on the loop as each series completes."""
        self.series_complete_hooks.append(hook)

    # -- stages ---------------------------------------------------------------------------

    async def _store(self, batch: list[IngestItem]) -> None:
        pending = [item for item in batch if item.record is None]
        if pending:
            jobs = [
                (
                    str(item.spool_path),
                    item.routing.project,
                    item.routing.dataset,
                    self._index_cfg.site_timezone,
                    item.received_at,
                )
                for item in pending
            ]
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._pool, inspect_instances, jobs)
            failure: GatewayError | None = None
            for item, result in zip(pending, results, strict=True):
                if isinstance(result, GatewayError):
                    failure = failure or result
                else:
                    item.record = result
            if failure is not None:
                # The pipeline splits the batch: parsed items go on, the bad one is retried
                # alone and quarantined.
                raise failure
        async with _measured(self._metrics, self._storage_backend, "put"):
            await self._storage.put_files(
                [(item.record.storage_key, item.spool_path) for item in batch if item.record]
            )

    async def _index(self, batch: list[IngestItem]) -> None:
        records = []
        for item in batch:
            if item.record is None:  # pragma: no cover - the store stage always sets it
                raise InvalidDicomError("item reached the index stage without a header record")
            records.append(IndexedInstance(item.record, item.routing, item.received_at))
        # Before the commit: the index must never know a mapping that reindex cannot rebuild.
        await self._write_routing_records(batch)
        async with _measured(self._metrics, self._index_cfg.backend, "write"):
            await self._index_backend.write_instances(records)
        # Committed: the spool copies are no longer needed.
        await asyncio.to_thread(self._discard_spool_files, [i.spool_path for i in batch])

    async def _write_routing_records(self, batch: list[IngestItem]) -> None:
        """Store a routing record per (series, project, dataset) new to this process.

        Also rewritten when an item carries a freshly built series document, so the record
        names the instance whose header the index's document was built from last (reindex
        rebuilds the document from that same instance).
        """
        due: dict[tuple[str, str, str], IngestItem] = {}
        for item in batch:
            assert item.record is not None
            combo = (item.record.series_instance_uid, item.routing.project, item.routing.dataset)
            if item.record.document is not None:
                due[combo] = item  # the last document wins, as in the index's merge
            elif combo not in self._routed and combo not in due:
                due[combo] = item
        if not due:
            return
        await asyncio.gather(
            *(
                self._storage.put_bytes(routing_record_key(*combo), routing_record(item))
                for combo, item in due.items()
            )
        )
        for combo in due:
            self._routed[combo] = None

    def _discard_spool_files(self, paths: list[Path]) -> None:
        for path in paths:
            self._spool.discard(path)

    async def _finished(self, item: IngestItem) -> None:
        assert item.record is not None
        self.tracker.source_item_settled(item.routing.source_id, item.record.series_instance_uid)
        self._run_item_hooks(item, None)

    def _run_item_hooks(self, item: IngestItem, exc: BaseException | None) -> None:
        for hook in self.item_settled_hooks:
            try:
                hook(item, exc)
            except Exception:
                logger.exception("item-settled hook failed")

    async def _quarantine(self, stage: str, item: IngestItem, exc: BaseException) -> None:
        self._metrics.stage_items.labels(stage=stage, outcome="fail").inc()
        target = await asyncio.to_thread(self._spool.quarantine_file, stage, item.spool_path)
        reason = f"{type(exc).__name__}: {exc}"
        # Relative to the data directory: the API shows it, and server paths are nobody's
        # business (quarantine/<stage>/<file>).
        where = str(target.relative_to(self._spool.quarantine.parent)) if target else ""
        try:
            await self._index_backend.record_quarantine(
                stage, where or item.spool_path.name, reason
            )
        except BackendUnavailableError:
            logger.exception("could not record quarantined item %s", target)
        series = item.record.series_instance_uid if item.record else None
        self.tracker.source_item_settled(item.routing.source_id, series)
        self._run_item_hooks(item, exc)

    async def _complete_series(self, series_uid: str) -> None:
        async with _measured(self._metrics, self._index_cfg.backend, "complete"):
            fields = await self._index_backend.complete_series(series_uid)
        self._metrics.series_completed.inc()
        logger.info("series %s complete", series_uid)
        for hook in self.series_complete_hooks:
            try:
                await hook(series_uid, fields)
            except Exception:
                logger.exception("series-complete hook failed for %s", series_uid)

    # -- bridge for association threads ---------------------------------------------------

    def submit_from_thread(self, item: IngestItem, timeout_s: float) -> None:
        """Admit an item from an association thread, blocking only while the pipeline is full.

        Runs on an association thread. Raises PipelineFull or ShuttingDownError.
        """
        self.pipeline.submit_threadsafe(item, timeout_s=timeout_s, then=self._admitted)

    def _admitted(self, item: IngestItem) -> None:
        # On the association thread, before the item can settle: the tracker must count it
        # ahead of the association's close, which reaches the loop later.
        self.tracker.source_item_admitted(item.routing.source_id)

    def source_closed_from_thread(self, source_id: str) -> None:
        """:meth:`source_closed`, soon, on the loop. Runs on any thread."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.source_closed, source_id)

    def project_exists_from_thread(self, name: str, timeout_s: float) -> bool:
        """Ask the index, on the loop, whether project `name` exists. Runs on an association
        thread; raises TimeoutError past `timeout_s`, BackendError as the index does."""
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(
            self._index_backend.project_exists(name), self.loop
        )
        return bool(future.result(timeout=timeout_s))


__all__ = ["IngestService", "Intake", "ItemHook", "Routing", "ThreadIntake"]
