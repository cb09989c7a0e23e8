"""reindex in process on a filesystem store: routing records, fallbacks, checkpoint edges."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest

from kp_gateway.backends.fs import FsStorage
from kp_gateway.backends.sqlite import SqliteIndex
from kp_gateway.config import Config, load
from kp_gateway.kaapana.routing_record import routing_record_key
from kp_gateway.reindex import CHECKPOINT_FILE, FALLBACK_DATASET, reindex, write_checkpoint
from kp_gateway.uids import storage_key
from tests.conftest import make_ct_series

DOC_SOP = "00080018 SOPInstanceUID_keyword"
ARRIVED = "00000000 TimestampArrived_datetime"


def config(data_dir: Path) -> Config:
    return load(
        None,
        environ={},
        overrides={"storage.path": str(data_dir), "pipeline.process_pool_size": 1},
    )


async def store_series(
    storage: FsStorage, folder: Path, count: int, route: tuple[str, str] | None
) -> tuple[str, list[str]]:
    """Store a synthetic series as the gateway would; returns its UID and sorted keys."""
    keys = []
    for path in make_ct_series(folder, count):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        key = storage_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        await storage.put_file(key, path)
        keys.append(key)
    keys.sort()
    uid = keys[0].split("/")[2]
    if route is not None:
        project, dataset = route
        record = {
            "project": project,
            "dataset": dataset,
            "calling_ae_title": f"kp-{dataset}",
            "called_ae_title": f"kp-{project}",
            "series_instance_uid": uid,
            # Deliberately not the first key: the document must come from this instance.
            "document_sop_instance_uid": keys[-1].rpartition("/")[2].removesuffix(".dcm"),
            "received_at": 1_700_000_000.25,
        }
        await storage.put_bytes(
            routing_record_key(uid, project, dataset), json.dumps(record).encode()
        )
    return uid, keys


async def series_of(cfg: Config, uid: str) -> dict[str, Any] | None:
    index = SqliteIndex(cfg.sqlite_path)
    await index.open()
    try:
        return await index.get_series(uid)
    finally:
        await index.aclose()


@pytest.fixture
async def stored(tmp_path: Path) -> tuple[Config, dict[str, list[str]]]:
    """A routed series (project lab1, dataset ds1) and one without a routing record."""
    cfg = config(tmp_path / "data")
    storage = FsStorage(cfg.data_dir)
    await storage.open()
    routed_uid, routed = await store_series(storage, tmp_path / "a", 4, ("lab1", "ds1"))
    plain_uid, plain = await store_series(storage, tmp_path / "b", 3, None)
    return cfg, {routed_uid: routed, plain_uid: plain}


async def test_reindex_routes_from_records_and_falls_back(
    stored: tuple[Config, dict[str, list[str]]],
) -> None:
    """Routed series come back in their project/dataset with the recorded document source
    and arrival time; a series without a record lands in the default project."""
    cfg, series = stored
    report = await reindex(cfg, series_stages=False, progress=None)
    assert (report.objects, report.series, report.unrouted_series) == (7, 2, 1)
    routed_uid, plain_uid = list(series)
    routed = await series_of(cfg, routed_uid)
    assert routed is not None and routed["complete"] and routed["instance_count"] == 4
    assert routed["projects"] == ["admin", "lab1"]
    assert {"project": "lab1", "dataset": "ds1"} in routed["datasets"]
    doc = routed["document"]
    assert doc[DOC_SOP] == series[routed_uid][-1].rpartition("/")[2].removesuffix(".dcm")
    assert doc[ARRIVED].startswith("2023-11-14")
    assert doc["00120020 ClinicalTrialProtocolID_keyword"] == "lab1"
    plain = await series_of(cfg, plain_uid)
    assert plain is not None and plain["complete"] and plain["projects"] == ["admin"]
    assert plain["datasets"] == [{"project": "admin", "dataset": FALLBACK_DATASET}]
    assert not (cfg.data_dir / CHECKPOINT_FILE).exists()


async def test_reindex_resume_at_series_end_still_closes_that_series(
    stored: tuple[Config, dict[str, list[str]]],
) -> None:
    """A checkpoint on the last key of a series (committed, not yet completed) resumes by
    writing that series' document and completing it, then goes on with the next series."""
    cfg, series = stored
    ordered = sorted(series.items(), key=lambda item: item[1][0])
    (first_uid, first_keys), (second_uid, _) = ordered
    write_checkpoint(cfg, first_keys[-1])
    report = await reindex(cfg, series_stages=False, progress=None)
    assert report.resumed_after == first_keys[-1]
    first = await series_of(cfg, first_uid)
    # Its instances were before the checkpoint; what the resume owed it is there.
    assert first is not None and first["complete"] and first["document"]
    second = await series_of(cfg, second_uid)
    assert second is not None and second["complete"] and second["instance_count"] > 0


async def test_reindex_restart_ignores_checkpoint(
    stored: tuple[Config, dict[str, list[str]]],
) -> None:
    """--restart indexes everything even when a checkpoint says otherwise."""
    cfg = stored[0]
    write_checkpoint(cfg, "dicom/~", keys_done=True)
    report = await reindex(cfg, restart=True, series_stages=False, progress=None)
    assert report.objects == 7
