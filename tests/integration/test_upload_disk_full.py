"""Uploads on a full disk (issue 14, finding 9): 507 with the JSON error and nothing left behind,
and ``dicom.min_free_bytes`` kept free while the bytes arrive, for POST and tus alike.

Before: a full disk answered 500 with a traceback and the reserve was not checked for uploads.
The disk here is the real one: the reserve is set relative to its free space at test time, and
``/dev/full`` stands for a disk that fills up under the writer.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kp_gateway.app import RunningGateway
from kp_gateway.errors import InsufficientStorageError
from kp_gateway.upload.service import BodyWriter
from tests.integration.test_upload import leftovers

TUS = {"Tus-Resumable": "1.0.0"}
MiB = 1 << 20


def _base(gw: RunningGateway) -> str:
    return f"http://127.0.0.1:{gw.http_port}"


async def test_writer_on_a_full_disk_raises_insufficient_storage(tmp_path: Path) -> None:
    """ENOSPC from the filesystem (``/dev/full``) becomes InsufficientStorageError."""
    received: list[int] = []
    writer = BodyWriter(Path("/dev/full"), offset=0, cap=1 << 30, on_bytes=received.append)
    await writer.open()
    chunks = iter([b"x" * MiB, b"x" * MiB, b""])

    async def read(n: int) -> bytes:
        return next(chunks)

    with pytest.raises(InsufficientStorageError, match="disk is full"):
        await writer.pump(read)
    await writer.close(sync=False)
    assert received == []


async def test_upload_below_the_reserve_is_refused_with_507_and_nothing_kept(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """A reserve larger than the whole disk: POST and tus creation answer 507 at once."""
    total = shutil.disk_usage(tmp_path).total
    gw = await make_gateway(make_config(dicom__min_free_bytes=total + 1))
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        async with http.post("/api/uploads", data=b"x" * 1000) as r:
            assert r.status == 507
            body = await r.json()
        assert body["error"] == "insufficient_storage" and "reserve" in body["detail"]
        async with http.post("/api/uploads/tus", headers={**TUS, "Upload-Length": "1000"}) as r:
            assert r.status == 507
            assert r.headers["Tus-Resumable"] == "1.0.0"
        async with http.get("/health/ready") as r:
            assert r.status == 503
            assert "min_free_bytes" in (await r.json())["components"]["storage"]["detail"]
    assert leftovers(gw.cfg.data_dir) == []


def _streamed(total_mib: int, sent: list[int]) -> Any:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(total_mib):
            sent.append(MiB)
            yield b"x" * MiB

    return body()


async def _post_streamed(http: aiohttp.ClientSession, total_mib: int) -> int:
    """POST a chunked body; the status, or 0 when the gateway closed while it was sent."""
    sent: list[int] = []
    try:
        async with http.post("/api/uploads", data=_streamed(total_mib, sent)) as r:
            if r.status == 507:
                assert (await r.json())["error"] == "insufficient_storage"
            return r.status
    except aiohttp.ClientError:
        assert sum(sent) < total_mib * MiB
        return 0


async def test_streamed_upload_crossing_the_reserve_is_refused_while_it_arrives(
    make_config: Callable[..., Any], make_gateway: Any, small_disk: Path
) -> None:
    """16 MiB reserve on a 32 MiB disk: a chunked 64 MiB POST is refused while it streams, a
    tus upload declaring more than the room left is refused at creation, nothing is kept, and
    a small upload still goes through."""
    gw = await make_gateway(
        make_config(storage__path=str(small_disk / "data"), dicom__min_free_bytes=16 * MiB)
    )
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        assert await _post_streamed(http, 64) in (507, 0)
        async with http.post(
            "/api/uploads/tus", headers={**TUS, "Upload-Length": str(24 * MiB)}
        ) as r:
            assert r.status == 507
        async with http.get("/api/uploads") as r:
            assert (await r.json())["items"] == []
        async with http.get("/metrics") as r:
            assert 'kp_gateway_uploads_total{state="rejected"} 1.0' in await r.text()
        assert leftovers(gw.cfg.data_dir) == []
        async with http.post("/api/uploads", data=b"small" * 100) as r:
            assert r.status == 202


async def test_upload_filling_the_disk_is_refused_with_507_and_nothing_kept(
    make_config: Callable[..., Any], make_gateway: Any, small_disk: Path
) -> None:
    """No reserve: the 32 MiB disk really fills (ENOSPC) under a 64 MiB POST. The answer is
    507 with the JSON error, not a 500 with a traceback, and the partial body is removed."""
    gw = await make_gateway(make_config(storage__path=str(small_disk / "data")))
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        assert await _post_streamed(http, 64) in (507, 0)
        async with http.get("/api/uploads") as r:
            assert (await r.json())["items"] == []
    assert leftovers(gw.cfg.data_dir) == []
    assert shutil.disk_usage(small_disk).free > 24 * MiB
