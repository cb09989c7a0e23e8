"""Per-project access over HTTP (issue 14, finding 14), against the real server on loopback.

Two projects, ``lung`` and ``brain``, each with a received series, a thumbnail and an uploaded
file; the admin token and two ``lung`` tokens (``read`` and ``read-write``) ask for everything.
What a token may not see answers 404 exactly as if it did not exist; what it may see but not
do answers 403. Then the token API, expiry and revocation, and browser sessions and logout.
"""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import pytest

from kp_gateway.access import Scope
from kp_gateway.app import RunningGateway
from tests.conftest import make_ct_series
from tests.integration.test_scp import _store_all, _wait_indexed
from tests.integration.test_upload import wait_upload, zip_bytes

SESSION_COOKIE = "kp_gateway_session"
WHO = ("admin", "read", "rw")


@dataclass
class Site:
    gw: RunningGateway
    base: str
    secrets: dict[str, str]  # who -> token
    ids: dict[str, str] = field(default_factory=dict)  # placeholders of the route table

    def bearer(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[who]}"}


async def _create_token(http: aiohttp.ClientSession, admin: dict[str, str], **body: Any) -> Any:
    project = body.pop("project", "lung")
    async with http.post(f"/api/projects/{project}/tokens", json=body, headers=admin) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def _upload_file(
    http: aiohttp.ClientSession, base: str, admin: dict[str, str], project: str
) -> dict[str, Any]:
    body = zip_bytes({f"{project}-notes.txt": project.encode() * 20})
    params = {"project": project, "kind": "files"}
    async with http.post("/api/uploads", params=params, data=body, headers=admin) as r:
        assert r.status == 202, await r.text()
        upload_id = (await r.json())["id"]
    async with aiohttp.ClientSession(headers=admin) as polling:
        return await wait_upload(polling, base, upload_id)


@pytest.fixture
async def site(make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path) -> Site:
    """A gateway with auth on, projects lung and brain with a series, a thumbnail and a file
    each, and a read and a read-write token for lung."""
    gw = await make_gateway(make_config(http__auth=True, series__enabled=False))
    base = f"http://127.0.0.1:{gw.http_port}"
    admin = {"Authorization": f"Bearer {gw.token}"}
    site = Site(gw, base, {"admin": gw.token})
    async with aiohttp.ClientSession(base_url=base) as http:
        for name in ("lung", "brain"):
            async with http.post("/api/projects", json={"name": name}, headers=admin) as r:
                assert r.status == 201
        for name in ("lung", "brain"):
            paths = make_ct_series(tmp_path / name, 2, patient_id=name.upper())
            assert await asyncio.to_thread(_store_all, gw, paths, called=f"kp-{name}") == [0, 0]
            first = pydicom.dcmread(paths[0])
            series_uid = str(first.SeriesInstanceUID)
            site.ids[f"{name}_series"] = series_uid
            site.ids[f"{name}_sop"] = str(first.SOPInstanceUID)
            await gw.storage.put_bytes(f"thumbnails/{series_uid}.png", b"\x89PNG fake")
            await gw.storage.put_bytes(f"validation/{series_uid}.html", b"<p>report</p>")
            status = await _upload_file(http, base, admin, name)
            site.ids[f"{name}_upload"] = status["id"]
            site.ids[f"{name}_file"] = status["files"][0]["path"]
        await _wait_indexed(gw, 4)
        site.secrets["read"] = (await _create_token(http, admin, scope="read"))["token"]
        site.secrets["rw"] = (await _create_token(http, admin, scope="read-write"))["token"]
    return site


def _tus(project: str) -> dict[str, str]:
    meta = ",".join(
        f"{k} {base64.b64encode(v.encode()).decode()}"
        for k, v in {"project": project, "kind": "files", "filename": "a.txt"}.items()
    )
    return {"Tus-Resumable": "1.0.0", "Upload-Length": "10", "Upload-Metadata": meta}


# (method, path, body, {who: expected status}); a missing entry is not asked. DICOMweb is
# served on another branch: here only what a token is refused before any handler runs.
FILES = "files"
ROUTES: list[tuple[str, str, Any, dict[str, int]]] = [
    ("GET", "/api/whoami", None, {"admin": 200, "read": 200, "rw": 200}),
    ("GET", "/api/projects", None, {"admin": 200, "read": 200, "rw": 200}),
    ("POST", "/api/projects", {"name": "made"}, {"admin": 201, "read": 403, "rw": 403}),
    ("DELETE", "/api/projects/brain", None, {"read": 403, "rw": 403}),
    ("DELETE", "/api/projects/lung", None, {"read": 403, "rw": 403}),
    ("GET", "/api/projects/lung/datasets", None, {"admin": 200, "read": 200, "rw": 200}),
    ("GET", "/api/projects/brain/datasets", None, {"admin": 200, "read": 404, "rw": 404}),
    ("GET", "/api/projects/nothere/datasets", None, {"admin": 404, "read": 404, "rw": 404}),
    ("GET", "/api/projects/lung/series", None, {"admin": 200, "read": 200, "rw": 200}),
    ("GET", "/api/projects/brain/series", None, {"admin": 200, "read": 404, "rw": 404}),
    ("GET", "/api/projects/admin/series", None, {"admin": 200, "read": 404, "rw": 404}),
    ("GET", "/api/series/{lung_series}", None, {"admin": 200, "read": 200, "rw": 200}),
    ("GET", "/api/series/{brain_series}", None, {"admin": 200, "read": 404, "rw": 404}),
    ("GET", "/api/series/{lung_series}/instances", None, {"admin": 200, "read": 200}),
    ("GET", "/api/series/{brain_series}/instances", None, {"admin": 200, "read": 404}),
    ("GET", "/api/series/{lung_series}/thumbnail", None, {"admin": 200, "read": 200}),
    ("GET", "/api/series/{brain_series}/thumbnail", None, {"admin": 200, "read": 404}),
    ("GET", "/api/series/{brain_series}/validation", None, {"admin": 200, "read": 404}),
    ("GET", "/api/instances/{lung_sop}", None, {"admin": 200, "read": 200, "rw": 200}),
    ("GET", "/api/instances/{brain_sop}", None, {"admin": 200, "read": 404, "rw": 404}),
    ("GET", "/api/quarantine", None, {"admin": 200, "read": 403, "rw": 403}),
    ("GET", "/gallery/api/modalities?project=lung", None, {"admin": 200, "read": 200}),
    ("GET", "/gallery/api/modalities?project=brain", None, {"admin": 200, "read": 404}),
    ("GET", "/gallery/api/modalities", None, {"admin": 200, "read": 404}),  # admin project
    ("GET", "/api/uploads/{lung_upload}", None, {"admin": 200, "read": 200, "rw": 200}),
    ("GET", "/api/uploads/{brain_upload}", None, {"admin": 200, "read": 404, "rw": 404}),
    ("GET", "/api/files/{lung_file}", None, {"admin": 200, "read": 200, "rw": 200}),
    ("GET", "/api/files/{brain_file}", None, {"admin": 200, "read": 404, "rw": 404}),
    ("POST", "/api/uploads?project=lung&kind=files", FILES, {"admin": 202, "read": 403, "rw": 202}),
    (
        "POST",
        "/api/uploads?project=brain&kind=files",
        FILES,
        {"admin": 202, "read": 404, "rw": 404},
    ),
    ("POST", "/api/uploads?kind=files", FILES, {"admin": 202, "read": 404, "rw": 404}),
    ("POST", "/api/uploads/tus", _tus("lung"), {"admin": 201, "read": 403, "rw": 201}),
    ("POST", "/api/uploads/tus", _tus("brain"), {"admin": 201, "read": 404, "rw": 404}),
    ("GET", "/api/projects/lung/tokens", None, {"admin": 200, "read": 403, "rw": 403}),
    ("POST", "/api/projects/lung/tokens", {"scope": "read"}, {"read": 403, "rw": 403}),
    ("GET", "/api/config/public", None, {"admin": 200, "read": 200, "rw": 200}),
    ("GET", "/dicomweb/studies", None, {"read": 403, "rw": 403}),
    ("GET", "/projects/brain/dicomweb/studies", None, {"read": 404, "rw": 404}),
    ("POST", "/projects/lung/dicomweb/studies", None, {"read": 403}),
    ("GET", "/", None, {"admin": 200, "read": 200, "rw": 200}),
    ("GET", "/gallery", None, {"admin": 200, "read": 200, "rw": 200}),
    ("GET", "/tokens", None, {"admin": 200, "read": 200, "rw": 200}),
]


async def test_every_route_answers_by_principal(site: Site) -> None:
    """The route table: admin everything; lung tokens lung only (other projects 404 as if
    absent), reading with ``read``, uploading with ``read-write``; cross-project routes 403."""
    wrong = []
    async with aiohttp.ClientSession(base_url=site.base) as http:
        for method, template, body, expected in ROUTES:
            path = template.format(**site.ids)
            for who, status in expected.items():
                kwargs: dict[str, Any] = {"headers": site.bearer(who)}
                if body == FILES:
                    kwargs["data"] = zip_bytes({"x.txt": b"x" * 100})
                elif isinstance(body, dict) and "Upload-Length" in body:
                    kwargs["headers"] = {**kwargs["headers"], **body}
                elif body is not None:
                    kwargs["json"] = body
                async with http.request(method, path, **kwargs) as r:
                    if r.status != status:
                        wrong.append(f"{who} {method} {path}: {r.status} != {status}")
                    if r.status in (403, 404) and r.content_type == "application/json":
                        assert set(await r.json()) == {"error", "detail"}, path
    assert wrong == []


async def test_listings_show_only_the_tokens_project(site: Site) -> None:
    """Projects, uploads, files and a series' projects and datasets: lung only, admin never."""
    async with aiohttp.ClientSession(base_url=site.base, headers=site.bearer("read")) as http:
        async with http.get("/api/projects") as r:
            assert [p["name"] for p in (await r.json())["items"]] == ["lung"]
        async with http.get("/api/uploads") as r:
            assert {u["project"] for u in (await r.json())["items"]} == {"lung"}
        async with http.get("/api/uploads", params={"project": "brain"}) as r:
            assert (await r.json())["items"] == []
        async with http.get("/api/files") as r:
            assert [f["project"] for f in (await r.json())["items"]] == ["lung"]
        async with http.get(f"/api/series/{site.ids['lung_series']}") as r:
            series = await r.json()
        assert series["projects"] == ["lung"]
        assert {d["project"] for d in series["datasets"]} == {"lung"}
        async with http.get("/api/whoami") as r:
            assert await r.json() == {
                "admin": False,
                "project": "lung",
                "scope": "read",
                "auth": True,
            }
        async with http.get("/api/projects/admin/series") as r:
            assert (await r.json())["error"] == "unknown_project"  # as for a missing project
        async with http.get("/api/quarantine") as r:
            assert (await r.json())["error"] == "admin_only"
    async with aiohttp.ClientSession(base_url=site.base, headers=site.bearer("admin")) as http:
        async with http.get("/api/projects") as r:
            names = [p["name"] for p in (await r.json())["items"]]
        assert names == ["admin", "brain", "lung"]
        async with http.get(f"/api/series/{site.ids['lung_series']}") as r:
            assert (await r.json())["projects"] == ["admin", "lung"]


async def test_read_write_token_uploads_only_into_its_project(site: Site) -> None:
    """A multipart form field cannot carry an upload into another project; a read token's
    upload is refused before its body; nothing of a refused upload stays."""
    before = {p.name for p in (site.gw.cfg.data_dir / "uploads-state").glob("*.json")}
    async with aiohttp.ClientSession(base_url=site.base, headers=site.bearer("rw")) as http:
        for fields in ({"project": "brain"}, {}):
            form = aiohttp.FormData()
            for name, value in fields.items():
                form.add_field(name, value)
            form.add_field("kind", "files")
            form.add_field("file", zip_bytes({"y.txt": b"y" * 50}), filename="y.zip")
            async with http.post("/api/uploads", data=form) as r:
                assert r.status == 404, (fields, await r.text())
        form = aiohttp.FormData()
        form.add_field("project", "lung")
        form.add_field("kind", "files")
        form.add_field("file", zip_bytes({"z.txt": b"z" * 50}), filename="z.zip")
        async with http.post("/api/uploads", data=form) as r:
            assert r.status == 202
            upload = await r.json()
        status = await wait_upload(http, site.base, upload["id"])
        assert status["project"] == "lung" and status["state"] == "done"
        # The tus upload of a read-write token: created, appended, deleted in its project.
        async with http.post("/api/uploads/tus", headers=_tus("lung")) as r:
            assert r.status == 201
            location = r.headers["Location"]
    async with aiohttp.ClientSession(base_url=site.base, headers=site.bearer("read")) as http:
        async with http.head(location, headers={"Tus-Resumable": "1.0.0"}) as r:
            assert r.status == 200
        patch = {"Tus-Resumable": "1.0.0", "Upload-Offset": "0"}
        patch["Content-Type"] = "application/offset+octet-stream"
        async with http.patch(location, headers=patch, data=b"0123456789") as r:
            assert r.status == 403 and (await r.json())["error"] == "read_only"
        async with http.delete(location, headers={"Tus-Resumable": "1.0.0"}) as r:
            assert r.status == 403
    after = {p.name for p in (site.gw.cfg.data_dir / "uploads-state").glob("*.json")}
    assert len(after - before) == 2  # the accepted upload and the tus one; no refused ones


async def test_token_api_shows_the_secret_once_and_stores_its_digest(site: Site) -> None:
    admin = site.bearer("admin")
    async with aiohttp.ClientSession(base_url=site.base, headers=admin) as http:
        created = await _create_token(
            http, {}, project="brain", scope="read-write", label="scanner 3", expires_in_days=1
        )
        assert set(created) == {
            "id",
            "project",
            "scope",
            "label",
            "created_at",
            "expires_at",
            "token",
        }
        assert created["token"].startswith(f"kpt_{created['id']}_")
        assert 86000 < created["expires_at"] - created["created_at"] <= 86400
        async with http.get("/api/projects/brain/tokens") as r:
            listed = (await r.json())["items"]
        assert [t["id"] for t in listed] == [created["id"]]
        assert "token" not in listed[0] and created["token"] not in json.dumps(listed)
        async with http.get("/api/projects/lung/tokens") as r:
            assert len((await r.json())["items"]) == 2
        for body, status in (
            ({"scope": "all"}, 400),
            ({"scope": "read", "expires_in_days": 0}, 400),
            ({"scope": "read", "expires_in_days": 3651}, 400),
            ({"scope": "read", "expires_in_days": True}, 400),
            ({"scope": "read", "label": 5}, 400),
            ({"scope": "read", "label": "a\nb"}, 400),
            ({"scope": "read", "secret": "mine"}, 400),
        ):
            async with http.post("/api/projects/brain/tokens", json=body) as r:
                assert r.status == status, body
        async with http.post("/api/projects/admin/tokens", json={}) as r:
            assert r.status == 400  # a token for the union of all projects: no
        async with http.post("/api/projects/nothere/tokens", json={}) as r:
            assert r.status == 404
        async with http.delete("/api/projects/lung/tokens/" + created["id"]) as r:
            assert r.status == 404  # a brain token is not found under lung
    path = site.gw.cfg.data_dir / "tokens.json"
    raw = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for secret in (*site.secrets.values(), created["token"]):
        assert secret not in raw
    assert created["id"] in raw


async def test_revoked_and_expired_tokens_get_401(site: Site) -> None:
    """Bearer, ?token= and login all refuse a revoked or an expired token."""
    expired, expired_secret = await site.gw.tokens.create(
        "lung", Scope.READ, "old", expires_at=time.time() - 1
    )
    async with aiohttp.ClientSession(base_url=site.base) as http:
        async with http.delete(
            f"/api/projects/lung/tokens/{_token_id(site.secrets['rw'])}",
            headers=site.bearer("admin"),
        ) as r:
            assert r.status == 204
        for secret in (expired_secret, site.secrets["rw"]):
            headers = {"Authorization": f"Bearer {secret}"}
            async with http.get("/api/projects/lung/series", headers=headers) as r:
                assert r.status == 401 and (await r.json())["error"] == "unauthorized"
            async with http.get(f"/api/projects?token={secret}") as r:
                assert r.status == 401
            async with http.post("/login", data={"token": secret}, allow_redirects=False) as r:
                assert r.status == 401
        async with http.get("/api/projects/lung/tokens", headers=site.bearer("admin")) as r:
            ids = [t["id"] for t in (await r.json())["items"]]
    assert ids == [_token_id(site.secrets["read"])]  # the expired one is pruned from the list
    assert expired.id not in (site.gw.cfg.data_dir / "tokens.json").read_text()


def _token_id(secret: str) -> str:
    return secret.split("_", 2)[1]


def _cookie(http: aiohttp.ClientSession) -> Any:
    return next(c for c in http.cookie_jar if c.key == SESSION_COOKIE)


async def test_session_cookie_is_not_the_token_and_logout_ends_it(site: Site) -> None:
    """Login and ?token= make a server-side session (HttpOnly, SameSite=Strict); logout ends
    it and clears the cookie; a copied cookie no longer works."""
    for who in WHO:
        secret = site.secrets[who]
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(base_url=site.base, cookie_jar=jar) as http:
            async with http.post("/login?next=/gallery", data={"token": secret}) as r:
                assert r.status == 200 and str(r.url).endswith("/gallery")
                set_cookie = r.history[0].headers["Set-Cookie"]
            cookie = _cookie(http)
            assert secret not in cookie.value and secret not in set_cookie
            assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
            assert "Secure" not in set_cookie  # plain http on loopback
            async with http.get("/api/whoami") as r:
                assert (await r.json())["admin"] is (who == "admin")
            stolen = cookie.value
            # Logout is a same-origin write like any other.
            cross = {"Sec-Fetch-Site": "cross-site"}
            async with http.post("/logout", headers=cross, allow_redirects=False) as r:
                assert r.status == 403
            async with http.post("/logout", allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/login"
            assert not any(c.key == SESSION_COOKIE and c.value for c in http.cookie_jar)
            async with http.get("/api/projects") as r:
                assert r.status == 401
        async with aiohttp.ClientSession(base_url=site.base) as other:
            async with other.get("/api/projects", cookies={SESSION_COOKIE: stolen}) as r:
                assert r.status == 401
            async with other.get("/api/projects", cookies={SESSION_COOKIE: secret}) as r:
                assert r.status == 401  # the token itself is no session id
    # ?token= on a page: the same trade, with the read token too.
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(base_url=site.base, cookie_jar=jar) as http:
        async with http.get(f"/gallery?token={site.secrets['read']}") as r:
            assert r.status == 200 and r.history[0].status == 302
        assert site.secrets["read"] not in _cookie(http).value
        async with http.get("/api/projects") as r:
            assert [p["name"] for p in (await r.json())["items"]] == ["lung"]


async def test_revoking_a_token_or_deleting_its_project_ends_its_sessions(site: Site) -> None:
    admin = site.bearer("admin")
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(base_url=site.base, cookie_jar=jar) as browser:
        async with browser.post("/login", data={"token": site.secrets["read"]}) as r:
            assert r.status == 200
        async with browser.get("/api/projects/lung/series") as r:
            assert r.status == 200
        async with aiohttp.ClientSession(base_url=site.base, headers=admin) as http:
            token_id = _token_id(site.secrets["read"])
            async with http.delete(f"/api/projects/lung/tokens/{token_id}") as r:
                assert r.status == 204
            async with http.delete(f"/api/projects/lung/tokens/{token_id}") as r:
                assert r.status == 404
        async with browser.get("/api/projects/lung/series") as r:
            assert r.status == 401
        async with browser.get("/gallery", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"].startswith("/login")
    # Deleting a project revokes its tokens: a project made again under the name is closed.
    async with aiohttp.ClientSession(base_url=site.base, headers=admin) as http:
        created = await _create_token(http, {}, project="brain", scope="read")
        async with http.delete("/api/projects/brain") as r:
            assert (await r.json())["tokens_revoked"] == 1
        async with http.post("/api/projects", json={"name": "brain"}) as r:
            assert r.status == 201
    bearer = {"Authorization": f"Bearer {created['token']}"}
    async with (
        aiohttp.ClientSession(base_url=site.base, headers=bearer) as http,
        http.get("/api/projects/brain/series") as r,
    ):
        assert r.status == 401


async def test_token_count_is_bounded_with_429(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    gw = await make_gateway(make_config(http__auth=True, http__max_tokens=2))
    admin = {"Authorization": f"Bearer {gw.token}"}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{gw.http_port}", headers=admin) as http:
        async with http.post("/api/projects", json={"name": "lung"}) as r:
            assert r.status == 201
        first = await _create_token(http, {}, scope="read")
        await _create_token(http, {}, scope="read")
        async with http.post("/api/projects/lung/tokens", json={}) as r:
            assert r.status == 429 and (await r.json())["error"] == "too_many_tokens"
        async with http.delete(f"/api/projects/lung/tokens/{first['id']}") as r:
            assert r.status == 204
        await _create_token(http, {}, scope="read")


async def test_without_auth_every_request_is_the_admin(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    gw = await make_gateway(make_config())
    async with aiohttp.ClientSession(f"http://127.0.0.1:{gw.http_port}") as http:
        async with http.get("/api/whoami") as r:
            assert (await r.json())["admin"] is True
        async with http.get("/api/quarantine") as r:
            assert r.status == 200
        async with http.post("/logout", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/"
