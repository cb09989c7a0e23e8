"""The HTTP API on loopback: auth, projects, datasets, series, instances, health, metrics."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import pytest

from kp_gateway.app import RunningGateway
from tests.conftest import make_ct_series
from tests.integration.test_scp import _store_all, _wait_indexed


def _base(gw: RunningGateway) -> str:
    return f"http://127.0.0.1:{gw.http_port}"


async def test_auth_token_bearer_cookie_and_query(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    """401 without a token; bearer works; ?token= trades for a cookie; health stays public."""
    gw = await make_gateway(make_config(http__auth=True))
    token_file = gw.cfg.data_dir / "token"
    assert token_file.read_text().strip() == gw.token
    assert token_file.stat().st_mode & 0o777 == 0o600
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{_base(gw)}/api/projects") as r:
            assert r.status == 401
            assert (await r.json())["error"] == "unauthorized"
        async with http.get(f"{_base(gw)}/health/live") as r:
            assert r.status == 200
        async with http.get(f"{_base(gw)}/metrics") as r:
            assert r.status == 200
        headers = {"Authorization": f"Bearer {gw.token}"}
        async with http.get(f"{_base(gw)}/api/projects", headers=headers) as r:
            assert r.status == 200
        async with http.get(
            f"{_base(gw)}/api/projects", headers={"Authorization": "Bearer x"}
        ) as r:
            assert r.status == 401
    # A script's ?token= on an API route gets the data itself: no redirect, no cookie (curl
    # does not follow redirects, so a 302 here is what a script would see).
    curl = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-s", "-w", "\n%{http_code}", f"{_base(gw)}/api/projects?token={gw.token}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    body, status = curl.stdout.rsplit("\n", 1)
    assert status == "200", curl.stdout
    assert [p["name"] for p in json.loads(body)["items"]] == ["admin"]
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(f"{_base(gw)}/api/projects?token={gw.token}") as r:
            assert r.status == 200 and not r.history
        async with http.get(f"{_base(gw)}/api/projects") as r:
            assert r.status == 401  # no cookie was set by the API
        async with http.get(f"{_base(gw)}/gallery?token={gw.token}") as r:
            # A page trades the token for the session cookie and drops it from the URL.
            assert r.status == 200 and r.history and r.history[0].status == 302
            assert str(r.url).endswith("/gallery")
        async with http.get(f"{_base(gw)}/api/projects") as r:
            assert r.status == 200  # the cookie now authenticates


async def test_projects_create_validate_delete(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    """Project names follow the AE-title rule; admin is protected; duplicates conflict."""
    gw = await make_gateway(make_config())
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        async with http.post("/api/projects", json={"name": "lung-ct"}) as r:
            assert r.status == 201
        async with http.post("/api/projects", json={"name": "lung-ct"}) as r:
            assert r.status == 409
        for bad in ({"name": "Has_Upper"}, {"name": "a" * 14}, {"name": "a\n"}, {"name": 5}, ["x"]):
            async with http.post("/api/projects", json=bad) as r:
                assert r.status == 400, bad
                assert set(await r.json()) == {"error", "detail"}
        json_type = {"Content-Type": "application/json"}
        async with http.post("/api/projects", data=b"{not json", headers=json_type) as r:
            assert r.status == 400
        # A body a browser form could send cross-site without a preflight is refused.
        async with http.post("/api/projects", data=b'{"name": "x"}') as r:
            assert r.status == 415
            assert (await r.json())["error"] == "unsupported_media"
        async with http.get("/api/projects") as r:
            names = [p["name"] for p in (await r.json())["items"]]
            assert names == ["admin", "lung-ct"]
        async with http.delete("/api/projects/admin") as r:
            assert r.status == 409
        async with http.delete("/api/projects/lung-ct") as r:
            assert r.status == 200
        async with http.get("/api/projects/lung-ct/series") as r:
            assert r.status == 404
            assert (await r.json())["error"] == "unknown_project"


async def test_series_listing_filters_detail_and_download(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """Series are listed with filters and paging; instances download byte for byte."""
    gw = await make_gateway(make_config())
    first = make_ct_series(tmp_path / "a", 3, patient_id="PA")
    second = make_ct_series(tmp_path / "b", 2, patient_id="PB")
    await asyncio.to_thread(_store_all, gw, first, calling="kp-alpha")
    await asyncio.to_thread(_store_all, gw, second, calling="kp-beta")
    await _wait_indexed(gw, 5)
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        async with http.get("/api/projects/admin/series") as r:
            body = await r.json()
            assert body["total"] == 2
        async with http.get("/api/projects/admin/series?dataset=beta") as r:
            items = (await r.json())["items"]
            assert [i["patient_id"] for i in items] == ["PB"]
            assert items[0]["instance_count"] == 2
        async with http.get("/api/projects/admin/series?patient_id=PA&modality=CT") as r:
            assert (await r.json())["total"] == 1
        async with http.get("/api/projects/admin/series?q=Synthetic&limit=1&offset=1") as r:
            page = await r.json()
            assert (page["total"], len(page["items"])) == (2, 1)
        async with http.get("/api/projects/admin/series?limit=0") as r:
            assert r.status == 400
        async with http.get("/api/projects/admin/datasets") as r:
            datasets = {d["name"]: d for d in (await r.json())["items"]}
            assert datasets["alpha"]["instance_count"] == 3
        series_uid = str(pydicom.dcmread(first[0]).SeriesInstanceUID)
        async with http.get(f"/api/series/{series_uid}") as r:
            detail = await r.json()
            assert detail["instance_count"] == 3
            assert detail["document"]["00100020 PatientID_keyword"] == "PA"
        async with http.get(f"/api/series/{series_uid}/instances") as r:
            instances = (await r.json())["items"]
        for instance, path in zip(instances, first, strict=True):
            async with http.get(instance["url"]) as r:
                assert r.headers["Content-Type"] == "application/dicom"
                body_bytes = await r.read()
            assert pydicom.dcmread(path).SOPInstanceUID == instance["sop_uid"]
            assert body_bytes[-200:] == path.read_bytes()[-200:]
        async with http.get("/api/series/1.2.3/thumbnail") as r:
            assert r.status == 404
        async with http.get("/api/instances/9.9.9") as r:
            assert r.status == 404


async def test_health_ready_and_metrics_text(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """Readiness lists components; metrics carry the documented names."""
    gw = await make_gateway(make_config())
    await asyncio.to_thread(_store_all, gw, make_ct_series(tmp_path / "a", 2))
    await _wait_indexed(gw, 2)
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        async with http.get("/health/ready") as r:
            body = await r.json()
            assert r.status == 200
            assert {"index", "storage", "pipeline", "series_stages"} <= set(body["components"])
        gw.health.draining = True
        async with http.get("/health/ready") as r:
            assert r.status == 503
        gw.health.draining = False
        async with http.get("/metrics") as r:
            text = await r.text()
    for name in (
        'kp_gateway_scp_cstore_total{status="0x0000"} 2.0',
        "kp_gateway_scp_received_bytes_total",
        'kp_gateway_pipeline_queue_depth{stage="store"}',
        'kp_gateway_stage_seconds_bucket{le="0.001",stage="index"}',
        "kp_gateway_scp_active_associations",
        'kp_gateway_pipeline_items_total{outcome="ok",stage="store"} 2.0',
        'kp_gateway_backend_seconds_count{backend="fs",operation="put"}',
        'kp_gateway_backend_seconds_count{backend="sqlite",operation="write"}',
    ):
        assert name in text, name


@pytest.mark.parametrize("path", ["/api/series/x", "/nope"])
async def test_unknown_routes_answer_json_errors(
    path: str, make_config: Callable[..., Any], make_gateway: Any
) -> None:
    """404s are JSON with error and detail."""
    gw = await make_gateway(make_config())
    async with aiohttp.ClientSession(base_url=_base(gw)) as http, http.get(path) as r:
        assert r.status == 404
        assert set(await r.json()) == {"error", "detail"}
