"""Series-level stages, run when a series completes: completeness extras, thumbnail, validation.

:class:`SeriesPostProcessor` hangs off :class:`~kp_gateway.pipeline.ingest.IngestService`'s
``series_complete_hooks``. Completion only *queues* the series (a bounded queue, de-duplicated:
a series already waiting is merged, not queued twice; debounced: a series that completes again
while it is being processed is processed once more afterwards), so C-STORE and indexing never
wait for it. The work runs away from the receiving interpreter: header reads and rendering in a
process pool, dciodvfy in subprocesses started from a dedicated thread pool. The pools this
module creates itself run at a lower CPU priority (nice 10), so on a busy machine the scheduler
prefers the receiving side.

Every pool task (geometry, thumbnail) runs under a time limit: a task that overruns has its
worker process killed and the pool replaced, so one hostile series costs at most
``task_time_limit_s`` and the next series goes on. The thumbnail refuses, before decoding, an
image its stored bytes cannot hold (:func:`kp_gateway.thumbnails.check_pixel_budget`).

A stage that fails never touches stored instances or their index rows: the failure is logged,
recorded on the series (``00000000 ThumbnailError_keyword``, or ``00111005
ValidationStatus_keyword`` = ``"failed: ..."`` inside ``00111001 ValidationResults_object``)
and, when it may be transient, retried with capped exponential backoff.

SEG and RTSTRUCT thumbnails need the series they annotate. When it is not stored yet the
thumbnail is mask-only; a table "referenced series -> annotating series" (filled while
rendering, rebuilt from the index's documents at start) re-queues the annotation when the
referenced series completes later.

Everything in the class runs on the event loop unless a docstring says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydicom import dcmread
from pydicom.uid import RTStructureSetStorage, SegmentationStorage

from kp_gateway.backends.base import IndexBackend, SeriesQuery, StorageBackend, iter_series
from kp_gateway.config import SeriesConfig
from kp_gateway.errors import RejectedInputError
from kp_gateway.kaapana.keys import (
    ADMIN_PROJECT,
    KEY_COMPLETE,
    KEY_FRAMES_TOTAL,
    KEY_MAX_IN,
    KEY_MIN_IN,
    KEY_MISSING_IN,
    KEY_MULTIFRAME,
    KEY_SERIES_INSTANCE_UID,
    KEY_SLICE_GAPS,
    KEY_SLICE_SPACING,
    KEY_SLICES_MISSING,
    KEY_SPACING_REGULAR,
    KEY_THUMBNAIL,
    KEY_THUMBNAIL_ERROR,
    KEY_THUMBNAIL_STRATEGY,
    KEY_VALIDATION,
    STATUS_UNAVAILABLE,
    STATUS_VALIDATED,
    VAL_DATE,
    VAL_ERRORS,
    VAL_STATUS,
    VAL_WARNINGS,
)
from kp_gateway.metrics import Metrics
from kp_gateway.model import StageOutcome
from kp_gateway.pipeline.core import RetryPolicy, cancel_tasks, classify
from kp_gateway.pipeline.process_pool import make_process_pool as worker_pool
from kp_gateway.thumbnails import (
    Thumbnail,
    referenced_series_uid,
    render_series_thumbnail,
)
from kp_gateway.validation.dciodvfy import (
    SeriesValidation,
    ValidatorUnavailableError,
    dciodvfy_path,
    validate_series,
)
from kp_gateway.validation.report import render_report_html

logger = logging.getLogger(__name__)

T = TypeVar("T")

STAGE_COMPLETENESS = "completeness"
STAGE_THUMBNAIL = "thumbnail"
STAGE_VALIDATION = "validation"
STAGES: tuple[str, ...] = (STAGE_COMPLETENESS, STAGE_THUMBNAIL, STAGE_VALIDATION)

_ANNOTATION_MODALITIES = frozenset({"SEG", "RTSTRUCT"})
_ANNOTATION_SOP_CLASSES = frozenset({str(SegmentationStorage), str(RTStructureSetStorage)})
_GEOMETRY_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames", "Rows"]
# A step more than this many times the typical spacing counts as a gap (1.5: a missing slice
# doubles the step, while rounding in positions stays far below half a slice).
_GAP_FACTOR = 1.5
_ERROR_TEXT_MAX = 300
_BACKGROUND_NICE = 10
# Downloads at once while fetching a series from an object store (each streams to disk).
_FETCH_CONCURRENCY = 4


# --- worker-process and thread side ---------------------------------------------------------


def _lower_thread_priority() -> None:
    """Pool initializer; runs on each new validation thread.

    On Linux the nice value is per thread and inherited by the threads and subprocesses it
    starts, so validate_series' own threads and every dciodvfy run at this priority too.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _BACKGROUND_NICE)


def make_process_pool(workers: int = 1) -> ProcessPoolExecutor:
    """A low-priority process pool for rendering. Blocking; call at start-up."""
    return worker_pool(workers, nice=_BACKGROUND_NICE)


def _kill_workers(executor: Executor | None) -> None:
    """SIGKILL the worker processes of a process pool (its running calls cannot be cancelled).

    The pool is broken afterwards: its pending futures fail with BrokenProcessPool.
    """
    if not isinstance(executor, ProcessPoolExecutor):
        return
    for process in list((executor._processes or {}).values()):
        with contextlib.suppress(OSError, ValueError):
            process.kill()


def slice_geometry(paths: Sequence[str]) -> dict[str, Any]:
    """Runs in a worker process. Frame count and slice-spacing gaps of one series.

    Single-frame instances sharing one ImageOrientationPatient are sorted by their position
    along the slice normal; the typical step is the median of the steps, and any step longer
    than 1.5 times that is a gap, with ``round(step / typical) - 1`` slices estimated missing.
    Positions closer than 1 µm are one position (repeated acquisitions). Files that cannot be
    read are skipped; a series without usable geometry gets the frame count only.

    Returns
    -------
    dict
        Document fields (``KEY_*`` constants of :mod:`kp_gateway.kaapana.keys`).
    """
    frames = 0
    orientations: list[tuple[float, ...]] = []
    positions: list[np.ndarray[Any, np.dtype[np.float64]]] = []
    multiframe = False
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_GEOMETRY_TAGS)
        except Exception:
            logger.debug("geometry: cannot read %s", path, exc_info=True)
            continue
        try:
            count = max(1, int(ds.get("NumberOfFrames") or 1))
        except (TypeError, ValueError):
            count = 1
        frames += count
        multiframe = multiframe or count > 1
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if count == 1 and ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
            try:
                orientations.append(tuple(round(float(v), 4) for v in iop))
                positions.append(np.array([float(v) for v in ipp], dtype=np.float64))
            except (TypeError, ValueError):
                continue
    fields: dict[str, Any] = {KEY_FRAMES_TOTAL: frames, KEY_MULTIFRAME: multiframe}
    if len(positions) < 3 or len(set(orientations)) != 1:
        return fields
    cosines = np.array(orientations[0], dtype=np.float64)
    normal = np.cross(cosines[:3], cosines[3:])
    along = np.unique(np.round(np.array([p @ normal for p in positions]), 3))
    steps = np.diff(along)
    if steps.size < 2:
        return fields
    typical = float(np.median(steps))
    if typical <= 0:
        return fields
    gaps = steps[steps > _GAP_FACTOR * typical]
    fields.update(
        {
            KEY_SLICE_SPACING: round(typical, 4),
            KEY_SLICE_GAPS: int(gaps.size),
            KEY_SLICES_MISSING: int(sum(round(float(g) / typical) - 1 for g in gaps)),
            KEY_SPACING_REGULAR: bool(gaps.size == 0),
        }
    )
    return fields


# --- pure helpers ----------------------------------------------------------------------------


def completeness_for_report(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Map the index's completion keys to the mapping ``render_report_html`` expects. Pure."""
    return {
        "complete": fields.get(KEY_COMPLETE),
        "min_instance_number": fields.get(KEY_MIN_IN),
        "max_instance_number": fields.get(KEY_MAX_IN),
        "missing_instance_numbers": fields.get(KEY_MISSING_IN) or [],
    }


def referenced_series_in_document(doc: Any, *, inside: bool = False) -> set[str]:
    """SeriesInstanceUIDs found under any ``...ReferencedSeriesSequence_object`` key. Pure.

    Covers SEG's ReferencedSeriesSequence (0008,1115) and RTSTRUCT's
    RTReferencedSeriesSequence (3006,0014) nested in ReferencedFrameOfReferenceSequence.
    """
    found: set[str] = set()
    if isinstance(doc, list):
        for item in doc:
            found |= referenced_series_in_document(item, inside=inside)
    elif isinstance(doc, dict):
        for key, value in doc.items():
            if inside and key == KEY_SERIES_INSTANCE_UID and isinstance(value, str):
                found.add(value)
            elif isinstance(value, dict | list):
                nested = inside or "ReferencedSeriesSequence" in key
                found |= referenced_series_in_document(value, inside=nested)
    return found


def _format_validation_date(moment: datetime.datetime) -> str:
    """Kaapana's ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _ERROR_TEXT_MAX else text[: _ERROR_TEXT_MAX - 3] + "..."


# --- the processor ---------------------------------------------------------------------------


class SeriesPostProcessor:
    """Thumbnail, validation and completeness extras per completed series (module docstring).

    Parameters
    ----------
    executor : concurrent.futures.Executor, optional
        Process pool for header reads and rendering (functions here are picklable). When None,
        a one-worker low-priority pool is created, owned, and replaced if it breaks.
    size_px : int
        Longer side of the thumbnail.
    validation_timeout_s : float
        dciodvfy limit per file.
    validation_max_instances : int
        Larger series are sampled (see :mod:`kp_gateway.validation.dciodvfy`).
    validation_workers : int
        dciodvfy processes per series at once.
    concurrency : int
        Series processed at once (each runs its stages in order).
    queue_size : int
        Distinct series waiting; a completion waits up to `enqueue_wait_s` for space.
    max_attempts, retry_backoff_s, retry_backoff_max_s :
        Retries of a failing stage: delay ``backoff * 2**(attempt-1)``, capped.
    site_timezone : str
        Shown in the report next to UTC.
    task_time_limit_s : float
        Longest one pool task (geometry, thumbnail) may run before its worker is killed.
    max_frame_bytes : int
        Largest decoded frame a thumbnail decodes (see :func:`render_series_thumbnail`).
    rescan_on_start : bool
        At start, rebuild the SEG/RTSTRUCT reference table from the index (awaited; pages
        through the SEG and RTSTRUCT series only), then in the background queue complete
        series that have no thumbnail or validation yet (work lost to a crash, a shutdown or
        a full queue) and mask-only annotations whose referenced series is stored now.
    """

    def __init__(
        self,
        cfg: SeriesConfig,
        *,
        storage: StorageBackend,
        index: IndexBackend,
        scratch_dir: Path,
        metrics: Metrics,
        executor: Executor | None = None,
        site_timezone: str = "UTC",
        enqueue_wait_s: float | None = None,
        rescan_on_start: bool | None = None,
    ) -> None:
        self._cfg = cfg
        self._storage = storage
        self._index = index
        # Objects without a local file (S3) are fetched here, on the data filesystem.
        self._scratch_dir = scratch_dir
        self._metrics = metrics
        self._executor = executor
        self._owns_executor = executor is None
        self.size_px = cfg.thumbnail_size_px
        # One retry rule with the ingest pipeline (pipeline/core.py): backoff and classification.
        self._retry = RetryPolicy(cfg.max_attempts, cfg.retry_backoff_s, cfg.retry_backoff_max_s)
        self._enqueue_wait_s = cfg.enqueue_wait_s if enqueue_wait_s is None else enqueue_wait_s
        self._site_timezone = site_timezone
        self._rescan_on_start = cfg.rescan_on_start if rescan_on_start is None else rescan_on_start
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=cfg.queue_size)
        self._pending: dict[str, set[str]] = {}  # queued series -> stages to run
        self._again: dict[str, set[str]] = {}  # completed again while running
        self._fields: dict[str, dict[str, Any]] = {}  # latest completion fields
        self._running: set[str] = set()
        self._attempts: dict[tuple[str, str], int] = {}
        self._referrers: dict[str, set[str]] = {}  # referenced series -> SEG/RTSTRUCT series
        self._tasks: set[asyncio.Task[None]] = set()  # workers and the start-up rescan
        self._side_tasks: set[asyncio.Task[None]] = set()  # retries and re-queues
        self._threads: ThreadPoolExecutor | None = None
        self._validator_available: bool | None = None
        self._closing = False
        metrics.series_stage_queue_depth.set_function(lambda: float(len(self._pending)))

    # -- wiring and lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Probe dciodvfy, rebuild the reference table, start the workers and the rescan."""
        self._closing = False
        self._threads = ThreadPoolExecutor(
            max_workers=self._cfg.concurrency,
            thread_name_prefix="series-validation",
            initializer=_lower_thread_priority,
        )
        if self._executor is None:
            self._executor = await asyncio.to_thread(make_process_pool)
        self._set_validator_available(await asyncio.to_thread(dciodvfy_path) is not None)
        if not self._validator_available:
            logger.warning("dciodvfy not found on PATH: series will not be validated")
        for n in range(self._cfg.concurrency):
            self._spawn(self._worker(), self._tasks, f"series-stages-{n}")
        if self._rescan_on_start:
            # Awaited: a referenced series completing right after start must find its SEGs.
            redraw = await self._rebuild_references()
            self._spawn(self._rescan(redraw), self._tasks, "series-stages-rescan")

    async def aclose(self, timeout_s: float = 0.0) -> None:
        """Stop: wait up to `timeout_s` for queued work, then cancel what is left.

        Call after the ingest service has drained (its last completions may still queue work).
        Work cancelled here is found again by the next start's rescan when the series has no
        thumbnail or validation yet.
        """
        if timeout_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    while not self.idle:
                        await asyncio.sleep(0.05)
        self._closing = True
        await cancel_tasks(self._tasks, self._side_tasks)
        if self._threads is not None:
            # A running dciodvfy ends by itself within its per-file timeout.
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None
        if self._owns_executor and self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    @property
    def validator_available(self) -> bool:
        """Whether dciodvfy was on PATH at the last check (start-up or last validation)."""
        return bool(self._validator_available)

    @property
    def idle(self) -> bool:
        """Nothing queued, running or waiting for a retry."""
        return not (self._pending or self._running or self._again or self._side_tasks)

    def is_running(self, series_uid: str) -> bool:
        """Whether the series' stages are running right now."""
        return series_uid in self._running

    def readiness(self) -> dict[str, Any]:
        """A /health/ready component; never gates readiness (ingest works without it)."""
        info: dict[str, Any] = {
            "ok": True,
            "validator_available": self.validator_available,
            "queued": len(self._pending),
            "running": len(self._running),
        }
        if not self.validator_available:
            info["detail"] = "dciodvfy not found on PATH (install dicom3tools); not validating"
        return info

    def _set_validator_available(self, available: bool) -> None:
        self._validator_available = available
        self._metrics.validator_available.set(1.0 if available else 0.0)

    def _spawn(
        self, coro: Coroutine[Any, Any, None], into: set[asyncio.Task[None]], name: str
    ) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        into.add(task)
        task.add_done_callback(into.discard)

    # -- queueing -------------------------------------------------------------------------

    async def on_series_complete(self, series_uid: str, fields: dict[str, object]) -> None:
        """The ingest hook: queue the series and every SEG/RTSTRUCT that annotates it."""
        for stage in STAGES:
            self._attempts.pop((series_uid, stage), None)
        await self.enqueue(series_uid, STAGES, fields=dict(fields))
        for referrer in sorted(self._referrers.get(series_uid, ())):
            if referrer != series_uid:
                await self.enqueue(referrer, (STAGE_THUMBNAIL,))

    async def enqueue(
        self,
        series_uid: str,
        stages: Iterable[str] = STAGES,
        *,
        fields: dict[str, Any] | None = None,
    ) -> bool:
        """Queue `stages` for a series; merged into a queued entry, deferred if running.

        Waits up to `enqueue_wait_s` when the queue is full; returns False if the series was
        not queued (full queue or closing).
        """
        if self._closing:
            return False
        wanted = set(stages)
        if fields is not None:
            self._fields[series_uid] = fields
        if series_uid in self._running:
            self._again.setdefault(series_uid, set()).update(wanted)
            return True
        if series_uid in self._pending:
            self._pending[series_uid].update(wanted)
            return True
        self._pending[series_uid] = wanted
        try:
            if self._enqueue_wait_s <= 0:
                self._queue.put_nowait(series_uid)
            else:
                async with asyncio.timeout(self._enqueue_wait_s):
                    await self._queue.put(series_uid)
        except (TimeoutError, asyncio.QueueFull):
            self._pending.pop(series_uid, None)
            self._fields.pop(series_uid, None)
            self._metrics.series_stage_dropped.inc()
            logger.error("series-stage queue full; %s not queued (redone at restart)", series_uid)
            return False
        return True

    async def _worker(self) -> None:
        while True:
            uid = await self._queue.get()
            stages = self._pending.pop(uid, set())
            self._running.add(uid)
            try:
                await self._process(uid, stages)
            except Exception:
                logger.exception("series stages failed for %s", uid)
            finally:
                self._running.discard(uid)
                self._queue.task_done()
                again = self._again.pop(uid, None)
                if again:
                    # In a task: a worker must never wait for space in its own queue.
                    self._spawn(self._requeue(uid, again), self._side_tasks, f"requeue-{uid}")

    async def _requeue(self, uid: str, stages: set[str]) -> None:
        await self.enqueue(uid, stages)

    async def _retry_later(self, uid: str, stage: str, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.enqueue(uid, (stage,))

    # -- processing -----------------------------------------------------------------------

    async def _process(self, uid: str, stages: set[str]) -> None:
        index = self._require_index()
        series = await index.get_series(uid)
        instances = await index.list_instances(uid)
        if series is None or not instances:
            logger.info("series %s vanished before its stages ran", uid)
            return
        fields = self._fields.pop(uid, None) or dict(series.get("document") or {})
        async with self._local_files(instances) as paths:
            for stage in STAGES:
                if stage in stages:
                    await self._run_stage(stage, uid, series, instances, paths, fields)
        # Another gateway (or a late association) may have added instances while the stages
        # ran on the older set; their outputs could then land last. Run them again: the next
        # run sees every instance and overwrites thumbnail, report and fields.
        if len(await index.list_instances(uid)) != len(instances):
            logger.info("series %s changed while its stages ran; running them again", uid)
            await self.enqueue(uid, stages)

    async def _run_stage(
        self,
        stage: str,
        uid: str,
        series: dict[str, Any],
        instances: list[dict[str, Any]],
        paths: list[str],
        fields: dict[str, Any],
    ) -> None:
        started = time.monotonic()
        try:
            if stage == STAGE_COMPLETENESS:
                outcome = await self._completeness(uid, paths)
            elif stage == STAGE_THUMBNAIL:
                outcome = await self._thumbnail(uid, series, instances, paths)
            else:
                outcome = await self._validation(uid, series, instances, paths, fields)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged, recorded and retried there
            await self._stage_failed(stage, uid, exc)
            return
        self._attempts.pop((uid, stage), None)
        self._metrics.series_stage_runs.labels(stage=stage, outcome=outcome).inc()
        self._metrics.series_stage_seconds.labels(stage=stage).observe(time.monotonic() - started)

    async def _stage_failed(self, stage: str, uid: str, exc: Exception) -> None:
        attempts = self._attempts.get((uid, stage), 0) + 1
        self._attempts[(uid, stage)] = attempts
        retry = (
            classify(exc) is StageOutcome.RETRY
            and attempts < self._retry.max_attempts
            and not self._closing
        )
        if retry:
            delay = self._retry.delay(attempts)
            logger.warning(
                "%s of series %s failed (attempt %d of %d), retrying in %.1f s: %s",
                stage,
                uid,
                attempts,
                self._retry.max_attempts,
                delay,
                exc,
            )
            self._spawn(self._retry_later(uid, stage, delay), self._side_tasks, f"retry-{uid}")
        else:
            logger.error("%s of series %s failed for good", stage, uid, exc_info=exc)
            self._attempts.pop((uid, stage), None)
        self._metrics.series_stage_runs.labels(
            stage=stage, outcome="retry" if retry else "fail"
        ).inc()
        note = _short(exc) + (f" (attempt {attempts}, will retry)" if retry else "")
        record: dict[str, Any] | None = None
        if stage == STAGE_THUMBNAIL:
            record = {KEY_THUMBNAIL_ERROR: note}
        elif stage == STAGE_VALIDATION:
            record = {KEY_VALIDATION: {VAL_STATUS: f"failed: {note}"}}
        if record is not None:
            try:
                await self._require_index().update_documents(uid, record)
            except Exception:
                logger.exception("could not record the %s failure of %s", stage, uid)

    async def _in_pool(self, fn: Any, *args: Any) -> Any:
        """Run a picklable call in the process pool under the per-task time limit.

        A process pool cannot cancel a running call, so a call that overruns
        `task_time_limit_s` has the pool's worker processes killed and the pool replaced; it
        raises RejectedInputError (recorded, not retried: the same bytes would overrun again).
        Calls of other series running in that pool at the moment (``concurrency`` > 1) fail
        with BrokenProcessPool, which is retried. A pool that broke by itself is replaced
        too. When the processor is closing, a cancelled call kills its workers, so a stop
        never waits for a long render.
        """
        loop = asyncio.get_running_loop()
        executor = self._executor
        deadline = asyncio.timeout(self._cfg.task_time_limit_s)
        try:
            async with deadline:
                return await loop.run_in_executor(executor, fn, *args)
        except TimeoutError:
            if not deadline.expired():
                raise  # raised by the call itself
            logger.error(
                "%s overran its %.0f s limit; killing the series worker",
                getattr(fn, "__name__", None) or getattr(fn, "func", fn).__name__,
                self._cfg.task_time_limit_s,
            )
            self._replace_pool(executor)
            raise RejectedInputError(
                f"took longer than {self._cfg.task_time_limit_s:g} s "
                "(series.task_time_limit_s); its worker process was stopped"
            ) from None
        except BrokenProcessPool:
            logger.error("series worker process died; starting a new pool")
            self._replace_pool(executor)
            raise
        except asyncio.CancelledError:
            if self._closing:
                _kill_workers(executor)
            raise

    def _replace_pool(self, broken: Executor | None) -> None:
        """Kill `broken`'s workers and, unless closing, put a new owned pool in its place."""
        _kill_workers(broken)
        if broken is None or broken is not self._executor or self._closing:
            return  # another task replaced it already, or nothing will run any more
        # The new pool is ours to shut down even when the broken one came from the app (the
        # app's shutdown of a broken pool returns at once).
        # As many workers as the broken pool had (series.process_pool_size for the app's).
        workers = int(getattr(broken, "_max_workers", 1))
        self._executor, self._owns_executor = make_process_pool(workers), True
        broken.shutdown(wait=False, cancel_futures=True)

    async def _completeness(self, uid: str, paths: list[str]) -> str:
        geometry: dict[str, Any] = await self._in_pool(slice_geometry, paths)
        await self._require_index().update_documents(uid, geometry)
        return "ok"

    async def _thumbnail(
        self,
        uid: str,
        series: dict[str, Any],
        instances: list[dict[str, Any]],
        paths: list[str],
    ) -> str:
        index = self._require_index()
        modality = str(series.get("modality") or "").upper()
        sop_class = str(instances[0].get("sop_class_uid") or "")
        reference: list[dict[str, Any]] = []
        if modality in _ANNOTATION_MODALITIES or sop_class in _ANNOTATION_SOP_CLASSES:
            ref_uid: str | None = await self._in_pool(referenced_series_uid, paths[0])
            if ref_uid and ref_uid != uid:
                self._referrers.setdefault(ref_uid, set()).add(uid)
                reference = await index.list_instances(ref_uid)
        async with self._local_files(reference) as reference_paths:
            render = functools.partial(
                render_series_thumbnail,
                paths,
                reference_paths=reference_paths,
                size_px=self.size_px,
                max_frame_bytes=self._cfg.max_frame_bytes,
            )
            thumbnail: Thumbnail = await self._in_pool(render)
        await self._require_storage().put_bytes(f"thumbnails/{uid}.png", thumbnail.png)
        document = series.get("document") or {}
        update: dict[str, Any] = {
            # A placeholder card has no source image; it stands for the first instance.
            KEY_THUMBNAIL: thumbnail.source_sop_instance_uid or str(instances[0]["sop_uid"]),
            KEY_THUMBNAIL_STRATEGY: thumbnail.strategy,
        }
        if document.get(KEY_THUMBNAIL_ERROR) is not None or self._attempts.get((uid, "thumbnail")):
            update[KEY_THUMBNAIL_ERROR] = None
        await index.update_documents(uid, update)
        logger.info("thumbnail of %s written (%s)", uid, thumbnail.strategy)
        return "ok"

    async def _validation(
        self,
        uid: str,
        series: dict[str, Any],
        instances: list[dict[str, Any]],
        paths: list[str],
        fields: dict[str, Any],
    ) -> str:
        index = self._require_index()
        loop = asyncio.get_running_loop()
        pairs: list[tuple[str, str | os.PathLike[str]]] = [
            (str(i["sop_uid"]), p) for i, p in zip(instances, paths, strict=True)
        ]
        run = functools.partial(
            validate_series,
            pairs,
            timeout_s=self._cfg.validation_timeout_s,
            max_instances=self._cfg.validation_max_instances,
            workers=self._cfg.validation_workers,
        )
        try:
            result: SeriesValidation = await loop.run_in_executor(self._threads, run)
        except ValidatorUnavailableError:
            self._set_validator_available(False)
            await index.update_documents(uid, {KEY_VALIDATION: {VAL_STATUS: STATUS_UNAVAILABLE}})
            logger.warning("series %s not validated: dciodvfy is not installed", uid)
            return "unavailable"
        self._set_validator_available(True)
        report = await asyncio.to_thread(
            render_report_html,
            result,
            series_instance_uid=uid,
            series_description=series.get("description") or None,
            modality=series.get("modality") or None,
            completeness=completeness_for_report(fields),
            site_timezone=self._site_timezone,
        )
        await self._require_storage().put_bytes(f"validation/{uid}.html", report.encode("utf-8"))
        summary = {
            VAL_ERRORS: result.error_count,
            VAL_WARNINGS: result.warning_count,
            VAL_DATE: _format_validation_date(result.validated_at),
            VAL_STATUS: STATUS_VALIDATED,
        }
        await index.update_documents(uid, {KEY_VALIDATION: summary})
        logger.info(
            "series %s validated: %d errors, %d warnings",
            uid,
            result.error_count,
            result.warning_count,
        )
        return "ok"

    # -- helpers --------------------------------------------------------------------------

    def _require_index(self) -> IndexBackend:
        return self._index

    def _require_storage(self) -> StorageBackend:
        return self._storage

    @contextlib.asynccontextmanager
    async def _local_files(
        self, instances: Sequence[Mapping[str, Any]]
    ) -> AsyncIterator[list[str]]:
        """Local paths of the instances; objects without one are fetched to a scratch folder.

        The folder lives under ``<data dir>/spool/tmp`` (never the system temp, which may be
        a small tmpfs), holds one series at a time per worker (``concurrency`` bounds them),
        is filled by at most ``_FETCH_CONCURRENCY`` downloads at once, and is removed when
        the block ends.
        """
        storage = self._require_storage()
        keys = [str(i["storage_key"]) for i in instances]
        local = [storage.local_path(key) for key in keys]
        if all(path is not None for path in local):
            yield [str(path) for path in local]
            return
        scratch = self._scratch_dir
        await asyncio.to_thread(scratch.mkdir, parents=True, exist_ok=True)
        tmp = await asyncio.to_thread(tempfile.mkdtemp, prefix="series-", dir=scratch)
        try:
            limit = asyncio.Semaphore(_FETCH_CONCURRENCY)

            async def fetch(n: int, key: str, path: Path | None) -> str:
                if path is not None:
                    return str(path)
                target = Path(tmp) / f"{n}.dcm"
                async with limit:
                    await storage.fetch_to_file(key, target)
                return str(target)

            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(fetch(n, key, path))
                        for n, (key, path) in enumerate(zip(keys, local, strict=True))
                    ]
            except ExceptionGroup as failed:
                # The first failure (a BackendError) is what the stages classify.
                raise failed.exceptions[0] from None
            yield [task.result() for task in tasks]
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)

    async def _pages(self, modality: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every series summary of the admin project (every series is mapped there)."""
        query = SeriesQuery(project=ADMIN_PROJECT, modality=modality)
        async for item in iter_series(self._require_index(), query):
            yield item

    async def _rebuild_references(self) -> list[str]:
        """Fill the reference table from the SEG/RTSTRUCT documents of the index.

        Returns the annotation series drawn mask-only whose referenced series is stored now.
        """
        index = self._require_index()
        redraw: list[str] = []
        for modality in sorted(_ANNOTATION_MODALITIES):
            async for item in self._pages(modality):
                uid = str(item["series_uid"])
                series = await index.get_series(uid)
                document = (series or {}).get("document") or {}
                references = referenced_series_in_document(document)
                for ref in references:
                    self._referrers.setdefault(ref, set()).add(uid)
                if document.get(KEY_THUMBNAIL_STRATEGY) == "mask-only":
                    for ref in references:
                        if await index.get_series(ref) is not None:
                            redraw.append(uid)
                            break
        return redraw

    async def _rescan(self, redraw: list[str]) -> None:
        """Queue mask-only annotations to redraw and complete series that lack results."""
        queued = 0
        for uid in redraw:
            await self._wait_for_space()
            queued += await self.enqueue(uid, (STAGE_THUMBNAIL,))
        async for item in self._pages():
            has_thumbnail, has_validation = item.get("has_thumbnail"), item.get("validation")
            if not item.get("complete") or (has_thumbnail and has_validation is not None):
                continue
            missing = [] if has_thumbnail else [STAGE_COMPLETENESS, STAGE_THUMBNAIL]
            if has_validation is None:
                missing.append(STAGE_VALIDATION)
            await self._wait_for_space()
            queued += await self.enqueue(str(item["series_uid"]), missing)
        if queued:
            logger.info("start-up rescan queued %d series", queued)

    async def _wait_for_space(self) -> None:
        # The rescan may wait for the queue as long as it takes; completions may not.
        while self._queue.full() and not self._closing:
            await asyncio.sleep(0.2)


__all__ = [
    "STAGES",
    "SeriesPostProcessor",
    "completeness_for_report",
    "make_process_pool",
    "referenced_series_in_document",
    "slice_geometry",
]
