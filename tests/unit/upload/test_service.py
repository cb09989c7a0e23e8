"""UploadService driven directly (no HTTP) over a real pipeline: filesystem storage, SQLite
index, a one-worker process pool. Bodies come from ``read(n)`` coroutines over bytes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import json
import shutil
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from kp_gateway.backends import make_index, make_storage
from kp_gateway.backends.base import IndexBackend, StorageBackend
from kp_gateway.config import Config
from kp_gateway.datadir import DataDir
from kp_gateway.errors import (
    FeatureUnavailableError,
    InvalidDicomError,
    PayloadTooLargeError,
    RejectedInputError,
    UnknownProjectError,
    UnknownUploadError,
    UploadOffsetError,
)
from kp_gateway.metrics import Metrics
from kp_gateway.pipeline.ingest import IngestService
from kp_gateway.pipeline.process_pool import make_process_pool, worker_pid
from kp_gateway.pipeline.spool import Spool
from kp_gateway.upload.importer import UploadImporter
from kp_gateway.upload.record import DONE, FAILED, IMPORTING, RECEIVING, Upload
from kp_gateway.upload.service import BodyCopier, BodyRead, BodyWriter, UploadParams, UploadService
from tests.conftest import instance_uids, make_ct_series

WAIT_S = 30.0  # generous: the machine is shared; a pass takes well under a second
# No fsync, and stages that do not wait for company: an import settles in milliseconds.
FAST: dict[str, Any] = {"storage__fsync": False, "pipeline__batch_linger_s": 0.01}


@pytest.fixture(scope="module")
def process_pool() -> Iterator[ProcessPoolExecutor]:
    """One spawned header-parsing worker for the whole module, started once."""
    pool = make_process_pool(1)
    pool.submit(worker_pid).result()
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Running:
    """One started gateway core: the pipeline and the upload service on top of it."""

    cfg: Config
    service: UploadService
    ingest: IngestService
    index: IndexBackend
    storage: StorageBackend
    stopped: bool = False

    @property
    def state_dir(self) -> Path:
        return self.service.state_dir

    async def stop(self) -> None:
        """Stop in the composition root's order: uploads, pipeline drain, backends."""
        if self.stopped:
            return
        self.stopped = True
        await self.service.aclose()
        assert await self.ingest.drain()
        await self.index.aclose()
        await self.storage.aclose()


StartFn = Callable[..., Any]


@pytest.fixture
async def start(
    make_config: Callable[..., Config], process_pool: ProcessPoolExecutor
) -> AsyncIterator[StartFn]:
    """``await start(cfg=None, nifti_available=False, **overrides)``: build and start the
    pipeline and an UploadService as ``app.py`` wires them; all are stopped at teardown."""
    started: list[Running] = []

    async def _start(
        cfg: Config | None = None, *, nifti_available: bool = False, **overrides: Any
    ) -> Running:
        cfg = cfg or make_config(**{**FAST, **overrides})
        metrics = Metrics()
        storage, index = make_storage(cfg), make_index(cfg)
        spool = Spool(cfg.data_dir, fsync=cfg.storage.fsync)
        await storage.open()
        await index.open()
        ingest = IngestService(
            cfg.pipeline,
            index_cfg=cfg.index,
            storage_backend=cfg.storage.backend,
            storage=storage,
            index=index,
            process_pool=process_pool,
            metrics=metrics,
            spool=spool,
        )
        importer = UploadImporter(
            intake=ingest,
            spool=spool,
            storage=storage,
            metrics=metrics,
            limits=cfg.upload,
            admission_wait_s=cfg.upload.admission_wait_s,
            nifti_importer=None,
        )
        service = UploadService(
            cfg.upload,
            state_dir=DataDir.at(cfg.data_dir).uploads_state,
            fsync=cfg.storage.fsync,
            importer=importer,
            project_exists=index.project_exists,
            metrics=metrics,
            nifti_available=nifti_available,
        )
        running = Running(cfg, service, ingest, index, storage)
        started.append(running)
        await ingest.start()
        await service.start()
        return running

    try:
        yield _start
    finally:
        for running in reversed(started):
            await running.stop()


# -- bodies -----------------------------------------------------------------------------


def reader(data: bytes, *, chunk: int = 4096, cut_at: int | None = None) -> BodyRead:
    """A ``read(n)`` over `data` in chunks of at most `chunk`; with `cut_at`, the peer
    resets the connection once that many bytes were delivered."""
    position = 0

    async def read(n: int) -> bytes:
        nonlocal position
        if cut_at is not None and position >= cut_at:
            raise ConnectionResetError("connection reset by peer")
        end = min(position + min(n, chunk), len(data))
        if cut_at is not None:
            end = min(end, cut_at)
        piece = data[position:end]
        position = end
        await asyncio.sleep(0)  # a real socket read yields to the loop
        return piece

    return read


def copier(read: BodyRead, routing: Mapping[str, str] | None = None) -> BodyCopier:
    """What the HTTP layer passes: pump the body into the writer, maybe return form fields."""

    async def copy_body(upload: Upload, writer: BodyWriter) -> Mapping[str, str] | None:
        await writer.pump(read)
        return routing

    return copy_body


def ct_bytes(folder: Path) -> tuple[bytes, pydicom.Dataset]:
    """A small Part-10 CT slice (about 9 KB) and its dataset."""
    (path,) = make_ct_series(folder, 1, rows=64)
    return path.read_bytes(), pydicom.dcmread(path)


def record_on_disk(state_dir: Path, upload_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((state_dir / f"{upload_id}.json").read_text())
    return doc


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def state_files(state_dir: Path) -> list[str]:
    return sorted(p.name for p in state_dir.iterdir()) if state_dir.is_dir() else []


async def wait_for_state(running: Running, upload_id: str, *states: str) -> dict[str, Any]:
    """Poll the durable record until its state is one of `states`; fail past the deadline."""
    deadline = time.monotonic() + WAIT_S
    path = running.state_dir / f"{upload_id}.json"
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if path.exists():
            doc = record_on_disk(running.state_dir, upload_id)
            if doc["state"] in states:
                return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"upload {upload_id} not {states} after {WAIT_S} s: {doc}")


async def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await asyncio.to_thread(path.exists):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        await asyncio.sleep(0.05)


async def assert_imported(running: Running, upload_id: str, ds: pydicom.Dataset) -> None:
    """The upload is done, its instance in the index and in storage, its body gone."""
    doc = await wait_for_state(running, upload_id, DONE, FAILED)
    assert doc["state"] == DONE, doc
    assert doc["instances_imported"] == 1
    assert doc["series"] == [ds.SeriesInstanceUID]
    assert doc["detail"].startswith("1 instances in 1 series")
    key = await running.index.instance_key(*instance_uids(ds))
    assert key is not None
    assert await running.storage.size(key) is not None
    assert state_files(running.state_dir) == [f"{upload_id}.json"]


# -- params ---------------------------------------------------------------------------


async def test_params_normalises_and_defaults(start: StartFn) -> None:
    service = (await start()).service
    params = await service.params(
        {
            "project": " ADMIN ",
            "dataset": " Lung-CT.v2 ",
            "kind": "DICOM",
            "extension": "DCM",
            "filename": "C:\\exports\\study 1.zip",
        }
    )
    assert params == UploadParams("admin", "lung-ct.v2", "dicom", ".dcm", "study 1.zip")
    defaults = await service.params({})
    today = f"upload-{datetime.date.today():%Y%m%d}"
    assert defaults == UploadParams("admin", today, "auto", "", "upload.bin")
    assert (await service.params({"extension": ".IMA"})).extension == ".ima"


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"project": "admin", "colour": "red"}, "unknown parameter"),
        ({"dataset": "no spaces allowed"}, "dataset"),
        ({"dataset": "-leading-dash"}, "dataset"),
        ({"dataset": "x" * 65}, "dataset"),
        ({"kind": "images"}, "kind must be one of"),
        ({"extension": "../dcm"}, "not a file extension"),
    ],
)
async def test_params_rejects_bad_values(
    start: StartFn, values: dict[str, str], match: str
) -> None:
    service = (await start()).service
    with pytest.raises(RejectedInputError, match=match):
        await service.params(values)


async def test_params_unknown_project(start: StartFn) -> None:
    running = await start()
    with pytest.raises(UnknownProjectError):
        await running.service.params({"project": "nosuchproject"})
    await running.index.create_project("lab")
    assert (await running.service.params({"project": "Lab"})).project == "lab"


async def test_params_nifti_unavailable(start: StartFn) -> None:
    without = (await start()).service
    with pytest.raises(FeatureUnavailableError, match="kind=nifti"):
        await without.params({"kind": "nifti"})
    assert (await without.params({"kind": "files"})).kind == "files"


async def test_params_nifti_available(start: StartFn) -> None:
    service = (await start(nifti_available=True)).service
    assert (await service.params({"kind": "nifti"})).kind == "nifti"


# -- POST-style receive ------------------------------------------------------------------


async def test_receive_dicom_is_imported(start: StartFn, tmp_path: Path) -> None:
    """importing once accepted (202), then done with the instance indexed and stored."""
    running = await start()
    service = running.service
    data, ds = ct_bytes(tmp_path / "ct")
    params = await service.params({"kind": "dicom", "filename": "slice.dcm"})
    upload = await service.receive(params, copier(reader(data)), expected=len(data))
    assert upload.state == IMPORTING
    assert upload.bytes_received == len(data)
    assert (upload.container, upload.members_total) == ("file", 1)
    assert record_on_disk(running.state_dir, upload.id)["state"] == IMPORTING
    assert service.get(upload.id) is upload
    await assert_imported(running, upload.id, ds)


async def test_receive_takes_routing_found_after_the_body(start: StartFn, tmp_path: Path) -> None:
    """Form fields after the file (returned by copy_body) route the upload."""
    running = await start()
    data, ds = ct_bytes(tmp_path / "ct")
    params = await running.service.params({"filename": "slice.dcm"})
    upload = await running.service.receive(
        params, copier(reader(data), {"dataset": "Late-Fields"}), expected=None
    )
    assert upload.dataset == "late-fields"
    await assert_imported(running, upload.id, ds)


async def test_receive_over_the_cap_leaves_nothing(start: StartFn, tmp_path: Path) -> None:
    running = await start(upload__max_upload_bytes=4000)
    service = running.service
    data, _ = ct_bytes(tmp_path / "ct")
    assert len(data) > 2 * 4000
    params = await service.params({"filename": "slice.dcm"})
    with pytest.raises(PayloadTooLargeError, match="4000 bytes"):
        await service.receive(params, copier(reader(data)), expected=None)
    assert state_files(running.state_dir) == []
    assert service.records == {}
    # A declared size over the cap is refused before anything is written.
    with pytest.raises(PayloadTooLargeError):
        await service.receive(params, copier(reader(data)), expected=len(data))
    assert state_files(running.state_dir) == []


async def test_receive_cut_off_leaves_nothing(start: StartFn, tmp_path: Path) -> None:
    running = await start()
    service = running.service
    data, _ = ct_bytes(tmp_path / "ct")
    params = await service.params({"filename": "slice.dcm"})
    read = reader(data, chunk=1024, cut_at=len(data) // 2)
    with pytest.raises(RejectedInputError, match="cut off") as caught:
        await service.receive(params, copier(read), expected=len(data))
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    assert state_files(running.state_dir) == []
    assert service.records == {}


async def test_receive_non_dicom_under_kind_dicom_leaves_nothing(
    start: StartFn, tmp_path: Path
) -> None:
    running = await start()
    params = await running.service.params({"kind": "dicom", "filename": "notes.txt"})
    body = b"plain text, no DICOM here\n" * 100
    with pytest.raises(InvalidDicomError):
        await running.service.receive(params, copier(reader(body)), expected=len(body))
    assert state_files(running.state_dir) == []
    assert running.service.records == {}


async def test_receive_files_lists_up_to_max_listed_files(
    start: StartFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kind=files keeps every member in storage; the record lists at most MAX_LISTED_FILES
    (lowered to 2 here) while files_stored counts them all."""
    monkeypatch.setattr("kp_gateway.upload.importer.MAX_LISTED_FILES", 2)
    running = await start()
    files = {f"notes/{i}.txt": f"note {i}".encode() for i in range(3)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    body = buf.getvalue()
    params = await running.service.params({"kind": "files", "filename": "notes.zip"})
    upload = await running.service.receive(params, copier(reader(body)), expected=len(body))
    doc = await wait_for_state(running, upload.id, DONE, FAILED)
    assert doc["state"] == DONE, doc
    assert doc["files_stored"] == 3
    assert len(doc["files"]) == 2  # members import concurrently: any two of the three
    assert all(f["path"] in files and f["size"] == 6 for f in doc["files"])
    for name in files:
        assert await running.storage.size(f"uploads/{upload.id}/{name}") == 6


# -- tus ------------------------------------------------------------------------------


async def test_tus_two_chunks_then_import(start: StartFn, tmp_path: Path) -> None:
    running = await start()
    service = running.service
    data, ds = ct_bytes(tmp_path / "ct")
    half = len(data) // 2
    params = await service.params({"kind": "dicom", "filename": "slice.dcm"})
    upload = await service.create_tus(params, len(data))
    assert service.tus_upload(upload.id) is upload
    assert (upload.state, service.tus_offset(upload)) == (RECEIVING, 0)
    assert (running.state_dir / f"{upload.id}.part").stat().st_size == 0

    await service.append_tus(upload, 0, reader(data[:half]))
    assert service.tus_offset(upload) == half
    assert upload.state == RECEIVING
    assert record_on_disk(running.state_dir, upload.id)["bytes_received"] == half
    assert (running.state_dir / f"{upload.id}.part").read_bytes() == data[:half]

    with pytest.raises(UploadOffsetError) as caught:
        await service.append_tus(upload, 0, reader(data[:half]))
    assert caught.value.offset == half
    assert service.tus_offset(upload) == half

    await service.append_tus(upload, half, reader(data[half:]))
    assert upload.state == IMPORTING
    await assert_imported(running, upload.id, ds)


async def test_tus_cut_off_keeps_what_arrived(start: StartFn, tmp_path: Path) -> None:
    """A PATCH whose connection resets keeps its bytes; the client resumes from there."""
    running = await start()
    service = running.service
    data, ds = ct_bytes(tmp_path / "ct")
    upload = await service.create_tus(await service.params({}), len(data))
    await service.append_tus(upload, 0, reader(data, chunk=1000, cut_at=3000))
    assert service.tus_offset(upload) == 3000
    assert upload.state == RECEIVING
    await service.append_tus(upload, 3000, reader(data[3000:]))
    await assert_imported(running, upload.id, ds)


async def test_tus_create_refuses_empty_and_oversized(start: StartFn) -> None:
    running = await start(upload__max_upload_bytes=4000)
    params = await running.service.params({})
    with pytest.raises(RejectedInputError, match="empty"):
        await running.service.create_tus(params, 0)
    with pytest.raises(PayloadTooLargeError):
        await running.service.create_tus(params, 4001)
    assert state_files(running.state_dir) == []


async def test_tus_terminate_removes_everything(start: StartFn, tmp_path: Path) -> None:
    running = await start()
    service = running.service
    data, _ = ct_bytes(tmp_path / "ct")
    upload = await service.create_tus(await service.params({}), len(data))
    await service.append_tus(upload, 0, reader(data[:1000]))
    assert state_files(running.state_dir) == [f"{upload.id}.json", f"{upload.id}.part"]
    await service.terminate_tus(upload)
    assert state_files(running.state_dir) == []
    with pytest.raises(UnknownUploadError):
        service.tus_upload(upload.id)
    with pytest.raises(UnknownUploadError):
        service.get(upload.id)


# -- restart recovery -----------------------------------------------------------------


async def test_restart_resumes_tus_and_fails_interrupted_post(
    start: StartFn, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """A tus upload half received resumes at its offset after a restart (bytes written
    after the last recorded offset are trimmed); a POST cut by the stop becomes failed."""
    cfg = make_config(**FAST)
    first = await start(cfg)
    service = first.service
    data, ds = ct_bytes(tmp_path / "ct")
    half = len(data) // 2
    tus = await service.create_tus(await service.params({"filename": "slice.dcm"}), len(data))
    await service.append_tus(tus, 0, reader(data[:half]))

    # A POST whose body stalls midway: what a crash at this moment leaves on disk is its
    # record (receiving) and its partial body. Keep a copy of both, as a crash would.
    stalled = asyncio.Event()
    delivered = reader(data[:4096])

    async def stalling_read(n: int) -> bytes:
        piece = await delivered(n)
        if not piece:
            await stalled.wait()  # never set: the sender is gone
        return piece

    params = await service.params({"filename": "other.dcm"})
    post = asyncio.create_task(service.receive(params, copier(stalling_read), expected=None))
    deadline = time.monotonic() + WAIT_S
    while len(service.records) < 2:
        assert time.monotonic() < deadline, "the POST never created its record"
        await asyncio.sleep(0.05)
    (post_id,) = [u for u in service.records if u != tus.id]
    await wait_for_file(first.state_dir / f"{post_id}.part")
    crash_copy = tmp_path / "crash"
    crash_copy.mkdir()
    for name in (f"{post_id}.json", f"{post_id}.part"):
        shutil.copy2(first.state_dir / name, crash_copy / name)
    post.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await post
    await first.stop()
    for name in (f"{post_id}.json", f"{post_id}.part"):
        shutil.copy2(crash_copy / name, first.state_dir / name)
    assert record_on_disk(first.state_dir, post_id)["state"] == RECEIVING
    # Bytes the stopped gateway wrote past the recorded offset were never acknowledged.
    await asyncio.to_thread(append_bytes, first.state_dir / f"{tus.id}.part", b"unacknowledged")

    second = await start(cfg)
    service = second.service
    failed = service.get(post_id)
    assert failed.state == FAILED
    assert "interrupted" in failed.detail
    assert record_on_disk(second.state_dir, post_id)["state"] == FAILED
    assert not (second.state_dir / f"{post_id}.part").exists()

    resumed = service.tus_upload(tus.id)
    assert resumed.state == RECEIVING
    assert service.tus_offset(resumed) == half
    assert (second.state_dir / f"{tus.id}.part").read_bytes() == data[:half]
    await service.append_tus(resumed, half, reader(data[half:]))
    doc = await wait_for_state(second, tus.id, DONE, FAILED)
    assert doc["state"] == DONE, doc
    assert await second.index.instance_key(*instance_uids(ds)) is not None
    assert state_files(second.state_dir) == sorted([f"{post_id}.json", f"{tus.id}.json"])
