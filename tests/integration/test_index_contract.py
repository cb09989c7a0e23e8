"""One contract for every IndexBackend: SQLite (always), OpenSearch against the in-process
stand-in (always) and against a real cluster when KP_TEST_OPENSEARCH_URL is set.

The real-cluster run deletes every ``kp_*`` and ``project_*`` index it finds before each test:
point KP_TEST_OPENSEARCH_URL at a disposable cluster only.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from kp_gateway.backends.base import IndexBackend, IndexedInstance, SeriesQuery
from kp_gateway.backends.opensearch import OpenSearchIndex
from kp_gateway.backends.sqlite import SqliteIndex
from kp_gateway.dicomweb.attributes import Level, level_attributes_json
from kp_gateway.dicomweb.qido import QidoRow, parse_query
from kp_gateway.errors import BackendRejectedError
from kp_gateway.kaapana.document import build_series_document
from kp_gateway.model import InstanceRecord, Routing
from tests.opensearch_standin import Standin

REAL_URL = os.environ.get("KP_TEST_OPENSEARCH_URL", "")
real_opensearch = pytest.param(
    "opensearch-real",
    marks=[
        pytest.mark.opensearch,
        pytest.mark.skipif(not REAL_URL, reason="KP_TEST_OPENSEARCH_URL is not set"),
    ],
)  # fmt: skip
ALL_BACKENDS = ["sqlite", "opensearch-standin", real_opensearch]
OPENSEARCH_BACKENDS = ["opensearch-standin", real_opensearch]

KEY_VALIDATION = "00111001 ValidationResults_object"
KEY_THUMBNAIL = "00000000 ThumbnailInstanceUID_keyword"
SUMMARY_KEYS = {
    "series_uid", "study_uid", "patient_id", "modality", "description", "series_date",
    "instance_count", "datasets", "complete", "first_received_at", "last_received_at",
    "validation", "has_thumbnail", "thumbnail_error",
}  # fmt: skip
T0 = 1_700_000_000.0


def _verify() -> bool:
    return os.environ.get("KP_TEST_OPENSEARCH_VERIFY_TLS", "1") != "0"


async def _wipe_real_cluster(url: str) -> None:
    from opensearchpy import AsyncOpenSearch

    user = os.environ.get("KP_GATEWAY_INDEX_OPENSEARCH_USER", "")
    auth = (user, os.environ.get("KP_GATEWAY_INDEX_OPENSEARCH_PASSWORD", "")) if user else None
    client = AsyncOpenSearch(hosts=[url], http_auth=auth, verify_certs=_verify())
    try:
        for pattern in ("kp_*", "project_*"):
            for name in await client.indices.get(index=pattern):
                await client.indices.delete(index=name)
    finally:
        await client.close()


def opensearch_index(url: str, **kw: Any) -> OpenSearchIndex:
    """An OpenSearchIndex configured like make_index does, credentials from the environment."""
    return OpenSearchIndex(
        url,
        verify_tls=_verify(),
        user=os.environ.get("KP_GATEWAY_INDEX_OPENSEARCH_USER", ""),
        password=os.environ.get("KP_GATEWAY_INDEX_OPENSEARCH_PASSWORD", ""),
        **kw,
    )


@pytest.fixture
async def standin() -> AsyncIterator[Standin]:
    server = Standin()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(params=ALL_BACKENDS)
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IndexBackend]:
    """An opened index backend of each kind, with the default project ``lab``."""
    backend: IndexBackend
    server: Standin | None = None
    if request.param == "sqlite":
        backend = SqliteIndex(tmp_path / "index.sqlite3", default_project="lab")
    elif request.param == "opensearch-standin":
        server = Standin()
        backend = opensearch_index(await server.start(), default_project="lab")
    else:
        await _wipe_real_cluster(REAL_URL)
        backend = opensearch_index(REAL_URL, default_project="lab")
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()
        if server is not None:
            await server.stop()


@pytest.fixture(params=OPENSEARCH_BACKENDS)
async def os_index(request: pytest.FixtureRequest) -> AsyncIterator[OpenSearchIndex]:
    """OpenSearch only: the stand-in, and a real cluster when configured."""
    server: Standin | None = None
    if request.param == "opensearch-standin":
        server = Standin()
        url = await server.start()
    else:
        await _wipe_real_cluster(REAL_URL)
        url = REAL_URL
    backend = opensearch_index(url)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()
        if server is not None:
            await server.stop()


# -- synthetic data ----------------------------------------------------------------------


def make_dataset(
    series_uid: str,
    study_uid: str,
    number: int | None,
    *,
    patient_id: str = "P0001",
    modality: str = "CT",
    description: str = "Chest CT",
    manufacturer: str = "ACME",
) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.StudyDate = ds.SeriesDate = "20240315"
    ds.StudyTime = "101500"
    ds.SeriesDescription = description
    ds.Manufacturer = manufacturer
    ds.Rows = ds.Columns = 16
    ds.SliceThickness = 1.0
    if number is not None:
        ds.InstanceNumber = number
    return ds


def make_item(
    ds: pydicom.Dataset,
    *,
    project: str = "lab",
    dataset: str = "ds1",
    at: float = T0,
    size: int = 1000,
    document: bool = True,
    key: str | None = None,
) -> IndexedInstance:
    arrived = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
    doc = build_series_document(ds, project=project, dataset=dataset, arrived_at=arrived)
    number = ds.get("InstanceNumber")
    record = InstanceRecord(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        modality=str(ds.Modality),
        instance_number=None if number is None else int(number),
        number_of_frames=None,
        patient_id=str(ds.PatientID),
        series_description=str(ds.SeriesDescription),
        series_date=str(ds.SeriesDate),
        size_bytes=size,
        storage_key=key or f"dicom/{ds.SOPInstanceUID}.dcm",
        document=doc if document else None,
        dicomweb_json=level_attributes_json(ds),
    )
    return IndexedInstance(record, Routing(project, dataset, "src-1"), at)


def series(
    count: int, *, start: int = 1, series_uid: str | None = None, study_uid: str | None = None,
    at: float = T0, project: str = "lab", dataset: str = "ds1", **ds_kw: Any,
) -> list[IndexedInstance]:  # fmt: skip
    """`count` instances of one series; only the first carries the document, as in ingest."""
    series_uid, study_uid = series_uid or generate_uid(), study_uid or generate_uid()
    return [
        make_item(
            make_dataset(series_uid, study_uid, start + i, **ds_kw),
            project=project,
            dataset=dataset,
            at=at + i,
            document=i == 0,
        )
        for i in range(count)
    ]


def uid_of(items: list[IndexedInstance]) -> str:
    return items[0].record.series_instance_uid


# -- the contract --------------------------------------------------------------------------


async def test_open_creates_admin_and_default_project(index: IndexBackend) -> None:
    await index.ping()
    projects = {p["name"]: p for p in await index.list_projects()}
    assert set(projects) == {"admin", "lab"}
    assert projects["admin"]["description"] == "Initial admin project"
    assert projects["admin"]["series_count"] == 0
    assert set(projects["admin"]) == {"name", "description", "created_at", "series_count"}
    assert await index.project_exists("admin") and await index.project_exists("lab")
    assert not await index.project_exists("nope")


async def test_write_new_series_maps_project_admin_and_dataset(index: IndexBackend) -> None:
    await index.create_project("lung", "Lung study")
    items = series(3, project="lung", dataset="trial-a")
    await index.write_instances(items)
    uid = uid_of(items)
    got = await index.get_series(uid)
    assert got is not None
    assert got["projects"] == ["admin", "lung"]
    assert got["datasets"] == [
        {"project": "admin", "dataset": "trial-a"},
        {"project": "lung", "dataset": "trial-a"},
    ]
    assert got["instance_count"] == 3 and got["size_bytes"] == 3000
    assert got["complete"] is False and got["completed_at"] is None
    assert got["first_received_at"] == T0 and got["last_received_at"] == T0 + 2
    assert (got["modality"], got["patient_id"], got["description"]) == ("CT", "P0001", "Chest CT")
    doc = got["document"]
    assert doc["0020000E SeriesInstanceUID_keyword"] == uid
    assert doc["00120020 ClinicalTrialProtocolID_keyword"] == "lung"
    assert doc["00120010 ClinicalTrialSponsorName_keyword"] == "trial-a"
    counts = {p["name"]: p["series_count"] for p in await index.list_projects()}
    assert counts == {"admin": 1, "lab": 0, "lung": 1}
    for project in ("lung", "admin"):
        datasets = await index.list_datasets(project)
        assert [(d["name"], d["series_count"], d["instance_count"]) for d in datasets] == [
            ("trial-a", 1, 3)
        ]
        assert set(datasets[0]) == {"name", "created_at", "series_count", "instance_count"}
        assert datasets[0]["created_at"] == T0


async def test_unknown_project_maps_to_admin_only(index: IndexBackend) -> None:
    items = series(1, project="ghost", dataset="x")
    await index.write_instances(items)
    got = await index.get_series(uid_of(items))
    assert got is not None
    assert got["projects"] == ["admin"]
    assert got["datasets"] == [{"project": "admin", "dataset": "x"}]
    assert not await index.project_exists("ghost")
    assert await index.list_datasets("ghost") == []


async def test_series_in_two_datasets_and_batches(index: IndexBackend) -> None:
    first = series(2, dataset="a")
    uid = uid_of(first)
    study = first[0].record.study_instance_uid
    later = series(1, start=3, series_uid=uid, study_uid=study, dataset="b", at=T0 + 100)
    await index.write_instances(first)
    await index.write_instances(later)
    got = await index.get_series(uid)
    assert got is not None
    assert got["datasets"] == [
        {"project": "admin", "dataset": "a"},
        {"project": "admin", "dataset": "b"},
        {"project": "lab", "dataset": "a"},
        {"project": "lab", "dataset": "b"},
    ]
    counts = {
        d["name"]: (d["series_count"], d["instance_count"])
        for d in await index.list_datasets("lab")
    }
    assert counts == {"a": (1, 3), "b": (1, 3)}


async def test_late_instance_reopens_and_same_sop_is_replaced(index: IndexBackend) -> None:
    items = series(2)
    uid = uid_of(items)
    await index.write_instances(items)
    assert uid in await index.incomplete_series()
    await index.complete_series(uid)
    assert uid not in await index.incomplete_series()
    done = await index.get_series(uid)
    assert done is not None and done["complete"] is True and done["completed_at"] is not None

    study = items[0].record.study_instance_uid
    late = series(1, start=3, series_uid=uid, study_uid=study, at=T0 + 50)
    await index.write_instances(late)
    got = await index.get_series(uid)
    assert got is not None
    assert got["complete"] is False and uid in await index.incomplete_series()
    assert got["first_received_at"] == T0 and got["last_received_at"] == T0 + 50
    assert got["instance_count"] == 3

    # The same SOP Instance again (a re-send): replaced, not counted twice.
    again = late[0]
    replaced = IndexedInstance(
        InstanceRecord(**{**_fields(again.record), "size_bytes": 5, "storage_key": "dicom/new"}),
        again.routing,
        T0 + 60,
    )
    await index.write_instances([replaced])
    got = await index.get_series(uid)
    assert got is not None and got["instance_count"] == 3
    assert got["size_bytes"] == 2005
    assert await index.instance_key(uid, again.record.sop_instance_uid) == "dicom/new"


async def test_reused_sop_instance_uid_is_another_instance(index: IndexBackend) -> None:
    """Issue 14 finding 8: a SOPInstanceUID that another series (of another project) reuses
    does not take the instance away from the first series."""
    await index.create_project("neuro")
    first = series(2)
    await index.write_instances(first)
    await index.complete_series(uid_of(first))
    reused = first[0].record
    other = make_item(
        make_dataset(generate_uid(), generate_uid(), 1), project="neuro", at=T0 + 30, key="k2"
    )
    theft = IndexedInstance(
        InstanceRecord(**{**_fields(other.record), "sop_instance_uid": reused.sop_instance_uid}),
        other.routing,
        T0 + 30,
    )
    await index.write_instances([theft])
    kept = await index.get_series(uid_of(first))
    assert kept is not None and kept["instance_count"] == 2 and kept["complete"] is True
    assert [i["sop_uid"] for i in await index.list_instances(uid_of(first))] == [
        i.record.sop_instance_uid for i in first
    ]
    assert await index.instance_key(uid_of(first), reused.sop_instance_uid) == reused.storage_key
    theirs = other.record.series_instance_uid
    assert await index.instance_key(theirs, reused.sop_instance_uid) == "k2"
    copies = await index.find_instance(reused.sop_instance_uid)
    assert [(c["series_uid"], c["storage_key"]) for c in copies] == [
        (theirs, "k2"),
        (uid_of(first), reused.storage_key),
    ]  # newest first
    assert set(copies[0]) == {"series_uid", "study_uid", "storage_key", "received_at"}
    assert await index.find_instance(generate_uid()) == []
    _, lab = await index.query_series(SeriesQuery(project="lab"))
    assert [(s["series_uid"], s["instance_count"]) for s in lab] == [(uid_of(first), 2)]


def _fields(rec: InstanceRecord) -> dict[str, Any]:
    return {name: getattr(rec, name) for name in rec.__dataclass_fields__}


async def test_documents_merge_kaapana_style(index: IndexBackend) -> None:
    items = series(1, manufacturer="ACME")
    uid = uid_of(items)
    await index.write_instances(items)
    validation = {"00111002 ValidationErrors_integer": 2, "00111003 ValidationWarnings_integer": 5}
    await index.update_documents(uid, {KEY_VALIDATION: validation, KEY_THUMBNAIL: "1.2.3"})
    await index.update_documents(uid, {"00000000 Tags_keyword": ["reviewed"]})
    study = items[0].record.study_instance_uid
    newer = make_item(
        make_dataset(uid, study, 7, manufacturer="Other", description="Chest CT"), at=T0 + 9
    )
    await index.write_instances([newer])
    got = await index.get_series(uid)
    assert got is not None
    doc = got["document"]
    assert doc["00080070 Manufacturer_keyword"] == "Other"  # new keys over old
    assert doc["00200013 InstanceNumber_integer"] == 7
    assert doc[KEY_VALIDATION] == validation  # what the new document lacks survives
    assert doc[KEY_THUMBNAIL] == "1.2.3"
    assert doc["00000000 Tags_keyword"] == ["reviewed"]
    # The same merge happened in the project's document (seen through query_series).
    _, page = await index.query_series(SeriesQuery(project="lab"))
    assert page[0]["validation"] == validation and page[0]["has_thumbnail"] is True
    # A recorded thumbnail failure shows in the summary, so the gallery can tell it from pending.
    await index.update_documents(uid, {"00000000 ThumbnailError_keyword": "cannot decode"})
    _, page = await index.query_series(SeriesQuery(project="lab"))
    assert page[0]["thumbnail_error"] == "cannot decode"
    await index.update_documents(generate_uid(), {KEY_THUMBNAIL: "x"})  # unknown: no error


async def test_complete_series_fields(index: IndexBackend) -> None:
    uid = generate_uid()
    study = generate_uid()
    items = [make_item(make_dataset(uid, study, n), at=T0 + n, document=n == 1) for n in (1, 2, 4)]
    await index.write_instances(items)
    fields = await index.complete_series(uid)
    assert fields == {
        "00000000 IsSeriesComplete_boolean": False,
        "00000000 MissingInstanceNumbers_integer": [3],
        "00000000 MinInstanceNumber_integer": 1,
        "00000000 MaxInstanceNumber_integer": 4,
    }
    got = await index.get_series(uid)
    assert got is not None and got["complete"] is True  # completion ran; the series has a gap
    for key, value in fields.items():
        assert got["document"][key] == value

    lone = [make_item(make_dataset(generate_uid(), study, None))]
    await index.write_instances(lone)
    fields = await index.complete_series(uid_of(lone))
    assert fields["00000000 IsSeriesComplete_boolean"] is True
    assert fields["00000000 MinInstanceNumber_integer"] == 1  # Kaapana: a lone instance is #1
    assert fields["00000000 MissingInstanceNumbers_integer"] == []


async def test_query_series_filters_paging_and_summary(index: IndexBackend) -> None:
    await index.create_project("neuro")
    study = generate_uid()
    ct_a = series(
        2, dataset="a", at=T0, study_uid=study, patient_id="P-100", description="Chest CT"
    )
    mr_a = series(
        1, dataset="a", at=T0 + 10, modality="MR", patient_id="P-200", description="Brain MR"
    )
    ct_b = series(
        1, dataset="b", at=T0 + 20, patient_id="P-300", description="Abdomen", manufacturer="Zeiss"
    )
    other = series(1, project="neuro", dataset="n", at=T0 + 30)
    await index.write_instances(ct_a + mr_a)
    await index.write_instances(ct_b + other)

    async def uids(**kw: Any) -> tuple[int, list[str]]:
        total, items = await index.query_series(SeriesQuery(project="lab", **kw))
        return total, [i["series_uid"] for i in items]

    newest_first = [uid_of(ct_b), uid_of(mr_a), uid_of(ct_a)]
    assert await uids() == (3, newest_first)
    assert await uids(limit=2) == (3, newest_first[:2])
    assert await uids(limit=2, offset=2) == (3, newest_first[2:])
    assert await uids(offset=5) == (3, [])
    assert await uids(dataset="a") == (2, [uid_of(mr_a), uid_of(ct_a)])
    assert await uids(dataset="zzz") == (0, [])
    assert await uids(modality="MR") == (1, [uid_of(mr_a)])
    assert await uids(patient_id="P-300") == (1, [uid_of(ct_b)])
    assert await uids(study_uid=study) == (1, [uid_of(ct_a)])
    assert await uids(modality="CT", dataset="b") == (1, [uid_of(ct_b)])
    # Free text: description and patient ID (substring, any case) and document values.
    assert await uids(text="brain") == (1, [uid_of(mr_a)])
    assert await uids(text="P-1") == (1, [uid_of(ct_a)])
    assert await uids(text="zeiss") == (1, [uid_of(ct_b)])
    assert await uids(text="nothing-like-this") == (0, [])
    assert (await index.query_series(SeriesQuery(project="neuro")))[0] == 1
    assert (await index.query_series(SeriesQuery(project="admin")))[0] == 4

    _, items = await index.query_series(SeriesQuery(project="lab", dataset="a"))
    summary = items[1]
    assert set(summary) == SUMMARY_KEYS
    assert summary["series_uid"] == uid_of(ct_a) and summary["study_uid"] == study
    assert summary["instance_count"] == 2 and summary["datasets"] == ["a"]
    assert (summary["modality"], summary["patient_id"]) == ("CT", "P-100")
    assert summary["series_date"] == "20240315"
    assert summary["complete"] is False and summary["validation"] is None
    assert summary["has_thumbnail"] is False and summary["thumbnail_error"] is None
    assert summary["first_received_at"] == T0 and summary["last_received_at"] == T0 + 1


async def test_list_instances_and_instance_key(index: IndexBackend) -> None:
    uid, study = generate_uid(), generate_uid()
    items = [
        make_item(make_dataset(uid, study, n), at=T0, size=10 * (i + 1), document=i == 0)
        for i, n in enumerate((3, None, 1))
    ]
    await index.write_instances(items)
    listed = await index.list_instances(uid)
    assert [i["instance_number"] for i in listed] == [None, 1, 3]  # no number sorts first
    assert set(listed[0]) == {
        "sop_uid", "sop_class_uid", "transfer_syntax_uid", "instance_number",
        "number_of_frames", "size", "storage_key", "received_at",
    }  # fmt: skip
    first = listed[1]
    assert first["sop_uid"] == items[2].record.sop_instance_uid
    assert (first["size"], first["received_at"], first["number_of_frames"]) == (30, T0, None)
    assert first["sop_class_uid"] == CTImageStorage
    assert first["transfer_syntax_uid"] == ExplicitVRLittleEndian
    assert await index.instance_key(uid, first["sop_uid"]) == first["storage_key"]
    assert await index.instance_key(uid, generate_uid()) is None
    assert await index.instance_key(generate_uid(), first["sop_uid"]) is None
    assert await index.list_instances(generate_uid()) == []
    assert await index.get_series(generate_uid()) is None


async def test_projects_create_duplicate_delete(index: IndexBackend) -> None:
    created = await index.create_project("lung", "Lung")
    assert (created["name"], created["description"], created["series_count"]) == ("lung", "Lung", 0)
    with pytest.raises(BackendRejectedError):
        await index.create_project("lung")
    items = series(2, project="lung", dataset="d")
    await index.write_instances(items)
    assert await index.delete_project("lung") is True
    assert await index.delete_project("lung") is False
    assert not await index.project_exists("lung")
    got = await index.get_series(uid_of(items))
    assert got is not None  # the stored instances and admin's view stay
    assert got["projects"] == ["admin"]
    assert got["datasets"] == [{"project": "admin", "dataset": "d"}]
    assert got["instance_count"] == 2
    assert [p["name"] for p in await index.list_projects()] == ["admin", "lab"]
    # A project created again under the same name starts empty.
    await index.create_project("lung")
    assert await index.query_series(SeriesQuery(project="lung")) == (0, [])
    assert await index.list_datasets("lung") == []
    assert (await index.query_series(SeriesQuery(project="admin")))[0] == 1


async def test_quarantine_newest_first(index: IndexBackend) -> None:
    assert await index.list_quarantine() == []
    await index.record_quarantine("store", "/spool/q/a.dcm", "InvalidDicomError: bad")
    await index.record_quarantine("index", "/spool/q/b.dcm", "BackendRejectedError: no")
    listed = await index.list_quarantine()
    assert [(q["stage"], q["path"], q["reason"]) for q in listed] == [
        ("index", "/spool/q/b.dcm", "BackendRejectedError: no"),
        ("store", "/spool/q/a.dcm", "InvalidDicomError: bad"),
    ]
    assert set(listed[0]) == {"id", "stage", "path", "reason", "at"}
    assert listed[0]["at"] >= listed[1]["at"]


async def test_many_instances_page_through(index: IndexBackend) -> None:
    """More instances than one scan page (1000): counts and listings stay exact."""
    items = series(1203)
    await index.write_instances(items)
    uid = uid_of(items)
    assert len(await index.list_instances(uid)) == 1203
    fields = await index.complete_series(uid)
    assert fields["00000000 MaxInstanceNumber_integer"] == 1203
    assert fields["00000000 IsSeriesComplete_boolean"] is True
    assert (await index.list_datasets("lab"))[0]["instance_count"] == 1203


# -- OpenSearch specifics (stand-in, and a real cluster when configured) --------------------


async def test_opensearch_template_maps_kaapana_suffixes(os_index: OpenSearchIndex) -> None:
    items = series(1)
    await os_index.write_instances(items)
    await os_index.update_documents(
        uid_of(items),
        {KEY_VALIDATION: {"00111004 ValidationDate_datetime": "2025-11-24 15:07:30.123456"}},
    )
    mapping = await os_index.client.indices.get_mapping(index="project_admin")
    props = mapping["project_admin"]["mappings"]["properties"]
    assert props["00280010 Rows_integer"]["type"] == "long"
    assert props["00180050 SliceThickness_float"]["type"] == "float"
    assert props["00080020 StudyDate_date"] == {"type": "date", "format": "yyyy-MM-dd"}
    assert props["00080030 StudyTime_time"] == {"type": "date", "format": "HH:mm:ss.SSSSSS"}
    assert props["00000000 Timestamp_datetime"]["format"] == "yyyy-MM-dd HH:mm:ss.SSSSSS"
    assert props["00080060 Modality_keyword"]["type"] == "text"
    assert props["00080060 Modality_keyword"]["fields"]["keyword"]["type"] == "keyword"
    inner = props[KEY_VALIDATION]["properties"]["00111004 ValidationDate_datetime"]
    assert inner["type"] == "date"
    # What Kaapana's dashboards query: the keyword sub-field of a string key.
    body = {"query": {"term": {"0020000E SeriesInstanceUID_keyword.keyword": uid_of(items)}}}
    hits = await os_index.client.search(index="project_admin", body=body)
    assert [h["_id"] for h in hits["hits"]["hits"]] == [uid_of(items)]


async def test_opensearch_mapping_conflict_is_rejected(os_index: OpenSearchIndex) -> None:
    good = series(1)
    await os_index.write_instances(good)
    bad = series(1)
    assert bad[0].record.document is not None
    bad[0].record.document["00280010 Rows_integer"] = "not a number"
    with pytest.raises(BackendRejectedError, match="Rows_integer"):
        await os_index.write_instances(bad)
    with pytest.raises(BackendRejectedError):
        await os_index.update_documents(uid_of(good), {"00000000 IsFoo_boolean": "maybe"})


# -- DICOMweb (QIDO-RS) -------------------------------------------------------------------------


async def _qido(
    index: IndexBackend, level: Level, project: str = "admin", **kw: Any
) -> tuple[list[QidoRow], bool]:
    study, series_uid = kw.pop("study", None), kw.pop("series", None)
    query = parse_query(level, project, list(kw.items()), study_uid=study, series_uid=series_uid)
    return await index.qido(query)


def _dicomweb_corpus() -> dict[str, list[IndexedInstance]]:
    ct_study, mr_study = generate_uid(), generate_uid()
    ct_series, seg_series, mr_series = generate_uid(), generate_uid(), generate_uid()
    ct = [make_dataset(ct_series, ct_study, n) for n in (1, 2, 3)]
    seg = [make_dataset(seg_series, ct_study, 1, modality="SEG")]
    mr = [make_dataset(mr_series, mr_study, n, patient_id="P0002", modality="MR") for n in (1, 2)]
    for ds in mr:
        ds.PatientName, ds.StudyDate, ds.StudyTime = "Doe^Jane", "20231201", "093000"
        ds.AccessionNumber = "ACC-7"
    for ds in ct + seg:
        ds.AccessionNumber = "ACC-1"
    return {
        "ct": [make_item(ds, at=T0 + n) for n, ds in enumerate(ct)],
        "seg": [make_item(seg[0], at=T0 + 5)],
        "mr": [make_item(ds, project="neuro", at=T0 + 10 + n) for n, ds in enumerate(mr)],
    }


def _uids(rows: list[QidoRow], attr: str) -> set[str]:
    return {str(getattr(r, attr)) for r in rows}


async def test_qido_matching_at_every_level(index: IndexBackend) -> None:
    await index.create_project("neuro")
    corpus = _dicomweb_corpus()
    for items in corpus.values():
        await index.write_instances(items)
    ct_study = corpus["ct"][0].record.study_instance_uid
    mr_study = corpus["mr"][0].record.study_instance_uid
    both = {ct_study, mr_study}
    study_cases: list[tuple[dict[str, str], set[str]]] = [
        ({}, both),
        ({"PatientID": "P0002"}, {mr_study}),
        ({"PatientName": "doe*"}, {mr_study}),
        ({"PatientName": "D?E^JANE"}, {mr_study}),
        ({"PatientName": "Doe"}, set()),
        ({"PatientName": "test^patient"}, {ct_study}),
        ({"StudyDate": "20231101-20231231"}, {mr_study}),
        ({"StudyDate": "-20231231"}, {mr_study}),
        ({"StudyDate": "20240101-"}, {ct_study}),
        ({"StudyTime": "0900-0930"}, {mr_study}),
        ({"ModalitiesInStudy": "SEG"}, {ct_study}),
        ({"ModalitiesInStudy": "MR,XA"}, {mr_study}),
        ({"AccessionNumber": "ACC-*"}, both),
        ({"StudyInstanceUID": f"{ct_study},{mr_study}"}, both),
        ({"StudyInstanceUID": mr_study, "PatientID": "P0001"}, set()),
    ]
    for params, expected in study_cases:
        rows, more = await _qido(index, Level.STUDY, **params)
        assert _uids(rows, "study_uid") == expected, params
        assert not more
    (ct,) = (await _qido(index, Level.STUDY, StudyInstanceUID=ct_study))[0]
    assert (ct.study_series, ct.study_instances, sorted(ct.modalities)) == (2, 4, ["CT", "SEG"])
    assert json.loads(ct.study_json)["00100020"]["Value"] == ["P0001"]
    # Project scoping: neuro sees its MR study only; lab its CT study only.
    neuro, _ = await _qido(index, Level.STUDY, "neuro")
    assert _uids(neuro, "study_uid") == {mr_study}
    lab, _ = await _qido(index, Level.STUDY, "lab", PatientName="doe*")
    assert lab == []
    # Paging: limit, offset, and whether more follow.
    first, more = await _qido(index, Level.STUDY, limit="1")
    second, last = await _qido(index, Level.STUDY, limit="1", offset="1")
    assert more and not last
    assert _uids(first, "study_uid") | _uids(second, "study_uid") == both

    series, _ = await _qido(index, Level.SERIES, study=ct_study)
    assert {json.loads(r.series_json)["00080060"]["Value"][0] for r in series} == {"CT", "SEG"}
    assert {r.series_instances for r in series} == {3, 1}
    mr_series, _ = await _qido(index, Level.SERIES, PatientName="doe*")
    assert [r.study_uid for r in mr_series] == [mr_study]
    assert json.loads(mr_series[0].study_json)["00100010"]["Value"][0]["Alphabetic"] == "Doe^Jane"
    assert (await _qido(index, Level.SERIES, Modality="CT", study=mr_study))[0] == []

    ct_series = corpus["ct"][0].record.series_instance_uid
    instances, _ = await _qido(index, Level.INSTANCE, study=ct_study, series=ct_series)
    assert [json.loads(r.instance_json)["00200013"]["Value"][0] for r in instances] == [1, 2, 3]
    (second_ct,) = (
        await _qido(index, Level.INSTANCE, study=ct_study, series=ct_series, InstanceNumber="2")
    )[0]
    assert second_ct.sop_uid == corpus["ct"][1].record.sop_instance_uid
    everywhere, _ = await _qido(index, Level.INSTANCE, SOPClassUID=CTImageStorage)
    assert len(everywhere) == 6
    by_patient, _ = await _qido(index, Level.INSTANCE, PatientID="P0002")
    assert _uids(by_patient, "series_uid") == {corpus["mr"][0].record.series_instance_uid}
    assert (await _qido(index, Level.INSTANCE, "lab", PatientID="P0002"))[0] == []


async def test_dicomweb_instances_are_scoped(index: IndexBackend) -> None:
    await index.create_project("neuro")
    corpus = _dicomweb_corpus()
    for items in corpus.values():
        await index.write_instances(items)
    mr = corpus["mr"][0].record
    found = await index.dicomweb_instances("neuro", mr.study_instance_uid)
    assert [f["sop_uid"] for f in found] == [i.record.sop_instance_uid for i in corpus["mr"]]
    assert set(found[0]) >= {"storage_key", "transfer_syntax_uid", "size", "received_at"}
    assert await index.dicomweb_instances("lab", mr.study_instance_uid) == []
    one = await index.dicomweb_instances(
        "admin", mr.study_instance_uid, mr.series_instance_uid, mr.sop_instance_uid
    )
    assert [f["sop_uid"] for f in one] == [mr.sop_instance_uid]
