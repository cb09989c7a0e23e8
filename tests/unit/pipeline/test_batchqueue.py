"""BatchQueue: batching, lingering, thread-side puts and their wake-ups, bounds, join, cancel."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from kp_gateway.pipeline.batchqueue import BatchQueue


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5) -> None:
    """Yield to the loop until `predicate` holds (fails the test after `timeout_s`)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.001)


async def settle() -> None:
    """Let every ready task and callback run a few times over."""
    for _ in range(10):
        await asyncio.sleep(0)


def count_wakes(q: BatchQueue[int], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the loop wake-ups `put_threadsafe` schedules; the returned list grows by one each."""
    wakes: list[int] = []
    original = q._wake_from_thread

    def counting() -> None:
        wakes.append(1)
        original()

    monkeypatch.setattr(q, "_wake_from_thread", counting)
    return wakes


# -- get_batch without a linger ---------------------------------------------------------------


async def test_get_batch_without_linger_returns_what_is_queued_in_fifo_order() -> None:
    """linger 0 returns at once with up to batch_max items, oldest first, leaving the rest."""
    q: BatchQueue[int] = BatchQueue()
    for i in range(5):
        q.put_nowait(i)
    async with asyncio.timeout(5):
        assert await q.get_batch(2, 0) == [0, 1]
        assert await q.get_batch(10, 0) == [2, 3, 4]
    assert q.empty()
    assert q.qsize() == 0


async def test_get_batch_without_linger_waits_for_the_first_item_only() -> None:
    """An empty queue makes get_batch wait; one item is enough to end the wait."""
    q: BatchQueue[int] = BatchQueue()
    consumer = asyncio.create_task(q.get_batch(10, 0))
    await settle()
    assert not consumer.done()
    q.put_nowait(7)
    async with asyncio.timeout(5):
        assert await consumer == [7]


# -- get_batch with a linger ------------------------------------------------------------------


async def test_linger_ends_early_when_batch_is_full() -> None:
    """With a 30 s linger, get_batch returns as soon as batch_max items are queued."""
    q: BatchQueue[int] = BatchQueue()
    consumer = asyncio.create_task(q.get_batch(4, 30))
    for i in range(3):
        q.put_nowait(i)
        await settle()
        assert not consumer.done()  # still lingering for the 4th
    q.put_nowait(3)
    q.put_nowait(4)  # beyond batch_max: stays queued
    async with asyncio.timeout(5):
        assert await consumer == [0, 1, 2, 3]
    assert q.qsize() == 1


async def test_linger_is_skipped_when_batch_is_already_full() -> None:
    """Items already queued up to batch_max are returned without lingering at all."""
    q: BatchQueue[int] = BatchQueue()
    for i in range(6):
        q.put_nowait(i)
    async with asyncio.timeout(5):
        assert await q.get_batch(5, 30) == [0, 1, 2, 3, 4]


async def test_linger_returns_partial_batch_after_deadline() -> None:
    """Short of batch_max, get_batch returns what it has once the linger ran out, not before,
    including items that arrived during the linger."""
    q: BatchQueue[int] = BatchQueue()
    loop = asyncio.get_running_loop()
    q.put_nowait(1)
    started = loop.time()
    consumer = asyncio.create_task(q.get_batch(10, 0.2))
    await asyncio.sleep(0.05)
    q.put_nowait(2)  # arrives while lingering
    await asyncio.sleep(0.05)
    assert not consumer.done()
    async with asyncio.timeout(5):
        batch = await consumer
    elapsed = loop.time() - started
    assert batch == [1, 2]
    assert 0.15 <= elapsed < 2
    assert q._wanted == 0


# -- put_threadsafe ---------------------------------------------------------------------------


def test_put_threadsafe_before_bind_raises() -> None:
    """Without bind() there is no loop to wake, so put_threadsafe refuses (and appends nothing)."""
    q: BatchQueue[int] = BatchQueue()
    with pytest.raises(RuntimeError, match="bind"):
        q.put_threadsafe(1)
    assert q.qsize() == 0


async def test_put_threadsafe_wakes_consumer_waiting_for_first_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A put from another thread wakes a consumer blocked on an empty queue, exactly once."""
    q: BatchQueue[int] = BatchQueue()
    q.bind(asyncio.get_running_loop())
    wakes = count_wakes(q, monkeypatch)
    consumer = asyncio.create_task(q.get_batch(10, 0))
    await wait_until(lambda: q._wanted == 1)
    await asyncio.to_thread(q.put_threadsafe, 42)
    async with asyncio.timeout(5):
        assert await consumer == [42]
    assert len(wakes) == 1


async def test_put_threadsafe_from_plain_thread_wakes_consumer() -> None:
    """A threading.Thread producer (not the default executor) also wakes the waiting consumer."""
    q: BatchQueue[str] = BatchQueue()
    q.bind(asyncio.get_running_loop())
    consumer = asyncio.create_task(q.get_batch(3, 0))
    await wait_until(lambda: q._wanted == 1)
    producer = threading.Thread(target=q.put_threadsafe, args=("a",))
    producer.start()
    async with asyncio.timeout(5):
        assert await consumer == ["a"]
    producer.join(5)
    assert not producer.is_alive()


async def test_put_threadsafe_wakes_lingering_consumer_only_when_batch_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a consumer lingers for 50 items, 48 thread-side puts cause no wake-up at all;
    completing the batch and putting 50 more causes exactly one, and the consumer gets its 50
    items in one batch."""
    q: BatchQueue[int] = BatchQueue()
    q.bind(asyncio.get_running_loop())
    wakes = count_wakes(q, monkeypatch)
    q.put_nowait(0)
    consumer = asyncio.create_task(q.get_batch(50, 30))
    await wait_until(lambda: q._wanted == 50)  # past the first item, lingering

    def put_range(start: int, stop: int) -> None:
        for i in range(start, stop):
            q.put_threadsafe(i)

    await asyncio.to_thread(put_range, 1, 49)
    await asyncio.sleep(0.05)  # any wake-up scheduled would have run by now
    assert wakes == []
    assert not consumer.done()
    assert q.qsize() == 49

    # The 50th item, then 50 more before the loop can run the wake-up: joining the producer
    # on the loop blocks it, so a second wake-up scheduled for the same wait would show.
    producer = threading.Thread(target=put_range, args=(49, 100))
    producer.start()
    producer.join(5)
    assert not producer.is_alive()
    async with asyncio.timeout(5):
        batch = await consumer
    assert batch == list(range(50))
    assert len(wakes) == 1
    assert q.qsize() == 50


async def test_put_threadsafe_does_not_wake_when_nobody_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no consumer waiting, thread-side puts only append; a later get_batch finds them."""
    q: BatchQueue[int] = BatchQueue()
    q.bind(asyncio.get_running_loop())
    wakes = count_wakes(q, monkeypatch)

    def put_all() -> None:
        for i in range(20):
            q.put_threadsafe(i)

    await asyncio.to_thread(put_all)
    await asyncio.sleep(0.02)
    assert wakes == []
    async with asyncio.timeout(5):
        assert await q.get_batch(100, 0) == list(range(20))


# -- bounded put / put_many -------------------------------------------------------------------


async def test_put_waits_while_full_and_resumes_when_get_batch_frees_space() -> None:
    """maxsize=2: the third put waits until a get_batch pops an item."""
    q: BatchQueue[int] = BatchQueue(maxsize=2)
    async with asyncio.timeout(5):
        await q.put(1)
        await q.put(2)
    blocked = asyncio.create_task(q.put(3))
    await settle()
    assert not blocked.done()
    assert q.qsize() == 2
    async with asyncio.timeout(5):
        assert await q.get_batch(1, 0) == [1]
        await blocked
    assert q.qsize() == 2
    async with asyncio.timeout(5):
        assert await q.get_batch(5, 0) == [2, 3]


async def test_put_many_may_exceed_maxsize_but_waits_while_at_or_over_it() -> None:
    """put_many appends a whole batch when below maxsize (overshooting by len-1), and waits
    while the queue is at or over maxsize until enough items were popped."""
    q: BatchQueue[int] = BatchQueue(maxsize=2)
    async with asyncio.timeout(5):
        await q.put(0)
        await q.put_many([1, 2, 3])  # 1 < maxsize: the whole batch goes in
    assert q.qsize() == 4

    blocked = asyncio.create_task(q.put_many([4, 5]))
    await settle()
    assert not blocked.done()
    async with asyncio.timeout(5):
        assert await q.get_batch(1, 0) == [0]
    await settle()
    assert not blocked.done()  # 3 queued: still over maxsize
    async with asyncio.timeout(5):
        assert await q.get_batch(2, 0) == [1, 2]
        await blocked  # 1 queued: below maxsize
    assert q.qsize() == 3
    async with asyncio.timeout(5):
        assert await q.get_batch(10, 0) == [3, 4, 5]


async def test_unbounded_put_never_waits() -> None:
    """maxsize=0 means unbounded: put and put_many complete without any consumer."""
    q: BatchQueue[int] = BatchQueue()
    async with asyncio.timeout(5):
        for i in range(100):
            await q.put(i)
        await q.put_many(list(range(100, 200)))
    assert q.qsize() == 200


async def test_put_wakes_waiting_consumer() -> None:
    """An awaited put (not just put_nowait) ends a consumer's wait for its first item."""
    q: BatchQueue[int] = BatchQueue(maxsize=3)
    consumer = asyncio.create_task(q.get_batch(3, 0))
    await wait_until(lambda: q._wanted == 1)
    async with asyncio.timeout(5):
        await q.put_many([1, 2])
        assert await consumer == [1, 2]


# -- several consumers ------------------------------------------------------------------------


async def test_concurrent_consumers_receive_every_item_exactly_once() -> None:
    """Three consumers taking batches of up to 4 together get all 100 items (50 from a thread,
    50 from the loop) exactly once, each producer's items in the order they were put."""
    q: BatchQueue[int] = BatchQueue()
    q.bind(asyncio.get_running_loop())
    received: list[int] = []
    batch_sizes: list[int] = []
    per_consumer: dict[int, int] = {0: 0, 1: 0, 2: 0}

    async def consume(ident: int) -> None:
        while True:
            batch = await q.get_batch(4, 0.05)
            batch_sizes.append(len(batch))
            received.extend(batch)
            per_consumer[ident] += len(batch)
            await asyncio.sleep(0)  # let the other consumers take turns

    consumers = [asyncio.create_task(consume(i)) for i in range(3)]

    def from_thread() -> None:
        for i in range(0, 100, 2):
            q.put_threadsafe(i)

    async def from_loop() -> None:
        for i in range(1, 100, 2):
            if i % 4 == 1:
                await q.put(i)
            else:
                q.put_nowait(i)
            await asyncio.sleep(0)

    async with asyncio.timeout(5):
        await asyncio.gather(asyncio.to_thread(from_thread), from_loop())
        await wait_until(lambda: len(received) >= 100)
    await asyncio.sleep(0.1)  # a duplicate or stray delivery would show up by now
    for task in consumers:
        task.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)

    assert len(received) == 100
    assert sorted(received) == list(range(100))
    assert all(1 <= size <= 4 for size in batch_sizes)
    evens = [i for i in received if i % 2 == 0]
    odds = [i for i in received if i % 2 == 1]
    assert evens == sorted(evens)
    assert odds == sorted(odds)
    assert q.empty()


async def test_consumers_take_turns_collecting() -> None:
    """Two waiting consumers: each put of batch_max items goes to exactly one of them."""
    q: BatchQueue[int] = BatchQueue()
    first = asyncio.create_task(q.get_batch(2, 30))
    second = asyncio.create_task(q.get_batch(2, 30))
    await wait_until(lambda: q._wanted == 1)
    async with asyncio.timeout(5):
        await q.put_many([1, 2])
        done, pending = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        assert done.pop().result() == [1, 2]
        await settle()
        assert len(pending) == 1
        (other,) = pending
        assert not other.done()
        await q.put_many([3, 4])
        assert await other == [3, 4]


# -- task_done / join -------------------------------------------------------------------------


async def test_join_waits_for_task_done_on_every_item() -> None:
    """join() returns only once task_done has covered every item put, popped or not."""
    q: BatchQueue[int] = BatchQueue()
    async with asyncio.timeout(5):
        await q.join()  # nothing put: returns at once
    q.put_nowait(1)
    await q.put_many([2, 3])
    joiner = asyncio.create_task(q.join())
    await settle()
    assert not joiner.done()
    async with asyncio.timeout(5):
        assert await q.get_batch(3, 0) == [1, 2, 3]
    await settle()
    assert not joiner.done()  # popped is not done
    q.task_done(2)
    await settle()
    assert not joiner.done()
    q.task_done()
    async with asyncio.timeout(5):
        await joiner


async def test_join_counts_thread_side_puts() -> None:
    """Items put from a thread count for join() like loop-side ones."""
    q: BatchQueue[int] = BatchQueue()
    q.bind(asyncio.get_running_loop())
    await asyncio.to_thread(q.put_threadsafe, 1)
    joiner = asyncio.create_task(q.join())
    await settle()
    assert not joiner.done()
    async with asyncio.timeout(5):
        assert await q.get_batch(1, 0) == [1]
    q.task_done()
    async with asyncio.timeout(5):
        await joiner


async def test_task_done_more_often_than_items_raises() -> None:
    """task_done beyond the number of items put raises ValueError."""
    q: BatchQueue[int] = BatchQueue()
    with pytest.raises(ValueError, match="more often"):
        q.task_done()
    q2: BatchQueue[int] = BatchQueue()
    q2.put_nowait(1)
    q2.put_nowait(2)
    with pytest.raises(ValueError, match="more often"):
        q2.task_done(3)


# -- cancellation -----------------------------------------------------------------------------


async def test_cancelled_waiting_consumer_leaves_queue_usable() -> None:
    """A consumer cancelled while waiting for its first item releases the collector role and
    resets _wanted; the next consumer gets the items."""
    q: BatchQueue[int] = BatchQueue()
    first = asyncio.create_task(q.get_batch(5, 0))
    await wait_until(lambda: q._wanted == 1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert q._wanted == 0
    assert not q._collector.locked()
    q.put_nowait(1)
    q.put_nowait(2)
    async with asyncio.timeout(5):
        assert await q.get_batch(5, 0) == [1, 2]


async def test_cancelled_lingering_consumer_keeps_items_and_hands_over() -> None:
    """A consumer cancelled mid-linger pops nothing; a consumer queued behind it for the
    collector role then takes over and gets those items plus later ones."""
    q: BatchQueue[int] = BatchQueue()
    q.bind(asyncio.get_running_loop())
    q.put_nowait(1)
    first = asyncio.create_task(q.get_batch(3, 30))
    await wait_until(lambda: q._wanted == 3)
    second = asyncio.create_task(q.get_batch(3, 30))
    await settle()
    assert not second.done()  # waiting for the collector role
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert q.qsize() == 1
    await wait_until(lambda: q._wanted == 3)  # second is now the lingering collector
    await asyncio.to_thread(q.put_threadsafe, 2)
    q.put_nowait(3)
    async with asyncio.timeout(5):
        assert await second == [1, 2, 3]
    assert q._wanted == 0
    assert not q._collector.locked()


async def test_task_done_overcount_does_not_corrupt_the_count() -> None:
    """A refused task_done leaves the count as it was: the queue still joins normally."""
    q: BatchQueue[int] = BatchQueue()
    with pytest.raises(ValueError):
        q.task_done()
    q.put_nowait(1)
    assert await q.get_batch(1, 0) == [1]
    q.task_done()
    async with asyncio.timeout(1):
        await q.join()
