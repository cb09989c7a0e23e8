"""A FIFO between pipeline stages that is filled item by item and emptied batch by batch.

At hundreds of C-STOREs per second the event loop shares the receiving interpreter's GIL with
pynetdicom, so every loop wake-up per item is taken from the senders. Here a stage worker
sleeps until its batch is full or its linger ran out, and association threads append without
waking the loop unless a worker is waiting for exactly that item: a second of traffic costs
a few wake-ups instead of one (and a timer, a future and a task switch) per item.

Every method runs on the loop, except :meth:`BatchQueue.put_threadsafe`, which runs on any
other thread.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Generic, TypeVar

E = TypeVar("E")


class BatchQueue(Generic[E]):
    """A queue whose consumers take batches; see the module docstring.

    Parameters
    ----------
    maxsize : int
        :meth:`put` waits while this many items are queued; 0 = unbounded (the first stage,
        which is bounded by the pipeline's admission instead).
    """

    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize
        self._items: collections.deque[E] = collections.deque()
        # Association threads append while the loop pops; the lock also keeps the wake-up
        # bookkeeping consistent with the deque.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        # One collector at a time waits for items; the others wait for the collector role.
        self._collector = asyncio.Lock()
        self._ready = asyncio.Event()
        self._wanted = 0  # items that make the waiting collector's wait worth ending; 0 = none
        self._wake_scheduled = False
        self._space = asyncio.Event()
        self._space.set()
        self._unfinished = 0
        self._all_done = asyncio.Event()
        self._all_done.set()
        # Items taken out to be retried later: they keep their place in `maxsize`, so a stage
        # whose backend fails cannot let its predecessor pile up ever more work behind it.
        self._held = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the consumers run on (needed by :meth:`put_threadsafe`). Loop only."""
        self._loop = loop

    def qsize(self) -> int:
        """Items waiting."""
        return len(self._items)

    @property
    def held(self) -> int:
        """Items out for a retry that still count against `maxsize`."""
        return self._held

    def empty(self) -> bool:
        """No items waiting."""
        return not self._items

    # -- producers ------------------------------------------------------------------------

    def put_nowait(self, item: E) -> None:
        """Append `item` regardless of `maxsize`. Loop only."""
        self._append_on_loop([item])

    async def put(self, item: E) -> None:
        """Append `item`, first waiting while the queue holds `maxsize` items. Loop only."""
        await self.put_many([item])

    async def put_many(self, items: list[E]) -> None:
        """Append `items` once the queue holds fewer than `maxsize` (it may then exceed it by
        at most ``len(items) - 1``: a batch is never split). Loop only."""
        while self.maxsize and len(self._items) + self._held >= self.maxsize:
            self._space.clear()
            await self._space.wait()
        self._append_on_loop(items)

    def hold(self) -> None:
        """A popped item will come back (a retry): keep its place until :meth:`put_held`.

        Counted in :meth:`join` until it is back. Loop only.
        """
        self._held += 1
        with self._lock:
            self._unfinished += 1
            self._all_done.clear()

    def put_held(self, item: E) -> None:
        """Append an item whose place :meth:`hold` kept; never waits. Loop only."""
        self._held -= 1
        with self._lock:
            self._unfinished -= 1  # _append_locked counts it again
        self._append_on_loop([item])

    def _append_on_loop(self, items: list[E]) -> None:
        with self._lock:
            for item in items:
                self._append_locked(item)
            wake = self._should_wake_locked()
        if wake:
            self._ready.set()

    def put_threadsafe(self, item: E) -> None:
        """Append `item` from another thread; wakes the loop only when a consumer needs it.

        Runs on any thread but the loop's.
        """
        loop = self._loop
        if loop is None:
            raise RuntimeError("BatchQueue.bind() was not called")
        with self._lock:
            self._append_locked(item)
            wake = self._should_wake_locked() and not self._wake_scheduled
            if wake:
                self._wake_scheduled = True
        if wake:
            loop.call_soon_threadsafe(self._wake_from_thread)

    def _append_locked(self, item: E) -> None:
        self._items.append(item)
        self._unfinished += 1
        self._all_done.clear()

    def _should_wake_locked(self) -> bool:
        return self._wanted > 0 and len(self._items) >= self._wanted

    def _wake_from_thread(self) -> None:
        with self._lock:
            self._wake_scheduled = False
        self._ready.set()

    # -- consumers ------------------------------------------------------------------------

    async def get_batch(self, batch_max: int, linger_s: float) -> list[E]:
        """Wait for an item, then up to `linger_s` for `batch_max`; pop at most `batch_max`.

        Loop only. Several workers may call this; they take turns collecting.
        """
        async with self._collector:
            await self._wait_for(1, None)
            if linger_s > 0 and len(self._items) < batch_max:
                loop = asyncio.get_running_loop()
                await self._wait_for(batch_max, loop.time() + linger_s)
            with self._lock:
                count = min(batch_max, len(self._items))
                batch = [self._items.popleft() for _ in range(count)]
        self._space.set()
        return batch

    async def _wait_for(self, count: int, deadline: float | None) -> None:
        while True:
            with self._lock:
                if len(self._items) >= count:
                    self._wanted = 0
                    return
                self._wanted = count
                self._ready.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._ready.wait()
            except TimeoutError:
                with self._lock:
                    self._wanted = 0
                return
            except BaseException:
                with self._lock:
                    self._wanted = 0
                raise

    def task_done(self, count: int = 1) -> None:
        """`count` popped items were dealt with (for :meth:`join`). Loop only."""
        with self._lock:
            # Checked first, as asyncio.Queue does: a refused call leaves the count intact.
            if count > self._unfinished:
                raise ValueError("task_done() called more often than items were put")
            self._unfinished -= count
            done = self._unfinished == 0
        if done:
            self._all_done.set()

    async def join(self) -> None:
        """Wait until every item put was popped and marked done. Loop only."""
        await self._all_done.wait()


__all__ = ["BatchQueue"]
