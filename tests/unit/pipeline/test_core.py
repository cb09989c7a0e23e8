"""The generic pipeline: bounded queues, backpressure, retries, quarantine, batching, drain."""

from __future__ import annotations

import asyncio

import pytest

from kp_gateway.errors import (
    BackendRejectedError,
    BackendUnavailableError,
    InvalidDicomError,
    PipelineFull,
    ShuttingDownError,
)
from kp_gateway.pipeline.core import Pipeline, RetryPolicy, Stage

FAST_RETRY = RetryPolicy(max_attempts=3, backoff_s=0.001, backoff_max_s=0.01)


class Recorder:
    """Collects finished and quarantined items."""

    def __init__(self) -> None:
        self.finished: list[int] = []
        self.quarantined: list[tuple[str, int, str]] = []

    async def on_finished(self, item: int) -> None:
        self.finished.append(item)

    async def on_quarantine(self, stage: str, item: int, exc: BaseException) -> None:
        self.quarantined.append((stage, item, type(exc).__name__))


def make_pipeline(stages: list[Stage[int]], rec: Recorder) -> Pipeline[int]:
    pipeline = Pipeline(
        stages, retry=FAST_RETRY, on_finished=rec.on_finished, on_quarantine=rec.on_quarantine
    )
    pipeline.start()
    return pipeline


async def test_pipeline_full_when_stage_blocked_past_timeout() -> None:
    """The first stage holds queue_size items (waiting or worked on); then submit times out."""
    release = asyncio.Event()
    entered = asyncio.Event()

    async def blocked(batch: list[int]) -> None:
        entered.set()
        await release.wait()

    rec = Recorder()
    pipeline = make_pipeline([Stage("slow", blocked, workers=1, queue_size=2)], rec)
    await pipeline.submit(1, timeout_s=1)  # taken by the worker
    await entered.wait()
    await pipeline.submit(2, timeout_s=1)  # waits in the queue
    with pytest.raises(PipelineFull):
        await pipeline.submit(3, timeout_s=0.05)
    assert pipeline.in_flight == 2
    release.set()
    assert await pipeline.drain(5)
    assert sorted(rec.finished) == [1, 2]


async def test_backpressure_propagates_from_last_stage_to_submit() -> None:
    """A slow second stage fills the first stage's queue, and only then is submit refused."""
    release = asyncio.Event()
    passed_first: list[int] = []

    async def first(batch: list[int]) -> None:
        passed_first.extend(batch)

    async def second(batch: list[int]) -> None:
        await release.wait()

    rec = Recorder()
    pipeline = make_pipeline(
        [Stage("a", first, queue_size=1), Stage("b", second, queue_size=1)], rec
    )
    admitted = 0
    with pytest.raises(PipelineFull):
        for item in range(100):
            await pipeline.submit(item, timeout_s=0.05)
            admitted += 1
    # Bounded: worker b holds 1, queue b 1, stage a 1 (its slot is held until b takes it).
    assert admitted <= 3
    release.set()
    assert await pipeline.drain(5)
    assert sorted(rec.finished) == list(range(admitted))


async def test_transient_failure_retried_then_succeeds() -> None:
    """BackendUnavailableError is retried with backoff until the stage succeeds."""
    attempts: dict[int, int] = {}

    async def flaky(batch: list[int]) -> None:
        for item in batch:
            attempts[item] = attempts.get(item, 0) + 1
            if attempts[item] < 3:
                raise BackendUnavailableError("disk busy")

    rec = Recorder()
    pipeline = make_pipeline([Stage("flaky", flaky)], rec)
    await pipeline.submit(7, timeout_s=1)
    assert await pipeline.drain(5)
    assert rec.finished == [7]
    assert attempts[7] == 3
    assert rec.quarantined == []


@pytest.mark.parametrize(
    ("exc", "expected_attempts"),
    [
        (InvalidDicomError("bad"), 1),
        (BackendRejectedError("no"), 1),
        (OSError("io"), 3),
        (RuntimeError("bug"), 3),
    ],
)
async def test_failing_item_quarantined_after_policy(
    exc: Exception, expected_attempts: int
) -> None:
    """Rejected input fails at once; transient errors and bugs after max_attempts."""
    calls = 0

    async def failing(batch: list[int]) -> None:
        nonlocal calls
        calls += 1
        raise exc

    rec = Recorder()
    pipeline = make_pipeline([Stage("bad", failing)], rec)
    await pipeline.submit(1, timeout_s=1)
    assert await pipeline.drain(5)
    assert calls == expected_attempts
    assert rec.quarantined == [("bad", 1, type(exc).__name__)]
    assert pipeline.in_flight == 0


async def test_failed_batch_is_split_so_good_items_pass() -> None:
    """One bad item in a batch does not take the others down with it."""
    gate = asyncio.Event()
    batches: list[list[int]] = []

    async def gatekeeper(batch: list[int]) -> None:
        await gate.wait()

    async def batched(batch: list[int]) -> None:
        batches.append(list(batch))
        if 3 in batch:
            raise InvalidDicomError("item 3 is bad")

    rec = Recorder()
    pipeline = make_pipeline(
        [Stage("gate", gatekeeper, queue_size=10), Stage("idx", batched, batch_max=10)], rec
    )
    for item in range(6):
        await pipeline.submit(item, timeout_s=1)
    gate.set()
    assert await pipeline.drain(5)
    assert sorted(rec.finished) == [0, 1, 2, 4, 5]
    assert rec.quarantined == [("idx", 3, "InvalidDicomError")]
    assert any(len(b) > 1 for b in batches)


async def test_submit_after_drain_raises_shutting_down() -> None:
    """A drained pipeline refuses new work with ShuttingDownError."""

    async def ok(batch: list[int]) -> None:
        return None

    pipeline = make_pipeline([Stage("ok", ok)], Recorder())
    assert await pipeline.drain(1)
    with pytest.raises(ShuttingDownError):
        await pipeline.submit(1, timeout_s=1)


async def test_drain_times_out_and_reports_unfinished() -> None:
    """Drain gives up after its timeout and says so; workers are stopped."""
    never = asyncio.Event()

    async def stuck(batch: list[int]) -> None:
        await never.wait()

    pipeline = make_pipeline([Stage("stuck", stuck)], Recorder())
    await pipeline.submit(1, timeout_s=1)
    assert await pipeline.drain(0.1) is False


async def test_submit_threadsafe_admits_without_the_loop_and_bounds() -> None:
    """Another thread is admitted while slots last, then gets PipelineFull; slots come back."""
    release = asyncio.Event()

    async def blocked(batch: list[int]) -> None:
        await release.wait()

    rec = Recorder()
    pipeline = make_pipeline([Stage("slow", blocked, workers=1, queue_size=3)], rec)
    seen: list[int] = []

    def producer() -> list[str]:
        outcomes = []
        for item in range(5):
            try:
                pipeline.submit_threadsafe(item, timeout_s=0.05, then=seen.append)
                outcomes.append("ok")
            except PipelineFull:
                outcomes.append("full")
        return outcomes

    assert await asyncio.to_thread(producer) == ["ok", "ok", "ok", "full", "full"]
    release.set()
    assert await pipeline.drain(5)
    assert sorted(rec.finished) == [0, 1, 2]
    assert seen == [0, 1, 2]


async def test_backend_outage_is_retried_past_max_attempts() -> None:
    """An unavailable backend never sends an acknowledged item to quarantine."""
    attempts = 0

    async def outage(batch: list[int]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 10:  # more than max_attempts (3)
            raise BackendUnavailableError("S3 unreachable")

    rec = Recorder()
    pipeline = make_pipeline([Stage("store", outage)], rec)
    await pipeline.submit(1, timeout_s=1)
    assert await pipeline.drain(5)
    assert (attempts, rec.finished, rec.quarantined) == (10, [1], [])


async def test_retries_hold_their_queue_place_so_an_outage_reaches_admission() -> None:
    """Issue 14 finding 10: with the last stage's backend down, items waiting for a retry keep
    their place in its queue; the first stage then stalls and admission refuses, instead of
    in-flight work growing to many times the queue sizes."""
    store_done = 0
    outage = True

    async def store(batch: list[int]) -> None:
        nonlocal store_done
        store_done += len(batch)

    async def index(batch: list[int]) -> None:
        if outage:
            raise BackendUnavailableError("the index cannot write")

    rec = Recorder()
    slow_retry = RetryPolicy(max_attempts=3, backoff_s=0.05, backoff_max_s=0.05)
    pipeline = Pipeline(
        [
            Stage("store", store, workers=2, queue_size=4),
            Stage("index", index, workers=1, queue_size=4, batch_max=2),
        ],
        retry=slow_retry,
        on_finished=rec.on_finished,
        on_quarantine=rec.on_quarantine,
    )
    pipeline.start()
    admitted = 0
    with pytest.raises(PipelineFull):
        for item in range(200):
            await pipeline.submit(item, timeout_s=0.5)
            admitted += 1
    # Store's 4 slots + index's 4 places (queued or held for a retry) + one batch in hand
    # per store worker waiting to be queued.
    bound = 4 + 4 + 2
    assert admitted <= bound and pipeline.in_flight <= bound, (admitted, pipeline.in_flight)
    assert store_done <= bound
    outage = False
    assert await pipeline.drain(10)
    assert sorted(rec.finished) == list(range(admitted)) and rec.quarantined == []
