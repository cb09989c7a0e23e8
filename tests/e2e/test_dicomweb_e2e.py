"""DICOMweb against the gateway as a process (issue 11): DCMTK dcmsend in, dicomweb-client
out, kill -9 during STOW-RS, and a 1 GiB STOW-RS request at flat memory."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from tests.conftest import dataset_bytes, make_ct_series, requires_dcmtk, run_dcmsend, wait_until

pytestmark = [pytest.mark.e2e, requires_dcmtk, pytest.mark.timeout(300)]

BOUNDARY = "kp-e2e-boundary"
STOW_HEADERS = {
    "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
    "Accept": "application/dicom+json",
}


def _rss_peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _multipart(parts: Iterator[bytes]) -> Iterator[bytes]:
    for data in parts:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield data
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def test_dcmsend_study_comes_back_byte_for_byte(gateway_process: Any, tmp_path: Path) -> None:
    gw = gateway_process()
    paths = make_ct_series(tmp_path / "ct", 5, rows=64)
    sent = run_dcmsend(gw.dicom_port, tmp_path / "ct", calling="kp-lab", called="kp-admin")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    first = pydicom.dcmread(paths[0])
    client = DICOMwebClient(url=gw.url("/dicomweb"))
    wait_until(
        lambda: len(client.search_for_instances(first.StudyInstanceUID)) == 5,
        timeout_s=60, what="the study in QIDO-RS",
    )  # fmt: skip
    by_sop = {pydicom.dcmread(p).SOPInstanceUID: p for p in paths}
    for ds in client.retrieve_study(first.StudyInstanceUID):
        original = by_sop.pop(ds.SOPInstanceUID)
        out = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(out, enforce_file_format=True)
        assert dataset_bytes(out) == dataset_bytes(original)
    assert not by_sop


def _stow_batch(url: str, paths: list[Path]) -> list[str]:
    """One STOW-RS request; the SOPInstanceUIDs its response lists as stored."""
    body = _multipart(p.read_bytes() for p in paths)
    response = requests.post(url, data=body, headers=STOW_HEADERS, timeout=60)
    assert response.status_code == 200, response.text
    return [i["00081155"]["Value"][0] for i in response.json()["00081199"]["Value"]]


def test_kill_9_during_stow_keeps_every_listed_instance(
    gateway_process: Any, tmp_path: Path
) -> None:
    """Batches of STOW-RS requests run until the gateway is killed; after a restart every
    instance a response listed is retrievable (recovered from the spool where needed)."""
    data = tmp_path / "data"
    gw = gateway_process(data)
    paths = make_ct_series(tmp_path / "ct", 400, rows=128)
    listed: list[str] = []
    failed: list[BaseException] = []

    def send() -> None:
        url = gw.url("/dicomweb/studies")
        try:
            for start in range(0, len(paths), 10):
                listed.extend(_stow_batch(url, paths[start : start + 10]))
        except (requests.RequestException, AssertionError) as exc:
            failed.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    wait_until(lambda: len(listed) >= 60 or not sender.is_alive(), timeout_s=120, what="stores")
    gw.kill()
    sender.join(timeout=60)
    assert failed, "the sender finished before the kill: nothing was tested"
    assert 60 <= len(listed) < len(paths)
    restarted = gateway_process(data)
    client = DICOMwebClient(url=restarted.url("/dicomweb"))
    study = pydicom.dcmread(paths[0]).StudyInstanceUID
    wanted = set(listed)

    def all_there() -> bool:
        found = {i["00080018"]["Value"][0] for i in client.search_for_instances(study)}
        return wanted <= found

    wait_until(all_there, timeout_s=90, what="every listed instance after the restart")
    series = pydicom.dcmread(paths[0]).SeriesInstanceUID
    for sop in sorted(wanted)[:: max(1, len(wanted) // 10)]:
        ds = client.retrieve_instance(study, series, sop)
        assert ds.SOPInstanceUID == sop


def test_one_gib_stow_keeps_memory_flat(gateway_process: Any, tmp_path: Path) -> None:
    """1 GiB in one STOW-RS request: 256 instances of 4 MiB, generated while sent."""
    gw = gateway_process()
    assert gw.proc is not None
    template_path = make_ct_series(tmp_path / "t", 1, rows=1448)[0]  # 1448^2 x 2 B = 4 MiB
    template = template_path.read_bytes()
    old_sop = pydicom.dcmread(template_path).SOPInstanceUID.encode()
    before = _rss_peak(gw.proc.pid)
    count = 256

    def instances() -> Iterator[bytes]:
        for n in range(count):
            # Same length as the template's UID, so no element length changes.
            new_sop = f"2.25.{n + 1}".ljust(len(old_sop), "7").encode()
            yield template.replace(old_sop, new_sop)

    started = time.monotonic()
    response = requests.post(
        gw.url("/dicomweb/studies"), data=_multipart(instances()), headers=STOW_HEADERS,
        timeout=280,
    )  # fmt: skip
    assert response.status_code == 200, response.text[:500]
    assert len(response.json()["00081199"]["Value"]) == count
    grown = _rss_peak(gw.proc.pid) - before
    # The body is 1 GiB; the gateway holds at most a part's write buffer and the pipeline's
    # bounded queues of paths, not the parts.
    assert grown < 128 << 20, f"peak RSS grew {grown >> 20} MiB for a 1 GiB request"
    print(f"1 GiB STOW-RS in {time.monotonic() - started:.1f} s, peak RSS +{grown >> 20} MiB")
    subprocess.run(["sync"], check=False)
