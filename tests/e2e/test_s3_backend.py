"""End to end with ``storage.backend = "s3"`` against moto's server, and ``kp-gateway reindex``.

The gateway runs as ``python -m kp_gateway serve`` and receives series from DCMTK's dcmsend;
moto's standalone S3 server runs in this process (its state survives a server restart).
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from kp_gateway.reindex import CHECKPOINT_FILE
from tests.conftest import (
    REPO,
    GatewayProcess,
    dataset_bytes,
    gateway_overrides,
    make_ct_series,
    requires_dcmtk,
    run_dcmsend,
    wait_until,
)
from tests.s3_support import MotoS3, unique_bucket
from tests.s3_support import isolated_aws_env as isolated_aws_env
from tests.s3_support import moto_s3 as moto_s3

pytestmark = [pytest.mark.e2e, requires_dcmtk]

KEY_THUMBNAIL = "00000000 ThumbnailInstanceUID_keyword"
KEY_VALIDATION = "00111001 ValidationResults_object"
VALIDATION_DATE = "00111004 ValidationDate_datetime"


def s3_settings(server: MotoS3, bucket: str) -> dict[str, Any]:
    return {
        "storage__backend": "s3",
        "storage__s3_endpoint_url": server.url,
        "storage__s3_bucket": bucket,
        "storage__s3_create_bucket": True,
        "storage__s3_timeout_s": 5.0,
    }


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def download(gw: GatewayProcess, path: str) -> bytes | None:
    try:
        with urllib.request.urlopen(gw.url(path), timeout=10) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def series_done(gw: GatewayProcess, uid: str, count: int) -> Callable[[], bool]:
    """Complete with `count` instances, a thumbnail and validation results in the document."""

    def check() -> bool:
        try:
            series = gw.get_json(f"/api/series/{uid}")
        except urllib.error.HTTPError:
            return False
        doc = series.get("document") or {}
        return bool(
            series["instance_count"] == count
            and series["complete"]
            and KEY_THUMBNAIL in doc
            and VALIDATION_DATE in (doc.get(KEY_VALIDATION) or {})
        )

    return check


def post_json(gw: GatewayProcess, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        gw.url(path),
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def snapshot_index(path: Path) -> dict[str, Any]:
    """Every row reindex must reproduce, without arrival and processing times."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        documents = {}
        for project, uid, text in conn.execute("SELECT project, series_uid, doc FROM documents"):
            doc = json.loads(text)
            for key in [k for k in doc if k.startswith("00000000 TimestampArrived")]:
                del doc[key]
            # The date dciodvfy ran, not a property of the data.
            (doc.get(KEY_VALIDATION) or {}).pop(VALIDATION_DATE, None)
            documents[(project, uid)] = doc
        tables = {
            "series": "SELECT series_uid, study_uid, patient_id, modality, description, "
            "series_date, complete FROM series",
            "instances": "SELECT sop_uid, series_uid, study_uid, sop_class_uid, "
            "transfer_syntax_uid, instance_number, number_of_frames, size, storage_key "
            "FROM instances",
            "series_projects": "SELECT series_uid, project FROM series_projects",
            "series_datasets": "SELECT series_uid, project, dataset FROM series_datasets",
            "datasets": "SELECT project, name FROM datasets",
            "projects": "SELECT name FROM projects",
        }
        snapshot: dict[str, Any] = {
            name: sorted(tuple(row) for row in conn.execute(sql)) for name, sql in tables.items()
        }
        snapshot["documents"] = documents
        return snapshot
    finally:
        conn.close()


def assert_same_index(after: dict[str, Any], before: dict[str, Any]) -> None:
    """Equal snapshots; for documents, name the keys that differ."""
    for name in before:
        if name != "documents":
            assert after[name] == before[name], name
    assert after["documents"].keys() == before["documents"].keys()
    for doc_id, doc in before["documents"].items():
        rebuilt = after["documents"][doc_id]
        differing = {
            key: (rebuilt.get(key), doc.get(key))
            for key in doc.keys() | rebuilt.keys()
            if rebuilt.get(key) != doc.get(key)
        }
        assert not differing, f"{doc_id}: {differing}"


def remove_index(data_dir: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (data_dir / f"index.sqlite3{suffix}").unlink(missing_ok=True)


def reindex_command(data_dir: Path, *extra_args: str, **extra: Any) -> list[str]:
    args = [sys.executable, "-m", "kp_gateway", "reindex"]
    for key, value in gateway_overrides(data_dir, **extra).items():
        args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return [*args, *extra_args]


def run_reindex(data_dir: Path, *extra_args: str, **extra: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        reindex_command(data_dir, *extra_args, **extra),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_s3_dcmsend_byte_identical_objects_in_bucket_and_reindex(
    gateway_process: Callable[..., GatewayProcess], moto_s3: MotoS3, tmp_path: Path
) -> None:
    """dcmsend to an S3-backed gateway: instances download byte-identical, thumbnail, report
    and routing record are bucket objects, and reindex from the bucket rebuilds the index."""
    bucket = unique_bucket("e2e")
    settings = s3_settings(moto_s3, bucket)
    paths = make_ct_series(tmp_path / "src", 12)
    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    data_dir = tmp_path / "data"
    gw = gateway_process(data_dir, **settings)
    result = run_dcmsend(gw.dicom_port, paths[0].parent, calling="kp-s3e2e", called="kp-admin")
    assert result.returncode == 0, result.stderr
    wait_until(series_done(gw, series_uid, 12), 60, "series stored, complete and processed")

    for path in paths:
        stored = download(gw, f"/api/instances/{sop_uid(path)}")
        assert stored is not None
        assert dataset_bytes_of(stored) == dataset_bytes(path)
    client = moto_s3.client()
    listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    objects = {item["Key"]: item["Size"] for item in listed}
    assert f"thumbnails/{series_uid}.png" in objects
    assert f"validation/{series_uid}.html" in objects
    assert sum(key.startswith("dicom/") for key in objects) == 12
    routing_keys = [key for key in objects if key.startswith(f"routing/{series_uid}/")]
    assert len(routing_keys) == 1
    record = json.loads(client.get_object(Bucket=bucket, Key=routing_keys[0])["Body"].read())
    assert (record["project"], record["dataset"]) == ("admin", "s3e2e")
    thumbnail = download(gw, f"/api/series/{series_uid}/thumbnail")
    assert thumbnail is not None and thumbnail.startswith(b"\x89PNG\r\n\x1a\n")
    assert gw.stop() == 0

    before = snapshot_index(data_dir / "index.sqlite3")
    remove_index(data_dir)
    run_reindex(data_dir, **settings)
    assert_same_index(snapshot_index(data_dir / "index.sqlite3"), before)
    assert not (data_dir / CHECKPOINT_FILE).exists()


def dataset_bytes_of(data: bytes) -> bytes:
    assert data[128:132] == b"DICM"
    meta_length = int.from_bytes(data[140:144], "little")
    return data[144 + meta_length :]


def test_s3_outage_acknowledges_from_spool_and_catches_up(
    gateway_process: Callable[..., GatewayProcess], moto_s3: MotoS3, tmp_path: Path
) -> None:
    """S3 down mid-series: C-STOREs keep getting 0x0000 (fsynced in the spool), the store
    stage retries with backoff, and once S3 is back every acknowledged instance is stored."""
    bucket = unique_bucket("outage")
    paths = make_ct_series(tmp_path / "src", 30)
    first, second = tmp_path / "first", tmp_path / "second"
    for n, path in enumerate(paths):
        target = (first if n < 10 else second) / path.name
        target.parent.mkdir(exist_ok=True)
        path.rename(target)
    series_uid = str(pydicom.dcmread(first / paths[0].name).SeriesInstanceUID)
    gw = gateway_process(
        tmp_path / "data",
        **s3_settings(moto_s3, bucket),
        # Default max_attempts: an unavailable backend is retried without limit anyway.
        pipeline__retry_backoff_s=0.2,
        pipeline__retry_backoff_max_s=1.0,
        series__enabled=False,
    )
    result = run_dcmsend(gw.dicom_port, first, calling="kp-outage", called="kp-admin")
    assert result.returncode == 0, result.stderr
    moto_s3.stop()
    result = run_dcmsend(gw.dicom_port, second, calling="kp-outage", called="kp-admin")
    # Every instance sent during the outage was acknowledged with Success (0x0000).
    assert result.returncode == 0, result.stderr
    assert re.search(r"with status SUCCESS\s*:\s*20\b", result.stderr), result.stderr
    wait_until(lambda: "retrying in" in gw.log.read_text(errors="replace"), 20, "store retries")
    time.sleep(1.0)
    assert _instance_count(gw, series_uid) < 30, "indexed while S3 was down"

    moto_s3.start()  # same port; moto kept the bucket
    wait_until(lambda: _instance_count(gw, series_uid) == 30, 60, "catch-up after the outage")
    assert gw.get_json("/api/quarantine")["items"] == []
    client = moto_s3.client()
    stored = [
        item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="dicom/")["Contents"]
    ]
    assert len(stored) == 30
    for folder in (first, second):
        for path in folder.iterdir():
            data = download(gw, f"/api/instances/{sop_uid(path)}")
            assert data is not None and dataset_bytes_of(data) == dataset_bytes(path)
    assert gw.stop() == 0


def _instance_count(gw: GatewayProcess, uid: str) -> int:
    try:
        return int(gw.get_json(f"/api/series/{uid}")["instance_count"])
    except urllib.error.HTTPError:
        return 0


def test_fs_reindex_resumes_after_kill_and_reproduces_index(
    gateway_process: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """Filesystem backend: reindex killed midway resumes from its checkpoint, and the
    result equals the index the gateway built (project, datasets, documents, completion)."""
    data_dir = tmp_path / "data"
    gw = gateway_process(data_dir)
    post_json(gw, "/api/projects", {"name": "lab1", "description": "first lab"})
    sent = {
        "kp-lab1": make_ct_series(tmp_path / "a", 40, rows=16),
        "kp-admin": make_ct_series(tmp_path / "b", 40, rows=16, patient_id="P2"),
    }
    for called, paths in sent.items():
        result = run_dcmsend(gw.dicom_port, paths[0].parent, calling="kp-ds1", called=called)
        assert result.returncode == 0, result.stderr
    for paths in sent.values():
        uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        wait_until(series_done(gw, uid, 40), 60, "series processed")
    assert gw.stop() == 0
    before = snapshot_index(data_dir / "index.sqlite3")
    remove_index(data_dir)

    log = tmp_path / "reindex-killed.log"
    checkpoint = data_dir / CHECKPOINT_FILE
    with open(log, "w") as out:
        proc = subprocess.Popen(
            reindex_command(data_dir, index__batch_max_items=2),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        wait_until(checkpoint.exists, 60, "the first checkpoint")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    state = json.loads(checkpoint.read_text())
    assert state["last_key"].startswith("dicom/") and not state["keys_done"], log.read_text()

    result = run_reindex(data_dir, index__batch_max_items=2)
    assert f"resuming after {state['last_key']}" in result.stderr
    assert "of 80 (" in result.stderr
    assert_same_index(snapshot_index(data_dir / "index.sqlite3"), before)
    assert not checkpoint.exists()


def test_serve_refuses_a_locked_data_dir(tmp_path: Path) -> None:
    """serve and reindex share the data directory lock; the second one exits 2 and says so."""
    from kp_gateway.datadir import lock_data_dir

    data_dir = tmp_path / "data"
    lock = lock_data_dir(data_dir)
    try:
        result = subprocess.run(
            reindex_command(data_dir), capture_output=True, text=True, cwd=REPO, timeout=60
        )
        assert result.returncode == 2
        assert "in use by another kp-gateway process" in result.stderr
        args = [sys.executable, "-m", "kp_gateway", "serve", "--data-dir", str(data_dir)]
        args += ["--set", "dicom.port=0", "--set", "http.port=0", "--set", "dicom.host=127.0.0.1"]
        args += ["--set", "http.host=127.0.0.1"]
        result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == 2
        assert "in use by another kp-gateway process" in result.stderr
    finally:
        lock.close()
