"""Hostile HTTP requests on loopback (issue 14, findings 11, 12, 13 and 16): cross-origin writes
with the session cookie, the open redirect after login, tokens in logs, and the smaller ones
(non-ASCII tokens, odd UIDs, tus lengths, security headers, private files, DNS rebinding,
server paths in the quarantine list). Each plays the attacker against the real aiohttp server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from kp_gateway.app import RunningGateway
from kp_gateway.config import load
from kp_gateway.kaapana.keys import KEY_THUMBNAIL
from kp_gateway.model import IngestItem, Routing
from tests.conftest import gateway_overrides, make_ct_series
from tests.integration.test_scp import _store_all, _wait_indexed

SESSION_COOKIE = "kp_gateway_session"


def _base(gw: RunningGateway) -> str:
    return f"http://127.0.0.1:{gw.http_port}"


async def _cookie_session(gw: RunningGateway) -> aiohttp.ClientSession:
    """A browser-like session holding the session cookie (traded from ?token= on a page)."""
    http = aiohttp.ClientSession(base_url=_base(gw), cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with http.get(f"/gallery?token={gw.token}") as r:
        assert r.status == 200
    assert any(c.key == SESSION_COOKIE for c in http.cookie_jar)
    return http


async def test_cookie_writes_from_another_origin_are_refused(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    """Finding 11: a page on another port or a sibling subdomain cannot create projects or plant
    uploads with the user's cookie; the same origin and bearer-token scripts still can."""
    gw = await make_gateway(make_config(http__auth=True))
    origin = _base(gw)
    http = await _cookie_session(gw)
    async with http:
        for headers in (
            {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"},
            {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"},
            {"Origin": "http://lab.example:8080"},  # an older browser: Origin only
        ):
            async with http.post("/api/projects", json={"name": "planted"}, headers=headers) as r:
                assert r.status == 403, headers
                assert (await r.json())["error"] == "cross_origin"
            upload = "/api/uploads?project=admin"
            async with http.post(upload, data=b"x" * 200, headers=headers) as r:
                assert r.status == 403, headers
        # text/plain is what a cross-site form can send without a preflight: refused anyway.
        same = {"Sec-Fetch-Site": "same-origin", "Origin": origin}
        plain = {**same, "Content-Type": "text/plain"}
        async with http.post("/api/projects", data=b'{"name": "planted"}', headers=plain) as r:
            assert r.status == 415
        async with http.post("/api/projects", json={"name": "mine"}, headers=same) as r:
            assert r.status == 201
    # A script with the bearer token is no browser: its Origin does not matter.
    bearer = {"Authorization": f"Bearer {gw.token}", "Origin": "http://elsewhere.example"}
    async with aiohttp.ClientSession(base_url=origin) as script:
        async with script.post("/api/projects", json={"name": "scripted"}, headers=bearer) as r:
            assert r.status == 201
        async with script.get("/api/projects", headers=bearer) as r:
            names = {p["name"] for p in (await r.json())["items"]}
    assert names == {"admin", "mine", "scripted"}
    assert not any(gw.cfg.data_dir.glob("uploads/*.json"))


async def test_login_redirects_only_within_the_origin(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    """Finding 12: ``next`` that a browser would read as another host falls back to ``/``."""
    gw = await make_gateway(make_config(http__auth=True))
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        # As typed into the address bar: the server decodes %09 to a tab, which browsers
        # drop, so "/<tab>/evil.example/" would be "//evil.example/".
        for raw_next, expected in (
            ("/%09/evil.example/", "/"),
            ("//evil.example/", "/"),
            ("/%5Cevil.example", "/"),
            ("https://evil.example/", "/"),
            ("/gallery%3Fproject%3Dadmin", "/gallery?project=admin"),
        ):
            url = URL(f"{_base(gw)}/login?next={raw_next}", encoded=True)
            async with http.post(url, data={"token": gw.token}, allow_redirects=False) as r:
                assert r.status == 302, raw_next
                assert r.headers["Location"] == expected, raw_next
        # A login form posted from another site is refused (login CSRF).
        async with http.post(
            "/login",
            data={"token": gw.token},
            headers={"Sec-Fetch-Site": "cross-site"},
            allow_redirects=False,
        ) as r:
            assert r.status == 403


async def test_tokens_never_reach_the_log(
    make_gateway: Any, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Finding 13: neither the start-up log nor the access log shows the token."""
    secret = "s3cret-token-from-env-0123456789"
    caplog.set_level(logging.INFO)
    overrides = gateway_overrides(tmp_path / "data", http__auth=True)
    gw = await make_gateway(
        load(None, environ={"KP_GATEWAY_HTTP_TOKEN": secret}, overrides=overrides)
    )
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        async with http.get(f"/api/projects?token={secret}") as r:
            assert r.status == 200
        async with http.get(f"/gallery?token={secret}", allow_redirects=False) as r:
            assert r.status == 302
    deadline = time.monotonic() + 10
    while "token=***" not in caplog.text and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the access log line is written after the response
    assert "token=***" in caplog.text
    assert "upload page: http://" in caplog.text
    assert secret not in caplog.text


async def test_odd_input_gets_4xx_not_500(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    """Finding 16: a non-ASCII bearer token is 401; odd UIDs are 404; a tus Upload-Length of
    "²" is 400 (each was a 500 with a traceback)."""
    gw = await make_gateway(make_config(http__auth=True))
    bearer = {"Authorization": f"Bearer {gw.token}"}
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        async with http.get("/api/projects", headers={"Authorization": "Bearer tökén"}) as r:
            assert r.status == 401
        for path in (
            "/api/series/..%2F..%2Ftoken/thumbnail",
            "/api/series/1.2.3%0A/validation",
            "/api/series/abc/instances",
            "/api/series/1.2.x",
            "/api/instances/%00",
            "/api/series/" + "1." * 40 + "1/thumbnail",
        ):
            async with http.get(path, headers=bearer) as r:
                assert r.status == 404, path
                assert (await r.json())["error"] == "not_found"
        tus = {**bearer, "Tus-Resumable": "1.0.0", "Upload-Length": "²"}
        async with http.post("/api/uploads/tus", headers=tus) as r:
            assert r.status == 400
            assert r.headers["Tus-Resumable"] == "1.0.0"


async def test_security_headers_on_pages_and_api(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    """Finding 16: pages carry a CSP with frame-ancestors, nosniff and a Referrer-Policy;
    JSON, errors and static files carry nosniff."""
    gw = await make_gateway(make_config(http__auth=True))
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        for page in ("/login", f"/?token={gw.token}", "/gallery"):
            async with http.get(page) as r:
                assert r.status == 200, page
                assert r.content_type == "text/html"
                assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["Referrer-Policy"] == "no-referrer"
        for other in ("/api/projects", "/static/upload.js", "/api/nothing-here"):
            async with http.get(other) as r:
                assert r.headers["X-Content-Type-Options"] == "nosniff", other
                assert "Content-Security-Policy" not in r.headers


async def test_without_auth_only_local_host_names_are_served(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    """Finding 16 (DNS rebinding): with ``http.auth = false`` a Host the gateway does not
    serve is refused; loopback names and ``http.public_host`` are served."""
    gw = await make_gateway(make_config(http__public_host="pacs.lab.example"))
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        async with http.get("/api/projects", headers={"Host": "rebound.evil.example"}) as r:
            assert r.status == 403
            assert (await r.json())["error"] == "host_not_allowed"
        for host in ("localhost:8080", "127.0.0.1", "[::1]:80", "pacs.lab.example:8080"):
            async with http.get("/api/projects", headers={"Host": host}) as r:
                assert r.status == 200, host


async def test_data_files_are_private_and_quarantine_shows_no_server_path(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """Finding 16: the index, routing records, thumbnails, reports and the spool are created
    0600 in 0700 folders, like the DICOM files; /api/quarantine names files relative to the
    data directory."""
    gw = await make_gateway(make_config())
    paths = make_ct_series(tmp_path / "s", 3)
    assert await asyncio.to_thread(_store_all, gw, paths) == [0, 0, 0]
    await _wait_indexed(gw, 3)
    series_uid = await _first_series(gw)
    async with asyncio.timeout(60):
        while KEY_THUMBNAIL not in (await _document(gw, series_uid)):
            await asyncio.sleep(0.1)
    # A spooled file that is no DICOM at all: the store stage quarantines it.
    folder = gw.spool.open_source(Routing("admin", "junk", source_id="junk-source"))
    junk = folder / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all" * 10)
    await gw.ingest.submit(
        IngestItem(junk, Routing("admin", "junk", "junk-source"), 0.0), timeout_s=5
    )
    gw.ingest.source_closed("junk-source")
    async with aiohttp.ClientSession(base_url=_base(gw)) as http:
        async with asyncio.timeout(30):
            while not (items := await _quarantine(http)):
                await asyncio.sleep(0.1)
    assert items[0]["path"] == "quarantine/store/junk.dcm"
    loose = [
        f"{path.relative_to(gw.cfg.data_dir)} {oct(path.stat().st_mode & 0o777)}"
        for path in gw.cfg.data_dir.rglob("*")
        if path.stat().st_mode & 0o077
    ]
    assert loose == []
    # What the check covered: the index, a thumbnail, a report and the stored instances.
    names = {p.name for p in gw.cfg.data_dir.rglob("*")}
    assert "index.sqlite3" in names and f"{series_uid}.png" in names
    assert f"{series_uid}.html" in names and len([n for n in names if n.endswith(".dcm")]) >= 3


async def _first_series(gw: RunningGateway) -> str:
    async with (
        aiohttp.ClientSession(base_url=_base(gw)) as http,
        http.get("/api/projects/admin/series") as r,
    ):
        return str((await r.json())["items"][0]["series_uid"])


async def _document(gw: RunningGateway, series_uid: str) -> dict[str, Any]:
    series = await gw.index.get_series(series_uid)
    return dict((series or {}).get("document") or {})


async def _quarantine(http: aiohttp.ClientSession) -> list[dict[str, Any]]:
    async with http.get("/api/quarantine") as r:
        return list((await r.json())["items"])
