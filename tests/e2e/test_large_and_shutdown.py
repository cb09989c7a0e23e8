"""A large object keeps memory flat; SIGTERM during transfers drains and exits 0."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.conftest import (
    dataset_bytes,
    dcmtk_env,
    make_ct_series,
    requires_dcmtk,
    run_dcmsend,
    wait_until,
)

pytestmark = [pytest.mark.e2e, requires_dcmtk]


def _peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    assert match
    return int(match.group(1)) * 1024


def _big_instance(folder: Path, megabytes: int) -> Path:
    """One Secondary Capture instance of about `megabytes` MB (16-bit, square)."""
    side = int((megabytes * 2**20 / 2) ** 0.5) // 2 * 2
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.InstanceNumber = "OT", "BIG", 1
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, side * side, np.uint16).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_large_object_memory_stays_flat(gateway_process: Any, tmp_path: Path) -> None:
    """A 300 MB instance is received through the chunked spool: peak RSS grows far less."""
    path = _big_instance(tmp_path / "big", 300)
    gw = gateway_process()
    assert gw.proc is not None
    before = _peak_rss_bytes(gw.proc.pid)
    result = run_dcmsend(gw.dicom_port, path.parent, calling="kp-big", called="kp-admin")
    assert result.returncode == 0, result.stderr
    wait_until(
        lambda: gw.get_json("/api/projects/admin/series")["total"] == 1, what="big series indexed"
    )
    growth = _peak_rss_bytes(gw.proc.pid) - before
    assert growth < 64 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MB for a 300 MB object"
    stored = next((gw.data_dir / "dicom").glob("**/*.dcm"))
    assert dataset_bytes(stored) == dataset_bytes(path)


def test_sigterm_during_transfer_drains_and_exits_zero(
    gateway_process: Any, tmp_path: Path
) -> None:
    """SIGTERM mid-transfer: intake stops, acknowledged work finishes, exit code 0."""
    folder = make_ct_series(tmp_path / "src", 300, rows=64)[0].parent
    gw = gateway_process()
    assert gw.proc is not None
    log = tmp_path / "storescu.log"
    with open(log, "w") as out:
        sender = subprocess.Popen(
            ["storescu", "-v", "-aet", "kp-term", "-aec", "kp-admin", "+sd",
             "127.0.0.1", str(gw.dicom_port), str(folder)],
            env=dcmtk_env(), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_until(
        lambda: log.read_text().count("Received Store Response (Success)") >= 50,
        what="50 acknowledged",
    )
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=90) == 0
    sender.wait(timeout=60)
    acknowledged = log.read_text().count("Received Store Response (Success)")
    # Everything acknowledged was indexed before exit: nothing waits in the spool.
    assert not list((gw.data_dir / "spool" / "incoming").glob("*/*.dcm"))
    restarted = gateway_process(gw.data_dir)
    datasets = restarted.get_json("/api/projects/admin/datasets")["items"]
    assert datasets[0]["instance_count"] >= acknowledged
