"""A staged pipeline: one bounded queue and a worker pool per stage, retries, quarantine, drain.

It knows nothing of DICOM. A stage handler takes a batch of items and either returns (all OK)
or raises; a failed batch is split and each item retried alone, so one bad item never holds
back the others. A full queue makes the previous stage's workers wait, and in the end
admission itself, which is how backpressure reaches the sender. An item waiting for a retry
keeps its place in its stage's queue, so a failing backend slows the senders instead of
letting work pile up behind it.

Admission is a counting semaphore sized to the first stage's ``queue_size``: a slot is taken
when an item is admitted and given back when the item leaves the first stage. Because it is a
thread-safe semaphore, an association thread can be admitted without a round trip through the
event loop (``submit_threadsafe``), which matters at hundreds of C-STOREs per second.

Runs on the event loop; every method but ``submit_threadsafe`` must be called from the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kp_gateway.errors import (
    BackendRejectedError,
    BackendUnavailableError,
    PipelineFull,
    RejectedInputError,
    ShuttingDownError,
)
from kp_gateway.model import StageOutcome
from kp_gateway.pipeline.batchqueue import BatchQueue

logger = logging.getLogger(__name__)

T = TypeVar("T")

BatchHandler = Callable[[list[T]], Awaitable[None]]


@dataclass(eq=False)
class _Envelope(Generic[T]):
    item: T
    attempts: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass
class Stage(Generic[T]):
    """One step of the pipeline.

    Parameters
    ----------
    name : str
        Used in logs, metrics labels and the quarantine folder.
    handler : callable
        ``async def handler(batch: list[T]) -> None``; raising fails the batch.
    workers : int
        Concurrent handler calls.
    queue_size : int
        Items waiting for this stage before the previous one has to wait.
    batch_max : int
        Most items handed to one handler call (the index stage commits a batch at once).
    linger_s : float
        How long a worker holding fewer than `batch_max` items waits for more: per-call costs
        (a process-pool round trip, an fsync, a commit) are then paid once per batch.
    """

    name: str
    handler: BatchHandler[T]
    workers: int = 1
    queue_size: int = 64
    batch_max: int = 1
    linger_s: float = 0.0
    queue: BatchQueue[_Envelope[T]] = field(init=False)

    def __post_init__(self) -> None:
        self.queue = BatchQueue(maxsize=self.queue_size)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff."""

    max_attempts: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Delay before attempt number `attempt` + 1."""
        return float(min(self.backoff_max_s, self.backoff_s * (2 ** max(0, attempt - 1))))


def classify(exc: BaseException) -> StageOutcome:
    """RETRY for transient failures, FAIL for input or permanent backend failures.

    The one rule for the ingest stages and the series stages. ValueError is what decoders
    (pydicom, numpy, Pillow) raise for bytes they cannot read: the same bytes fail again.
    """
    if isinstance(exc, RejectedInputError | BackendRejectedError | ValueError):
        return StageOutcome.FAIL
    if isinstance(exc, BackendUnavailableError | OSError | TimeoutError):
        return StageOutcome.RETRY
    # An unexpected exception is a bug; retrying a few times costs little and the item is
    # quarantined (never dropped) if it keeps failing.
    return StageOutcome.RETRY


async def cancel_tasks(*groups: set[asyncio.Task[None]]) -> None:
    """Cancel every task of `groups`, wait until each has ended, and empty the sets."""
    tasks = [task for group in groups for task in group]
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for group in groups:
        group.clear()


class StageObserver(Generic[T]):
    """Hooks for metrics and bookkeeping; the default does nothing."""

    def on_stage_done(self, stage: str, batch: Sequence[T], seconds: float) -> None:
        """A batch passed `stage`."""

    def on_retry(self, stage: str, item: T, exc: BaseException) -> None:
        """An item will be retried."""


class Pipeline(Generic[T]):
    """Bounded stages in sequence; see the module docstring.

    Parameters
    ----------
    stages : sequence of Stage
        In order; an item leaves the last stage finished.
    on_finished : callable
        ``async def (item)`` after the last stage succeeded.
    on_quarantine : callable
        ``async def (stage_name, item, exc)`` for an item that failed for good.
    """

    def __init__(
        self,
        stages: Sequence[Stage[T]],
        *,
        retry: RetryPolicy,
        on_finished: Callable[[T], Awaitable[None]],
        on_quarantine: Callable[[str, T, BaseException], Awaitable[None]],
        observer: StageObserver[T] | None = None,
    ) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = list(stages)
        self._retry = retry
        self._on_finished = on_finished
        self._on_quarantine = on_quarantine
        self._observer = observer or StageObserver()
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry_tasks: set[asyncio.Task[None]] = set()
        self._accepting = False
        # Stage name -> the backend error its items are waiting out (readiness shows it).
        self.outages: dict[str, str] = {}
        # Admission runs on association threads too, so the count has a lock.
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        first = self.stages[0]
        # The semaphore bounds the first stage; its queue need not.
        self._slots = threading.Semaphore(first.queue_size)
        self._slot_freed = asyncio.Event()
        first.queue = BatchQueue()

    @property
    def in_flight(self) -> int:
        """Items admitted and not yet finished or quarantined."""
        return self._in_flight

    def _count_in_flight(self, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight += delta

    @property
    def accepting(self) -> bool:
        """Whether ``submit`` takes new items."""
        return self._accepting

    def start(self) -> None:
        """Start the stage workers on the running loop."""
        loop = asyncio.get_running_loop()
        for index, stage in enumerate(self.stages):
            stage.queue.bind(loop)
            for n in range(stage.workers):
                task = asyncio.create_task(
                    self._worker(index, stage), name=f"pipeline-{stage.name}-{n}"
                )
                self._tasks.add(task)
        self._accepting = True

    async def submit(self, item: T, *, timeout_s: float) -> None:
        """Admit `item`, waiting up to `timeout_s` for a slot. Runs on the loop.

        Raises
        ------
        PipelineFull
            The first stage stayed full for `timeout_s` (the sender gets 0xA700 / 503).
        ShuttingDownError
            The pipeline is draining.
        """
        if not self._accepting:
            raise ShuttingDownError("the gateway is shutting down")
        deadline = time.monotonic() + timeout_s
        while not self._slots.acquire(blocking=False):
            self._slot_freed.clear()
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    await self._slot_freed.wait()
            except TimeoutError:
                raise PipelineFull(
                    f"pipeline stayed full for {timeout_s:g} s ({self.in_flight} items in flight)"
                ) from None
        self._enqueue(item)

    def submit_threadsafe(
        self,
        item: T,
        *,
        timeout_s: float,
        then: Callable[[T], None] | None = None,
    ) -> None:
        """Admit `item` from another thread, blocking that thread up to `timeout_s` for a slot.

        Runs on any thread but the loop's. `then(item)` runs on the calling thread once the
        slot is taken and before any stage can see the item (bookkeeping that must come first).
        Never waits for the loop, and wakes it only when a stage worker waits for the item.

        Raises
        ------
        PipelineFull, ShuttingDownError
            As :meth:`submit`.
        """
        if not self._accepting:
            raise ShuttingDownError("the gateway is shutting down")
        if not self._slots.acquire(timeout=timeout_s):
            raise PipelineFull(f"pipeline stayed full for {timeout_s:g} s")
        if then is not None:
            then(item)
        self._count_in_flight(1)
        self.stages[0].queue.put_threadsafe(_Envelope(item))

    def _enqueue(self, item: T) -> None:
        self._count_in_flight(1)
        self.stages[0].queue.put_nowait(_Envelope(item))

    def _release_slot(self, count: int = 1) -> None:
        self._slots.release(count)
        self._slot_freed.set()

    def queue_depths(self) -> dict[str, int]:
        """Items waiting per stage."""
        return {stage.name: stage.queue.qsize() for stage in self.stages}

    async def _worker(self, index: int, stage: Stage[T]) -> None:
        next_queue = self.stages[index + 1].queue if index + 1 < len(self.stages) else None
        while True:
            batch = await stage.queue.get_batch(stage.batch_max, stage.linger_s)
            try:
                await self._run_batch(stage, batch, next_queue, first=index == 0)
            finally:
                stage.queue.task_done(len(batch))

    async def _run_batch(
        self,
        stage: Stage[T],
        batch: list[_Envelope[T]],
        next_queue: BatchQueue[_Envelope[T]] | None,
        *,
        first: bool,
    ) -> None:
        started = time.monotonic()
        try:
            await stage.handler([env.item for env in batch])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the stage worker is a failure boundary
            if len(batch) > 1:
                # Split the batch: each item gets its own attempt and its own fate.
                for env in batch:
                    await self._run_batch(stage, [env], next_queue, first=first)
                return
            if await self._handle_failure(stage, batch[0], exc) and first:
                self._release_slot()
            return
        self.outages.pop(stage.name, None)
        self._observer.on_stage_done(
            stage.name, [env.item for env in batch], time.monotonic() - started
        )
        for env in batch:
            env.attempts = 0
        if next_queue is not None:
            await next_queue.put_many(batch)
        else:
            self._count_in_flight(-len(batch))
            for env in batch:
                await self._finish(env.item)
        if first:
            # Only now: while the next stage is full the slots stay taken (backpressure).
            self._release_slot(len(batch))

    async def _finish(self, item: T) -> None:
        try:
            await self._on_finished(item)
        except Exception:
            logger.exception("on_finished hook failed")

    async def _handle_failure(self, stage: Stage[T], env: _Envelope[T], exc: Exception) -> bool:
        """Schedule a retry or quarantine the item; True when the item left the stage."""
        env.attempts += 1
        outcome = classify(exc)
        # A backend that is down (disk full, S3 or the index unreachable) is waited out without
        # an attempt limit: the item was acknowledged and must not end in quarantine because
        # of an outage. Meanwhile the queues fill and senders get 0xA700 / 503.
        unlimited = isinstance(exc, BackendUnavailableError)
        if unlimited:
            self.outages[stage.name] = str(exc)
        if outcome is StageOutcome.RETRY and (unlimited or env.attempts < self._retry.max_attempts):
            delay = self._retry.delay(env.attempts)
            logger.warning(
                "stage %s failed (attempt %d%s), retrying in %.1f s: %s",
                stage.name,
                env.attempts,
                "" if unlimited else f" of {self._retry.max_attempts}",
                delay,
                exc,
            )
            self._observer.on_retry(stage.name, env.item, exc)
            stage.queue.hold()
            task = asyncio.create_task(self._requeue(stage, env, delay))
            self._retry_tasks.add(task)
            task.add_done_callback(self._retry_tasks.discard)
            return False
        if isinstance(exc, RejectedInputError | BackendRejectedError):
            logger.warning("stage %s rejected an item for good: %s", stage.name, exc)
        else:
            logger.error(
                "stage %s gave up after %d attempts", stage.name, env.attempts, exc_info=exc
            )
        self._count_in_flight(-1)
        try:
            await self._on_quarantine(stage.name, env.item, exc)
        except Exception:
            logger.exception("quarantine of a failed item failed; it stays in the spool")
        return True

    async def _requeue(self, stage: Stage[T], env: _Envelope[T], delay: float) -> None:
        # The item held its place in the stage's queue meanwhile (backpressure holds while a
        # backend is down) and is counted in the stage's join() until it is back.
        await asyncio.sleep(delay)
        stage.queue.put_held(env)

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting, finish queued work within `timeout_s`, then stop the workers.

        Returns True when everything finished; what did not stays in the spool and is
        recovered at the next start.
        """
        self._accepting = False
        finished = True
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    for stage in self.stages:
                        await stage.queue.join()
                    if not self._retry_tasks and all(s.queue.empty() for s in self.stages):
                        break
                    await asyncio.sleep(0.05)
        except TimeoutError:
            finished = False
            logger.warning(
                "drain timed out; %d items stay in the spool for restart", self.in_flight
            )
        await self.aclose()
        return finished

    async def aclose(self) -> None:
        """Cancel workers and pending retries at once."""
        self._accepting = False
        await cancel_tasks(self._tasks, self._retry_tasks)
