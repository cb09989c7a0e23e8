"""An index written by an older gateway (instances keyed by SOPInstanceUID alone) is migrated
when a new gateway opens it, keeping every instance (issue 14 finding 8)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from opensearchpy import AsyncOpenSearch
from pydicom.uid import generate_uid

from kp_gateway.backends.opensearch import (
    INSTANCES,
    KP_INDICES,
    LEGACY_INSTANCES,
    OpenSearchIndex,
)
from kp_gateway.backends.sqlite import SCHEMA_VERSION, SqliteIndex
from tests.opensearch_standin import Standin

# The instances table as gateways before schema version 1 created it.
V0_INSTANCES = """
CREATE TABLE instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL, transfer_syntax_uid TEXT NOT NULL, instance_number INTEGER,
    number_of_frames INTEGER, size INTEGER NOT NULL, storage_key TEXT NOT NULL,
    received_at REAL NOT NULL);
CREATE INDEX instances_by_series ON instances (series_uid);
"""


def _v0_rows(count: int) -> list[dict[str, object]]:
    series, study = generate_uid(), generate_uid()
    return [
        {
            "sop_uid": (sop := generate_uid()),
            "series_uid": series,
            "study_uid": study,
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            "instance_number": n + 1,
            "number_of_frames": None,
            "size": 100 + n,
            "storage_key": f"dicom/{study}/{series}/{sop}.dcm",
            "received_at": 1_700_000_000.0 + n,
        }
        for n in range(count)
    ]


async def test_sqlite_v0_index_is_migrated_once(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    rows = _v0_rows(3)
    conn = sqlite3.connect(path)
    conn.executescript(V0_INSTANCES)
    columns = ", ".join(rows[0])
    conn.executemany(
        f"INSERT INTO instances ({columns}) VALUES ({', '.join('?' * len(rows[0]))})",
        [tuple(r.values()) for r in rows],
    )
    conn.commit()
    conn.close()

    for _ in range(2):  # the second open finds the new schema and changes nothing
        index = SqliteIndex(path)
        await index.open()
        try:
            series = str(rows[0]["series_uid"])
            listed = await index.list_instances(series)
            assert [(i["sop_uid"], i["size"]) for i in listed] == [
                (r["sop_uid"], r["size"]) for r in rows
            ]
            for row in rows:
                key = await index.instance_key(series, str(row["sop_uid"]))
                assert key == row["storage_key"]
        finally:
            await index.aclose()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        pk = [r[1] for r in conn.execute("PRAGMA table_info(instances)") if r[5]]
        assert sorted(pk) == ["series_uid", "sop_uid"]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "instances_v0" not in tables and "instances_by_series" not in tables
    finally:
        conn.close()


async def test_opensearch_legacy_instances_are_moved(tmp_path: Path) -> None:
    server = Standin()
    url = await server.start()
    rows = _v0_rows(3)
    client = AsyncOpenSearch(hosts=[url])
    try:
        # The mapping is the one older gateways gave kp_instances; only the _id changed.
        await client.indices.create(index=LEGACY_INSTANCES, body=KP_INDICES[INSTANCES])
        for row in rows:
            await client.index(index=LEGACY_INSTANCES, id=str(row["sop_uid"]), body=row)
        await client.indices.refresh(index=LEGACY_INSTANCES)
        index = OpenSearchIndex(url)
        await index.open()
        try:
            series = str(rows[0]["series_uid"])
            listed = await index.list_instances(series)
            assert [i["sop_uid"] for i in listed] == [r["sop_uid"] for r in rows]
            for row in rows:
                key = await index.instance_key(series, str(row["sop_uid"]))
                assert key == row["storage_key"]
            assert not await client.indices.exists(index=LEGACY_INSTANCES)
            assert await client.indices.exists(index=INSTANCES)
        finally:
            await index.aclose()
    finally:
        await client.close()
        await server.stop()
