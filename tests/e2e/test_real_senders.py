"""Senders nobody here wrote, as a lab points them at the gateway: Orthanc and DCMTK tools."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import dcmtk_env, free_port, make_ct_series, requires_dcmtk, wait_until

pytestmark = [pytest.mark.e2e, requires_dcmtk]

ORTHANC = shutil.which("Orthanc")


class Orthanc:
    """Orthanc 1.10 (Debian) as the lab's sending PACS, on loopback, with its REST API."""

    def __init__(self, workdir: Path, modalities: dict[str, list[Any]]) -> None:
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        config = {
            "Name": "kp-tests-orthanc",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "Plugins": [],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": "ORTHANC",
            "DicomPort": free_port(),
            "DicomModalities": modalities,
            "OrthancExplorerEnabled": False,
            "SaveJobs": False,
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "orthanc.json").write_text(json.dumps(config))
        self.log = workdir / "orthanc.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(ORTHANC), str(workdir / "orthanc.json")], stdout=out, stderr=out
            )
        wait_until(self._up, timeout_s=30, what="Orthanc's REST API")

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text(errors="replace")
        try:
            self.request("GET", "/system")
            return True
        except OSError:
            return False

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(f"{self.base}{path}", data=body, method=method)
        with urllib.request.urlopen(req, timeout=60) as response:
            return json.load(response)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def make_orthanc(tmp_path: Path) -> Iterator[Callable[[dict[str, list[Any]]], Orthanc]]:
    """Factory for Orthanc instances with the given DicomModalities; all stopped at teardown."""
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed; `make test` installs it")
    started: list[Orthanc] = []

    def start(modalities: dict[str, list[Any]]) -> Orthanc:
        orthanc = Orthanc(tmp_path / f"orthanc{len(started)}", modalities)
        started.append(orthanc)
        return orthanc

    yield start
    for orthanc in started:
        orthanc.close()


def _dataset_counts(gw: Any, project: str = "admin") -> dict[str, int]:
    items = gw.get_json(f"/api/projects/{project}/datasets")["items"]
    return {item["name"]: item["instance_count"] for item in items}


def _curl_upload(gw: Any, path: Path, dataset: str) -> dict[str, Any]:
    """curl -F file=@path into admin/<dataset>; the upload's status once its import ended."""
    run = subprocess.run(
        ["curl", "-s", "-F", f"file=@{path}",
         gw.url(f"/api/uploads?project=admin&dataset={dataset}")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    upload_id = json.loads(run.stdout)["id"]
    wait_until(
        lambda: gw.get_json(f"/api/uploads/{upload_id}")["state"] in ("done", "failed"),
        timeout_s=60,
        what=f"import of {path.name}",
    )
    return dict(gw.get_json(f"/api/uploads/{upload_id}"))


def test_echoscu_to_the_gateways_own_ae_title(gateway_process: Any) -> None:
    """echoscu -aec KP-GATEWAY: the title the gateway announces is accepted (C-ECHO success)."""
    gw = gateway_process()
    run = subprocess.run(
        ["echoscu", "-v", "-aec", "KP-GATEWAY", "127.0.0.1", str(gw.dicom_port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=30,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Received Echo Response (Success)" in run.stdout + run.stderr


def test_orthanc_modality_with_the_gateways_own_ae_title_stores_into_admin(
    gateway_process: Any, make_orthanc: Callable[..., Orthanc], tmp_path: Path
) -> None:
    """An Orthanc modality entry ["KP-GATEWAY", host, port]: echo and C-STORE succeed, and the
    series lands in the default project, in the dataset named after Orthanc's AE title."""
    gw = gateway_process()
    orthanc = make_orthanc({"kp": ["KP-GATEWAY", "127.0.0.1", gw.dicom_port]})
    paths = make_ct_series(tmp_path / "ct", 3)
    ids = [orthanc.request("POST", "/instances", p.read_bytes())["ID"] for p in paths]
    orthanc.request("POST", "/modalities/kp/echo", b"{}")
    orthanc.request("POST", "/modalities/kp/store", json.dumps(ids).encode())
    wait_until(lambda: _dataset_counts(gw).get("orthanc") == 3, what="3 instances in admin")
    for path in paths:
        original = pydicom.dcmread(path)
        url = gw.url(f"/api/instances/{original.SOPInstanceUID}")
        with urllib.request.urlopen(url, timeout=10) as response:
            stored = pydicom.dcmread(io.BytesIO(response.read()))
        assert stored == original  # every data element as Orthanc had it


def test_calling_ae_title_with_spaces_names_a_dataset_uploads_can_use(
    gateway_process: Any, tmp_path: Path
) -> None:
    """storescu -aet "MR SCAN1": the dataset it creates has a valid name, and an upload naming
    that dataset is accepted and lands beside the sent instances."""
    gw = gateway_process()
    paths = make_ct_series(tmp_path / "mr", 2)
    run = subprocess.run(
        ["storescu", "-aet", "MR SCAN1", "-aec", "kp-admin", "127.0.0.1", str(gw.dicom_port),
         *map(str, paths)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    wait_until(lambda: sum(_dataset_counts(gw).values()) == 2, what="2 instances indexed")
    (dataset,) = _dataset_counts(gw)
    assert dataset.startswith("mr_scan1-"), dataset
    extra = make_ct_series(tmp_path / "more", 1)[0]
    request = urllib.request.Request(
        gw.url(f"/api/uploads?project=admin&dataset={dataset}&kind=dicom"),
        data=extra.read_bytes(),
        method="POST",
        headers={"Content-Type": "application/dicom"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 202
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"upload into {dataset!r} refused: {exc.read()!r}") from exc
    wait_until(lambda: _dataset_counts(gw).get(dataset) == 3, what="upload beside the sent ones")


def test_worklist_find_is_refused_at_negotiation_and_storage_still_works(
    gateway_process: Any,
) -> None:
    """findscu -W (Modality Worklist) gets no presentation context, so no C-FIND and no error
    in the gateway's log; a pynetdicom SCU proposing MWL, Color Palette Q/R and CT storage gets
    only CT (and Verification) accepted."""
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        ColorPaletteInformationModelFind,
        CTImageStorage,
        ModalityWorklistInformationFind,
        Verification,
    )

    gw = gateway_process()
    run = subprocess.run(
        ["findscu", "-W", "-k", "ScheduledProcedureStepSequence[0].Modality=CT",
         "-aec", "kp-admin", "127.0.0.1", str(gw.dicom_port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=30,
    )  # fmt: skip
    assert run.returncode != 0
    assert "no acceptable presentation contexts" in (run.stdout + run.stderr).lower()

    ae = AE(ae_title="kp-probe")
    for sop_class in (
        ModalityWorklistInformationFind,
        ColorPaletteInformationModelFind,
        CTImageStorage,
        Verification,
    ):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", gw.dicom_port, ae_title="kp-admin")
    try:
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        refused = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
        assert accepted == {str(CTImageStorage), str(Verification)}
        assert refused == {
            str(ModalityWorklistInformationFind): 0x03,
            str(ColorPaletteInformationModelFind): 0x03,
        }
    finally:
        assoc.release()
        ae.shutdown()
    log = gw.log.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log[-2000:]


def test_association_over_the_limit_is_logged_and_counted(gateway_process: Any) -> None:
    """With max_associations = 2 held open, echoscu's third association is refused as busy,
    and the gateway says so in its log and in the rejected-associations metric."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    gw = gateway_process(dicom__max_associations=2, dicom__max_associations_per_peer=3)
    ae = AE(ae_title="kp-holder")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", gw.dicom_port, ae_title="kp-admin") for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        run = subprocess.run(
            ["echoscu", "-aet", "LATECOMER", "-aec", "kp-admin", "127.0.0.1", str(gw.dicom_port)],
            capture_output=True, text=True, env=dcmtk_env(), timeout=30,
        )  # fmt: skip
        assert run.returncode != 0
        assert "rejected" in (run.stdout + run.stderr).lower()
    finally:
        for assoc in held:
            assoc.release()
        ae.shutdown()

    def logged() -> bool:
        return "rejecting association from LATECOMER" in gw.log.read_text(errors="replace")

    wait_until(logged, what="the refusal in the gateway log")
    assert "association limit (dicom.max_associations = 2)" in gw.log.read_text()
    with urllib.request.urlopen(gw.url("/metrics"), timeout=10) as response:
        metrics = response.read().decode()
    assert 'kp_gateway_scp_associations_total{result="rejected"} 1.0' in metrics


def test_curl_upload_of_a_cd_export_zip_skips_its_dicomdir(
    gateway_process: Any, tmp_path: Path
) -> None:
    """curl -F file=@export.zip: the images are imported; the DICOMDIR (an index) is listed as
    skipped, not failed, and nothing is quarantined."""
    import zipfile

    from tests.e2e.test_dcmsend_command import _dicomdir_export

    gw = gateway_process()
    export, count = _dicomdir_export(tmp_path / "export")
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(p for p in export.rglob("*") if p.is_file()):
            zf.write(path, str(path.relative_to(export)))
    status = _curl_upload(gw, archive, "cd-zip")
    assert status["state"] == "done", status
    assert status["instances_imported"] == count and status["errors"] == []
    assert [s["file"] for s in status["skipped"]] == ["DICOMDIR"]
    assert "index" in status["skipped"][0]["reason"]
    assert gw.get_json("/api/quarantine")["items"] == []


def test_curl_multipart_several_files_refused_and_form_fields_honoured(
    gateway_process: Any, tmp_path: Path
) -> None:
    """curl -F file=@a -F file=@b is refused whole (never only the first imported); project and
    dataset form fields route the upload before or after the file part; the query wins."""
    gw = gateway_process()
    request = urllib.request.Request(
        gw.url("/api/projects"), data=b'{"name": "lung"}', method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    urllib.request.urlopen(request, timeout=10).close()
    # One series per upload, so each dataset's count is its own upload's.
    paths = [make_ct_series(tmp_path / f"ct{n}", 1)[0] for n in range(4)]

    def curl(*form: str, query: str = "") -> tuple[int, dict[str, Any]]:
        args = [a for field in form for a in ("-F", field)]
        run = subprocess.run(
            ["curl", "-s", "-w", "\\n%{http_code}", *args, gw.url(f"/api/uploads{query}")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        body, status = run.stdout.rsplit("\n", 1)
        return int(status), json.loads(body)

    status, body = curl(*(f"file=@{p}" for p in paths[:3]))
    assert status == 400 and "more than one file" in body["detail"], body
    assert gw.get_json("/api/uploads")["items"] == []

    uploads = [
        curl("project=lung", "dataset=before", f"file=@{paths[0]}"),
        curl(f"file=@{paths[1]}", "dataset=after", query="?project=lung"),
        curl("dataset=form", f"file=@{paths[2]}", query="?project=lung&dataset=query"),
    ]
    assert [status for status, _ in uploads] == [202, 202, 202], uploads

    def routed() -> dict[str, int]:
        items = gw.get_json("/api/projects/lung/datasets")["items"]
        return {item["name"]: item["instance_count"] for item in items}

    wait_until(lambda: sum(routed().values()) == 3, what="three uploads in project lung")
    assert routed() == {"before": 1, "after": 1, "query": 1}


def test_curl_upload_of_cut_off_or_garbage_dicom_fails_per_file(
    gateway_process: Any, tmp_path: Path
) -> None:
    """A DICOM file cut inside its Pixel Data (native, or JPEG 2000 fragments), and a DICOM
    preamble over garbage, are refused per file; an upload in which nothing could be imported
    ends failed, not done; beside a good file in a zip, the cut one is an error and the good
    one is imported. Nothing quarantined."""
    import zipfile

    from pydicom.data import get_testdata_file

    gw = gateway_process()
    good, cut_source = make_ct_series(tmp_path / "ct", 2, rows=64)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(cut_source.read_bytes()[:-3000])
    # Cut inside its last fragment: pydicom alone would read it and drop the fragment.
    cut_j2k = tmp_path / "cut-j2k.dcm"
    cut_j2k.write_bytes(Path(str(get_testdata_file("JPEG2000.dcm"))).read_bytes()[:-2000])
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(bytes(128) + b"DICM" + b"\x01\x02 not a dataset " * 40)
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(good, "study/good.dcm")
        zf.write(cut, "study/cut.dcm")

    def upload(path: Path) -> dict[str, Any]:
        return _curl_upload(gw, path, "broken")

    for path in (cut, cut_j2k, garbage):
        status = upload(path)
        assert status["state"] == "failed", status
        assert status["instances_imported"] == 0 and len(status["errors"]) == 1, status
        assert status["errors"][0]["error"] == "invalid_dicom"
    assert "cut off" in upload(cut)["errors"][0]["detail"]
    mixed = upload(archive)
    assert mixed["state"] == "done" and mixed["instances_imported"] == 1, mixed
    assert [e["file"] for e in mixed["errors"]] == ["study/cut.dcm"]
    assert gw.get_json("/api/quarantine")["items"] == []
