"""The C-STORE SCP on loopback with a pynetdicom SCU: statuses, routing and robustness."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from kp_gateway.app import RunningGateway, running
from kp_gateway.dicom.receive_files import SpoolFile
from kp_gateway.dicom.scp import PRECREATED_SPOOL_FILES
from tests.conftest import dataset_bytes, instance_uids, make_ct_series

CT = str(CTImageStorage)


def _scu(called: str = "kp-admin", calling: str = "kp-tests") -> tuple[AE, Any]:
    ae = AE(ae_title=calling)
    # Explicit VR only: what the SCU sends is then byte for byte what pydicom wrote.
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    ae.add_requested_context(CT, [ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae, called


def _associate(gw: RunningGateway, called: str = "kp-admin", calling: str = "kp-tests") -> Any:
    ae, called = _scu(called, calling)
    return ae.associate("127.0.0.1", gw.scp.port, ae_title=called)


def _store_all(gw: RunningGateway, paths: list[Path], **kw: str) -> list[int]:
    """Send files on one association (blocking; run via to_thread)."""
    assoc = _associate(gw, **kw)
    assert assoc.is_established
    statuses = []
    try:
        for path in paths:
            rsp = assoc.send_c_store(pydicom.dcmread(path))
            statuses.append(int(rsp.Status))
    finally:
        assoc.release()
    return statuses


async def _wait_indexed(gw: RunningGateway, count: int, timeout_s: float = 20) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            datasets = await gw.index.list_datasets("admin")
            if sum(d["instance_count"] for d in datasets) >= count:
                return
            await asyncio.sleep(0.05)


async def test_store_then_echo_on_loopback(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """C-ECHO and C-STORE answer 0x0000; the instance is stored, indexed and complete."""
    gw = await make_gateway(make_config())
    paths = make_ct_series(tmp_path / "s", 3)

    def echo() -> int:
        assoc = _associate(gw)
        try:
            return int(assoc.send_c_echo().Status)
        finally:
            assoc.release()

    assert await asyncio.to_thread(echo) == 0
    assert await asyncio.to_thread(_store_all, gw, paths) == [0, 0, 0]
    await _wait_indexed(gw, 3)
    series_uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    async with asyncio.timeout(10):
        while not (await gw.index.get_series(series_uid) or {}).get("complete"):
            await asyncio.sleep(0.05)
    document = (await gw.index.get_series(series_uid) or {})["document"]
    assert document["00000000 IsSeriesComplete_boolean"] is True
    assert document["00000000 MinInstanceNumber_integer"] == 1
    assert document["00000000 MaxInstanceNumber_integer"] == 3


async def test_same_sop_instance_again_replaces_it(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """A second copy of the same SOPInstanceUID replaces the first and is answered 0x0000."""
    gw = await make_gateway(make_config())
    path = make_ct_series(tmp_path / "s", 1)[0]
    ds = pydicom.dcmread(path)
    ds.SeriesDescription = "second copy"
    second = tmp_path / "second.dcm"
    ds.save_as(second)
    assert await asyncio.to_thread(_store_all, gw, [path]) == [0]
    await _wait_indexed(gw, 1)
    assert await asyncio.to_thread(_store_all, gw, [second]) == [0]
    key = await gw.index.instance_key(*instance_uids(ds))
    assert key is not None
    stored = gw.cfg.data_dir / key
    async with asyncio.timeout(10):
        while b"second copy" not in stored.read_bytes():
            await asyncio.sleep(0.05)
    assert len(await gw.index.list_instances(str(ds.SeriesInstanceUID))) == 1


async def test_unknown_project_association_rejected(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    """A-ASSOCIATE-RJ rejected-permanent, called AE title not recognised (PS3.8 9.3.4)."""
    gw = await make_gateway(make_config())
    assoc = await asyncio.to_thread(_associate, gw, "kp-ghost")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)


async def test_pipeline_saturated_answers_a700_and_keeps_nothing(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """With the store stage stuck and tiny queues, C-STORE gets 0xA700 after the admission wait."""
    cfg = make_config(
        pipeline__queue_size=1, pipeline__store_workers=1, dicom__admission_wait_s=0.2
    )
    gw = await make_gateway(cfg)
    release = asyncio.Event()
    real_put = gw.storage.put_files

    async def stuck_put(items: Any) -> list[int]:  # fault injection: a storage that hangs
        await release.wait()
        return await real_put(items)

    monkeypatch.setattr(gw.storage, "put_files", stuck_put)
    paths = make_ct_series(tmp_path / "s", 5)
    statuses = await asyncio.to_thread(_store_all, gw, paths)
    assert statuses[0] == 0
    assert 0xA700 in statuses
    assert 0xC211 not in statuses
    accepted = statuses.count(0)
    release.set()
    await _wait_indexed(gw, accepted)
    spooled = list((gw.cfg.data_dir / "spool").glob("**/*.dcm"))
    async with asyncio.timeout(10):
        while spooled:
            await asyncio.sleep(0.05)
            spooled = list((gw.cfg.data_dir / "spool").glob("**/*.dcm"))
    stored = list((gw.cfg.data_dir / "dicom").glob("**/*.dcm"))
    assert len(stored) == accepted  # refused instances were not kept


async def test_slow_stage_slows_sender_and_loses_nothing(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """Tiny queues + a slow stage: the sender is held back, queues stay bounded, all stored."""
    cfg = make_config(pipeline__queue_size=2, pipeline__store_workers=1, dicom__admission_wait_s=30)
    gw = await make_gateway(cfg)
    real_put = gw.storage.put_files
    peak = 0

    async def slow_put(items: Any) -> list[int]:  # fault injection: a slow disk
        nonlocal peak
        peak = max(peak, gw.ingest.readiness()["in_flight"])
        await asyncio.sleep(0.01 * len(items))
        return await real_put(items)

    monkeypatch.setattr(gw.storage, "put_files", slow_put)
    first = make_ct_series(tmp_path / "a", 40)
    second = make_ct_series(tmp_path / "b", 40)
    results = await asyncio.gather(
        asyncio.to_thread(_store_all, gw, first, calling="kp-one"),
        asyncio.to_thread(_store_all, gw, second, calling="kp-two"),
    )
    assert results == [[0] * 40, [0] * 40]
    # Queue store 2 + its worker 1 + queue index 2 + index worker batch (<= 2) + senders 2.
    assert peak <= 9
    await _wait_indexed(gw, 80)


async def test_garbage_dataset_answered_c210_and_not_stored(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """Bytes that are not a dataset get 0xC210 (cannot understand), never 0xC211."""
    gw = await make_gateway(make_config())

    # A Part-10 file with valid file meta and garbage where the dataset should be.
    garbage = tmp_path / "garbage.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    with garbage.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        fh.write(b"\x01\x02\x03garbage-not-a-dataset" * 8)

    def send_garbage() -> int:
        # Chunked sending streams the file's bytes without decoding them, as a broken peer would.
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        assoc = _associate(gw)
        try:
            return int(assoc.send_c_store(garbage).Status)
        finally:
            assoc.release()

    assert await asyncio.to_thread(send_garbage) == 0xC210
    assert not list((gw.cfg.data_dir / "spool" / "incoming").glob("*/*.dcm"))
    assert not (gw.cfg.data_dir / "dicom").exists()


async def test_bad_peers_do_not_disturb_a_valid_association(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """Garbage bytes, a half-open socket and a 4 GiB PDU claim leave a concurrent store intact."""
    gw = await make_gateway(make_config())
    port = gw.scp.port
    half_open = socket.create_connection(("127.0.0.1", port))  # never speaks
    garbage = socket.create_connection(("127.0.0.1", port))
    garbage.sendall(b"\x99" * 64)
    huge = socket.create_connection(("127.0.0.1", port))
    # An A-ASSOCIATE-RQ header that claims 4 GiB - 1 of payload.
    huge.sendall(struct.pack(">BBL", 0x01, 0x00, 0xFFFFFFFF) + b"\x00" * 64)
    try:
        paths = make_ct_series(tmp_path / "s", 20)
        assert await asyncio.to_thread(_store_all, gw, paths) == [0] * 20
        # A 4 GiB PDU claim is refused at once: the connection is closed, nothing allocated.
        assert await asyncio.to_thread(_read_until_closed, huge) == b""
        # Garbage gets an A-ABORT PDU right away (PS3.8 AA-1); the ARTIM timer then bounds
        # how long the socket may linger.
        garbage.settimeout(10)
        assert (await asyncio.to_thread(garbage.recv, 10))[:1] == b"\x07"
        await _wait_indexed(gw, 20)
    finally:
        for sock in (half_open, garbage, huge):
            sock.close()


def _read_until_closed(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything the peer sends until it closes; fails if it is still open after timeout_s."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.mark.parametrize("mode", ["chunked", "memory"])
async def test_receive_modes_store_identical_bytes(
    mode: str, make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """Both receive paths store the dataset bytes exactly as sent."""
    gw = await make_gateway(make_config(dicom__receive_mode=mode))
    path = make_ct_series(tmp_path / "s", 1, rows=128)[0]
    assert await asyncio.to_thread(_store_all, gw, [path]) == [0]
    await _wait_indexed(gw, 1)
    key = await gw.index.instance_key(*instance_uids(path))
    assert key is not None
    assert dataset_bytes(gw.cfg.data_dir / key) == dataset_bytes(path)


async def test_reactor_threads_are_woken_not_polled(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """With a 3 s idle interval, C-STOREs, a release and a peer's abort still go at once.

    Each C-STORE needs several hand-overs between an association's two threads; if any of them
    waited for the idle interval instead of being woken, 30 instances would take minutes.
    """
    gw = await make_gateway(make_config(dicom__poll_interval_s=3.0))
    paths = make_ct_series(tmp_path / "s", 30)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.to_thread(_store_all, gw, paths) == [0] * 30
    assert loop.time() - started < 20  # polled: >= 30 * 3 s
    await _wait_indexed(gw, 30)

    assoc = await asyncio.to_thread(_associate, gw)
    assert assoc.is_established
    await asyncio.sleep(0.5)  # let both threads settle into their idle wait
    started = loop.time()
    await asyncio.to_thread(assoc.abort)
    async with asyncio.timeout(10):
        while gw.scp.ae.active_associations:
            await asyncio.sleep(0.05)
    assert loop.time() - started < 2.5  # within one idle interval: woken by the A-ABORT


async def test_received_datasets_go_into_precreated_spool_files(
    make_config: Callable[..., Any], tmp_path: Path
) -> None:
    """A C-STORE takes a spool file made ahead of time; none is left in the spool at stop."""
    cfg = make_config()
    paths = make_ct_series(tmp_path / "s", 5, rows=64)
    async with running(cfg) as gw:
        reserve = gw.scp.precreated_files
        assert reserve is not None
        async with asyncio.timeout(10):
            while reserve.available < PRECREATED_SPOOL_FILES:
                await asyncio.sleep(0.01)
        assert await asyncio.to_thread(_store_all, gw, paths) == [0] * 5
        await _wait_indexed(gw, 5)
        assert reserve.created_in_place == 0  # every dataset went into a precreated file
        for path in paths:
            key = await gw.index.instance_key(*instance_uids(path))
            assert key is not None
            assert dataset_bytes(cfg.data_dir / key) == dataset_bytes(path)
        receiving = gw.spool.receiving
        assert len(list(receiving.iterdir())) >= PRECREATED_SPOOL_FILES
        assert list(gw.spool.tmp.iterdir()) == []
    assert list(receiving.iterdir()) == []


class _SmallPduDIMSE(DIMSEServiceProvider):
    @property
    def maximum_pdu_size(self) -> int:
        return 16384


async def test_association_aborted_mid_dataset_leaves_no_spool_file(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """A peer that aborts while its data set is arriving leaves nothing in the spool."""
    gw = await make_gateway(make_config())
    receiving = gw.spool.receiving
    path = make_ct_series(tmp_path / "s", 1, rows=2048)[0]  # 8 MiB: several PDUs
    dataset = pydicom.dcmread(path)
    assoc = await asyncio.to_thread(_associate, gw)
    assert assoc.is_established
    # We accept any PDU size; make this SCU send 16 KiB PDUs, 2 ms apart, so the data set
    # takes about a second.
    assoc.dimse.__class__ = _SmallPduDIMSE
    send_pdu = assoc.dul.send_pdu
    aborting = threading.Event()

    def paced_send_pdu(primitive: Any) -> None:
        if isinstance(primitive, P_DATA):
            time.sleep(0.002)
            if aborting.is_set():  # pynetdicom's sending thread would trip over the abort
                return
        send_pdu(primitive)

    assoc.dul.send_pdu = paced_send_pdu
    sending = asyncio.create_task(asyncio.to_thread(assoc.send_c_store, dataset))

    def partial_files() -> list[Path]:
        return [p for p in receiving.iterdir() if p.stat().st_size > 0]

    async with asyncio.timeout(20):
        while not partial_files():
            await asyncio.sleep(0.001)
    aborting.set()
    await asyncio.to_thread(assoc.abort)
    await asyncio.gather(sending, return_exceptions=True)
    # Deleted by the association's DUL thread as it ends.
    async with asyncio.timeout(10):
        while gw.scp.ae.active_associations or partial_files():
            await asyncio.sleep(0.05)
    assert not any(gw.spool.incoming.rglob("*.dcm"))
    assert await gw.index.instance_key(*instance_uids(dataset)) is None


async def test_spool_write_failure_answers_a700_and_keeps_nothing(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """A spool file that cannot be written (here: /dev/full) is out of resources, not a crash."""
    gw = await make_gateway(make_config())
    reserve = gw.scp.precreated_files
    assert reserve is not None

    names = iter(range(1000))

    def full_disk_file() -> SpoolFile:  # fault injection: a disk with no space left
        # A link of our own: pynetdicom unlinks the file's name after the handler.
        full = tmp_path / f"full-{next(names)}"
        full.symlink_to("/dev/full")
        return SpoolFile(str(full), os.open(full, os.O_WRONLY))

    reserve.take = full_disk_file  # type: ignore[method-assign]
    paths = make_ct_series(tmp_path / "s", 2, rows=64)
    assert await asyncio.to_thread(_store_all, gw, paths) == [0xA700, 0xA700]
    assert not any(gw.spool.incoming.rglob("*.dcm"))
    assert await gw.index.list_datasets("admin") == []


async def test_dataset_spooled_by_pynetdicom_itself_is_committed_too(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """Without precreated files (pynetdicom's own temporary file), the same bytes are stored.

    The fallback for a pynetdicom whose chunked receive no longer takes our files.
    """
    gw = await make_gateway(make_config())
    server = gw.scp._server
    assert server is not None
    server.spool_files = None  # new associations get no precreated files
    paths = make_ct_series(tmp_path / "s", 2, rows=64)
    assert await asyncio.to_thread(_store_all, gw, paths) == [0, 0]
    await _wait_indexed(gw, 2)
    reserve = gw.scp.precreated_files
    assert reserve is not None and reserve.created_in_place == 0
    for path in paths:
        key = await gw.index.instance_key(*instance_uids(path))
        assert key is not None
        assert dataset_bytes(gw.cfg.data_dir / key) == dataset_bytes(path)
