"""End to end with DCMTK: the user documentation's dcmsend command against the gateway."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import (
    GatewayProcess,
    dataset_bytes,
    dcmtk_env,
    free_port,
    make_ct_series,
    requires_dcmtk,
    run_dcmsend,
    wait_until,
)

pytestmark = [pytest.mark.e2e, requires_dcmtk]


def _storescp_reference(corpus: Path, tmp_path: Path) -> dict[str, bytes]:
    """What dcmsend puts on the wire, as DCMTK's own storescp writes it bit-preserving (+B)."""
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen(
        ["storescp", "--accept-all", "+B", "-od", str(out), "-fe", ".dcm", str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: subprocess.run(
            ["echoscu", "127.0.0.1", str(port)], capture_output=True, env=dcmtk_env()
        ).returncode == 0, what="storescp")  # fmt: skip
        result = run_dcmsend(port, corpus, calling="kp-ref", called="ANY-SCP", timeout=120)
        assert result.returncode == 0, result.stderr
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    reference = {}
    for path in out.iterdir():
        sop = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)
        reference[sop] = dataset_bytes(path)
    return reference


def _get(gw: GatewayProcess, path: str) -> Any:
    return gw.get_json(path)


def _fetch(gw: GatewayProcess, path: str) -> bytes:
    with urllib.request.urlopen(gw.url(path), timeout=10) as response:
        return bytes(response.read())


def test_dcmsend_documented_command_stores_every_instance_byte_identical(
    gateway_process: Any, dicom_corpus: Path, tmp_path: Path
) -> None:
    """Every instance dcmsend sent is retrievable byte for byte, in project, admin and dataset."""
    gw = gateway_process()
    urllib.request.urlopen(
        urllib.request.Request(
            gw.url("/api/projects"),
            data=json.dumps({"name": "lungproj"}).encode(),
            headers={"Content-Type": "application/json"},
        ),
        timeout=10,
    )
    result = run_dcmsend(
        gw.dicom_port, dicom_corpus, calling="kp-lungstudy", called="kp-lungproj", timeout=120
    )
    assert result.returncode == 0, result.stderr
    reference = _storescp_reference(dicom_corpus, tmp_path)

    def all_indexed() -> bool:
        datasets = _get(gw, "/api/projects/lungproj/datasets")["items"]
        return bool(datasets) and datasets[0]["instance_count"] == len(reference)

    wait_until(all_indexed, what="every instance indexed")
    for project in ("lungproj", "admin"):
        listing = _get(gw, f"/api/projects/{project}/series?limit=500")
        series_uids = {item["series_uid"] for item in listing["items"]}
        assert listing["total"] == len(series_uids) > 0
        assert all(item["datasets"] == ["lungstudy"] for item in listing["items"])
    stored = 0
    for item in _get(gw, "/api/projects/lungproj/series?limit=500")["items"]:
        detail = _get(gw, f"/api/series/{item['series_uid']}")
        assert detail["projects"] == ["admin", "lungproj"]
        assert {"project": "lungproj", "dataset": "lungstudy"} in detail["datasets"]
        document = detail["document"]
        assert document["00120020 ClinicalTrialProtocolID_keyword"] == "lungproj"
        assert document["00120010 ClinicalTrialSponsorName_keyword"] == "lungstudy"
        for instance in _get(gw, f"/api/series/{item['series_uid']}/instances")["items"]:
            body = _fetch(gw, instance["url"])
            assert body[128:132] == b"DICM"
            path = tmp_path / "fetched.dcm"
            path.write_bytes(body)
            assert dataset_bytes(path) == reference[instance["sop_uid"]], instance["sop_uid"]
            stored += 1
    assert stored == len(reference)


def test_dcmsend_second_send_appends_to_dataset(gateway_process: Any, tmp_path: Path) -> None:
    """A second association with the same calling AE adds its series to the existing dataset."""
    gw = gateway_process()
    first = make_ct_series(tmp_path / "a", 3)
    second = make_ct_series(tmp_path / "b", 4)
    for folder in (first[0].parent, second[0].parent):
        result = run_dcmsend(gw.dicom_port, folder, calling="kp-cohort", called="kp-admin")
        assert result.returncode == 0, result.stderr
    wait_until(
        lambda: (
            [d["instance_count"] for d in _get(gw, "/api/projects/admin/datasets")["items"]] == [7]
        ),
        what="7 instances in dataset cohort",
    )
    datasets = _get(gw, "/api/projects/admin/datasets")["items"]
    assert [(d["name"], d["series_count"]) for d in datasets] == [("cohort", 2)]


def test_dcmsend_unknown_project_rejected_and_nothing_stored(
    gateway_process: Any, tmp_path: Path
) -> None:
    """A called AE naming no project gets A-ASSOCIATE-RJ and nothing reaches the store."""
    gw = gateway_process()
    folder = make_ct_series(tmp_path / "x", 2)[0].parent
    result = run_dcmsend(gw.dicom_port, folder, calling="kp-d", called="kp-nosuchproject")
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr + result.stdout
    assert _get(gw, "/api/projects/admin/series")["total"] == 0
    assert (
        not list((gw.data_dir / "dicom").glob("**/*.dcm"))
        if (gw.data_dir / "dicom").exists()
        else True
    )


def test_echoscu_and_storescu_compressed_transfer_syntaxes(
    gateway_process: Any, dicom_corpus: Path, tmp_path: Path
) -> None:
    """C-ECHO answers; storescu sends JPEG and JPEG 2000 files in their own syntax."""
    gw = gateway_process()
    echo = subprocess.run(
        ["echoscu", "-aec", "kp-admin", "127.0.0.1", str(gw.dicom_port)],
        capture_output=True, text=True, env=dcmtk_env(),
    )  # fmt: skip
    assert echo.returncode == 0, echo.stderr
    # storescu's option proposing exactly that compressed syntax (so nothing is transcoded).
    compressed = {
        "1.2.840.10008.1.2.4.50": "-xy",
        "1.2.840.10008.1.2.4.70": "-xs",
        "1.2.840.10008.1.2.4.90": "-xv",
        "1.2.840.10008.1.2.4.91": "-xw",
    }
    picked: dict[str, Path] = {}
    for path in sorted(dicom_corpus.glob("**/*.dcm")):
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        if ts in compressed and ts not in picked:
            picked[ts] = path
    assert len(picked) >= 3, picked
    for ts, path in picked.items():
        result = subprocess.run(
            ["storescu", compressed[ts], "-aec", "kp-admin", "-aet", "kp-compressed",
             "127.0.0.1", str(gw.dicom_port), str(path)],
            capture_output=True, text=True, env=dcmtk_env(),
        )  # fmt: skip
        assert result.returncode == 0, (compressed[ts], result.stderr)
    wait_until(
        lambda: (
            sum(d["instance_count"] for d in _get(gw, "/api/projects/admin/datasets")["items"])
            == len(picked)
        ),
        what="compressed instances indexed",
    )
    for ts, path in picked.items():
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        stored = tmp_path / f"{sop}.dcm"
        stored.write_bytes(_fetch(gw, f"/api/instances/{sop}"))
        received = pydicom.dcmread(stored)
        assert str(received.file_meta.TransferSyntaxUID) == ts
        # storescu re-encodes the header, but the compressed fragments travel untouched.
        assert received.PixelData == pydicom.dcmread(path).PixelData


def test_serve_config_error_names_the_key(tmp_path: Path) -> None:
    """A bad value stops start-up with exit code 2 and a message naming the dotted key."""
    result = subprocess.run(
        [shutil.which("python") or "python", "-m", "kp_gateway", "serve",
         "--data-dir", str(tmp_path), "--set", "dicom.port=eleven"],
        capture_output=True, text=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert result.returncode == 2
    assert "dicom.port" in result.stderr
    try:
        urllib.request.urlopen("http://127.0.0.1:1/", timeout=0.2)
    except (urllib.error.URLError, OSError):
        pass
