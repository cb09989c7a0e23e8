"""The per-task time limit of the series stages: a real spawned pool, a call that overruns.

The overrunning call is ``time.sleep`` in the worker process: the pool cannot cancel it, so the
limit must kill the process, replace the pool and let the next call run in a new worker.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import pytest

from kp_gateway.backends.fs import FsStorage
from kp_gateway.backends.sqlite import SqliteIndex
from kp_gateway.config import SeriesConfig, load
from kp_gateway.errors import ConfigError, RejectedInputError
from kp_gateway.metrics import Metrics
from kp_gateway.pipeline.series_stages import SeriesPostProcessor, make_process_pool


def _processor(tmp_path: Path, executor: Executor | None = None, **cfg: Any) -> SeriesPostProcessor:
    """A processor over real (unopened) backends: only its pool is exercised here."""
    return SeriesPostProcessor(
        SeriesConfig(**cfg),
        storage=FsStorage(tmp_path / "data"),
        index=SqliteIndex(tmp_path / "index.sqlite3"),
        scratch_dir=tmp_path / "scratch",
        metrics=Metrics(),
        executor=executor,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child not yet reaped by the pool shows as a zombie; that is dead too.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


async def _wait_dead(pid: int, deadline_s: float = 20.0) -> None:
    async with asyncio.timeout(deadline_s):
        while _alive(pid):
            await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_in_pool_overrun_kills_worker_and_next_call_runs_in_a_new_one(tmp_path: Path) -> None:
    """An overrun raises RejectedInputError naming the setting; the worker dies; work goes on."""
    processor = _processor(tmp_path, task_time_limit_s=2.0)
    processor._executor = make_process_pool()
    processor._owns_executor = True
    try:
        first_pid: int = await processor._in_pool(os.getpid)  # spawned and warm
        with pytest.raises(RejectedInputError, match=r"longer than 2 s \(series.task_time_limit_s"):
            await processor._in_pool(time.sleep, 600)
        await _wait_dead(first_pid)
        second_pid: int = await processor._in_pool(os.getpid)
        assert second_pid != first_pid
    finally:
        await processor.aclose()


@pytest.mark.timeout(60)
async def test_in_pool_overrun_replaces_a_pool_it_does_not_own(tmp_path: Path) -> None:
    """The app's series pool is replaced too (before, a broken app pool failed every call)."""
    app_pool = make_process_pool()
    processor = _processor(tmp_path, app_pool, task_time_limit_s=2.0)
    try:
        with pytest.raises(RejectedInputError):
            await processor._in_pool(time.sleep, 600)
        assert await processor._in_pool(os.getpid) > 0
        assert processor._executor is not app_pool
    finally:
        await processor.aclose()
        app_pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(60)
async def test_aclose_kills_a_running_task_instead_of_waiting_for_it(tmp_path: Path) -> None:
    """Stopping while a long render runs ends that worker; aclose does not wait 600 s."""
    processor = _processor(tmp_path, task_time_limit_s=1000.0)
    processor._executor = make_process_pool()
    processor._owns_executor = True
    pid: int = await processor._in_pool(os.getpid)
    long_call = asyncio.create_task(processor._in_pool(time.sleep, 600))
    processor._tasks.add(long_call)
    await asyncio.sleep(0)  # let the call reach the pool
    await processor.aclose()
    assert long_call.cancelled()
    await _wait_dead(pid)


def test_time_limit_must_be_positive() -> None:
    """A zero limit is a configuration mistake, not "no limit"."""
    with pytest.raises(ConfigError, match="task_time_limit_s"):
        load(None, environ={}, overrides={"series.task_time_limit_s": 0})
