"""A SOPInstanceUID reused by another sender in another series and project (issue 14 finding 8).

The rule, as Orthanc keeps it: an instance is its series and its SOPInstanceUID, as its storage
key ``dicom/<study>/<series>/<sop>.dcm`` is. The reused UID makes a second instance in the
second series; the first series keeps its instance, its count and its file. Before, the index
row (keyed by SOPInstanceUID alone) was re-pointed: the first series showed one instance less
and its file was orphaned. DCMTK ``storescu`` sends both, from two AE titles.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import dataset_bytes, dcmtk_env, make_ct_series, requires_dcmtk, wait_until

pytestmark = [pytest.mark.e2e, requires_dcmtk, pytest.mark.timeout(180)]


def _storescu(port: int, paths: list[Path], *, calling: str, called: str) -> None:
    run = subprocess.run(
        ["storescu", "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port),
         *(str(p) for p in paths)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert log.count("Received Store Response (Success)") == len(paths), log


def _get(gw: Any, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(gw.url(path), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _complete(gw: Any, uid: str, count: int) -> bool:
    status, body = _get(gw, f"/api/series/{uid}")
    if status != 200:
        return False
    series = json.loads(body)
    return bool(series["complete"]) and series["instance_count"] == count


def test_reused_sop_instance_uid_leaves_the_first_series_untouched(
    gateway_process: Any, tmp_path: Path
) -> None:
    gw = gateway_process()
    request = urllib.request.Request(
        gw.url("/api/projects"),
        data=json.dumps({"name": "neuro"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201

    first = make_ct_series(tmp_path / "first", 3, rows=32)
    first_uid = str(pydicom.dcmread(first[0]).SeriesInstanceUID)
    _storescu(gw.dicom_port, first, calling="kp-lab", called="kp-admin")
    wait_until(lambda: _complete(gw, first_uid, 3), timeout_s=60, what="the first series")

    # Another series, another study, another project: the first instance's SOPInstanceUID.
    reused = pydicom.dcmread(first[0])
    sop = str(reused.SOPInstanceUID)
    reused.StudyInstanceUID, reused.SeriesInstanceUID = generate_uid(), generate_uid()
    reused.PatientID = "intruder"
    reused.PixelData = bytes(len(reused.PixelData))
    second = tmp_path / "second.dcm"
    reused.save_as(second, enforce_file_format=True)
    second_uid = str(reused.SeriesInstanceUID)
    _storescu(gw.dicom_port, [second], calling="kp-other", called="kp-neuro")
    wait_until(lambda: _complete(gw, second_uid, 1), timeout_s=60, what="the second series")

    status, body = _get(gw, f"/api/series/{first_uid}")
    kept = json.loads(body)
    assert status == 200 and kept["instance_count"] == 3, kept
    status, body = _get(gw, f"/api/series/{first_uid}/instances")
    listed = json.loads(body)["items"]
    assert sop in {i["sop_uid"] for i in listed}
    for url, path in (
        (f"/api/series/{first_uid}/instances/{sop}", first[0]),
        (f"/api/series/{second_uid}/instances/{sop}", second),
    ):
        status, data = _get(gw, url)
        assert status == 200, url
        assert data.endswith(dataset_bytes(path)), url
    status, body = _get(gw, f"/api/instances/{sop}")
    assert status == 409
    answer = json.loads(body)
    assert answer["error"] == "ambiguous_instance"
    assert sorted(answer["urls"]) == sorted(
        [f"/api/series/{first_uid}/instances/{sop}", f"/api/series/{second_uid}/instances/{sop}"]
    )
    # Each copy is its own file under its own series; nothing orphaned, nothing overwritten.
    stored = sorted(p.relative_to(gw.data_dir) for p in (gw.data_dir / "dicom").rglob(f"{sop}.dcm"))
    assert sorted(p.parts[2] for p in stored) == sorted([first_uid, second_uid])
    neuro = json.loads(_get(gw, "/api/projects/neuro/series")[1])
    assert [s["series_uid"] for s in neuro["items"]] == [second_uid]
