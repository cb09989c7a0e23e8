"""kill -9 during a parallel send: every instance that got 0x0000 survives and is indexed."""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import dcmtk_env, make_ct_series, requires_dcmtk, wait_until

pytestmark = [pytest.mark.e2e, requires_dcmtk]

SENDERS = 4
PER_SENDER = 150


def _acknowledged(log: Path, sop_by_file: dict[str, str]) -> set[str]:
    """SOPInstanceUIDs that storescu's verbose log shows answered with Success (0x0000)."""
    acknowledged = set()
    current: str | None = None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("I: Sending file: "):
            current = line[len("I: Sending file: ") :].strip()
        elif line.startswith("I: Received Store Response (Success)") and current:
            acknowledged.add(sop_by_file[current])
            current = None
    return acknowledged


def _received(gw: Any) -> float:
    with urllib.request.urlopen(gw.url("/metrics"), timeout=5) as response:
        text = response.read().decode()
    match = re.search(r'^kp_gateway_scp_cstore_total\{status="0x0000"\} (\S+)', text, re.M)
    return float(match.group(1)) if match else 0.0


def _instance_present(gw: Any, sop: str) -> bool:
    try:
        with urllib.request.urlopen(gw.url(f"/api/instances/{sop}"), timeout=5) as response:
            return response.status == 200 and len(response.read()) > 0
    except urllib.error.HTTPError:
        return False


def test_kill_during_parallel_send_loses_no_acknowledged_instance(
    gateway_process: Any, tmp_path: Path
) -> None:
    """Acknowledged instances are all stored and indexed after restart, without re-sending."""
    folders = []
    sop_by_file: dict[str, str] = {}
    for n in range(SENDERS):
        paths = make_ct_series(tmp_path / f"src{n}", PER_SENDER, rows=64)
        folders.append(paths[0].parent)
        for path in paths:
            sop_by_file[str(path)] = str(
                pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            )
    data_dir = tmp_path / "data"
    gw = gateway_process(data_dir)
    senders = []
    for n, folder in enumerate(folders):
        log = tmp_path / f"storescu{n}.log"
        with open(log, "w") as out:
            senders.append(
                (
                    subprocess.Popen(
                        ["storescu", "-v", "-aet", f"kp-crash{n}", "-aec", "kp-admin", "+sd",
                         "127.0.0.1", str(gw.dicom_port), str(folder)],
                        env=dcmtk_env(), stdout=out, stderr=subprocess.STDOUT,
                    ),
                    log,
                )
            )  # fmt: skip
    # Kill once a good part has been acknowledged, while the senders are still busy.
    wait_until(lambda: _received(gw) >= SENDERS * PER_SENDER * 0.3, what="30% acknowledged")
    gw.kill()
    acknowledged: set[str] = set()
    for proc, log in senders:
        proc.wait(timeout=60)
        acknowledged |= _acknowledged(log, sop_by_file)
    assert 0 < len(acknowledged) < SENDERS * PER_SENDER, len(acknowledged)

    restarted = gateway_process(data_dir)
    wait_until(
        lambda: (
            sum(
                d["instance_count"]
                for d in restarted.get_json("/api/projects/admin/datasets")["items"]
            )
            >= len(acknowledged)
        ),
        timeout_s=60,
        what="acknowledged instances indexed after restart",
    )
    missing = [sop for sop in sorted(acknowledged) if not _instance_present(restarted, sop)]
    assert not missing, f"{len(missing)} acknowledged instances lost, e.g. {missing[:3]}"
    wait_until(
        lambda: not list((data_dir / "spool" / "incoming").glob("*/*.dcm")),
        what="spool emptied",
    )
