"""Unfinished tus uploads are bounded and expire while the gateway runs (issue 14, finding 15).

Before: 300 half-finished uploads were accepted in 2.5 s, and expired ones were removed only at
the next start. Played against the real aiohttp server on loopback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from kp_gateway.app import RunningGateway

TUS = {"Tus-Resumable": "1.0.0"}


def _base(gw: RunningGateway) -> str:
    return f"http://127.0.0.1:{gw.http_port}"


async def _create(http: aiohttp.ClientSession, length: int) -> aiohttp.ClientResponse:
    async with http.post(
        "/api/uploads/tus", headers={**TUS, "Upload-Length": str(length)}
    ) as response:
        await response.read()
        return response


async def test_unfinished_tus_uploads_are_bounded_in_number_and_bytes(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    """An attacker opening upload after upload gets 429 at the limit; finishing or deleting
    one makes room; the declared bytes are capped too."""
    gw = await make_gateway(
        make_config(upload__tus_max_unfinished=5, upload__tus_max_unfinished_bytes=10_000)
    )
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        statuses = [(await _create(http, 100)).status for _ in range(40)]
        assert statuses == [201] * 5 + [429] * 35
        async with http.post("/api/uploads/tus", headers={**TUS, "Upload-Length": "100"}) as r:
            body = await r.json()
            assert r.status == 429 and body["error"] == "too_many_unfinished_uploads"
            assert r.headers["Tus-Resumable"] == "1.0.0"
        async with http.get("/api/uploads", params={"state": "receiving"}) as r:
            first = (await r.json())["items"][0]["id"]
        async with http.delete(f"/api/uploads/tus/{first}", headers=TUS) as r:
            assert r.status == 204
        assert (await _create(http, 100)).status == 201
    # Nothing of the refused ones was kept: five records, five partial bodies.
    state_dir = gw.cfg.data_dir / "uploads-state"
    assert len(list(state_dir.glob("*.json"))) == 5
    assert len(list(state_dir.glob("*.part"))) == 5


async def test_declared_bytes_of_unfinished_uploads_are_capped(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    """The sum of the declared lengths is what the disk must hold: capped too."""
    gw = await make_gateway(make_config(upload__tus_max_unfinished_bytes=1000))
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        assert (await _create(http, 600)).status == 201
        assert (await _create(http, 500)).status == 429
        assert (await _create(http, 400)).status == 201


async def test_idle_tus_upload_expires_while_running(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    """With ``upload.tus_expiry_s = 1``, a half-sent upload is failed and its bytes removed
    without a restart; resuming it then gets 410 Gone, and its quota slot is free again."""
    gw = await make_gateway(make_config(upload__tus_expiry_s=1, upload__tus_max_unfinished=1))
    state_dir = gw.cfg.data_dir / "uploads-state"
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        created = await _create(http, 1000)
        assert created.status == 201
        location = created.headers["Location"]
        patch = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        async with http.patch(location, data=b"x" * 400, headers=patch) as r:
            assert r.status == 204 and r.headers["Upload-Offset"] == "400"
        upload_id = location.rsplit("/", 1)[1]
        assert (state_dir / f"{upload_id}.part").stat().st_size == 400
        async with asyncio.timeout(30):
            while True:
                async with http.get(f"/api/uploads/{upload_id}") as r:
                    status = await r.json()
                if status["state"] == "failed":
                    break
                await asyncio.sleep(0.1)
        assert "expired" in status["detail"]
        assert not (state_dir / f"{upload_id}.part").exists()
        async with http.head(location, headers=TUS) as r:
            assert r.status == 410
        resume = {**patch, "Upload-Offset": "400"}
        async with http.patch(location, data=b"x" * 600, headers=resume) as r:
            assert r.status == 410
        assert (await _create(http, 1000)).status == 201
