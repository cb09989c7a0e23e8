"""HTTP uploads against a real gateway on loopback: POST and tus, import, safety, restarts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kp_gateway.app import RunningGateway, running
from kp_gateway.config import Config
from tests.conftest import (
    REPO,
    free_port,
    gateway_overrides,
    make_ct_series,
    requires_dcmtk,
    run_dcmsend,
)


@dataclass
class UploadGateway:
    """A running gateway plus the base URL that serves the upload routes."""

    base: str
    gw: RunningGateway

    @property
    def data_dir(self) -> Path:
        return self.gw.cfg.data_dir


@contextlib.asynccontextmanager
async def upload_gateway(cfg: Config) -> AsyncIterator[Any]:
    """Start the gateway in-process on loopback; its own app serves the upload routes."""
    async with running(cfg) as gw:
        yield UploadGateway(f"http://127.0.0.1:{gw.http_port}", gw)


def zip_bytes(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_folder(folder: Path) -> bytes:
    return zip_bytes(
        {
            str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
    )


async def wait_upload(session: aiohttp.ClientSession, base: str, upload_id: str) -> dict[str, Any]:
    """Poll the status until the import finished (done or failed)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with session.get(f"{base}/api/uploads/{upload_id}") as r:
            status = await r.json()
        if status["state"] in ("done", "failed"):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"upload {upload_id} did not finish: {status}")


async def post_upload(
    session: aiohttp.ClientSession, base: str, body: Any, **params: str
) -> dict[str, Any]:
    async with session.post(f"{base}/api/uploads", params=params, data=body) as r:
        assert r.status == 202, await r.text()
        accepted = await r.json()
    assert accepted["status_url"] == f"/api/uploads/{accepted['id']}"
    return await wait_upload(session, base, accepted["id"])


async def project_contents(
    session: aiohttp.ClientSession, base: str, project: str
) -> dict[str, dict[str, bytes]]:
    """series uid -> sop uid -> stored bytes, as the API serves them."""
    async with session.get(f"{base}/api/projects/{project}/series", params={"limit": 500}) as r:
        assert r.status == 200, await r.text()
        series = (await r.json())["items"]
    out: dict[str, dict[str, bytes]] = {}
    for item in series:
        uid = item["series_uid"]
        async with session.get(f"{base}/api/series/{uid}/instances") as r:
            instances = (await r.json())["items"]
        out[uid] = {}
        for inst in instances:
            async with session.get(f"{base}/api/instances/{inst['sop_uid']}") as r:
                assert r.status == 200
                out[uid][inst["sop_uid"]] = await r.read()
    return out


async def create_project(session: aiohttp.ClientSession, base: str, name: str) -> None:
    async with session.post(f"{base}/api/projects", json={"name": name}) as r:
        assert r.status == 201, await r.text()


def leftovers(data_dir: Path) -> list[str]:
    """Everything a refused upload could have left: stored objects, spool files, records."""
    found = []
    for sub in ("uploads", "dicom"):
        root = data_dir / sub
        if root.exists():
            found += [str(p) for p in root.rglob("*") if p.is_file()]
    spool = data_dir / "spool"
    found += [str(p) for p in (spool / "tmp").glob("*")]
    found += [str(p) for p in (spool / "incoming").glob("upload-*")]
    found += [str(p) for p in (data_dir / "uploads-state").glob("*")]
    return found


def sop_bytes(paths: list[Path]) -> dict[str, bytes]:
    import pydicom

    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.read_bytes()
        for p in paths
    }


async def wait_instances(session: aiohttp.ClientSession, base: str, project: str, n: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with session.get(f"{base}/api/projects/{project}/datasets") as r:
            total = sum(d["instance_count"] for d in (await r.json())["items"])
        if total >= n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {total} of {n} instances arrived in {project}")


# -- equivalence with DICOM ----------------------------------------------------------------


@requires_dcmtk
async def test_upload_zip_matches_dcmsend(
    make_config: Callable[..., Config], dicom_corpus: Path, tmp_path: Path
) -> None:
    """The same folders via dcmsend and as a zip upload: same series, instances and bytes."""
    corpus = tmp_path / "corpus"
    shutil.copytree(dicom_corpus, corpus)
    synthetic = sop_bytes(make_ct_series(corpus / "extra" / "ct", 4))
    paths = sorted(corpus.rglob("*.dcm"))
    originals = sop_bytes(paths)
    async with upload_gateway(make_config()) as ug, aiohttp.ClientSession() as s:
        await create_project(s, ug.base, "viadicom")
        await create_project(s, ug.base, "viahttp")
        sent = await asyncio.to_thread(
            run_dcmsend, ug.gw.scp.port, corpus, calling="kp-sent", called="kp-viadicom"
        )
        assert sent.returncode == 0, sent.stderr
        await wait_instances(s, ug.base, "viadicom", len(originals))
        via_dicom = await project_contents(s, ug.base, "viadicom")

        status = await post_upload(
            s, ug.base, zip_folder(corpus), project="viahttp", dataset="zipped", kind="dicom"
        )
        assert status["state"] == "done", status
        assert status["errors"] == []
        assert status["instances_imported"] == len(originals)
        await wait_instances(s, ug.base, "viahttp", len(originals))
        via_http = await project_contents(s, ug.base, "viahttp")

    assert via_http.keys() == via_dicom.keys()
    assert set(via_http) == {s["series_uid"] for s in status["series"]}
    for series_uid, instances in via_http.items():
        assert instances.keys() == via_dicom[series_uid].keys()
        for sop, data in instances.items():
            # The upload keeps the file byte for byte; C-STORE carries the same dataset under
            # the receiver's own file meta group.
            assert data == originals[sop]
            received = via_dicom[series_uid][sop]
            if sop in synthetic:
                assert dataset_bytes_of(data) == dataset_bytes_of(received)
            else:
                # DCMTK re-encodes some of pydicom's odd files on the way (drops group lengths,
                # re-packs fragments): compare what the header says, not how DCMTK spelled it.
                assert same_dataset(data, received), sop


def dataset_bytes_of(data: bytes) -> bytes:
    """The bytes after the file meta group (what C-STORE transfers)."""
    assert data[128:132] == b"DICM"
    return data[144 + int.from_bytes(data[140:144], "little") :]


_RECODED = (0x7FE00010, 0xFFFCFFFC)


def same_dataset(a: bytes, b: bytes) -> bool:
    """Equal elements apart from group lengths (gggg,0000) and trailing padding, which DCMTK
    drops (both optional, PS3.5 7.2 and PS3.10 7.2), and pixel data, whose fragments it may
    re-pack."""
    import pydicom

    def load(data: bytes) -> pydicom.Dataset:
        ds = pydicom.dcmread(io.BytesIO(data))
        for tag in [t for t in list(ds.keys()) if t.element == 0 or t in _RECODED]:
            del ds[tag]
        return ds

    return bool(load(a) == load(b))


# -- bad input -------------------------------------------------------------------------------


def _zip_with(name: str, data: bytes, *, mode: int | None = None, flags: int = 0) -> bytes:
    info = zipfile.ZipInfo(name)
    if mode is not None:
        info.external_attr = mode << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(info, data)
    raw = bytearray(buf.getvalue())
    if flags:
        # Set the encryption bit in the local and the central header (zipfile cannot encrypt).
        for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = raw.index(sig) + off
            raw[at] |= flags
    return bytes(raw)


def _bad_inputs(dicom_file: bytes) -> list[tuple[str, dict[str, str], bytes, int, str]]:
    """(case, query, body, expected status, expected error code)."""
    ok_zip = zip_bytes({"a/one.dcm": dicom_file})
    return [
        ("zip slip", {}, _zip_with("../evil.dcm", dicom_file), 400, "unsafe_archive"),
        ("absolute path", {}, _zip_with("/etc/evil.dcm", dicom_file), 400, "unsafe_archive"),
        (
            "symlink member",
            {},
            _zip_with("link", b"/etc/passwd", mode=0o120777),
            400,
            "unsafe_archive",
        ),
        ("encrypted", {}, _zip_with("a.dcm", dicom_file, flags=0x1), 400, "unsafe_archive"),
        ("zip bomb", {}, zip_bytes({"zeros.dcm": bytes(64 << 20)}), 413, "payload_too_large"),
        ("corrupt zip", {}, ok_zip[: len(ok_zip) // 2], 400, "unsafe_archive"),
        ("empty zip", {}, zip_bytes({}), 415, "unsupported_media"),
        (
            "only dot-files",
            {},
            zip_bytes({".DS_Store": b"x", "__MACOSX/a": b"y"}),
            415,
            "unsupported_media",
        ),
        ("not DICOM", {"kind": "dicom"}, b"hello, I am a text file" * 10, 400, "invalid_dicom"),
        (
            "zip without DICOM",
            {"kind": "dicom"},
            zip_bytes({"a.txt": b"text"}),
            415,
            "unsupported_media",
        ),
        ("looks raw, is not", {"kind": "dicom"}, b"\x08\x00" + bytes(200), 400, "invalid_dicom"),
        ("empty body", {}, b"", 400, "rejected_input"),
        ("unknown project", {"project": "nope"}, ok_zip, 404, "unknown_project"),
        ("bad kind", {"kind": "pdf"}, ok_zip, 400, "rejected_input"),
        ("bad dataset", {"dataset": "../x"}, ok_zip, 400, "rejected_input"),
        ("unknown parameter", {"projekt": "admin"}, ok_zip, 400, "rejected_input"),
        ("kind=nifti but no NIfTI inside", {"kind": "nifti"}, ok_zip, 415, "unsupported_media"),
    ]


async def test_upload_bad_inputs_are_refused_and_leave_nothing(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """Every unsafe or unusable upload: 4xx JSON error, nothing stored, no spool files."""
    dicom_file = make_ct_series(tmp_path / "ct", 1)[0].read_bytes()
    async with upload_gateway(make_config()) as ug, aiohttp.ClientSession() as s:
        for case, query, body, status, code in _bad_inputs(dicom_file):
            async with s.post(f"{ug.base}/api/uploads", params=query, data=body) as r:
                payload = await r.json()
                assert (r.status, payload["error"]) == (status, code), (case, payload)
                assert payload["detail"], case
            assert leftovers(ug.data_dir) == [], case
        # Multipart without a "file" part, and a body over a declared Content-Length cap.
        form = aiohttp.FormData()
        form.add_field("other", b"x", filename="x.bin")
        async with s.post(f"{ug.base}/api/uploads", data=form) as r:
            assert r.status == 400 and (await r.json())["error"] == "rejected_input"
        reader, writer = await asyncio.open_connection("127.0.0.1", int(ug.base.rsplit(":", 1)[1]))
        writer.write(
            b"POST /api/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 99999999999999\r\n\r\n"
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), head
        writer.close()
        async with s.get(f"{ug.base}/api/uploads") as r:
            assert (await r.json())["total"] == 0
        assert leftovers(ug.data_dir) == []


async def test_upload_over_the_cap_is_cut_while_streaming(
    make_config: Callable[..., Config],
) -> None:
    """A chunked body (no Content-Length) is refused with 413 as soon as it passes the cap."""
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(16):
            sent += 1 << 20
            yield bytes(1 << 20)

    cfg = make_config(upload__max_upload_bytes=4 << 20)
    async with upload_gateway(cfg) as ug, aiohttp.ClientSession() as s:
        async with s.post(f"{ug.base}/api/uploads", params={"kind": "files"}, data=body()) as r:
            assert r.status == 413
            assert (await r.json())["error"] == "payload_too_large"
        assert sent < 16 << 20
        assert leftovers(ug.data_dir) == []


async def test_upload_zip_with_some_bad_members_reports_them_per_file(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """kind=dicom: good members are imported; text and preamble-less data are handled per file."""
    paths = make_ct_series(tmp_path / "ct", 3)
    raw_dataset = dataset_bytes_of(paths[2].read_bytes())  # the same instance without Part-10
    members = {
        "study/1.dcm": paths[0].read_bytes(),
        "study/2.dcm": paths[1].read_bytes(),
        "study/raw": raw_dataset,
        "study/notes.txt": b"not an image",
        "__MACOSX/study/._1.dcm": b"resource fork",
    }
    async with upload_gateway(make_config()) as ug, aiohttp.ClientSession() as s:
        form = aiohttp.FormData()
        form.add_field("file", zip_bytes(members), filename="study.zip")
        status = await post_upload(s, ug.base, form, dataset="mixed", kind="dicom")
        assert status["state"] == "done", status
        assert status["filename"] == "study.zip"
        assert status["instances_imported"] == 3
        assert status["files_seen"] == 4
        assert [e["file"] for e in status["errors"]] == ["study/notes.txt"]
        assert status["errors"][0]["error"] == "invalid_dicom"
        contents = await project_contents(s, ug.base, "admin")
        (instances,) = contents.values()
        sop = {p.name: uid for uid, p in zip(sop_bytes(paths), paths, strict=True)}
        converted = instances[sop[paths[2].name]]
        assert converted[128:132] == b"DICM"
        assert dataset_bytes_of(converted) == raw_dataset  # elements untouched, meta added
        assert instances[sop[paths[0].name]] == paths[0].read_bytes()
        async with s.get(f"{ug.base}/metrics") as r:
            text = await r.text()
        assert 'kp_gateway_uploads_total{state="done"} 1.0' in text
        assert "kp_gateway_upload_import_seconds_count 1.0" in text
        assert "kp_gateway_upload_received_bytes_total" in text
        # Nothing but the stored instances and the status record: no spool or body files.
        expected = {str(p) for p in (ug.data_dir / "dicom").rglob("*.dcm")}
        expected.add(str(ug.data_dir / "uploads-state" / f"{status['id']}.json"))
        assert set(leftovers(ug.data_dir)) == expected


async def test_upload_kind_files_lists_and_serves_them(
    make_config: Callable[..., Config],
) -> None:
    """kind=files: members under uploads/<id>/<path>, listed per project and downloadable."""
    files = {"docs/readme.md": b"# hello\n", "docs/data/table.csv": b"a,b\n1,2\n"}
    async with upload_gateway(make_config()) as ug, aiohttp.ClientSession() as s:
        await create_project(s, ug.base, "lab")
        status = await post_upload(s, ug.base, zip_bytes(files), project="lab", kind="files")
        assert status["state"] == "done" and status["files_stored"] == 2
        for name, data in files.items():
            assert (ug.data_dir / "uploads" / status["id"] / name).read_bytes() == data
        async with s.get(f"{ug.base}/api/files", params={"project": "lab"}) as r:
            listing = (await r.json())["items"]
        assert sorted(i["name"] for i in listing) == sorted(files)
        for item in listing:
            async with s.get(f"{ug.base}{item['url']}") as r:
                assert r.status == 200 and await r.read() == files[item["name"]]
        async with s.get(f"{ug.base}/api/files", params={"project": "admin"}) as r:
            assert (await r.json())["items"] == []
        async with s.get(f"{ug.base}/api/files/{status['id']}/../token") as r:
            assert r.status == 404


# -- tus ---------------------------------------------------------------------------------------


def _tus_meta(**meta: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in meta.items())


async def tus_create(s: aiohttp.ClientSession, base: str, length: int, **meta: str) -> str:
    headers = {
        "Tus-Resumable": "1.0.0",
        "Upload-Length": str(length),
        "Upload-Metadata": _tus_meta(**meta),
    }
    async with s.post(f"{base}/api/uploads/tus", headers=headers) as r:
        assert r.status == 201, await r.text()
        assert r.headers["Tus-Resumable"] == "1.0.0"
        return base + r.headers["Location"]


async def tus_offset(s: aiohttp.ClientSession, url: str) -> int:
    async with s.head(url, headers={"Tus-Resumable": "1.0.0"}) as r:
        assert r.status == 200
        assert r.headers["Cache-Control"] == "no-store"
        return int(r.headers["Upload-Offset"])


async def tus_patch(
    s: aiohttp.ClientSession, url: str, offset: int, data: bytes, **extra: str
) -> aiohttp.ClientResponse:
    headers = {
        "Tus-Resumable": "1.0.0",
        "Upload-Offset": str(offset),
        "Content-Type": "application/offset+octet-stream",
        **extra,
    }
    async with s.patch(url, headers=headers, data=data) as r:
        await r.read()
        return r


async def patch_started(url: str, offset: int, total: int, part: bytes) -> asyncio.StreamWriter:
    """Announce `total` bytes from `offset` and send only `part`; the caller cuts the line."""
    host_port, path = url.removeprefix("http://").split("/", 1)
    host, port = host_port.split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"PATCH /{path} HTTP/1.1\r\nHost: {host_port}\r\nTus-Resumable: 1.0.0\r\n"
        f"Upload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\n"
        f"Content-Length: {total}\r\n\r\n".encode()
        + part
    )
    await writer.drain()
    return writer


async def wait_offset(s: aiohttp.ClientSession, url: str, want: int) -> None:
    deadline = time.monotonic() + 10
    while (got := await tus_offset(s, url)) != want:
        assert time.monotonic() < deadline, f"offset stuck at {got}, want {want}"
        await asyncio.sleep(0.02)


async def test_tus_upload_cut_at_half_resumes_from_its_offset(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """A PATCH cut at 50 %: HEAD gives the offset, the rest completes it, same result."""
    paths = make_ct_series(tmp_path / "ct" / "s1", 6, rows=64)
    originals = sop_bytes(paths)
    body = zip_folder(tmp_path / "ct")
    half = len(body) // 2
    async with upload_gateway(make_config()) as ug, aiohttp.ClientSession() as s:
        async with s.options(f"{ug.base}/api/uploads/tus") as r:
            assert r.status == 204
            assert r.headers["Tus-Version"] == "1.0.0"
            assert "creation" in r.headers["Tus-Extension"]
        url = await tus_create(s, ug.base, len(body), dataset="resumed", filename="ct.zip")
        assert await tus_offset(s, url) == 0
        line = await patch_started(url, 0, len(body), body[:half])
        await wait_offset(s, url, half)  # the gateway has every byte that was sent
        line.transport.abort()  # the connection drops mid-body (no FIN handshake)
        assert await tus_offset(s, url) == half
        upload_id = url.rsplit("/", 1)[1]
        async with s.get(f"{ug.base}/api/uploads/{upload_id}") as r:
            assert (await r.json())["state"] == "receiving"
        wrong = await tus_patch(s, url, 0, body)
        assert wrong.status == 409 and wrong.headers["Upload-Offset"] == str(half)
        plain = await tus_patch(s, url, half, body[half:], **{"Content-Type": "text/plain"})
        assert plain.status == 415
        done = await tus_patch(s, url, half, body[half:])
        assert done.status == 204 and done.headers["Upload-Offset"] == str(len(body))
        status = await wait_upload(s, ug.base, upload_id)
        assert status["state"] == "done", status
        assert status["bytes_received"] == len(body) and status["errors"] == []
        contents = await project_contents(s, ug.base, "admin")
        assert {sop: data for series in contents.values() for sop, data in series.items()} == (
            originals
        )
        # Termination of another upload removes it and its bytes.
        other = await tus_create(s, ug.base, 10, filename="x.bin", kind="files")
        async with s.delete(other, headers={"Tus-Resumable": "1.0.0"}) as r:
            assert r.status == 204
        async with s.head(other, headers={"Tus-Resumable": "1.0.0"}) as r:
            assert r.status == 404
        # Bad creation requests are refused with JSON errors.
        async with s.post(f"{ug.base}/api/uploads/tus", headers={"Tus-Resumable": "1.0.0"}) as r:
            assert r.status == 400 and (await r.json())["error"] == "rejected_input"
        bad_meta = {"Tus-Resumable": "1.0.0", "Upload-Length": "5", "Upload-Metadata": "kind %%"}
        async with s.post(f"{ug.base}/api/uploads/tus", headers=bad_meta) as r:
            assert r.status == 400 and r.headers["Tus-Resumable"] == "1.0.0"


async def test_tus_final_patch_of_unsafe_zip_is_refused_and_leaves_nothing(
    make_config: Callable[..., Config],
) -> None:
    body = _zip_with("../../evil.dcm", b"x" * 100)
    async with upload_gateway(make_config()) as ug, aiohttp.ClientSession() as s:
        url = await tus_create(s, ug.base, len(body), filename="evil.zip")
        r = await tus_patch(s, url, 0, body)
        assert r.status == 400 and r.headers["Tus-Resumable"] == "1.0.0"
        assert leftovers(ug.data_dir) == []


# -- restarts --------------------------------------------------------------------------------


async def test_upload_state_survives_restart_and_interrupted_imports_resume(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """After a stop: a tus upload resumes, an import that was running finishes, and a POST
    that was cut short is marked failed with a clear detail."""
    cfg = make_config()
    paths = make_ct_series(tmp_path / "ct" / "s1", 4)
    originals = sop_bytes(paths)
    body = zip_folder(tmp_path / "ct")
    half = len(body) // 2
    async with upload_gateway(cfg) as ug, aiohttp.ClientSession() as s:
        url = await tus_create(s, ug.base, len(body), dataset="tus", filename="ct.zip")
        assert (await tus_patch(s, url, 0, body[:half])).status == 204
    # What a crash leaves: a record of a running import with its body, and a cut-off POST.
    state_dir = cfg.data_dir / "uploads-state"
    now = time.time()
    common = {"project": "admin", "created_at": now, "updated_at": now, "kind": "dicom"}
    crashed = {**common, "id": "20240101-aaaaaaaaaaaa", "protocol": "post", "dataset": "crashed"}
    crashed.update(state="importing", container="zip", members_total=4, bytes_received=len(body))
    (state_dir / "20240101-aaaaaaaaaaaa.body").write_bytes(body)
    (state_dir / "20240101-aaaaaaaaaaaa.json").write_text(json.dumps(crashed))
    cut = {**common, "id": "20240101-bbbbbbbbbbbb", "protocol": "post", "dataset": "cut"}
    cut.update(state="receiving", bytes_received=1234)
    (state_dir / "20240101-bbbbbbbbbbbb.part").write_bytes(b"x" * 1234)
    (state_dir / "20240101-bbbbbbbbbbbb.json").write_text(json.dumps(cut))

    async with upload_gateway(cfg) as ug, aiohttp.ClientSession() as s:
        url = ug.base + "/api/uploads/tus/" + url.rsplit("/", 1)[1]
        assert await tus_offset(s, url) == half
        assert (await tus_patch(s, url, half, body[half:])).status == 204
        status = await wait_upload(s, ug.base, url.rsplit("/", 1)[1])
        assert status["state"] == "done" and status["instances_imported"] == 4, status
        resumed = await wait_upload(s, ug.base, "20240101-aaaaaaaaaaaa")
        assert resumed["state"] == "done" and resumed["instances_imported"] == 4, resumed
        failed = await wait_upload(s, ug.base, "20240101-bbbbbbbbbbbb")
        assert failed["state"] == "failed"
        assert "after 1234 bytes" in failed["detail"] and "upload it again" in failed["detail"]
        contents = await project_contents(s, ug.base, "admin")
        stored = {sop: data for series in contents.values() for sop, data in series.items()}
        assert stored == originals
        async with s.get(f"{ug.base}/api/uploads") as r:
            assert (await r.json())["total"] == 3
    assert sorted(p.name for p in state_dir.iterdir()) == sorted(
        f"{i}.json" for i in ("20240101-aaaaaaaaaaaa", "20240101-bbbbbbbbbbbb", status["id"])
    )


# -- memory --------------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def gateway_subprocess(tmp_path: Path) -> Any:
    """``python -m kp_gateway serve`` on loopback ports, stopped at exit."""
    data_dir = tmp_path / "data"
    overrides = gateway_overrides(data_dir)
    overrides.update({"dicom.port": free_port(), "http.port": free_port()})
    args = [sys.executable, "-m", "kp_gateway", "serve"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    port = overrides["http.port"]
    log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_upload_of_2_gib_keeps_rss_flat(tmp_path: Path) -> None:
    """A 2 GiB streamed upload (generated on the fly) grows the gateway's RSS by < 100 MB."""
    total = 2 << 30
    block = os.urandom(1 << 20)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(total // len(block)):
            yield block

    with gateway_subprocess(tmp_path) as (proc, base):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(f"{base}/api/config/public") as r:
                        if r.status == 200:
                            break
                assert time.monotonic() < deadline and proc.poll() is None, "gateway not up"
                await asyncio.sleep(0.1)
            # Warm up the code paths once, then measure.
            await post_upload(s, base, b"warm-up", kind="files", filename="warm.bin")
            baseline = _rss_bytes(proc.pid)
            peak = baseline
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, _rss_bytes(proc.pid))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                status = await post_upload(s, base, body(), kind="files", filename="big.bin")
            finally:
                done.set()
                sampler.join()
        assert status["state"] == "done", status
        assert status["bytes_received"] == total
        assert status["files"][0]["size"] == total
        growth = peak - baseline
        print(f"RSS baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
        assert growth < 100 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
