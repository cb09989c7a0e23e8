"""When the index cannot write, senders are slowed and then refused, readiness says why, and
nothing acknowledged is lost (issue 14, finding 10).

Before: retried index batches left their queue, so the store stage kept admitting: senders
got 0x0000 while in-flight work grew to 20x ``pipeline.queue_size``, ``/health/ready`` stayed
200, and the SQLite error was replaced by "cannot rollback". Here a second SQLite connection
holds the real index file locked, as a backup tool or a stuck process would.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from kp_gateway.errors import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS
from tests.conftest import instance_uids, make_ct_series
from tests.integration.test_scp import _store_all


async def _ready(port: int) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/health/ready") as r,
    ):
        return r.status, await r.json()


async def test_index_that_cannot_write_slows_and_refuses_senders_and_loses_nothing(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    gw = await make_gateway(
        make_config(
            pipeline__queue_size=2,
            pipeline__store_batch_max=1,
            pipeline__retry_backoff_s=0.1,
            pipeline__retry_backoff_max_s=0.5,
            index__batch_max_items=2,
            dicom__admission_wait_s=0.5,
            series__enabled=False,
        )
    )
    paths = make_ct_series(tmp_path / "s", 16)
    locker = sqlite3.connect(gw.cfg.data_dir / "index.sqlite3", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        statuses = await asyncio.to_thread(_store_all, gw, paths)
        acknowledged = [p for p, s in zip(paths, statuses, strict=True) if s == STATUS_SUCCESS]
        assert set(statuses) <= {STATUS_SUCCESS, STATUS_OUT_OF_RESOURCES}, statuses
        # Store's 2 slots, the index queue's 2 places (queued or held for a retry), and the
        # index worker's batch of 2 in hand; the rest waited and got 0xA700.
        assert 1 <= len(acknowledged) <= 6, statuses
        async with asyncio.timeout(30):
            while (ready := await _ready(gw.http_port))[0] == 200:
                await asyncio.sleep(0.1)
        status, body = ready
        assert status == 503
        pipeline = body["components"]["pipeline"]
        assert not pipeline["ok"] and "database is locked" in pipeline["detail"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    wanted = {instance_uids(p) for p in acknowledged}
    async with asyncio.timeout(60):
        while True:
            keys = [await gw.index.instance_key(*uids) for uids in wanted]
            if all(keys):
                break
            await asyncio.sleep(0.1)
        while (await _ready(gw.http_port))[0] != 200:
            await asyncio.sleep(0.1)
    assert await gw.index.list_quarantine() == []
