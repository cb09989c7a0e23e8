"""Ingestion benchmark: kp-gateway against DCMTK ``storescp`` and Orthanc, on loopback.

One run generates two workloads with pydicom (a CT series of 512x512 int16 slices and many small
64x64 MR-like instances), then, for every workload, every number of parallel senders and every
receiver, starts a fresh receiver in a temporary directory, sends the workload with ``dcmsend``
and measures:

- wall time of the send (first ``dcmsend`` start to last ``dcmsend`` exit), instances/s, MiB/s;
- peak RSS of the receiver and all its descendant processes (sampled from ``/proc``);
- for the gateway, the time from the last ``dcmsend`` exit until every instance is searchable
  through the HTTP API (series list and dataset instance count).

Each measurement is repeated ``--repeat`` times; the table shows medians, the JSON file in
``bench/results/`` holds every raw sample. See ``bench/README.md``.

Run with the repository's venv: ``.venv/bin/python bench/run_bench.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
MIB = 1024 * 1024
RECEIVERS = ("gateway", "storescp", "orthanc")
SMALL_SERIES_SIZE = 100
POLL_S = 0.05
RSS_SAMPLE_S = 0.02
CALLING_AE = "kp-bench"
CALLED_AE = "kp-admin"
DATASET = "bench"
PROJECT = "admin"
# DCMTK keeps Nagle's algorithm on unless told otherwise; every receiver then stalls.
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}


class BenchError(Exception):
    """A measurement failed (send error, receiver crash, missing instances, timeout)."""


# -- data generation --------------------------------------------------------------------------


@dataclass
class Workload:
    """A generated set of DICOM files and how to split it across parallel senders."""

    name: str
    root: Path
    files: list[Path]
    n_series: int
    total_bytes: int
    splits: dict[int, list[Path]] = field(default_factory=dict)

    @property
    def n_instances(self) -> int:
        """Number of instances (one file each)."""
        return len(self.files)

    def dirs_for(self, senders: int) -> list[Path]:
        """Directories to hand to ``senders`` parallel dcmsend processes (built once, linked)."""
        if senders in self.splits:
            return self.splits[senders]
        if senders == 1:
            dirs = [self.root / "all"]
        else:
            base = self.root / f"split{senders}"
            dirs = []
            chunk = -(-len(self.files) // senders)
            for i in range(senders):
                part = base / f"part{i}"
                part.mkdir(parents=True, exist_ok=True)
                for src in self.files[i * chunk : (i + 1) * chunk]:
                    dst = part / src.name
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copyfile(src, dst)
                dirs.append(part)
        self.splits[senders] = dirs
        return dirs


def _base_dataset(sop_class: str, modality: str, patient: str, study_uid: str) -> Dataset:
    """A dataset with patient/study/equipment modules filled in realistically."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.StudyDate = "20240115"
    ds.SeriesDate = "20240115"
    ds.AcquisitionDate = "20240115"
    ds.ContentDate = "20240115"
    ds.StudyTime = "093012.000000"
    ds.SeriesTime = "093512.000000"
    ds.AcquisitionTime = "093514.250000"
    ds.ContentTime = "093514.250000"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "KP Bench Imaging"
    ds.InstitutionName = "Benchmark Hospital"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StationName = "BENCH01"
    ds.StudyDescription = "Benchmark study"
    ds.ManufacturerModelName = "Synthetic 3000"
    ds.PatientName = f"Bench^{patient}"
    ds.PatientID = patient
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "054Y"
    ds.BodyPartExamined = "CHEST" if modality == "CT" else "HEAD"
    ds.StudyInstanceUID = study_uid
    ds.StudyID = "1"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _save(ds: Dataset, path: Path | BinaryIO) -> None:
    """Write ``ds`` as a Part 10 file, explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def part10_bytes(ds: Dataset) -> bytes:
    """``ds`` encoded as a Part 10 file (explicit VR little endian), in memory."""
    buf = io.BytesIO()
    _save(ds, buf)
    return buf.getvalue()


def iter_ct_slices(slices: int, rng: np.random.Generator) -> Iterator[Dataset]:
    """The datasets of one CT series of ``slices`` 512x512 int16 slices (phantom plus noise)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    yy, xx = np.mgrid[-256:256, -256:256]
    body = ((xx / 220.0) ** 2 + (yy / 160.0) ** 2) <= 1.0
    lung = (((xx - 90) / 60.0) ** 2 + (yy / 90.0) ** 2 <= 1.0) | (
        ((xx + 90) / 60.0) ** 2 + (yy / 90.0) ** 2 <= 1.0
    )
    phantom = np.where(body, 1040, 0).astype(np.int16)
    phantom[lung] = 200
    for i in range(slices):
        ds = _base_dataset(CTImageStorage, "CT", "BENCH-CT", study_uid)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesNumber = 2
        ds.SeriesDescription = "Thorax 1.0 B31f"
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        ds.SliceThickness = "1.0"
        ds.KVP = "120"
        ds.XRayTubeCurrent = 250
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "B31f"
        ds.ImagePositionPatient = [-249.5, -249.5, float(-i)]
        ds.SliceLocation = float(-i)
        ds.PixelSpacing = [0.976, 0.976]
        ds.Rows = 512
        ds.Columns = 512
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        noise = rng.integers(-20, 21, size=(512, 512), dtype=np.int16)
        ds.PixelData = (phantom + noise).tobytes()
        yield ds


def generate_ct(root: Path, slices: int, rng: np.random.Generator) -> Workload:
    """One CT series of ``slices`` 512x512 int16 slices (an elliptical phantom plus noise)."""
    out = root / "all"
    out.mkdir(parents=True)
    files: list[Path] = []
    for i, ds in enumerate(iter_ct_slices(slices, rng)):
        path = out / f"ct_{i:05d}.dcm"
        _save(ds, path)
        files.append(path)
    return Workload("ct", root, files, 1, sum(f.stat().st_size for f in files))


def generate_small(
    root: Path, count: int, rng: np.random.Generator, series_size: int = SMALL_SERIES_SIZE
) -> Workload:
    """``count`` 64x64 int16 MR instances in series of ``series_size`` (100 by default; several
    studies of one patient)."""
    out = root / "all"
    out.mkdir(parents=True)
    study_uid = generate_uid()
    series_uid = ""
    files: list[Path] = []
    n_series = 0
    yy, xx = np.mgrid[-32:32, -32:32]
    head = np.where((xx / 28.0) ** 2 + (yy / 30.0) ** 2 <= 1.0, 800, 0).astype(np.int16)
    for i in range(count):
        if i % series_size == 0:
            series_uid = generate_uid()
            n_series += 1
            if n_series % 5 == 1:
                study_uid = generate_uid()
        ds = _base_dataset(MRImageStorage, "MR", "BENCH-MR", study_uid)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesNumber = n_series
        ds.SeriesDescription = f"t1_se_tra {n_series}"
        ds.InstanceNumber = i % series_size + 1
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SP"
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = "12"
        ds.RepetitionTime = "500"
        ds.MagneticFieldStrength = "3"
        ds.SliceThickness = "4.0"
        ds.ImagePositionPatient = [-120.0, -120.0, float(4 * (i % series_size))]
        ds.PixelSpacing = [3.75, 3.75]
        ds.Rows = 64
        ds.Columns = 64
        ds.PixelData = (head + rng.integers(0, 50, size=(64, 64), dtype=np.int16)).tobytes()
        path = out / f"mr_{i:06d}.dcm"
        _save(ds, path)
        files.append(path)
    return Workload("small", root, files, n_series, sum(f.stat().st_size for f in files))


# -- process helpers --------------------------------------------------------------------------


def free_port() -> int:
    """A currently free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get_json(url: str, timeout: float = 2.0) -> Any:
    """GET ``url`` and decode its JSON body; raises on non-2xx."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (via /proc/<pid>/task/*/children)."""
    result, todo = [], [pid]
    while todo:
        p = todo.pop()
        result.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
            except OSError:
                pass
    return result


def status_kib(pid: int, key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style value (KiB) from /proc/<pid>/status, 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class RssSampler:
    """Polls the summed VmRSS of a process tree in a background thread and keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        pids = descendants(self.pid)
        total = sum(status_kib(p, "VmRSS") for p in pids)
        self.peak_kib = max(self.peak_kib, total, status_kib(self.pid, "VmHWM"))
        self.max_procs = max(self.max_procs, len(pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(RSS_SAMPLE_S)

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        """Peak RSS in MiB."""
        return self.peak_kib / 1024


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM ``proc``, wait up to ``timeout`` s, then SIGKILL; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            return None
    return proc.returncode


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a text file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- receivers --------------------------------------------------------------------------------


class Receiver:
    """A freshly started receiver in its own work directory; subclasses know how to start it."""

    name = "?"

    def __init__(self, workdir: Path, log_path: Path, opts: argparse.Namespace) -> None:
        self.workdir = workdir
        self.log_path = log_path
        self.opts = opts
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def command(self) -> list[str]:
        """The command line that starts the receiver."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """The receiver's environment."""
        return NODELAY_ENV

    def ready(self) -> bool:
        """True once the receiver accepts work."""
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        """Start the receiver and wait until it is ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} during start-up:\n"
                    + tail(self.log_path)
                )
            if self.ready():
                return
            time.sleep(0.1)
        raise BenchError(f"{self.name} not ready after {timeout:.0f} s:\n" + tail(self.log_path))

    def stop(self) -> int | None:
        """Stop the receiver (SIGTERM, then SIGKILL); returns its exit code."""
        rc = None
        if self.proc is not None:
            rc = stop_process(self.proc, self.opts.stop_timeout)
        if self._log is not None:
            self._log.close()
        return rc

    def count_stored(self) -> int:
        """How many instances the receiver holds (checked after every send)."""
        raise NotImplementedError

    def wait_searchable(self, workload: Workload, timeout: float) -> float | None:
        """Seconds until everything is searchable (gateway only; ``None`` elsewhere)."""
        return None

    def after(self, tag: str) -> None:
        """Called after a measurement, before stop (e.g. to save metrics)."""


class GatewayReceiver(Receiver):
    """kp-gateway with its default configuration plus loopback, no auth and a 1 s series idle."""

    name = "gateway"

    def __init__(self, workdir: Path, log_path: Path, opts: argparse.Namespace) -> None:
        super().__init__(workdir, log_path, opts)
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        sets = [
            "dicom.host=127.0.0.1",
            "http.host=127.0.0.1",
            "http.auth=false",
            "pipeline.series_idle_s=1",
            *self.opts.gateway_set,
        ]
        cmd = [
            self.opts.gateway_cmd,
            "serve",
            "--data-dir",
            str(self.workdir / "data"),
            "--dicom-port",
            str(self.port),
            "--http-port",
            str(self.http_port),
        ]
        for s in sets:
            cmd += ["--set", s]
        return cmd

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in NODELAY_ENV.items() if not k.startswith("KP_GATEWAY_")}
        return env

    def ready(self) -> bool:
        return http_ok(f"{self.base}/health/ready")

    def _counts(self) -> tuple[int, int]:
        """(series total in admin, instance_count of the bench dataset)."""
        series = http_get_json(f"{self.base}/api/projects/{PROJECT}/series?limit=500")
        datasets = http_get_json(f"{self.base}/api/projects/{PROJECT}/datasets")
        instances = 0
        for item in datasets.get("items", []):
            if item.get("name") == DATASET:
                instances = int(item.get("instance_count", 0))
        return int(series.get("total", 0)), instances

    def wait_searchable(self, workload: Workload, timeout: float) -> float | None:
        start = time.monotonic()
        last: tuple[int, int] = (0, 0)
        while True:
            try:
                last = self._counts()
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last = (-1, -1)
                if self.proc is not None and self.proc.poll() is not None:
                    raise BenchError(f"gateway died while polling: {exc}") from exc
            if last[0] >= workload.n_series and last[1] >= workload.n_instances:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise BenchError(
                    f"not searchable after {timeout:.0f} s: series {last[0]}/{workload.n_series},"
                    f" instances {last[1]}/{workload.n_instances}"
                )
            time.sleep(POLL_S)

    def count_stored(self) -> int:
        return self._counts()[1]

    def after(self, tag: str) -> None:
        try:
            with urllib.request.urlopen(f"{self.base}/metrics", timeout=5) as resp:
                (self.log_path.parent / f"{tag}.metrics.txt").write_bytes(resp.read())
        except (urllib.error.URLError, OSError):
            pass


class StorescpReceiver(Receiver):
    """DCMTK storescp (single process), writing every received object to a file."""

    name = "storescp"

    def command(self) -> list[str]:
        out = self.workdir / "out"
        out.mkdir(parents=True, exist_ok=True)
        cmd = ["storescp", "+xa", "-od", str(out), "+uf", "-dhl", "-aet", "STORESCP"]
        if self.opts.storescp_fork:
            cmd.append("--fork")
        return [*cmd, str(self.port)]

    def ready(self) -> bool:
        r = subprocess.run(
            ["echoscu", "-to", "2", "-aec", "STORESCP", "127.0.0.1", str(self.port)],
            env=NODELAY_ENV,
            capture_output=True,
            timeout=10,
            check=False,
        )
        return r.returncode == 0

    def count_stored(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.workdir / "out"))


class OrthancReceiver(Receiver):
    """Orthanc with SQLite index and file storage in the work dir, fsync (SyncStorageArea) on."""

    name = "orthanc"

    def __init__(self, workdir: Path, log_path: Path, opts: argparse.Namespace) -> None:
        super().__init__(workdir, log_path, opts)
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        config = {
            "Name": "kp-bench-orthanc",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": "ORTHANC",
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "SyncStorageArea": True,
            "SaveJobs": False,
            "WebDavEnabled": False,
            "OrthancExplorerEnabled": False,
            "LuaScripts": [],
            "DicomModalities": {},
            "OrthancPeers": {},
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return ["Orthanc", str(path)]

    def ready(self) -> bool:
        return http_ok(f"{self.base}/system")

    def count_stored(self) -> int:
        return int(http_get_json(f"{self.base}/statistics")["CountInstances"])


RECEIVER_CLASSES: dict[str, type[Receiver]] = {
    "gateway": GatewayReceiver,
    "storescp": StorescpReceiver,
    "orthanc": OrthancReceiver,
}


# -- sending ----------------------------------------------------------------------------------


def send(port: int, dirs: Sequence[Path], log_dir: Path, tag: str, timeout: float) -> float:
    """Run one dcmsend per directory in parallel; returns wall seconds (start to last exit)."""
    procs: list[tuple[subprocess.Popen[bytes], Path, Any]] = []
    start = time.monotonic()
    try:
        for i, d in enumerate(dirs):
            log = log_dir / f"{tag}.dcmsend{i}.log"
            fh = open(log, "wb")  # noqa: SIM115 - closed below
            cmd = [
                "dcmsend",
                "127.0.0.1",
                str(port),
                "--aetitle",
                CALLING_AE,
                "--call",
                CALLED_AE,
                "--timeout",
                "10",
                "--dimse-timeout",
                "120",
                "--scan-directories",
                "--recurse",
                str(d),
            ]
            p = subprocess.Popen(cmd, env=NODELAY_ENV, stdout=fh, stderr=subprocess.STDOUT)
            procs.append((p, log, fh))
        deadline = start + timeout
        for p, _, _ in procs:
            p.wait(max(0.1, deadline - time.monotonic()))
        wall = time.monotonic() - start
    except subprocess.TimeoutExpired as exc:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        raise BenchError(f"dcmsend did not finish within {timeout:.0f} s") from exc
    finally:
        for _, _, fh in procs:
            fh.close()
    failed = [(p.returncode, log) for p, log, _ in procs if p.returncode != 0]
    if failed:
        rc, log = failed[0]
        raise BenchError(f"{len(failed)} dcmsend exited non-zero (first: {rc}):\n" + tail(log))
    for _, log, _ in procs:
        if log.stat().st_size == 0:
            log.unlink()
    return wall


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Sample:
    """One measurement: one workload sent by N senders to one fresh receiver."""

    workload: str
    senders: int
    receiver: str
    repeat: int
    instances: int
    bytes: int
    ok: bool = False
    error: str = ""
    wall_s: float | None = None
    instances_per_s: float | None = None
    mib_per_s: float | None = None
    peak_rss_mib: float | None = None
    max_processes: int | None = None
    searchable_s: float | None = None
    stored: int | None = None
    receiver_exit: int | None = None
    loadavg_1m: float | None = None


def measure(
    receiver_name: str,
    workload: Workload,
    senders: int,
    repeat: int,
    work_base: Path,
    log_dir: Path,
    opts: argparse.Namespace,
) -> Sample:
    """Start a fresh receiver, send the workload, measure, check and stop the receiver."""
    tag = f"{workload.name}-s{senders}-{receiver_name}-r{repeat}"
    sample = Sample(
        workload.name,
        senders,
        receiver_name,
        repeat,
        workload.n_instances,
        workload.total_bytes,
    )
    sample.loadavg_1m = os.getloadavg()[0]
    workdir = work_base / tag
    rx = RECEIVER_CLASSES[receiver_name](workdir, log_dir / f"{tag}.{receiver_name}.log", opts)
    dirs = workload.dirs_for(senders)
    try:
        rx.start()
        assert rx.proc is not None
        with RssSampler(rx.proc.pid) as rss:
            try:
                wall = send(rx.port, dirs, log_dir, tag, opts.send_timeout)
                sample.wall_s = wall
                sample.instances_per_s = workload.n_instances / wall
                sample.mib_per_s = workload.total_bytes / MIB / wall
                sample.searchable_s = rx.wait_searchable(workload, opts.searchable_timeout)
            finally:
                sample.peak_rss_mib = rss.peak_mib
                sample.max_processes = rss.max_procs
        sample.stored = rx.count_stored()
        if sample.stored != workload.n_instances:
            raise BenchError(f"receiver holds {sample.stored}/{workload.n_instances} instances")
        rx.after(tag)
        sample.ok = True
    except (BenchError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    finally:
        sample.receiver_exit = rx.stop()
        # The receiver's files stay until the run's temporary directory goes at the end:
        # deleting thousands of files right before the next measurement slows that receiver's
        # file creation (ext4 without a journal, as on our machines, scans the inodes deleted
        # in the last 30 s for every new file), whichever receiver comes next.
        os.sync()  # keep one receiver's writeback out of the next measurement
    if sample.ok and receiver_name == "gateway" and sample.receiver_exit not in (0, None):
        sample.ok = False
        sample.error = f"gateway exited {sample.receiver_exit} on SIGTERM"
    if not sample.ok:
        print(f"    FAILED: {sample.error}\n    log: {rx.log_path}", file=sys.stderr)
    return sample


# -- report -----------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    """Median of the non-None values, None if there are none."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    """One row per (workload, senders, receiver): medians over successful samples."""
    keys: list[tuple[str, int, str]] = []
    for s in samples:
        k = (s.workload, s.senders, s.receiver)
        if k not in keys:
            keys.append(k)
    rows = []
    for wl, n, rx in keys:
        group = [s for s in samples if (s.workload, s.senders, s.receiver) == (wl, n, rx)]
        good = [s for s in group if s.ok]
        rows.append(
            {
                "workload": wl,
                "senders": n,
                "receiver": rx,
                "runs_ok": len(good),
                "runs": len(group),
                "instances_per_s": median([s.instances_per_s for s in good]),
                "mib_per_s": median([s.mib_per_s for s in good]),
                "peak_rss_mib": median([s.peak_rss_mib for s in good]),
                "searchable_s": median([s.searchable_s for s in good]),
                "searchable_max_s": max(
                    (s.searchable_s for s in good if s.searchable_s is not None), default=None
                ),
            }
        )
    for row in rows:
        ref = next(
            (
                r
                for r in rows
                if (r["workload"], r["senders"], r["receiver"])
                == (row["workload"], row["senders"], "storescp")
            ),
            None,
        )
        rate, ref_rate = row["instances_per_s"], ref["instances_per_s"] if ref else None
        row["ratio_to_storescp"] = rate / ref_rate if rate and ref_rate else None
    return rows


def fmt(value: float | None, spec: str) -> str:
    """Format a number or '-' for missing."""
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> str:
    """Render the summary table (also returned as text)."""
    head = (
        f"{'workload':<8} {'senders':>7} {'receiver':<9} {'inst/s':>8} {'MiB/s':>8} "
        f"{'x storescp':>10} {'peak RSS MiB':>12} {'searchable s':>12} {'runs ok':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['workload']:<8} {r['senders']:>7} {r['receiver']:<9} "
            f"{fmt(r['instances_per_s'], '.1f'):>8} {fmt(r['mib_per_s'], '.1f'):>8} "
            f"{fmt(r['ratio_to_storescp'], '.2f'):>10} {fmt(r['peak_rss_mib'], '.0f'):>12} "
            f"{fmt(r['searchable_s'], '.2f'):>12} {r['runs_ok']:>3}/{r['runs']:<3}"
        )
    text = "\n".join(line.rstrip() for line in lines)
    print(text)
    return text


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets (gateway vs Orthanc, time to searchable) per number of senders."""
    by = {(r["workload"], r["senders"], r["receiver"]): r for r in rows}
    result = []
    for n in sorted({r["senders"] for r in rows}):
        for wl, factor in (("ct", 1.0), ("small", 0.8)):
            gw, oc = by.get((wl, n, "gateway")), by.get((wl, n, "orthanc"))
            if not gw or not oc or gw["instances_per_s"] is None or not oc["instances_per_s"]:
                continue
            goal = factor * oc["instances_per_s"]
            result.append(
                {
                    "target": f"{wl} rate >= {factor:g} x Orthanc",
                    "senders": n,
                    "value": gw["instances_per_s"],
                    "goal": goal,
                    "pass": gw["instances_per_s"] >= goal,
                    "detail": f"gateway {gw['instances_per_s']:.1f} inst/s vs "
                    f"{factor:g} x orthanc {oc['instances_per_s']:.1f} = {goal:.1f} "
                    f"(ratio {gw['instances_per_s'] / oc['instances_per_s']:.2f})",
                }
            )
        for wl in ("ct", "small"):
            gw = by.get((wl, n, "gateway"))
            if not gw or gw["searchable_max_s"] is None:
                continue
            result.append(
                {
                    "target": f"{wl} searchable <= 2 s",
                    "senders": n,
                    "value": gw["searchable_max_s"],
                    "goal": 2.0,
                    "pass": gw["searchable_max_s"] <= 2.0,
                    "detail": f"median {gw['searchable_s']:.2f} s, "
                    f"worst {gw['searchable_max_s']:.2f} s after the last dcmsend exit",
                }
            )
    return result


def tool_versions() -> dict[str, str]:
    """Versions of the programs and libraries involved."""
    out: dict[str, str] = {
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "numpy": np.__version__,
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
    }
    for name, cmd in (("dcmtk", ["dcmsend", "--version"]), ("orthanc", ["Orthanc", "--version"])):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            out[name] = (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            out[name] = "unavailable"
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        out["kp-gateway"] = version("kp-gateway")
        out["pynetdicom"] = version("pynetdicom")
    return out


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    default_gw = Path(sys.executable).parent / "kp-gateway"
    if not default_gw.exists():
        default_gw = REPO_DIR / ".venv" / "bin" / "kp-gateway"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--ct-slices", type=int, default=200, help="CT slices (512x512 int16)")
    p.add_argument("--small-count", type=int, default=2000, help="small 64x64 instances")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of each measurement")
    p.add_argument("--senders", default="1,4", help="parallel dcmsend counts, comma separated")
    p.add_argument("--receivers", default=",".join(RECEIVERS), help="comma separated subset")
    p.add_argument("--workloads", default="ct,small", help="comma separated subset of ct,small")
    p.add_argument(
        "--gateway-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra --set for the gateway (repeatable), e.g. dicom.receive_mode=memory",
    )
    p.add_argument("--gateway-cmd", default=str(default_gw), help="the kp-gateway executable")
    p.add_argument("--storescp-fork", action="store_true", help="run storescp with --fork")
    p.add_argument("--quick", action="store_true", help="tiny sizes, repeat 1 (smoke check)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--tmp-dir", default=None, help="parent of the temporary directory")
    p.add_argument("--results-dir", default=str(BENCH_DIR / "results"))
    p.add_argument("--send-timeout", type=float, default=300.0, help="seconds per send")
    p.add_argument("--searchable-timeout", type=float, default=60.0, help="seconds")
    p.add_argument("--stop-timeout", type=float, default=90.0, help="seconds to wait on SIGTERM")
    p.add_argument(
        "--time-budget", type=float, default=1500.0, help="skip measurements after this many s"
    )
    p.add_argument("--seed", type=int, default=1234)
    opts = p.parse_args(argv)
    if opts.quick:
        opts.ct_slices, opts.small_count, opts.repeat = 12, 120, 1
    opts.sender_counts = [int(x) for x in opts.senders.split(",") if x.strip()]
    opts.receiver_names = [x.strip() for x in opts.receivers.split(",") if x.strip()]
    opts.workload_names = [x.strip() for x in opts.workloads.split(",") if x.strip()]
    unknown = set(opts.receiver_names) - set(RECEIVERS)
    if unknown:
        p.error(f"unknown receivers: {sorted(unknown)}")
    if set(opts.workload_names) - {"ct", "small"}:
        p.error("workloads are ct and small")
    if any(n < 1 for n in opts.sender_counts) or opts.repeat < 1:
        p.error("--senders and --repeat must be >= 1")
    return opts


def check_tools(opts: argparse.Namespace) -> None:
    """Fail early when a needed program is missing."""
    needed = ["dcmsend"]
    if "storescp" in opts.receiver_names:
        needed += ["storescp", "echoscu"]
    if "orthanc" in opts.receiver_names:
        needed.append("Orthanc")
    missing = [t for t in needed if shutil.which(t) is None]
    if "gateway" in opts.receiver_names and not Path(opts.gateway_cmd).exists():
        missing.append(opts.gateway_cmd)
    if missing:
        sys.exit(f"missing programs: {', '.join(missing)}")


@contextlib.contextmanager
def temp_root(opts: argparse.Namespace) -> Iterator[Path]:
    """The run's temporary directory, removed at the end unless --keep."""
    root = Path(tempfile.mkdtemp(prefix="kp-bench-", dir=opts.tmp_dir))
    try:
        yield root
    finally:
        if opts.keep:
            print(f"kept temporary files in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate, measure, print and save; exit 1 if any measurement failed."""
    opts = parse_args(argv)
    check_tools(opts)
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results_dir = Path(opts.results_dir)
    log_dir = results_dir / f"bench-{run_id}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    t_run = time.monotonic()
    load_at_start = os.getloadavg()[0]
    print(f"load average before the run: {load_at_start:.2f} (1 min) on {os.cpu_count()} CPUs")
    samples: list[Sample] = []
    skipped = 0
    with temp_root(opts) as root:
        rng = np.random.default_rng(opts.seed)
        t0 = time.monotonic()
        workloads: list[Workload] = []
        if "ct" in opts.workload_names:
            workloads.append(generate_ct(root / "data" / "ct", opts.ct_slices, rng))
        if "small" in opts.workload_names:
            workloads.append(generate_small(root / "data" / "small", opts.small_count, rng))
        for wl in workloads:
            print(
                f"generated {wl.name}: {wl.n_instances} instances, {wl.n_series} series, "
                f"{wl.total_bytes / MIB:.1f} MiB"
            )
        print(f"generation took {time.monotonic() - t0:.1f} s; logs in {log_dir}")
        work_base = root / "receivers"
        work_base.mkdir()
        for rep in range(opts.repeat):
            for wl in workloads:
                for n in opts.sender_counts:
                    for rx in opts.receiver_names:
                        if time.monotonic() - t_run > opts.time_budget:
                            skipped += 1
                            continue
                        s = measure(rx, wl, n, rep, work_base, log_dir, opts)
                        samples.append(s)
                        print(
                            f"  [{rep + 1}/{opts.repeat}] {wl.name:<5} senders={n} {rx:<8} "
                            + (
                                f"{s.instances_per_s:8.1f} inst/s {s.mib_per_s:7.1f} MiB/s "
                                f"rss {s.peak_rss_mib:6.0f} MiB"
                                + (
                                    f" searchable {s.searchable_s:.2f} s"
                                    if s.searchable_s is not None
                                    else ""
                                )
                                if s.ok and s.instances_per_s and s.mib_per_s and s.peak_rss_mib
                                else "FAILED"
                            ),
                            flush=True,
                        )
    rows = summarize(samples)
    print()
    print(
        f"medians over {opts.repeat} run(s); CT {opts.ct_slices} slices, "
        f"small {opts.small_count} instances; MiB = 2^20 bytes"
    )
    table = print_table(rows)
    goals = targets(rows)
    print()
    for g in goals:
        verdict = "PASS" if g["pass"] else "FAIL"
        print(f"{verdict}  senders={g['senders']}  {g['target']}: {g['detail']}")
    if load_at_start > 0.5:
        print(
            f"\nWARNING: the 1-minute load average was {load_at_start:.2f} before the run started: "
            "other processes were busy, figures may be noisy (per-sample load in the JSON)"
        )
    failed = [s for s in samples if not s.ok]
    if skipped:
        print(f"\n{skipped} measurement(s) skipped: time budget of {opts.time_budget:.0f} s spent")
    if failed:
        print(f"\n{len(failed)} measurement(s) FAILED:")
        for s in failed:
            print(f"  {s.workload} senders={s.senders} {s.receiver} run {s.repeat}: {s.error}")
    report = {
        "run_id": run_id,
        "duration_s": time.monotonic() - t_run,
        "loadavg_1m_at_start": load_at_start,
        "options": {
            k: v for k, v in vars(opts).items() if isinstance(v, str | int | float | bool | list)
        },
        "versions": tool_versions(),
        "workloads": [
            {
                "name": wl.name,
                "instances": wl.n_instances,
                "series": wl.n_series,
                "bytes": wl.total_bytes,
            }
            for wl in workloads
        ],
        "summary": rows,
        "targets": goals,
        "skipped": skipped,
        "samples": [asdict(s) for s in samples],
        "table": table,
        "logs": str(log_dir),
    }
    out = results_dir / f"bench-{run_id}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nresults: {out}  (run took {report['duration_s']:.0f} s)")
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
