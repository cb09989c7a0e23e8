"""Series completion: sources closed, all items settled, idle time passed; late arrivals."""

from __future__ import annotations

from kp_gateway.pipeline.completion import SeriesTracker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_series_completes_only_after_source_closed_and_idle() -> None:
    """Open association or pending items keep a series incomplete; then idle time decides."""
    clock = Clock()
    completed: list[str] = []

    async def on_complete(uid: str) -> None:
        completed.append(uid)

    tracker = SeriesTracker(idle_s=5, on_complete=on_complete, clock=clock)
    tracker.source_item_admitted("a1")
    tracker.source_item_admitted("a1")
    tracker.source_item_settled("a1", "S")
    clock.now += 10
    assert await tracker.check_once() == 0  # association still open, one item pending
    tracker.source_closed("a1")
    assert await tracker.check_once() == 0  # one item still in the pipeline
    tracker.source_item_settled("a1", "S")
    clock.now += 4
    assert await tracker.check_once() == 0  # not idle long enough
    clock.now += 1
    assert await tracker.check_once() == 1
    assert completed == ["S"]
    assert tracker.pending_count() == 0


async def test_late_instance_reopens_and_completes_again() -> None:
    """An instance arriving after completion triggers a second completion of the same series."""
    clock = Clock()
    completed: list[str] = []

    async def on_complete(uid: str) -> None:
        completed.append(uid)

    tracker = SeriesTracker(idle_s=1, on_complete=on_complete, clock=clock)
    for source in ("a1", "a2"):
        tracker.source_item_admitted(source)
        tracker.source_item_settled(source, "S")
        tracker.source_closed(source)
        clock.now += 2
        await tracker.check_once()
    assert completed == ["S", "S"]


async def test_series_split_across_two_associations_waits_for_both() -> None:
    """A series fed by two associations completes only when both have closed."""
    clock = Clock()
    completed: list[str] = []

    async def on_complete(uid: str) -> None:
        completed.append(uid)

    tracker = SeriesTracker(idle_s=1, on_complete=on_complete, clock=clock)
    for source in ("a1", "a2"):
        tracker.source_item_admitted(source)
        tracker.source_item_settled(source, "S")
    tracker.source_closed("a1")
    clock.now += 5
    assert await tracker.check_once() == 0
    tracker.source_closed("a2")
    assert await tracker.check_once() == 1


async def test_failed_completion_is_retried() -> None:
    """If the completion hook fails, the series stays tracked and is tried again."""
    clock = Clock()
    calls = 0

    async def on_complete(uid: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("index down")

    tracker = SeriesTracker(idle_s=1, on_complete=on_complete, clock=clock)
    tracker.track_existing("S")
    clock.now += 2
    assert await tracker.check_once() == 0
    clock.now += 2
    assert await tracker.check_once() == 1
