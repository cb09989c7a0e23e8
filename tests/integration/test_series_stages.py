"""Series stages against the real gateway: DCMTK dcmsend in, HTTP API and dciodvfy out.

The gateway runs in-process (``kp_gateway.app.running``) with the SeriesPostProcessor attached
to its ingest service, as app.py will do; dcmsend is the sending peer, dciodvfy the validator.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)

from kp_gateway import config as config_mod
from kp_gateway.app import RunningGateway, running
from kp_gateway.kaapana.keys import (
    KEY_SLICE_GAPS,
    KEY_SLICE_SPACING,
    KEY_SLICES_MISSING,
    KEY_THUMBNAIL_ERROR,
    KEY_THUMBNAIL_STRATEGY,
)
from kp_gateway.pipeline.series_stages import SeriesPostProcessor
from tests.conftest import tissue_segment, write_segmentation

DCMSEND = shutil.which("dcmsend")
DCIODVFY = shutil.which("dciodvfy")
pytestmark = [
    pytest.mark.skipif(DCMSEND is None, reason="dcmsend (dcmtk) is not installed"),
    pytest.mark.timeout(120),
]

KEY_VALIDATION = "00111001 ValidationResults_object"
KEY_THUMBNAIL = "00000000 ThumbnailInstanceUID_keyword"
SIZE = 64
SPACING = 0.8
THICKNESS = 2.5
_MODULE_SUFFIX = re.compile(r" - Module=<[^<>]*>$")
T = TypeVar("T")


# --- synthetic data ----------------------------------------------------------------------------


@dataclass
class Series:
    uid: str
    paths: list[Path]
    sop_uids: list[str]


def _save(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.save_as(path, enforce_file_format=True)
    return path


def make_ct_series(
    directory: Path,
    *,
    count: int = 10,
    skip: Sequence[int] = (),
    description: str = "synthetic chest",
    undecodable_pixels: bool = False,
) -> Series:
    """A CT stack of `count` 64x64 axial slices, 2.5 mm apart; slice k has a disc of radius 4+2k.

    Slices whose index is in `skip` are left out (a gap in position and InstanceNumber).
    With `undecodable_pixels` the PixelData is whole JPEG Lossless fragments of garbage: a
    complete instance (so C-STORE takes it) that no decoder can read.
    """
    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    paths, sop_uids = [], []
    for k in range(count):
        if k in skip:
            continue
        ds = Dataset()
        ds.PatientName = "Test^Series"
        ds.PatientID = "KP-SERIES-1"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDate = "20240102"
        ds.SeriesDescription = description
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.Manufacturer = "kp-gateway tests"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-SIZE / 2 * SPACING, -SIZE / 2 * SPACING, k * THICKNESS]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [SPACING, SPACING]
        ds.SliceThickness = THICKNESS
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = SIZE
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        disc = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 <= (4 + 2 * k) ** 2
        pixels = np.where(disc, 1024 + 300, 1024 - 100).astype(np.uint16).tobytes()
        if undecodable_pixels:
            ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(range(256)) * 4])
            ds["PixelData"].VR = "OB"
            paths.append(_save(ds, directory / f"ct-{k}.dcm", JPEGLosslessSV1))
        else:
            ds.PixelData = pixels
            paths.append(_save(ds, directory / f"ct-{k}.dcm"))
        sop_uids.append(str(ds.SOPInstanceUID))
    return Series(series_uid, paths, sop_uids)


def make_seg(directory: Path, ct: Series, slices: Sequence[int] = (4, 5)) -> Series:
    """A binary highdicom SEG over `ct`, one square segment on the given slice indices."""
    sources = sorted(
        (dcmread(p) for p in ct.paths), key=lambda ds: float(ds.ImagePositionPatient[2])
    )
    mask = np.zeros((len(sources), SIZE, SIZE), dtype=bool)
    for index in slices:
        mask[index, 16:40, 20:44] = True
    path = directory / "seg.dcm"
    seg = write_segmentation(
        path,
        sources,
        mask,
        [tissue_segment(1, "square")],
        series_description="square segmentation",
    )
    return Series(str(seg.SeriesInstanceUID), [path], [str(seg.SOPInstanceUID)])


# --- peers and polling ---------------------------------------------------------------------------


def dcmsend(port: int, paths: Sequence[Path], *, dataset: str = "tests") -> None:
    """Send with DCMTK's dcmsend as the real peer (calling kp-<dataset>, called kp-admin)."""
    assert DCMSEND is not None
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.run(
        [DCMSEND, "127.0.0.1", str(port), "-aet", f"kp-{dataset}", "-aec", "kp-admin"]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def wait_for(
    probe: Callable[[], Awaitable[T | None]], *, timeout_s: float = 30.0, what: str = "condition"
) -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(0.25, delay * 1.5)


async def document(http: aiohttp.ClientSession, uid: str) -> dict[str, Any]:
    async with http.get(f"/api/series/{uid}") as response:
        if response.status == 404:
            return {}
        assert response.status == 200
        body: dict[str, Any] = (await response.json())["document"]
        return body


async def wait_document(
    http: aiohttp.ClientSession,
    uid: str,
    check: Callable[[dict[str, Any]], bool],
    *,
    what: str,
    timeout_s: float = 40.0,
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        doc = await document(http, uid)
        return doc if doc and check(doc) else None

    return await wait_for(probe, timeout_s=timeout_s, what=what)


def dciodvfy_distinct(paths: Sequence[Path]) -> tuple[int, int]:
    """Distinct (errors, warnings) dciodvfy itself prints over the files, module suffix ignored."""
    assert DCIODVFY is not None
    seen: set[str] = set()
    for path in paths:
        proc = subprocess.run(
            [DCIODVFY, "-new", str(path)], capture_output=True, text=True, timeout=30, check=False
        )
        for line in (proc.stdout + "\n" + proc.stderr).splitlines():
            if line.startswith(("Error - ", "Warning - ")):
                seen.add(_MODULE_SUFFIX.sub("", line.strip()))
    return (
        sum(line.startswith("Error") for line in seen),
        sum(line.startswith("Warning") for line in seen),
    )


def png_pixels(data: bytes) -> np.ndarray[Any, Any]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


# --- the gateway ---------------------------------------------------------------------------------


@dataclass
class Harness:
    gw: RunningGateway
    processor: SeriesPostProcessor
    http: aiohttp.ClientSession


def gateway_config(data_dir: Path, **series: str) -> config_mod.Config:
    overrides = {
        "storage.path": str(data_dir),
        "dicom.host": "127.0.0.1",
        "dicom.port": "0",
        "http.host": "127.0.0.1",
        "http.port": "0",
        "http.auth": "false",
        "pipeline.series_idle_s": "0.5",
        "series.max_attempts": "2",
        "series.retry_backoff_s": "0.1",
    }
    overrides.update({f"series.{key}": value for key, value in series.items()})
    return config_mod.load(None, environ={}, overrides=overrides)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """The gateway (with its series stages, as configured), plus an HTTP client for its API."""
    async with running(gateway_config(tmp_path / "data")) as gw:
        assert gw.series_stages is not None
        async with aiohttp.ClientSession(f"http://127.0.0.1:{gw.http_port}") as http:
            yield Harness(gw, gw.series_stages, http)


def _has_results(doc: dict[str, Any]) -> bool:
    return KEY_THUMBNAIL in doc and "00111002 ValidationErrors_integer" in (
        doc.get(KEY_VALIDATION) or {}
    )


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
async def test_series_stages_ct_thumbnail_report_and_counts(
    harness: Harness, tmp_path: Path
) -> None:
    """A sent CT series gets a 300 px thumbnail, a report and dciodvfy's own counts."""
    ct = make_ct_series(tmp_path / "ct")
    gappy = make_ct_series(tmp_path / "gappy", skip=(6,), description="gappy")
    await asyncio.to_thread(dcmsend, harness.gw.scp.port, ct.paths + gappy.paths)
    doc = await wait_document(harness.http, ct.uid, _has_results, what="CT results")

    async with harness.http.get(f"/api/series/{ct.uid}/thumbnail") as response:
        assert response.status == 200
        assert response.content_type == "image/png"
        pixels = png_pixels(await response.read())
    assert pixels.shape[:2] == (300, 300)  # 64 x 64 at equal spacing: longer side 300
    assert pixels.std() > 10
    assert doc[KEY_THUMBNAIL] in ct.sop_uids
    assert doc[KEY_THUMBNAIL_STRATEGY] == "slice"

    errors, warnings = await asyncio.to_thread(dciodvfy_distinct, ct.paths)
    results = doc[KEY_VALIDATION]
    assert results["00111002 ValidationErrors_integer"] == errors
    assert results["00111003 ValidationWarnings_integer"] == warnings
    assert results["00111005 ValidationStatus_keyword"] == "validated"
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", results["00111004 ValidationDate_datetime"]
    )
    assert errors + warnings > 0, "the synthetic CT should give dciodvfy something to report"

    async with harness.http.get(f"/api/series/{ct.uid}/validation") as response:
        assert response.status == 200
        report = await response.text()
    assert f'data-error-count="{errors}"' in report
    assert f'data-warning-count="{warnings}"' in report
    assert report.count('<li class="finding') == errors + warnings
    assert 'data-complete="yes"' in report
    assert doc[KEY_SLICE_SPACING] == pytest.approx(THICKNESS)
    assert doc[KEY_SLICE_GAPS] == 0
    assert doc["00000000 NumberOfFramesTotal_integer"] == 10

    gappy_doc = await wait_document(harness.http, gappy.uid, _has_results, what="gappy results")
    assert gappy_doc["00000000 IsSeriesComplete_boolean"] is False
    assert gappy_doc[KEY_SLICE_GAPS] == 1
    assert gappy_doc[KEY_SLICES_MISSING] == 1
    async with harness.http.get(f"/api/series/{gappy.uid}/validation") as response:
        gappy_report = await response.text()
    assert 'data-complete="no"' in gappy_report
    assert 'data-missing-instance-numbers="7"' in gappy_report

    async with harness.http.get("/metrics") as response:
        metrics = await response.text()
    assert 'kp_gateway_series_stage_runs_total{outcome="ok",stage="thumbnail"} 2.0' in metrics
    assert "kp_gateway_validator_available 1.0" in metrics
    assert harness.processor.readiness()["validator_available"] is True


async def test_series_stages_seg_before_reference_mask_then_overlay(
    harness: Harness, tmp_path: Path
) -> None:
    """A SEG sent before its CT is drawn mask-only, then redrawn on the CT once it completes."""
    ct = make_ct_series(tmp_path / "ct")
    seg = make_seg(tmp_path / "seg", ct)
    await asyncio.to_thread(dcmsend, harness.gw.scp.port, seg.paths, dataset="seg")
    doc = await wait_document(
        harness.http, seg.uid, lambda d: KEY_THUMBNAIL_STRATEGY in d, what="SEG thumbnail"
    )
    assert doc[KEY_THUMBNAIL_STRATEGY] == "mask-only"
    async with harness.http.get(f"/api/series/{seg.uid}/thumbnail") as response:
        mask_only = png_pixels(await response.read())

    await asyncio.to_thread(dcmsend, harness.gw.scp.port, ct.paths)
    doc = await wait_document(
        harness.http,
        seg.uid,
        lambda d: d.get(KEY_THUMBNAIL_STRATEGY) == "overlay-seg",
        what="SEG overlay on the CT",
    )
    # The thumbnail now comes from the CT slice the segment covers most (index 4 or 5).
    assert doc[KEY_THUMBNAIL] in {ct.sop_uids[4], ct.sop_uids[5]}
    async with harness.http.get(f"/api/series/{seg.uid}/thumbnail") as response:
        overlay = png_pixels(await response.read())
    assert overlay.shape == mask_only.shape
    # The CT disc shows through outside the mask: far more distinct grey levels than before.
    grey = overlay[(overlay[..., 0] == overlay[..., 1]) & (overlay[..., 1] == overlay[..., 2])]
    assert len(np.unique(grey)) > 1
    assert not np.array_equal(overlay, mask_only)


async def test_series_stages_validator_unavailable(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without dciodvfy on PATH the series says so, with no counts and no report."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    ct = make_ct_series(tmp_path / "ct", count=4)
    await asyncio.to_thread(dcmsend, harness.gw.scp.port, ct.paths)
    doc = await wait_document(
        harness.http,
        ct.uid,
        lambda d: KEY_VALIDATION in d and KEY_THUMBNAIL in d,
        what="validation status",
    )
    assert doc[KEY_VALIDATION] == {"00111005 ValidationStatus_keyword": "validator unavailable"}
    async with harness.http.get(f"/api/series/{ct.uid}/validation") as response:
        assert response.status == 404
    readiness = harness.processor.readiness()
    assert readiness["validator_available"] is False
    assert "dciodvfy" in readiness["detail"]
    assert harness.processor.validator_available is False


async def test_series_stages_undecodable_pixels_recorded_not_blocking(
    harness: Harness, tmp_path: Path
) -> None:
    """Pixel data that cannot be decoded: indexed and validated anyway, the error recorded."""
    broken = make_ct_series(tmp_path / "broken", count=3, undecodable_pixels=True)
    await asyncio.to_thread(dcmsend, harness.gw.scp.port, broken.paths)
    doc = await wait_document(
        harness.http,
        broken.uid,
        lambda d: KEY_THUMBNAIL_ERROR in d and KEY_VALIDATION in d,
        what="thumbnail error",
    )
    # Refused before decoding: the stored bytes cannot hold the declared image.
    assert "cannot decode pixel data" in doc[KEY_THUMBNAIL_ERROR]
    assert KEY_THUMBNAIL not in doc
    async with harness.http.get(f"/api/series/{broken.uid}") as response:
        assert (await response.json())["instance_count"] == 3
    async with harness.http.get(f"/api/series/{broken.uid}/thumbnail") as response:
        assert response.status == 404
    async with harness.http.get("/metrics") as response:
        metrics = await response.text()
    # Undecodable bytes stay undecodable: recorded once, not retried.
    assert 'kp_gateway_series_stage_runs_total{outcome="fail",stage="thumbnail"} 1.0' in metrics


async def test_series_stages_deflated_instance_gets_a_thumbnail(harness: Harness) -> None:
    """pydicom's image_dfl.dcm sent by dcmsend is stored deflated and still gets a thumbnail."""
    deflated = Path(str(get_testdata_file("image_dfl.dcm")))
    header = dcmread(deflated, stop_before_pixels=True)
    await asyncio.to_thread(dcmsend, harness.gw.scp.port, [deflated])
    doc = await wait_document(
        harness.http,
        str(header.SeriesInstanceUID),
        lambda d: KEY_THUMBNAIL in d or KEY_THUMBNAIL_ERROR in d,
        what="deflated thumbnail",
    )
    assert KEY_THUMBNAIL_ERROR not in doc, doc.get(KEY_THUMBNAIL_ERROR)
    assert doc[KEY_THUMBNAIL_STRATEGY] == "slice"
    async with harness.http.get(f"/api/instances/{header.SOPInstanceUID}") as response:
        stored = await response.read()
    # Stored as sent: still deflated, so the renderer had to inflate it.
    meta = dcmread(io.BytesIO(stored), stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    async with harness.http.get(f"/api/series/{header.SeriesInstanceUID}/thumbnail") as response:
        assert response.status == 200
        assert png_pixels(await response.read()).std() > 10


async def test_series_stages_dedup_and_debounce(harness: Harness, tmp_path: Path) -> None:
    """Queued twice runs once; completing again while running runs once more afterwards."""
    ct = make_ct_series(tmp_path / "ct", count=4)
    await asyncio.to_thread(dcmsend, harness.gw.scp.port, ct.paths)
    await wait_document(harness.http, ct.uid, lambda d: KEY_THUMBNAIL in d, what="thumbnail")
    await wait_for(
        lambda: asyncio.sleep(0, harness.processor.idle), what="processor idle", timeout_s=30
    )
    registry = harness.gw.metrics.registry

    def runs() -> float:
        value = registry.get_sample_value(
            "kp_gateway_series_stage_runs_total", {"stage": "thumbnail", "outcome": "ok"}
        )
        return value or 0.0

    before = runs()
    # Both land before the worker wakes up: one queue entry.
    assert await harness.processor.enqueue(ct.uid, ("thumbnail",))
    assert await harness.processor.enqueue(ct.uid, ("thumbnail",))
    deadline = time.monotonic() + 10
    while not harness.processor.is_running(ct.uid):
        assert time.monotonic() < deadline, "the worker never picked the series up"
        await asyncio.sleep(0)
    # Processing awaits threads and the pool, so it is still running here: deferred, not lost.
    assert await harness.processor.enqueue(ct.uid, ("thumbnail",))
    await wait_for(
        lambda: asyncio.sleep(0, harness.processor.idle), what="processor idle", timeout_s=30
    )
    assert runs() == before + 2


async def test_series_stages_reference_table_survives_restart(tmp_path: Path) -> None:
    """A mask-only SEG from before a restart is redrawn when its CT arrives after it."""
    cfg = gateway_config(tmp_path / "data", max_attempts="1")
    ct = make_ct_series(tmp_path / "ct")
    seg = make_seg(tmp_path / "seg", ct)
    for round_ in ("before", "after"):
        async with (
            running(cfg) as gw,
            aiohttp.ClientSession(f"http://127.0.0.1:{gw.http_port}") as http,
        ):
            if round_ == "before":
                await asyncio.to_thread(dcmsend, gw.scp.port, seg.paths)
                doc = await wait_document(
                    http, seg.uid, lambda d: KEY_THUMBNAIL in d, what="mask-only SEG"
                )
                assert doc[KEY_THUMBNAIL_STRATEGY] == "mask-only"
            else:
                # Only the index knows the SEG references this CT now.
                await asyncio.to_thread(dcmsend, gw.scp.port, ct.paths)
                doc = await wait_document(
                    http,
                    seg.uid,
                    lambda d: d.get(KEY_THUMBNAIL_STRATEGY) == "overlay-seg",
                    what="SEG redrawn after the restart",
                )
                assert doc[KEY_THUMBNAIL] in ct.sop_uids
