"""Series completion: a series is complete when every source (association or upload) that
delivered to it has closed, all its items are indexed, and ``series_idle_s`` passed since the
last one (CONTRACT section 3). Late instances re-open the series and it completes again.

Runs on the event loop, except :meth:`SeriesTracker.source_item_admitted`, which association
threads call as they admit an item.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class _SourceState:
    pending: int = 0
    closed: bool = False


@dataclass
class _SeriesState:
    last_activity: float
    sources: set[str] = field(default_factory=set)


class SeriesTracker:
    """Decides when series are complete and calls `on_complete` once per completion."""

    def __init__(
        self,
        *,
        idle_s: float,
        on_complete: Callable[[str], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle_s = idle_s
        self._on_complete = on_complete
        self._clock = clock
        self._sources: dict[str, _SourceState] = {}
        # Guards _sources: admissions are counted on association threads.
        self._sources_lock = threading.Lock()
        self._series: dict[str, _SeriesState] = {}
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()

    def source_item_admitted(self, source_id: str) -> None:
        """An item of `source_id` entered the pipeline. Runs on any thread."""
        with self._sources_lock:
            self._sources.setdefault(source_id, _SourceState()).pending += 1

    def source_item_settled(self, source_id: str, series_uid: str | None) -> None:
        """An item of `source_id` left the pipeline (indexed, or quarantined with no series)."""
        with self._sources_lock:
            state = self._sources.setdefault(source_id, _SourceState())
            state.pending = max(0, state.pending - 1)
            self._forget_source_if_done_locked(source_id)
        if series_uid is not None:
            series = self._series.setdefault(series_uid, _SeriesState(self._clock()))
            series.last_activity = self._clock()
            series.sources.add(source_id)
        self._wakeup.set()

    def source_closed(self, source_id: str) -> None:
        """The association was released or aborted, or the upload finished importing."""
        with self._sources_lock:
            self._sources.setdefault(source_id, _SourceState()).closed = True
            self._forget_source_if_done_locked(source_id)
        self._wakeup.set()

    def track_existing(self, series_uid: str) -> None:
        """Track a series found incomplete at start-up (its sources are gone with the crash)."""
        self._series.setdefault(series_uid, _SeriesState(self._clock()))
        self._wakeup.set()

    def _forget_source_if_done_locked(self, source_id: str) -> None:
        state = self._sources.get(source_id)
        if state is not None and state.closed and state.pending == 0:
            del self._sources[source_id]

    def _source_busy(self, source_id: str) -> bool:
        return source_id in self._sources

    def due(self) -> list[str]:
        """Series whose sources are all done and that have been idle long enough."""
        now = self._clock()
        return [
            uid
            for uid, state in self._series.items()
            if now - state.last_activity >= self._idle_s
            and not any(self._source_busy(s) for s in state.sources)
        ]

    def pending_count(self) -> int:
        """Series not yet complete."""
        return len(self._series)

    async def check_once(self) -> int:
        """Complete every due series; returns how many completed."""
        completed = 0
        for uid in self.due():
            # The background round and drain's final round may both hold this uid: first wins.
            state = self._series.pop(uid, None)
            if state is None:
                continue
            try:
                await self._on_complete(uid)
                completed += 1
            except Exception:
                # Put it back; the next round tries again.
                logger.exception("completing series failed; will retry")
                state.last_activity = self._clock()
                self._series.setdefault(uid, state)
        return completed

    async def _run(self) -> None:
        # Poll at a quarter of the idle time so completion lands within 25 % of it.
        interval = max(0.05, min(1.0, self._idle_s / 4))
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wakeup.wait()
            self._wakeup.clear()
            await self.check_once()

    def start(self) -> None:
        """Start the background checker."""
        self._task = asyncio.create_task(self._run(), name="series-tracker")

    async def aclose(self) -> None:
        """Stop the background checker."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
