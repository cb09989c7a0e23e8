"""Hostile content through real senders: it costs its own series an error, and nothing else.

Issue 14 findings 4 and 5. DCMTK ``storescu`` sends a 1 KB instance declaring 20,000,000
frames (refused before the acknowledgement now: its Pixel Data cannot hold them) and a sub-KB
RLE instance declaring 20000 x 20000 x 3 x 16 bit (whole fragments, so it is stored), then a
normal CT series; the normal series must get its thumbnail and validation within a deadline
while the RLE one gets a thumbnail error (before the fix, the single series worker spent
minutes on the first hostile one). A NIfTI upload declaring 3 GiB in a tiny gzip must end
``failed`` with a per-file error while a C-STORE sent right after it is indexed.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import dcmtk_env, make_ct_series, requires_dcmtk, wait_until
from tests.unit.test_thumbnail_bounds import write_rle_header, write_twenty_million_frames

pytestmark = [pytest.mark.e2e, requires_dcmtk, pytest.mark.timeout(240)]

# Generous for a loaded 2-core machine (a normal series takes about a second); the unfixed
# gateway spent minutes on the hostile instance queued before it.
_DEADLINE_S = 60.0


def _storescu(
    port: int, *paths: Path, calling: str, options: tuple[str, ...] = (), status: str = "Success"
) -> None:
    run = subprocess.run(
        ["storescu", "-v", *options, "-aet", calling, "-aec", "kp-admin", "127.0.0.1", str(port),
         *(str(p) for p in paths)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    log = run.stdout + run.stderr
    assert (run.returncode == 0) == (status == "Success"), log
    assert log.count(f"Received Store Response ({status})") == len(paths), log


def _series(gw: Any, uid: str) -> dict[str, Any] | None:
    try:
        return dict(gw.get_json(f"/api/series/{uid}"))
    except OSError:  # urllib's HTTPError (404 until indexed) is an OSError
        return None


def _series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_hostile_instances_get_errors_and_a_normal_series_its_thumbnail(
    gateway_process: Any, tmp_path: Path
) -> None:
    """20M frames in 1 KB: refused at C-STORE. A 2.4 GB RLE declaration: a thumbnail error.
    The CT behind them: its thumbnail."""
    gw = gateway_process()
    (tmp_path / "hostile").mkdir()
    frames = write_twenty_million_frames(tmp_path / "hostile" / "frames.dcm")
    rle = write_rle_header(tmp_path / "hostile" / "rle.dcm")
    _storescu(gw.dicom_port, frames, calling="kp-hostile", status="Error: CannotUnderstand")
    # -xr: propose RLE Lossless, so the RLE instance is sent as stored (not decoded first).
    _storescu(gw.dicom_port, rle, calling="kp-hostile", options=("-xr",))
    assert _series(gw, _series_uid(frames)) is None
    hostile_uids = [_series_uid(rle)]
    # The hostile series complete (and queue) first; the normal one arrives behind them.
    wait_until(
        lambda: all((_series(gw, uid) or {}).get("complete") for uid in hostile_uids),
        timeout_s=_DEADLINE_S,
        what="the hostile series to complete",
    )
    normal = make_ct_series(tmp_path / "normal", 5)
    _storescu(gw.dicom_port, *normal, calling="kp-normal")
    normal_uid = _series_uid(normal[0])

    def normal_done() -> bool:
        series = _series(gw, normal_uid) or {}
        return bool(series.get("has_thumbnail")) and series.get("validation") is not None

    wait_until(normal_done, timeout_s=_DEADLINE_S, what="the normal series' thumbnail")
    normal_series = _series(gw, normal_uid)
    assert normal_series is not None and normal_series["thumbnail_error"] is None

    def errors_recorded() -> bool:
        return all((_series(gw, uid) or {}).get("thumbnail_error") for uid in hostile_uids)

    wait_until(errors_recorded, timeout_s=_DEADLINE_S, what="the hostile series' errors")
    rle_series = _series(gw, hostile_uids[0]) or {}
    assert "exceeds the limit" in rle_series["thumbnail_error"]
    assert not rle_series["has_thumbnail"]
    # Refused input is not retried: the error is final, not "will retry".
    assert "will retry" not in rle_series["thumbnail_error"]


def _upload(gw: Any, path: Path, dataset: str) -> str:
    run = subprocess.run(
        ["curl", "-s", "-F", f"file=@{path}",
         gw.url(f"/api/uploads?project=admin&dataset={dataset}&kind=nifti")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return str(json.loads(run.stdout)["id"])


def test_hostile_nifti_upload_fails_while_a_c_store_is_indexed(
    gateway_process: Any, tmp_path: Path
) -> None:
    """3 GiB declared in a tiny .nii.gz: the upload fails naming the file; a CT is indexed."""
    gw = gateway_process()
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1536))
    header.set_data_dtype(np.int16)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("case1.nii.gz", gzip.compress(header.binaryblock + bytes(4)))
    assert archive.stat().st_size < 400
    upload_id = _upload(gw, archive, "hostile-nifti")
    ct = make_ct_series(tmp_path / "ct", 1)
    _storescu(gw.dicom_port, *ct, calling="kp-meanwhile")
    ct_uid = _series_uid(ct[0])
    wait_until(
        lambda: _series(gw, ct_uid) is not None,
        timeout_s=_DEADLINE_S,
        what="the C-STORE sent during the NIfTI import to be indexed",
    )
    wait_until(
        lambda: gw.get_json(f"/api/uploads/{upload_id}")["state"] in ("done", "failed"),
        timeout_s=_DEADLINE_S,
        what="the hostile NIfTI import to end",
    )
    status = gw.get_json(f"/api/uploads/{upload_id}")
    assert status["state"] == "failed", status
    text = json.dumps(status["errors"])
    assert "case1.nii.gz" in text and "header declares 1024x1024x1536 voxels" in text, status
