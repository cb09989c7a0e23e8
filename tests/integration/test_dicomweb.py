"""DICOMweb on a running gateway, with dicomweb-client (PyPI) as the client (issue 11).

Instances arrive by C-STORE (pynetdicom, each file in its own transfer syntax): two CT studies
of different patients, a JPEG 2000 NM image, a two-frame RLE image and a highdicom SEG. Then
QIDO-RS at every level with the matching rules (table-driven), WADO-RS retrieval (the bytes
stored), metadata, frames (equal to pydicom's decoding), project scoping and PS3.18 errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from kp_gateway.app import RunningGateway
from kp_gateway.names import default_dataset_name
from tests.conftest import make_ct_series, tissue_segment, write_segmentation
from tests.integration.test_scp import _wait_indexed

pytestmark = pytest.mark.timeout(120)


def _send(gw: RunningGateway, paths: list[Path], called: str = "kp-admin") -> None:
    """C-STORE each file in its own transfer syntax (blocking; run via to_thread)."""
    ae = AE(ae_title="kp-tests")
    datasets = [pydicom.dcmread(p) for p in paths]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gw.scp.port, ae_title=called)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()
    assert statuses == [0] * len(paths)


def _mr_study(folder: Path) -> list[Path]:
    paths = make_ct_series(folder, 2, patient_id="P0002")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.PatientName = "Doe^Jane"
        ds.StudyDate = "20231201"
        ds.AccessionNumber = "ACC-7"
        ds.save_as(path, enforce_file_format=True)
    return paths


class Corpus:
    def __init__(self, tmp_path: Path) -> None:
        self.ct = make_ct_series(tmp_path / "ct", 3)
        for path in self.ct:  # what highdicom copies from a SEG's source images
            ds = pydicom.dcmread(path)
            ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber = "19700101", "O", "ACC-1"
            ds.StudyID, ds.ReferringPhysicianName, ds.SeriesNumber = "1", "", 1
            ds.save_as(path, enforce_file_format=True)
        self.mr = _mr_study(tmp_path / "mr")
        self.j2k = Path(str(get_testdata_file("JPEG2000.dcm")))
        self.rle = Path(str(get_testdata_file("SC_rgb_rle_2frame.dcm")))
        sources = [pydicom.dcmread(p) for p in self.ct]
        mask = np.zeros((len(sources), 32, 32), dtype=bool)
        mask[1, 8:16, 8:16] = True
        self.seg = tmp_path / "seg.dcm"
        write_segmentation(self.seg, sources, mask, [tissue_segment(1, "box")])
        self.all = [*self.ct, *self.mr, self.j2k, self.rle, self.seg]

    def ds(self, path: Path) -> pydicom.Dataset:
        return pydicom.dcmread(path)


@pytest.fixture
async def loaded(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> tuple[RunningGateway, Corpus]:
    gw = await make_gateway(make_config())
    corpus = Corpus(tmp_path)
    await asyncio.to_thread(_send, gw, corpus.all)
    await _wait_indexed(gw, len(corpus.all))
    return gw, corpus


def _client(gw: RunningGateway, root: str = "/dicomweb") -> DICOMwebClient:
    return DICOMwebClient(url=f"http://127.0.0.1:{gw.http_port}{root}")


def _value(result: dict[str, Any], tag: str) -> Any:
    values = result.get(tag, {}).get("Value", [])
    return values[0] if len(values) == 1 else values


async def test_study_search_matching_rules(loaded: tuple[RunningGateway, Corpus]) -> None:
    gw, corpus = loaded
    client = _client(gw)
    ct, mr = corpus.ds(corpus.ct[0]), corpus.ds(corpus.mr[0])
    j2k = corpus.ds(corpus.j2k)
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({}, {ct.StudyInstanceUID, mr.StudyInstanceUID, j2k.StudyInstanceUID,
              corpus.ds(corpus.rle).StudyInstanceUID}),
        ({"PatientID": "P0002"}, {mr.StudyInstanceUID}),
        ({"PatientName": "doe*"}, {mr.StudyInstanceUID}),  # PN: wildcard, any case
        ({"PatientName": "D?E^JANE"}, {mr.StudyInstanceUID}),
        ({"PatientName": "Doe"}, set()),  # single value: the whole name
        ({"StudyDate": "20231101-20231231"}, {mr.StudyInstanceUID}),
        ({"StudyDate": "-20231231", "PatientID": "P000*"}, {mr.StudyInstanceUID}),
        ({"StudyDate": "20240315-", "PatientID": "P0001"}, {ct.StudyInstanceUID}),
        ({"ModalitiesInStudy": "MR"}, {mr.StudyInstanceUID}),
        ({"ModalitiesInStudy": "SEG"}, {ct.StudyInstanceUID}),  # the SEG joined the CT study
        ({"AccessionNumber": "ACC-7"}, {mr.StudyInstanceUID}),
        ({"StudyInstanceUID": f"{ct.StudyInstanceUID},{mr.StudyInstanceUID}"},
         {ct.StudyInstanceUID, mr.StudyInstanceUID}),
    ]  # fmt: skip
    for filters, expected in cases:
        found = await asyncio.to_thread(
            client.search_for_studies, search_filters=filters, fuzzymatching=True
        )
        assert {_value(r, "0020000D") for r in found} == expected, filters
    (study,) = await asyncio.to_thread(
        client.search_for_studies, search_filters={"StudyInstanceUID": ct.StudyInstanceUID}
    )
    assert sorted(_value(study, "00080061")) == ["CT", "SEG"]  # ModalitiesInStudy
    assert _value(study, "00201206") == 2  # NumberOfStudyRelatedSeries
    assert _value(study, "00201208") == 4  # NumberOfStudyRelatedInstances
    assert _value(study, "00100010") == {"Alphabetic": "Test^Patient"}
    assert _value(study, "00081190").endswith(f"/dicomweb/studies/{ct.StudyInstanceUID}")
    page1 = await asyncio.to_thread(client.search_for_studies, limit=2, offset=0)
    page2 = await asyncio.to_thread(client.search_for_studies, limit=2, offset=2)
    uids = [_value(r, "0020000D") for r in page1 + page2]
    assert len(uids) == 4 == len(set(uids))


async def test_series_and_instance_search(loaded: tuple[RunningGateway, Corpus]) -> None:
    gw, corpus = loaded
    client = _client(gw)
    ct = corpus.ds(corpus.ct[0])
    series = await asyncio.to_thread(client.search_for_series, ct.StudyInstanceUID)
    assert {_value(s, "00080060") for s in series} == {"CT", "SEG"}
    counts = {_value(s, "00080060"): _value(s, "00201209") for s in series}
    assert counts == {"CT": 3, "SEG": 1}
    mr_series = await asyncio.to_thread(client.search_for_series, search_filters={"Modality": "MR"})
    assert [_value(s, "00100020") for s in mr_series] == ["P0002"]  # study attributes too
    instances = await asyncio.to_thread(
        client.search_for_instances, ct.StudyInstanceUID, ct.SeriesInstanceUID
    )
    assert [_value(i, "00200013") for i in instances] == [1, 2, 3]
    (second,) = await asyncio.to_thread(
        client.search_for_instances,
        ct.StudyInstanceUID,
        ct.SeriesInstanceUID,
        search_filters={"InstanceNumber": "2"},
    )
    assert _value(second, "00080018") == corpus.ds(corpus.ct[1]).SOPInstanceUID
    everywhere = await asyncio.to_thread(
        client.search_for_instances, search_filters={"SOPClassUID": ct.SOPClassUID}
    )
    assert len(everywhere) == 5  # three CT and two MR-as-CT-class instances


async def test_retrieve_gives_the_stored_bytes(loaded: tuple[RunningGateway, Corpus]) -> None:
    gw, corpus = loaded
    client = _client(gw)
    ct = corpus.ds(corpus.ct[0])
    study = await asyncio.to_thread(client.retrieve_study, ct.StudyInstanceUID)
    assert len(study) == 4
    # Byte for byte, read with aiohttp's multipart reader.
    for path in (corpus.j2k, corpus.rle, corpus.ct[0]):
        ds = corpus.ds(path)
        url = (
            f"http://127.0.0.1:{gw.http_port}/dicomweb/studies/{ds.StudyInstanceUID}"
            f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        )
        async with aiohttp.ClientSession() as http:
            accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
            async with http.get(url, headers={"Accept": accept}) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("multipart/related")
                reader = aiohttp.MultipartReader.from_response(r)
                part = await reader.next()
                assert part is not None
                data = await part.read()  # type: ignore[union-attr]
                assert await reader.next() is None
        stored = gw.cfg.data_dir / next(
            (gw.cfg.data_dir / "dicom").rglob(f"{ds.SOPInstanceUID}.dcm")
        ).relative_to(gw.cfg.data_dir)
        assert data == stored.read_bytes()
        assert pydicom.dcmread(path).PixelData == ds.PixelData


async def test_metadata_and_frames(loaded: tuple[RunningGateway, Corpus]) -> None:
    gw, corpus = loaded
    client = _client(gw)
    ct = corpus.ds(corpus.ct[0])
    metadata = await asyncio.to_thread(
        client.retrieve_series_metadata, ct.StudyInstanceUID, ct.SeriesInstanceUID
    )
    assert sorted(_value(m, "00200013") for m in metadata) == [1, 2, 3]
    for item in metadata:
        # dicomweb-client sends "Host: 127.0.0.1" without the port; URLs follow the Host.
        uri = item["7FE00010"]["BulkDataURI"]
        assert uri.startswith("http://127.0.0.1") and "/dicomweb/studies/" in uri
        assert uri.endswith(f"/instances/{_value(item, '00080018')}/bulkdata/7FE00010")
        assert "Value" not in item["7FE00010"]
    study_meta = await asyncio.to_thread(client.retrieve_study_metadata, ct.StudyInstanceUID)
    assert len(study_meta) == 4
    # Native frames: the stored bytes of that frame.
    (frame,) = await asyncio.to_thread(
        client.retrieve_instance_frames,
        ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID, frame_numbers=[1],
    )  # fmt: skip
    assert frame == ct.PixelData
    # RLE, two frames: as stored with transfer-syntax=*, decoded otherwise.
    rle = corpus.ds(corpus.rle)
    frames = await asyncio.to_thread(
        client.retrieve_instance_frames,
        rle.StudyInstanceUID, rle.SeriesInstanceUID, rle.SOPInstanceUID, frame_numbers=[2, 1],
        media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),),
    )  # fmt: skip
    decoded = rle.pixel_array
    assert frames[0] == decoded[1].tobytes() and frames[1] == decoded[0].tobytes()
    j2k = corpus.ds(corpus.j2k)
    (compressed,) = await asyncio.to_thread(
        client.retrieve_instance_frames,
        j2k.StudyInstanceUID, j2k.SeriesInstanceUID, j2k.SOPInstanceUID, frame_numbers=[1],
        media_types=(("image/jp2", "1.2.840.10008.1.2.4.91"),),
    )  # fmt: skip
    from pydicom.encaps import generate_frames

    assert compressed == next(generate_frames(j2k.PixelData, number_of_frames=1))


async def test_project_scoping_and_errors(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    gw = await make_gateway(make_config())
    await gw.index.create_project("neuro")
    lab = make_ct_series(tmp_path / "lab", 1)
    neuro = make_ct_series(tmp_path / "neuro", 1, patient_id="N1")
    await asyncio.to_thread(_send, gw, lab, "kp-admin")
    await asyncio.to_thread(_send, gw, neuro, "kp-neuro")
    await _wait_indexed(gw, 2)
    neuro_study = corpus_uid = pydicom.dcmread(neuro[0]).StudyInstanceUID
    everything = await asyncio.to_thread(_client(gw).search_for_studies)
    assert len(everything) == 2
    scoped = await asyncio.to_thread(_client(gw, "/projects/neuro/dicomweb").search_for_studies)
    assert [_value(s, "0020000D") for s in scoped] == [corpus_uid]
    assert _value(scoped[0], "00081190").endswith(f"/projects/neuro/dicomweb/studies/{neuro_study}")
    lab_study = pydicom.dcmread(lab[0]).StudyInstanceUID
    base = f"http://127.0.0.1:{gw.http_port}"
    async with aiohttp.ClientSession(base_url=base) as http:
        async with http.get(f"/projects/neuro/dicomweb/studies/{lab_study}/metadata") as r:
            assert r.status == 404  # another project's study is not there
        async with http.get("/projects/nosuch/dicomweb/studies") as r:
            assert r.status == 404
        for query in ("NoSuchKeyword=1", "limit=0", "limit=x", "StudyDate=2024-01-01-2"):
            async with http.get(f"/dicomweb/studies?{query}") as r:
                assert r.status == 400, query
                assert (await r.json())["error"] == "bad_query"
        async with http.get("/dicomweb/studies", headers={"Accept": "text/html"}) as r:
            assert r.status == 406
        async with http.get(
            f"/dicomweb/studies/{lab_study}",
            headers={"Accept": 'multipart/related; type="application/dicom"; '
                     "transfer-syntax=1.2.840.10008.1.2.4.50"},
        ) as r:  # fmt: skip
            assert r.status == 406  # stored as Explicit VR LE; no transcoding
        async with http.get("/dicomweb/studies/1.2.3/series") as r:
            assert r.status == 200 and await r.json() == []
        async with http.get("/dicomweb/studies/1.2.3") as r:
            assert r.status == 404
        async with http.get("/dicomweb/studies?PatientAge=1&Foo.Bar=") as r:
            assert r.status == 400
        async with http.get("/dicomweb/studies?PatientAge=040Y") as r:
            assert r.status == 200


async def test_dicomweb_needs_the_token(make_config: Callable[..., Any], make_gateway: Any) -> None:
    gw = await make_gateway(make_config(http__auth=True))
    base = f"http://127.0.0.1:{gw.http_port}"
    async with aiohttp.ClientSession(base_url=base) as http:
        async with http.get("/dicomweb/studies") as r:
            assert r.status == 401
        headers = {"Authorization": f"Bearer {gw.token}"}
        async with http.get("/dicomweb/studies", headers=headers) as r:
            assert r.status == 200 and await r.json() == []


async def test_stow_rs_stores_a_mixed_set(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    """dicomweb-client's store_instances: CT series, JPEG 2000, RLE two-frame and a SEG; then
    found by QIDO, the JSON API and the gallery's listing, and retrieved byte for byte."""
    gw = await make_gateway(make_config())
    await gw.index.create_project("neuro")
    corpus = Corpus(tmp_path)
    client = _client(gw, "/projects/neuro/dicomweb")
    datasets = [corpus.ds(p) for p in corpus.all]
    response = await asyncio.to_thread(client.store_instances, datasets)
    stored = response.ReferencedSOPSequence
    assert len(stored) == len(datasets)
    assert "FailedSOPSequence" not in response
    assert stored[0].RetrieveURL.endswith(
        f"/projects/neuro/dicomweb/studies/{datasets[0].StudyInstanceUID}/series/"
        f"{datasets[0].SeriesInstanceUID}/instances/{datasets[0].SOPInstanceUID}"
    )
    # Acknowledged means spooled: the index catches up without anything being re-sent.
    await _wait_indexed(gw, len(datasets))
    studies = await asyncio.to_thread(client.search_for_studies)
    assert len(studies) == 4
    base = f"http://127.0.0.1:{gw.http_port}"
    async with (
        aiohttp.ClientSession(base_url=base) as http,
        http.get("/api/projects/neuro/series") as r,
    ):
        listed = await r.json()
    assert listed["total"] == 5
    assert {d for s in listed["items"] for d in s["datasets"]} == {default_dataset_name()}
    for path in (corpus.j2k, corpus.seg):
        ds = corpus.ds(path)
        again = await asyncio.to_thread(
            client.retrieve_instance,
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
        )  # fmt: skip
        assert again.PixelData == ds.PixelData
        stored_file = next((gw.cfg.data_dir / "dicom").rglob(f"{ds.SOPInstanceUID}.dcm"))
        assert stored_file.read_bytes() == path.read_bytes()


async def test_stow_rs_failures(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    gw = await make_gateway(make_config())
    ct = make_ct_series(tmp_path / "ct", 2)
    other = make_ct_series(tmp_path / "other", 1)
    study = pydicom.dcmread(ct[0]).StudyInstanceUID
    base = f"http://127.0.0.1:{gw.http_port}"

    def body(parts: list[tuple[str, bytes]]) -> aiohttp.MultipartWriter:
        writer = aiohttp.MultipartWriter("related", boundary="kp-test-boundary")
        for content_type, data in parts:
            writer.append(data, {"Content-Type": content_type})
        return writer

    headers = {
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=kp-test-boundary',
        "Accept": "application/dicom+json",
    }
    cut = ct[1].read_bytes()[:-100]
    async with aiohttp.ClientSession(base_url=base) as http:
        parts = [
            ("application/dicom", ct[0].read_bytes()),
            ("application/dicom", other[0].read_bytes()),  # another study
            ("application/dicom", cut),  # cut inside Pixel Data
            ("text/plain", b"not an image"),
        ]
        async with http.post(f"/dicomweb/studies/{study}", data=body(parts), headers=headers) as r:
            assert r.status == 202
            answer = await r.json()
        stored = answer["00081199"]["Value"]
        failed = answer["00081198"]["Value"]
        assert [s["00081155"]["Value"][0] for s in stored] == [
            pydicom.dcmread(ct[0]).SOPInstanceUID
        ]
        reasons = [f["00081197"]["Value"][0] for f in failed]
        assert reasons == [0xC409, 0xC000, 0xC000]
        assert failed[0]["00081155"]["Value"][0] == pydicom.dcmread(other[0]).SOPInstanceUID
        assert answer["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{study}")
        async with http.post(
            "/dicomweb/studies", data=body([("application/dicom", cut)]), headers=headers
        ) as r:
            assert r.status == 409
        async with http.post("/dicomweb/studies", data=b"x", headers={
            "Content-Type": "application/dicom"}) as r:  # fmt: skip
            assert r.status == 415
        async with http.post(
            "/dicomweb/studies?dataset=Bad%20Name",
            data=body([("application/dicom", ct[0].read_bytes())]),
            headers=headers,
        ) as r:
            assert r.status == 400
    await _wait_indexed(gw, 1)
    # Nothing of the refused parts is left behind; the stored one leaves the spool once indexed.
    spool = gw.cfg.data_dir / "spool"
    async with asyncio.timeout(20):
        while any((spool / "incoming").rglob("*.dcm")):
            await asyncio.sleep(0.05)
    assert not [p for p in (spool / "tmp").rglob("*") if p.is_file()]
    stored_files = list((gw.cfg.data_dir / "dicom").rglob("*.dcm"))
    assert len(stored_files) == 1


async def test_project_token_sees_its_project_dicomweb_only(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    gw = await make_gateway(make_config(http__auth=True))
    await gw.index.create_project("neuro")
    await gw.index.create_project("lung")
    neuro = make_ct_series(tmp_path / "neuro", 1)
    await asyncio.to_thread(_send, gw, neuro, "kp-neuro")
    await _wait_indexed(gw, 1)
    base = f"http://127.0.0.1:{gw.http_port}"
    admin = {"Authorization": f"Bearer {gw.token}"}
    async with aiohttp.ClientSession(base_url=base) as http:
        async with http.post(
            "/api/projects/neuro/tokens", json={"scope": "read", "label": "viewer"}, headers=admin
        ) as r:
            assert r.status == 201
            secret = (await r.json())["token"]
        reader = {"Authorization": f"Bearer {secret}"}
        async with http.get("/projects/neuro/dicomweb/studies", headers=reader) as r:
            assert r.status == 200 and len(await r.json()) == 1
        async with http.get("/dicomweb/studies", headers=reader) as r:
            assert r.status == 403  # the root serves every project: admin only
        async with http.get("/projects/lung/dicomweb/studies", headers=reader) as r:
            assert r.status == 404
        stow_headers = {
            **reader,
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b0',
        }
        body = b"--b0\r\nContent-Type: application/dicom\r\n\r\n" + neuro[0].read_bytes()
        async with http.post(
            "/projects/neuro/dicomweb/studies", data=body + b"\r\n--b0--\r\n",
            headers=stow_headers,
        ) as r:  # fmt: skip
            assert r.status == 403  # a read token stores nothing


async def test_series_metadata_is_kept_and_follows_new_instances(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    gw = await make_gateway(make_config())
    first = make_ct_series(tmp_path / "a", 3)
    ds = pydicom.dcmread(first[0])
    await asyncio.to_thread(_send, gw, first)
    await _wait_indexed(gw, 3)
    client = _client(gw)
    series = (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    kept = gw.cfg.data_dir / "dicomweb" / "metadata" / series[0] / f"{series[1]}.json"
    async with asyncio.timeout(30):  # built ahead when the series completes
        while not kept.is_file():
            await asyncio.sleep(0.05)
    built_at = kept.stat().st_mtime_ns
    meta = await asyncio.to_thread(client.retrieve_series_metadata, *series)
    assert len(meta) == 3
    again = await asyncio.to_thread(client.retrieve_series_metadata, *series)
    assert again == meta and kept.stat().st_mtime_ns == built_at  # served as kept
    late = make_ct_series(
        tmp_path / "b", 1, study_uid=series[0], series_uid=series[1], start_number=4
    )
    await asyncio.to_thread(_send, gw, late)
    await _wait_indexed(gw, 4)
    grown = await asyncio.to_thread(client.retrieve_series_metadata, *series)
    assert sorted(_value(m, "00200013") for m in grown) == [1, 2, 3, 4]
    study_meta = await asyncio.to_thread(client.retrieve_study_metadata, series[0])
    assert len(study_meta) == 4


async def test_rendered_and_thumbnail(loaded: tuple[RunningGateway, Corpus]) -> None:
    import io

    from PIL import Image

    gw, corpus = loaded
    client = _client(gw)
    ct = corpus.ds(corpus.ct[0])
    uids = (ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    jpeg = await asyncio.to_thread(client.retrieve_instance_rendered, *uids)
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (32, 32)
    assert len(set(np.asarray(image).ravel().tolist())) > 10  # an image, not a blank
    png = await asyncio.to_thread(
        client.retrieve_instance_rendered, *uids, media_types=("image/png",),
        params={"viewport": "16,16", "window": "40,400"},
    )  # fmt: skip
    small = Image.open(io.BytesIO(png))
    assert small.format == "PNG" and small.size == (16, 16)
    rle = corpus.ds(corpus.rle)
    second = await asyncio.to_thread(
        client.retrieve_instance_frames_rendered,
        rle.StudyInstanceUID, rle.SeriesInstanceUID, rle.SOPInstanceUID, frame_numbers=[2],
        media_types=("image/png",),
    )  # fmt: skip
    assert Image.open(io.BytesIO(second)).mode == "RGB"
    base = f"http://127.0.0.1:{gw.http_port}/dicomweb/studies/{uids[0]}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/series/{uids[1]}/thumbnail") as r:
            assert r.status == 200 and r.content_type == "image/jpeg"
            assert Image.open(io.BytesIO(await r.read())).size == (32, 32)
        async with http.get(f"{base}/thumbnail", headers={"Accept": "text/plain"}) as r:
            assert r.status == 406
        rendered = f"{base}/series/{uids[1]}/instances/{uids[2]}/rendered"
        for query in ("viewport=0,10", "window=1", "quality=0", "viewport=a,b"):
            async with http.get(f"{rendered}?{query}") as r:
                assert r.status == 400, query
        async with http.get(f"{base}/series/{uids[1]}/instances/{uids[2]}/frames/2/rendered") as r:
            assert r.status == 404  # a single-frame instance


async def test_cors_only_for_configured_origins(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    allowed = "http://viewer.example"
    gw = await make_gateway(make_config(http__auth=True, dicomweb__cors_origins=allowed))
    base = f"http://127.0.0.1:{gw.http_port}"
    preflight = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    async with aiohttp.ClientSession(base_url=base) as http:
        async with http.options("/dicomweb/studies", headers={**preflight, "Origin": allowed}) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == allowed
            assert "AUTHORIZATION" in r.headers["Access-Control-Allow-Headers"].upper()
        async with http.options(
            "/dicomweb/studies", headers={**preflight, "Origin": "http://evil.example"}
        ) as r:
            assert "Access-Control-Allow-Origin" not in r.headers
        bearer = {"Authorization": f"Bearer {gw.token}", "Origin": allowed}
        async with http.get("/dicomweb/studies", headers=bearer) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == allowed
        async with http.get("/api/projects", headers=bearer) as r:
            assert "Access-Control-Allow-Origin" not in r.headers  # DICOMweb only
        async with http.get("/dicomweb/studies", headers={"Origin": allowed}) as r:
            assert r.status == 401  # CORS opens the door to tokens, not around them


async def test_no_cors_by_default(make_config: Callable[..., Any], make_gateway: Any) -> None:
    gw = await make_gateway(make_config())
    base = f"http://127.0.0.1:{gw.http_port}"
    async with (
        aiohttp.ClientSession(base_url=base) as http,
        http.get("/dicomweb/studies", headers={"Origin": "http://a.example"}) as r,
    ):
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
