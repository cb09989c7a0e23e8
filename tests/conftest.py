"""Shared fixtures: configs, an in-process gateway, a gateway subprocess, DICOM test data."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from kp_gateway.app import RunningGateway, running
from kp_gateway.config import Config, load

REPO = Path(__file__).resolve().parent.parent
PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

# Debian's Chromium, driven by Playwright for Python (never its own browser download). The
# flags keep it from reaching for the network this machine does not have.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "test-artifacts"

requires_dcmtk = pytest.mark.skipif(
    shutil.which("dcmsend") is None,
    reason="DCMTK (dcmsend) is not installed; `make test` installs it",
)


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


_EPHEMERAL = _ephemeral_ports()
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """An unused TCP port on 127.0.0.1, outside the kernel's ephemeral range.

    A port the kernel hands out with bind(0) is an ephemeral one: between this check and the
    gateway's own bind a second later, any outgoing connection on the machine may take it
    (seen once in a full run beside a test holding 1,100 connections). Ports below the
    ephemeral range are only ever taken by an explicit bind.
    """
    candidates = [p for p in range(20000, 32768) if p not in _EPHEMERAL and p not in _HANDED_OUT]
    for port in random.sample(candidates, 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)  # never twice in one run: a gateway's two ports must differ
        return port
    raise AssertionError("no free TCP port between 20000 and the ephemeral range")


def gateway_overrides(data_dir: Path, **extra: Any) -> dict[str, Any]:
    """Config overrides for a loopback test gateway on OS-assigned ports."""
    overrides: dict[str, Any] = {
        "storage.path": str(data_dir),
        "dicom.host": "127.0.0.1",
        "dicom.port": 0,
        "http.host": "127.0.0.1",
        "http.port": 0,
        "http.auth": False,
        "pipeline.series_idle_s": 0.5,
        "pipeline.process_pool_size": 1,
        "dicomweb.process_pool_size": 1,
        "dicom.min_free_bytes": 0,
    }
    overrides.update({k.replace("__", "."): v for k, v in extra.items()})
    return overrides


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """``make_config(**overrides)``: a validated config on a fresh data dir (dots as ``__``)."""

    def make(**extra: Any) -> Config:
        return load(None, environ={}, overrides=gateway_overrides(tmp_path / "data", **extra))

    return make


@pytest.fixture
async def make_gateway() -> AsyncIterator[Callable[[Config], Any]]:
    """Factory starting in-process gateways; stops all of them at teardown."""
    stack = contextlib.AsyncExitStack()

    async def start(cfg: Config) -> RunningGateway:
        return await stack.enter_async_context(running(cfg))

    async with stack:
        yield start


def make_ct_series(
    folder: Path,
    count: int,
    *,
    rows: int = 32,
    study_uid: str | None = None,
    series_uid: str | None = None,
    start_number: int = 1,
    patient_id: str = "P0001",
) -> list[Path]:
    """Write `count` synthetic CT slices (Part-10, explicit VR little endian); returns paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    paths = []
    for i in range(count):
        number = start_number + i
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientID = patient_id
        ds.PatientName = "Test^Patient"
        ds.StudyDate = "20240315"
        ds.SeriesDate = "20240315"
        ds.StudyTime = "101500"
        ds.SeriesDescription = "Synthetic CT"
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [0.0, 0.0, float(number)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 1.0
        ds.Rows = rows
        ds.Columns = rows
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        pixels = (np.arange(rows * rows, dtype=np.int16).reshape(rows, rows) + number) % 2000
        ds.PixelData = pixels.astype(np.int16).tobytes()
        path = folder / f"slice{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def tissue_segment(number: int, label: str, display_color: Any = None) -> Any:
    """A MANUAL SEG segment coded as SCT Tissue (what the tests need, nothing more)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type="MANUAL",
        display_color=display_color,
    )


def write_segmentation(
    path: Path,
    sources: list[pydicom.Dataset],
    pixel_array: Any,
    segments: list[Any],
    *,
    segmentation_type: str = "BINARY",
    **attributes: Any,
) -> Any:
    """Build a highdicom SEG over `sources` with fresh UIDs, save it to `path`, return it."""
    import highdicom as hd

    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=segmentation_type,
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="kp-gateway tests",
        manufacturer_model_name="tests",
        software_versions="0",
        device_serial_number="0",
        **attributes,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return seg


@pytest.fixture(scope="session")
def dicom_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pydicom's own test files that DCMTK can send, one per SOPInstanceUID, in nested folders.

    Covers many transfer syntaxes (JPEG, JPEG 2000, RLE, deflate, big endian) and SOP classes
    (CT, MR, SC, SR, RT dose, waveform). Files DCMTK cannot parse are left out, since the
    user documentation's dcmsend command stops at the first unreadable file, and so are files
    the gateway refuses by design (cut short, or not what dcmsend's request says they are).
    """
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    from kp_gateway.uids import is_valid_uid
    from kp_gateway.upload.sniff import check_complete_instance

    if shutil.which("dcmdump") is None:
        pytest.skip("DCMTK (dcmdump) is not installed; `make test` installs it")
    out = tmp_path_factory.mktemp("corpus")
    seen: set[str] = set()
    for index, path in enumerate(sorted(PYDICOM_TEST_FILES.glob("*.dcm"))):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            sop = str(ds.SOPInstanceUID)
            uids = [str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID")]
            ok = (
                str(ds.file_meta.TransferSyntaxUID) in ALL_TRANSFER_SYNTAXES
                and all(is_valid_uid(u) for u in [sop, *uids])
                and str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")) == sop
                # dcmsend names the file meta's class in the request; a dataset of another
                # class is refused with 0xA900, as DCMTK's storescp does.
                and str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == str(ds.SOPClassUID)
                and sop not in seen
            )
            # Files cut short (MR_truncated.dcm) are refused before the acknowledgement.
            check_complete_instance(path)
        except Exception:  # noqa: BLE001 - any unreadable file is simply not part of the corpus
            continue
        if not ok:
            continue
        dump = subprocess.run(
            ["dcmdump", "-q", "+P", "0008,0018", str(path)], capture_output=True, text=True
        )
        # DCMTK must read the SOPInstanceUID as the dataset holds it: files encoded other than
        # their transfer syntax (rtdose_rle*.dcm) make dcmsend request another UID, refused
        # with 0xA900 (a confirmation under that UID would name nothing stored).
        if dump.returncode != 0 or f"UI [{sop}]" not in dump.stdout:
            continue
        seen.add(sop)
        target = out / f"folder{index % 3}" / "sub" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    assert len(seen) >= 20, "too few usable pydicom test files"
    return out


def instance_uids(source: Path | Dataset) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID): what names an instance in the index."""
    ds = pydicom.dcmread(source, stop_before_pixels=True) if isinstance(source, Path) else source
    return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part-10 file after its file meta group (what C-STORE transfers)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", path
    meta_length = int.from_bytes(data[140:144], "little")
    return data[144 + meta_length :]


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: Nagle off, or every receiver stalls at ~20 instances/s."""
    return {**os.environ, "TCP_NODELAY": "1"}


def run_dcmsend(port: int, folder: Path, *, calling: str, called: str, **kw: Any) -> Any:
    """The user documentation's command, verbatim apart from host and port."""
    command = [
        "dcmsend", "-v", "127.0.0.1", str(port),
        "--aetitle", calling, "--call", called,
        "--scan-directories", "--scan-pattern", "*.dcm", "--recurse", str(folder),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=dcmtk_env(), **kw)


class GatewayProcess:
    """``python -m kp_gateway serve`` as a subprocess on loopback ports."""

    def __init__(self, data_dir: Path, **extra: Any) -> None:
        self.data_dir = data_dir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"gateway-{self.dicom_port}.log"

    def start(self) -> GatewayProcess:
        overrides = gateway_overrides(self.data_dir, **self.extra)
        overrides["dicom.port"] = self.dicom_port
        overrides["http.port"] = self.http_port
        args = [sys.executable, "-m", "kp_gateway", "serve"]
        for key, value in overrides.items():
            args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.wait_ready()
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get_json(self, path: str) -> Any:
        import json
        import urllib.request

        with urllib.request.urlopen(self.url(path), timeout=10) as response:
            return json.load(response)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited early:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url("/health/ready"), timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway not ready in {timeout_s} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory for gateway subprocesses; every one is stopped at teardown."""
    started: list[GatewayProcess] = []

    def start(data_dir: Path | None = None, **extra: Any) -> GatewayProcess:
        gw = GatewayProcess(data_dir or tmp_path / "data", **extra).start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.stop()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    """Poll `predicate` every 50 ms until true, or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs of its own: its free space moves only with what the test writes (the
    shared disk's moves with every other process). Needs root, as CI and `make test` run."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (root needed): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


@contextlib.contextmanager
def held_connections(
    port: int, count: int, first_bytes: bytes = b"", source: str = "127.0.0.1"
) -> Iterator[list[socket.socket]]:
    """`count` TCP connections to 127.0.0.1:`port` from `source`, each sending `first_bytes`
    and then nothing: the attacker of the hostile-peer tests. Closed on exit."""
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(
                ("127.0.0.1", port), timeout=10, source_address=(source, 0)
            )
            if first_bytes:
                s.sendall(first_bytes)
            opened.append(s)
        yield opened
    finally:
        for s in opened:
            s.close()


def closed_by_peer(s: socket.socket) -> bool:
    """Whether the other end has closed `s` (read without waiting)."""
    s.setblocking(False)
    try:
        return s.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def echoscu(port: int, called: str = "kp-admin") -> subprocess.CompletedProcess[bytes]:
    """DCMTK echoscu to 127.0.0.1:`port`: the real sender that must keep getting through."""
    return subprocess.run(
        ["echoscu", "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        env=dcmtk_env(),
        timeout=60,
    )
