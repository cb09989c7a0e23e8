"""NIfTI -> DICOM -> NIfTI round trips through tools nobody here wrote (dcm2niix, dciodvfy)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path

from kp_gateway.convert.nifti import ConvertedSeries, convert_case, plan_nifti_tree

SHAPE = (32, 24, 10)


def _tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


DCM2NIIX = _tool("dcm2niix")
DCIODVFY = _tool("dciodvfy")
needs_dcm2niix = pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix is not installed")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) missing")


def oblique_affine() -> np.ndarray:
    """An oblique, anisotropic RAS affine (rotation about all three axes)."""
    ax, ay, az = 0.2, -0.15, 0.3
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [-12.5, 30.25, 7.0]
    return affine


def volume(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if dtype == "int16":
        return rng.integers(-1024, 3000, SHAPE).astype(np.int16)
    if dtype == "uint8":
        return rng.integers(0, 256, SHAPE).astype(np.uint8)
    if dtype == "int32":
        return rng.integers(100_000, 160_000, SHAPE).astype(np.int32)
    return (rng.standard_normal(SHAPE) * 37.5 + 4.25).astype(np.float32)


def label_map() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[4:14, 3:11, 2:5] = 1
    labels[18:27, 12:20, 5:9] = 2
    labels[8:10, 15:17, 7] = 1
    return labels


def convert_single(
    tmp_path: Path, data: np.ndarray, affine: np.ndarray, modality: str, labels: bool
) -> list[ConvertedSeries]:
    src = tmp_path / "in"
    src.mkdir()
    nib.save(nib.Nifti1Image(data, affine), src / "Case01.nii.gz")
    (src / "meta_data.json").write_text(json.dumps({"global_tags": {"Modality": modality}}))
    if labels:
        nib.save(nib.Nifti1Image(label_map(), affine), src / "Case01_seg.nii.gz")
        seg_info = {
            "algorithm": "Ground truth",
            "seg_info": [
                {"label_name": "liver", "label_int": "1"},
                {"label_name": "spleen", "label_int": 2},
            ],
        }
        (src / "seg_info.json").write_text(json.dumps(seg_info))
    plan = plan_nifti_tree(src)
    return convert_case(plan, plan.cases[0], tmp_path / "out", dataset_uid_seed="roundtrip")


def dcm2niix_back(tmp_path: Path, files: tuple[Path, ...]) -> nib.Nifti1Image:
    series_dir = files[0].parent
    back = tmp_path / "back"
    back.mkdir()
    assert DCM2NIIX is not None
    subprocess.run(
        [DCM2NIIX, "-z", "n", "-b", "n", "-f", "back", "-o", str(back), str(series_dir)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (out,) = back.glob("back*.nii")
    img = nib.load(out)
    assert isinstance(img, nib.Nifti1Image)
    return img


def convert_nibabel_file(tmp_path: Path, name: str) -> tuple[nib.Nifti1Image, ConvertedSeries]:
    """One of nibabel's bundled test images, converted as an upload of that single file."""
    original = nib.load(Path(data_path) / name)
    assert isinstance(original, nib.Nifti1Image)
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(Path(data_path) / name, src / name)
    plan = plan_nifti_tree(src)
    (image,) = convert_case(plan, plan.cases[0], tmp_path / "out", dataset_uid_seed="nib")
    return original, image


def float_tolerance(ds: pydicom.Dataset) -> float:
    """The documented bound slope/2, plus float32 rounding of dcm2niix's scl_slope/scl_inter."""
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    return slope / 2 + 2.0**-23 * (abs(intercept) + 65535 * slope)


def assert_same_image(original: nib.Nifti1Image, back: nib.Nifti1Image, tolerance: float) -> None:
    a = nib.as_closest_canonical(original)
    b = nib.as_closest_canonical(back)
    assert b.shape == a.shape
    np.testing.assert_allclose(b.affine, a.affine, rtol=0, atol=1e-3)
    a_data, b_data = np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)
    if tolerance == 0:
        assert np.array_equal(a_data.astype(np.int64), b_data.astype(np.int64))
    else:
        assert np.max(np.abs(a_data.astype(np.float64) - b_data.astype(np.float64))) <= tolerance


@needs_dcm2niix
@pytest.mark.parametrize(
    ("dtype", "modality"),
    [("int16", "CT"), ("uint8", "OT"), ("float32", "MR"), ("int32", "PT")],
)
def test_convert_case_dcm2niix_roundtrip(tmp_path: Path, dtype: str, modality: str) -> None:
    """Oblique anisotropic volumes come back from dcm2niix with equal voxels and affine."""
    data = volume(dtype)
    affine = oblique_affine()
    (image,) = convert_single(tmp_path, data, affine, modality, labels=False)
    assert image.warnings == ()
    first = pydicom.dcmread(image.files[0])
    tolerance = 0.0
    if dtype == "float32":
        tolerance = float_tolerance(first)
    back = dcm2niix_back(tmp_path, image.files)
    assert_same_image(nib.Nifti1Image(data, affine), back, tolerance)


@needs_dcm2niix
@pytest.mark.parametrize("name", ["anatomical.nii", "reoriented_anat_moved.nii", "standard.nii.gz"])
def test_convert_case_nibabel_test_images_roundtrip(tmp_path: Path, name: str) -> None:
    """nibabel's own test images survive the round trip through dcm2niix."""
    original, image = convert_nibabel_file(tmp_path, name)
    data = np.asanyarray(original.dataobj)
    tolerance = 0.0
    if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
        tolerance = float_tolerance(pydicom.dcmread(image.files[0]))
    back = dcm2niix_back(tmp_path, image.files)
    reference = nib.Nifti1Image(data, original.header.get_best_affine())
    assert_same_image(reference, back, tolerance)


@needs_dcm2niix
def test_convert_case_resampled_image_with_nan_roundtrip(tmp_path: Path) -> None:
    """nibabel's resampled_anat_moved.nii (NaN outside the field of view) converts; every finite
    voxel comes back from dcm2niix within the bound, the NaN voxels as the padding value."""
    name = "resampled_anat_moved.nii"
    original, image = convert_nibabel_file(tmp_path, name)
    first = pydicom.dcmread(image.files[0])
    data = np.asanyarray(original.dataobj).astype(np.float64)
    finite = np.isfinite(data)
    assert not finite.all(), "the test image should carry NaN voxels"
    assert any("NaN or infinite voxels" in w for w in image.warnings)
    back = nib.as_closest_canonical(dcm2niix_back(tmp_path, image.files))
    reference = nib.as_closest_canonical(nib.Nifti1Image(data, original.header.get_best_affine()))
    np.testing.assert_allclose(back.affine, reference.affine, rtol=0, atol=1e-3)
    a, b = np.asanyarray(reference.dataobj), np.asanyarray(back.dataobj).astype(np.float64)
    mask = np.isfinite(a)
    assert np.max(np.abs(a[mask] - b[mask])) <= float_tolerance(first)
    padding_value = int(first.PixelPaddingValue) * float(first.RescaleSlope) + float(
        first.RescaleIntercept
    )
    np.testing.assert_allclose(b[~mask], padding_value, rtol=1e-6)


def test_convert_case_seg_matches_label_map(tmp_path: Path) -> None:
    """Each SEG segment read back with highdicom equals label == value in the right slices."""
    labels = label_map()
    image, seg_series = convert_single(
        tmp_path, volume("int16"), oblique_affine(), "CT", labels=True
    )
    assert seg_series.kind == "seg"
    assert seg_series.study_instance_uid == image.study_instance_uid
    seg = hd.seg.segread(seg_series.files[0])
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["liver", "spleen"]
    assert seg.get_segment_description(1).algorithm_type.value == "MANUAL"
    sop_uids = [
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in image.files
    ]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sop_uids, segment_numbers=[1, 2]
    )
    # (slice, row, column, segment) vs the label map's (i, j, k): rows run along j.
    for number, value in ((1, 1), (2, 2)):
        expected = np.transpose(labels == value, (2, 1, 0))
        assert np.array_equal(pixels[..., number - 1].astype(bool), expected)
    # Empty frames are omitted: one frame per (slice, segment) pair that holds the label.
    expected_frames = sum(int((labels == v).any(axis=(0, 1)).sum()) for v in (1, 2))
    assert int(seg.NumberOfFrames) == expected_frames


def dciodvfy_errors(path: Path) -> list[str]:
    assert DCIODVFY is not None
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


@needs_dciodvfy
@pytest.mark.parametrize("modality", ["CT", "MR", "OT", "PT"])
def test_convert_case_dciodvfy_reports_no_errors(tmp_path: Path, modality: str) -> None:
    """dciodvfy finds no errors in an image instance nor in the SEG, for every SOP class."""
    image, seg_series = convert_single(
        tmp_path, volume("float32"), oblique_affine(), modality, labels=True
    )
    assert dciodvfy_errors(image.files[3]) == []
    assert dciodvfy_errors(seg_series.files[0]) == []


@needs_dciodvfy
@pytest.mark.parametrize("modality", ["CT", "MR", "OT"])
def test_convert_case_padded_image_dciodvfy_reports_no_errors(
    tmp_path: Path, modality: str
) -> None:
    """PixelPaddingValue for NaN voxels is valid in every image SOP class we write."""
    data = volume("float32")
    data[:3, :, :] = np.nan
    (image,) = convert_single(tmp_path, data, oblique_affine(), modality, labels=False)
    assert "PixelPaddingValue" in pydicom.dcmread(image.files[3])
    assert dciodvfy_errors(image.files[3]) == []
