"""The OpenSearch stand-in is strict (so it cannot hide bugs), the backend retries and
translates errors, and the gateway runs end to end on ``index.backend = "opensearch"``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import pytest

from kp_gateway.backends.opensearch import OpenSearchIndex
from kp_gateway.errors import BackendRejectedError, BackendUnavailableError
from tests.conftest import free_port, make_ct_series, requires_dcmtk, run_dcmsend
from tests.integration.test_index_contract import series, uid_of
from tests.opensearch_standin import Standin


@pytest.fixture
async def standin() -> AsyncIterator[Standin]:
    server = Standin()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http(standin: Standin) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=standin.url) as session:
        yield session


async def _call(
    http: aiohttp.ClientSession, method: str, path: str, body: Any = None, data: str | None = None
) -> tuple[int, Any]:
    payload = data if data is not None else (None if body is None else json.dumps(body))
    headers = {"Content-Type": "application/json"}
    async with http.request(method, path, data=payload, headers=headers) as response:
        return response.status, await response.json()


def _error_type(body: Any) -> str:
    return str(body["error"]["type"])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ('{"index": {"_index": "t", "_id": "1"}}\n{"a": 1}', "terminated by a newline"),
        ('{"index": {"_index": "t", "_id": "1"}}\n', "source line"),
        ('{"upsert": {"_index": "t", "_id": "1"}}\n{"a": 1}\n', "expected one of"),
        ('{"index": {"_index": "t", "_id": "1"}\n{"a": 1}\n', "Malformed action"),
        ('{"index": {"_index": "t", "_id": "1"}}\n{"a": \n', "source line"),
        ('{"index": {"_index": "t", "routing": "x"}}\n{"a": 1}\n', "unknown parameter"),
        ('{"index": {"_id": "1"}}\n{"a": 1}\n', "index is missing"),
        ("", "no requests added"),
    ],
)
async def test_standin_rejects_malformed_bulk(
    http: aiohttp.ClientSession, data: str, reason: str
) -> None:
    status, body = await _call(http, "POST", "/_bulk", data=data)
    assert status == 400
    assert body["status"] == 400 and reason in body["error"]["reason"]


@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        ("POST", "/_bulk?refresh=yes", None, "illegal_argument_exception"),
        ("POST", "/_bulk?pipeline=x", None, "illegal_argument_exception"),
        ("POST", "/kp/_search?scroll=1m", {}, "illegal_argument_exception"),
        ("POST", "/kp/_search", {"query": {"fuzzy": {"a": "b"}}}, "parsing_exception"),
        ("POST", "/kp/_search", {"query": {"bool": {"filterr": []}}}, "parsing_exception"),
        ("POST", "/kp/_search", {"highlight": {}}, "parsing_exception"),
        ("POST", "/kp/_search", {"from": 9990, "size": 11}, "illegal_argument_exception"),
        ("POST", "/kp/_search", {"sort": [{"nope": {"order": "asc"}}]}, "query_shard_exception"),
        ("POST", "/kp/_search", {"sort": [{"t": {"order": "asc"}}]}, "illegal_argument_exception"),
        ("POST", "/kp/_count", {"query": {"match": {"t": "x"}}}, "parsing_exception"),
        ("PUT", "/kp", {}, "resource_already_exists_exception"),
        ("PUT", "/Bad", {}, "invalid_index_name_exception"),
        ("PUT", "/kp/_doc/1", {"extra": 1}, "strict_dynamic_mapping_exception"),
    ],
)
async def test_standin_rejects_unknown_parameters_and_clauses(
    http: aiohttp.ClientSession, method: str, path: str, body: Any, error: str
) -> None:
    mapping = {"dynamic": "strict", "properties": {"k": {"type": "keyword"}, "t": {"type": "text"}}}
    assert (await _call(http, "PUT", "/kp", {"mappings": mapping}))[0] == 200
    data = '{"index": {"_index": "kp", "_id": "1"}}\n{"k": "v"}\n' if "_bulk" in path else None
    status, answer = await _call(http, method, path, body, data=data)
    assert status == 400, answer
    assert _error_type(answer) == error


async def test_standin_applies_template_dynamic_mapping(
    standin: Standin, http: aiohttp.ClientSession
) -> None:
    """A string under ``*_integer`` is a mapper_parsing_exception, as on a real cluster."""
    standin_index = OpenSearchIndex(standin.url)  # installs the index template
    await standin_index.open()
    await standin_index.aclose()
    lines = [
        {"index": {"_index": "project_x", "_id": "ok"}},
        {"00280010 Rows_integer": "512", "a_date": "2024-03-15", "n_object": {"v_float": 1}},
        {"index": {"_index": "project_x", "_id": "bad1"}},
        {"00280010 Rows_integer": "five hundred"},
        {"index": {"_index": "project_x", "_id": "bad2"}},
        {"00080020 StudyDate_date": "15.03.2024"},
        {"index": {"_index": "project_x", "_id": "bad3"}},
        {"00081032 ProcedureCodeSequence_object": "flat"},
        {"index": {"_index": "project_x", "_id": "bad4"}},
        {"00000000 IsSeriesComplete_boolean": "yes"},
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines)
    status, body = await _call(http, "POST", "/_bulk", data=data)
    assert status == 200 and body["errors"] is True
    statuses = [item["index"]["status"] for item in body["items"]]
    assert statuses == [201, 400, 400, 400, 400]
    assert {_error_type(item["index"]) for item in body["items"][1:]} == {
        "mapper_parsing_exception"
    }
    # The failed documents left no trace in the mapping.
    _, mapping = await _call(http, "GET", "/project_x/_mapping")
    props = mapping["project_x"]["mappings"]["properties"]
    assert props["00280010 Rows_integer"] == {"type": "long"}
    assert "00080020 StudyDate_date" not in props


async def test_standin_search_sees_only_refreshed_data(http: aiohttp.ClientSession) -> None:
    await _call(http, "PUT", "/t", {})
    await _call(http, "PUT", "/t/_doc/1", {"k": "v"})  # no refresh parameter
    assert (await _call(http, "POST", "/t/_count", {}))[1]["count"] == 0
    assert (await _call(http, "GET", "/t/_doc/1"))[1]["found"] is True  # gets are realtime
    await _call(http, "POST", "/t/_refresh")
    assert (await _call(http, "POST", "/t/_count", {}))[1]["count"] == 1


# -- the backend's bulk, retries and error translation ---------------------------------------


async def test_bulk_is_chunked_and_retried_on_429_and_5xx(standin: Standin) -> None:
    index = OpenSearchIndex(standin.url, bulk_max_actions=4, retry_backoff_s=0.01)
    await index.open()
    try:
        standin.requests.clear()
        standin.fail_bulk[:] = [429, 503]  # the whole request, twice
        standin.fail_items[:] = [429, 502]  # then two items of the next one
        items = series(6)
        await index.write_instances(items)
        bulks = [r for r in standin.requests if r == ("POST", "/_bulk")]
        assert len(bulks) >= 1 + 2 + 1 + 2  # 6 instances + 2 datasets in chunks of 4, retries
        assert len(await index.list_instances(uid_of(items))) == 6
        standin.fail_bulk[:] = [500] * 10
        with pytest.raises(BackendUnavailableError):
            await index.write_instances(series(1))
        standin.fail_bulk.clear()
    finally:
        await index.aclose()


async def test_unreachable_server_is_unavailable() -> None:
    index = OpenSearchIndex(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    with pytest.raises(BackendUnavailableError):
        await index.open()
    await index.aclose()


async def test_rejections_are_backend_rejected(standin: Standin) -> None:
    index = OpenSearchIndex(standin.url)
    await index.open()
    try:
        with pytest.raises(BackendRejectedError) as info:
            await index.create_project("admin")
        assert info.value.__cause__ is not None  # raised from the client's exception
        await index.ping()
    finally:
        await index.aclose()


# -- end to end ------------------------------------------------------------------------------


@requires_dcmtk
async def test_gateway_on_opensearch_end_to_end(
    standin: Standin, make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """dcmsend a series to a gateway indexing into the stand-in, then query the HTTP API."""
    cfg = make_config(index__backend="opensearch", index__opensearch_url=standin.url)
    gw = await make_gateway(cfg)
    base = f"http://127.0.0.1:{gw.http_port}"
    async with aiohttp.ClientSession(base_url=base) as api:
        async with api.post("/api/projects", json={"name": "lung"}) as r:
            assert r.status == 201
        paths = make_ct_series(tmp_path / "series", 4, patient_id="PX-1")
        result = await asyncio.to_thread(
            run_dcmsend, gw.scp.port, tmp_path / "series", calling="kp-trial", called="kp-lung"
        )
        assert result.returncode == 0, result.stderr

        async def listed() -> dict[str, Any]:
            async with api.get("/api/projects/lung/series") as r:
                assert r.status == 200
                return dict(await r.json())

        for _ in range(200):
            page = await listed()
            first = page["items"][0] if page["items"] else {}
            if first.get("instance_count") == 4 and first.get("complete"):
                break
            await asyncio.sleep(0.1)
        item = page["items"][0]
        assert item["instance_count"] == 4 and item["patient_id"] == "PX-1"
        assert item["datasets"] == ["trial"] and item["complete"] is True
        async with api.get(f"/api/series/{item['series_uid']}") as r:
            got = await r.json()
        assert got["projects"] == ["admin", "lung"]
        assert got["document"]["00000000 MaxInstanceNumber_integer"] == 4
        async with api.get(f"/api/series/{item['series_uid']}/instances") as r:
            assert (await r.json())["total"] == len(paths)
        async with api.get("/api/projects/lung/series?q=px-1") as r:
            assert (await r.json())["total"] == 1
        async with api.delete("/api/projects/admin") as r:
            assert r.status == 409  # admin is protected
        async with api.get("/health/ready") as r:
            assert r.status == 200


async def test_dicomweb_on_opensearch(
    standin: Standin, make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """STOW-RS into a gateway on the OpenSearch index, then QIDO-RS and WADO-RS."""
    from dicomweb_client.api import DICOMwebClient

    cfg = make_config(index__backend="opensearch", index__opensearch_url=standin.url)
    gw = await make_gateway(cfg)
    paths = make_ct_series(tmp_path / "series", 3, patient_id="PX-2")
    client = DICOMwebClient(url=f"http://127.0.0.1:{gw.http_port}/dicomweb")
    datasets = [pydicom.dcmread(p) for p in paths]
    stored = await asyncio.to_thread(client.store_instances, datasets)
    assert len(stored.ReferencedSOPSequence) == 3
    study = datasets[0].StudyInstanceUID
    for _ in range(200):
        found = await asyncio.to_thread(client.search_for_instances, study)
        if len(found) == 3:
            break
        await asyncio.sleep(0.1)
    assert len(found) == 3
    (hit,) = await asyncio.to_thread(
        client.search_for_studies, search_filters={"PatientID": "PX-2"}
    )
    assert hit["00201208"]["Value"] == [3]
    metadata = await asyncio.to_thread(
        client.retrieve_series_metadata, study, datasets[0].SeriesInstanceUID
    )
    assert len(metadata) == 3
    again = await asyncio.to_thread(client.retrieve_study, study)
    assert sorted(d.SOPInstanceUID for d in again) == sorted(d.SOPInstanceUID for d in datasets)
