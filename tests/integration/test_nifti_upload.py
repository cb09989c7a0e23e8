"""NIfTI uploads against a real gateway on loopback: conversion in the pool, into the pipeline."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import nibabel as nib
import numpy as np
import pydicom

from kp_gateway.config import Config
from kp_gateway.kaapana.keys import KEY_THUMBNAIL_STRATEGY
from tests.integration.test_upload import post_upload, upload_gateway, zip_folder

SHAPE = (16, 16, 6)
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
SEG_INFO = {"algorithm": "Ground truth", "seg_info": [{"label_name": "prostate", "label_int": 1}]}
KEY_DESCRIPTION = "0008103E SeriesDescription_keyword"
KEY_MODALITY = "00080060 Modality_keyword"
KEY_PATIENT_ID = "00100020 PatientID_keyword"


def image(path: Path, value: int = 100, shape: tuple[int, ...] = SHAPE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (np.arange(int(np.prod(shape))).reshape(shape) % 97 + value).astype(np.int16)
    nib.save(nib.Nifti1Image(data, AFFINE), path)


def labels(path: Path, shape: tuple[int, ...] = SHAPE, values: tuple[int, ...] = (1,)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(shape, dtype=np.uint8)
    for n, value in enumerate(values):
        data[4 + 4 * n : 8 + 4 * n, 5:11, 2:4] = value
    nib.save(nib.Nifti1Image(data, AFFINE), path)


def write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def basic_tree(root: Path) -> bytes:
    """The user guide's basic layout, option one: segmentations beside their cases."""
    image(root / "Prostate" / "Case01.nii.gz")
    labels(root / "Prostate" / "Case01_segmentation.nii.gz")
    image(root / "Prostate" / "Case02.nii.gz", value=300)
    write_json(root / "Prostate" / "seg_info.json", SEG_INFO)
    write_json(
        root / "Prostate" / "meta_data.json",
        {
            "global_tags": {"0008|0060": "MR", "BodyPartExamined": "PROSTATE"},
            "series_tags": {"Case01.nii": {"0008|103e": "T2 axial"}},
        },
    )
    return zip_folder(root)


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as r:
        assert r.status == 200, (url, await r.text())
        return await r.json()


async def dataset_series(
    session: aiohttp.ClientSession, base: str, dataset: str
) -> dict[str, dict[str, Any]]:
    """series uid -> the series' detail (document, instance count) of one dataset."""
    page = await get_json(session, f"{base}/api/projects/admin/series?dataset={dataset}&limit=500")
    out = {}
    for item in page["items"]:
        out[item["series_uid"]] = await get_json(session, f"{base}/api/series/{item['series_uid']}")
    return out


async def first_instance(session: aiohttp.ClientSession, base: str, uid: str) -> pydicom.Dataset:
    instances = await get_json(session, f"{base}/api/series/{uid}/instances")
    async with session.get(f"{base}{instances['items'][0]['url']}") as r:
        return pydicom.dcmread(io.BytesIO(await r.read()))


async def wait_thumbnail(session: aiohttp.ClientSession, base: str, uid: str) -> str:
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        doc = (await get_json(session, f"{base}/api/series/{uid}"))["document"]
        if KEY_THUMBNAIL_STRATEGY in doc:
            return str(doc[KEY_THUMBNAIL_STRATEGY])
        await asyncio.sleep(0.2)
    raise AssertionError(f"no thumbnail for {uid}")


def assert_done(status: dict[str, Any], cases: tuple[int, int, int]) -> None:
    assert status["state"] == "done", status
    counts = (status["cases_total"], status["cases_done"], status["cases_failed"])
    assert counts == cases, status


async def test_nifti_upload_basic_layout_nifti_then_auto_is_idempotent(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """kind=nifti converts cases with meta_data.json tags and a SEG over its images; the same
    zip again under kind=auto gives the same series and no duplicate instances."""
    body = basic_tree(tmp_path / "tree")
    async with upload_gateway(make_config()) as ug, aiohttp.ClientSession() as s:
        first = await post_upload(s, ug.base, body, kind="nifti", dataset="prostate")
        assert_done(first, (2, 2, 0))
        assert first["errors"] == [] and first["instances_imported"] == 6 + 1 + 6
        series = await dataset_series(s, ug.base, "prostate")
        assert len(series) == 3
        by_kind: dict[str, list[str]] = {}
        for uid, detail in series.items():
            by_kind.setdefault(detail["document"][KEY_MODALITY], []).append(uid)
        assert sorted(by_kind) == ["MR", "SEG"] and len(by_kind["MR"]) == 2
        descriptions = {
            series[uid]["document"][KEY_PATIENT_ID]: series[uid]["document"][KEY_DESCRIPTION]
            for uid in by_kind["MR"]
        }
        assert descriptions == {"Case01": "T2 axial", "Case02": "Case02"}
        assert all(series[uid]["instance_count"] == 6 for uid in by_kind["MR"])
        (seg_uid,) = by_kind["SEG"]
        seg = await first_instance(s, ug.base, seg_uid)
        (case01_uid,) = [
            uid for uid in by_kind["MR"] if series[uid]["document"][KEY_PATIENT_ID] == "Case01"
        ]
        assert [r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence] == [case01_uid]
        assert seg.SegmentSequence[0].SegmentLabel == "prostate"
        assert await wait_thumbnail(s, ug.base, seg_uid) == "overlay-seg"

        again = await post_upload(s, ug.base, body, kind="auto", dataset="prostate")
        assert_done(again, (2, 2, 0))
        assert sorted(x["series_uid"] for x in again["series"]) == sorted(series)
        after = await dataset_series(s, ug.base, "prostate")
        assert sorted(after) == sorted(series)
        counts = {uid: detail["instance_count"] for uid, detail in after.items()}
        assert counts == {uid: detail["instance_count"] for uid, detail in series.items()}
        datasets = await get_json(s, f"{ug.base}/api/projects/admin/datasets")
        (prostate,) = [d for d in datasets["items"] if d["name"] == "prostate"]
        assert prostate["instance_count"] == 13


async def test_nifti_upload_nnunet_two_channels_one_study(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """nnU-Net v2 with 2 channels: 2 image series in one study, 1 SEG on channel 0000."""
    root = tmp_path / "tree" / "Dataset042_Prostate"
    write_json(
        root / "dataset.json",
        {
            "channel_names": {"0": "T2", "1": "ADC"},
            "labels": {"background": 0, "PZ": 1, "TZ": 2, "CZ": 3},
            "file_ending": ".nii.gz",
        },
    )
    image(root / "imagesTr" / "prostate_00_0000.nii.gz")
    image(root / "imagesTr" / "prostate_00_0001.nii.gz", value=500)
    labels(root / "labelsTr" / "prostate_00.nii.gz", values=(1, 2))
    body = zip_folder(tmp_path / "tree")
    async with upload_gateway(make_config()) as ug, aiohttp.ClientSession() as s:
        status = await post_upload(s, ug.base, body, kind="auto", dataset="nnunet")
        assert_done(status, (1, 1, 0))
        series = await dataset_series(s, ug.base, "nnunet")
        docs = {detail["document"][KEY_DESCRIPTION]: detail for detail in series.values()}
        assert sorted(docs) == ["ADC", "Segmentation", "T2"]
        studies = {d["document"]["0020000D StudyInstanceUID_keyword"] for d in docs.values()}
        assert len(studies) == 1
        seg_uid = next(u for u, d in series.items() if d["document"][KEY_MODALITY] == "SEG")
        seg = await first_instance(s, ug.base, seg_uid)
        t2_uid = next(u for u, d in series.items() if d["document"][KEY_DESCRIPTION] == "T2")
        assert [r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence] == [t2_uid]
        assert [item.SegmentLabel for item in seg.SegmentSequence] == ["PZ", "TZ", "CZ"]
        assert status["warnings"] == ["prostate_00.nii.gz: declared label 3 (CZ) does not occur"]


async def test_nifti_upload_bad_case_is_an_error_and_nothing_of_it_is_stored(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """A case whose label shape differs from its image fails alone: named in the errors, no
    series of it stored, no work files left; the good case is imported."""
    root = tmp_path / "tree"
    image(root / "Bad01.nii.gz")
    labels(root / "Bad01_seg.nii.gz", shape=(16, 16, 5))
    image(root / "Good01.nii.gz")
    labels(root / "Good01_seg.nii.gz")
    write_json(root / "seg_info.json", SEG_INFO)
    body = zip_folder(root)
    async with upload_gateway(make_config()) as ug, aiohttp.ClientSession() as s:
        status = await post_upload(s, ug.base, body, kind="nifti", dataset="mixed")
        assert_done(status, (2, 1, 1))
        (error,) = status["errors"]
        assert error["file"] == "Bad01.nii.gz" and error["error"] == "conversion"
        assert "case Bad01" in error["detail"] and "shape" in error["detail"], error
        series = await dataset_series(s, ug.base, "mixed")
        patients = sorted(d["document"][KEY_PATIENT_ID] for d in series.values())
        assert patients == ["Good01", "Good01"]
        assert status["instances_imported"] == 6 + 1
        bad = await get_json(s, f"{ug.base}/api/projects/admin/series?patient_id=Bad01")
        assert bad["total"] == 0
        tmp = ug.data_dir / "spool" / "tmp"
        assert [p.name for p in tmp.iterdir()] == []
        assert list((ug.data_dir / "uploads-state").glob("*.nifti")) == []


async def test_nifti_upload_unplannable_tree_fails_the_upload(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """kind=nifti with invalid meta_data.json: the upload fails naming the file."""
    root = tmp_path / "tree"
    image(root / "Case01.nii.gz")
    (root / "meta_data.json").write_text("{not json")
    async with upload_gateway(make_config()) as ug, aiohttp.ClientSession() as s:
        status = await post_upload(s, ug.base, zip_folder(root), kind="nifti", dataset="broken")
        assert status["state"] == "failed", status
        assert "meta_data.json: invalid JSON" in status["detail"]
        assert status["errors"][0]["error"] == "conversion"
