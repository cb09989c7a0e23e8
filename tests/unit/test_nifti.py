"""Layouts, tags, identity, value encoding and bad inputs of the NIfTI converter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path

from kp_gateway.convert.nifti import (
    ConvertedSeries,
    Layout,
    NiftiPlan,
    convert_case,
    is_nifti_tree,
    plan_nifti_tree,
)
from kp_gateway.errors import ConversionError

SHAPE = (8, 6, 4)
AFFINE = np.diag([0.7, 0.9, 3.0, 1.0])


def image(path: Path, value: int = 100, shape: tuple[int, ...] = SHAPE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (np.arange(int(np.prod(shape))).reshape(shape) % 50 + value).astype(np.int16)
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def labels(path: Path, values: tuple[int, ...] = (1,), shape: tuple[int, ...] = SHAPE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(shape, dtype=np.uint8)
    for n, value in enumerate(values):
        data[n : n + 2, 1:3, 1 + n % 3] = value
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


SEG_INFO = {"algorithm": "Ground truth", "seg_info": [{"label_name": "prostate", "label_int": "1"}]}


def convert_all(plan: NiftiPlan, out: Path, seed: str = "ds") -> dict[str, list[ConvertedSeries]]:
    return {c.case_id: convert_case(plan, c, out, dataset_uid_seed=seed) for c in plan.cases}


def header(series: ConvertedSeries, index: int = 0) -> pydicom.Dataset:
    return pydicom.dcmread(series.files[index], stop_before_pixels=True)


def test_plan_basic_without_segs_applies_meta_data(tmp_path: Path) -> None:
    """The documented OnlyMRs example: global Modality, exact series_tags, stripped stems."""
    root = tmp_path / "OnlyMRs"
    for name in ("Case00.nii.gz", "Case002.nii.gz", "spleen.nii.gz", "brain.nii"):
        image(root / name)
    write_json(
        root / "meta_data.json",
        {
            "global_tags": {"0008|0060": "MR"},
            "series_tags": {"Case00.nii": {"0008|103e": "unique"}},
        },
    )
    plan = plan_nifti_tree(tmp_path)
    assert [c.case_id for c in plan.cases] == ["Case00", "Case002", "brain", "spleen"]
    assert all(c.layout is Layout.BASIC and c.label is None for c in plan.cases)
    result = convert_all(plan, tmp_path / "out")
    descriptions = {case: header(series[0]).SeriesDescription for case, series in result.items()}
    # "Case00.nii" names Case00.nii.gz exactly and never Case002; stems keep their last letters.
    assert descriptions == {
        "Case00": "unique", "Case002": "Case002", "brain": "brain", "spleen": "spleen"
    }  # fmt: skip
    first = header(result["Case00"][0])
    assert first.Modality == "MR"
    assert first.SOPClassUID == pydicom.uid.MRImageStorage
    assert first.PatientID == "Case00"
    assert first.InstanceNumber == 1
    studies = {series[0].study_instance_uid for series in result.values()}
    assert len(studies) == 4  # one study per case


def test_plan_basic_option_one_pairs_segmentations(tmp_path: Path) -> None:
    """Option one: <case>_segmentation / <case>_seg beside the cases, matched exactly."""
    image(tmp_path / "Case11.nii.gz")
    labels(tmp_path / "Case11_segmentation.nii.gz")
    image(tmp_path / "Case1.nii.gz")
    labels(tmp_path / "Case1_seg.nii")
    image(tmp_path / "Case12.nii.gz")
    write_json(tmp_path / "seg_info.json", SEG_INFO)
    plan = plan_nifti_tree(tmp_path)
    pairs = {c.case_id: c.label.name if c.label else None for c in plan.cases}
    assert pairs == {
        "Case1": "Case1_seg.nii", "Case11": "Case11_segmentation.nii.gz", "Case12": None
    }  # fmt: skip
    result = convert_all(plan, tmp_path / "out")
    assert [s.kind for s in result["Case11"]] == ["image", "seg"]
    assert [s.kind for s in result["Case12"]] == ["image"]
    seg = hd.seg.segread(result["Case11"][1].files[0])
    assert seg.get_segment_description(1).segment_label == "prostate"


def test_plan_basic_option_two_cases_and_segs(tmp_path: Path) -> None:
    """Option two: cases/ and segs/ with identical names; an AUTOMATIC algorithm is named."""
    root = tmp_path / "MRsWithSegmentationsTwoFolders"
    for case in ("Case03", "Case04"):
        image(root / "cases" / f"{case}.nii.gz")
        labels(root / "segs" / f"{case}.nii.gz", values=(1, 2))
    write_json(
        root / "seg_info.json",
        {
            "algorithm": "nnunet-prostate",
            "task_body_part": "prostate",
            "seg_info": [
                {"label_name": "PZ", "label_int": 1},
                {
                    "label_name": "TZ",
                    "label_int": 2,
                    "code": {"scheme": "SCT", "value": "399384005", "meaning": "Transition zone"},
                },
            ],
        },
    )
    plan = plan_nifti_tree(tmp_path)
    assert [c.dataset for c in plan.cases] == [root.name] * 2
    result = convert_all(plan, tmp_path / "out")
    seg_series = result["Case03"][1]
    assert seg_series.warnings == ()
    seg = hd.seg.segread(seg_series.files[0])
    first, second = seg.get_segment_description(1), seg.get_segment_description(2)
    assert first.algorithm_type.value == "AUTOMATIC"
    assert first.algorithm_identification[0].AlgorithmName == "nnunet-prostate"
    assert first.segmented_property_type.value == "85756007"  # generic Tissue
    assert second.segmented_property_type.meaning == "Transition zone"
    assert seg.BodyPartExamined == "PROSTATE"
    assert (tmp_path / "out" / f"{root.name}__Case03").is_dir()


def nnunet(root: Path, channels: dict[str, str], train: list[str], test: list[str]) -> None:
    write_json(
        root / "dataset.json",
        {
            "channel_names": channels,
            "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
            "file_ending": ".nii.gz",
            "name": "Hippocampus",
        },
    )
    for folder, cases in (("imagesTr", train), ("imagesTs", test)):
        for case in cases:
            for channel in channels:
                image(root / folder / f"{case}_{int(channel):04d}.nii.gz", value=10 * int(channel))
    for case in train:
        labels(root / "labelsTr" / f"{case}.nii.gz", values=(1, 2))


def test_plan_nnunet_four_channels_one_study(tmp_path: Path) -> None:
    """nnU-Net v2: 4 channels give 4 series in one study; the SEG references channel 0000."""
    root = tmp_path / "Dataset001_BrainTumour"
    nnunet(root, {"0": "MRI", "1": "FLAIR", "2": "CT", "3": "T2w"}, ["BRATS_001"], ["BRATS_485"])
    plan = plan_nifti_tree(tmp_path)
    assert [(c.case_id, c.layout) for c in plan.cases] == [
        ("BRATS_001", Layout.NNUNET_V2), ("BRATS_485", Layout.NNUNET_V2)
    ]  # fmt: skip
    result = convert_all(plan, tmp_path / "out")
    train = result["BRATS_001"]
    assert [s.kind for s in train] == ["image"] * 4 + ["seg"]
    assert len({s.study_instance_uid for s in train}) == 1
    assert len({s.series_instance_uid for s in train}) == 5
    headers = [header(s) for s in train[:4]]
    assert [h.SeriesDescription for h in headers] == ["MRI", "FLAIR", "CT", "T2w"]
    assert [h.Modality for h in headers] == ["MR", "OT", "CT", "OT"]
    assert len({h.FrameOfReferenceUID for h in headers}) == 1
    seg = pydicom.dcmread(train[4].files[0])
    referenced = {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence}
    assert referenced == {train[0].series_instance_uid}
    assert [s.kind for s in result["BRATS_485"]] == ["image"] * 4  # imagesTs: no labels


def test_plan_nnunet_v1_dataset_json_is_refused(tmp_path: Path) -> None:
    """A v1 dataset.json (modality, training list) gets a clear error."""
    image(tmp_path / "imagesTr" / "hip_001_0000.nii.gz")
    write_json(
        tmp_path / "dataset.json",
        {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "A"}, "training": []},
    )
    with pytest.raises(ConversionError, match="nnU-Net v1"):
        plan_nifti_tree(tmp_path)


def test_convert_case_uids_are_deterministic(tmp_path: Path) -> None:
    """The same input and seed give the same UIDs; another seed gives others."""
    image(tmp_path / "in" / "Case01.nii.gz")
    plan = plan_nifti_tree(tmp_path / "in")
    first = convert_case(plan, plan.cases[0], tmp_path / "a", dataset_uid_seed="ds")
    again = convert_case(plan, plan.cases[0], tmp_path / "a", dataset_uid_seed="ds")
    other = convert_case(plan, plan.cases[0], tmp_path / "b", dataset_uid_seed="other")
    assert first == again
    assert header(first[0]).SOPInstanceUID == header(again[0]).SOPInstanceUID
    assert first[0].series_instance_uid != other[0].series_instance_uid
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["Case01"]  # replaced, no debris


def test_convert_case_tags_by_keyword_and_hex(tmp_path: Path) -> None:
    """Keyword and 'gggg|eeee' keys (any case) reach the DICOM; series_tags override globals."""
    image(tmp_path / "Case01.nii.gz")
    write_json(
        tmp_path / "meta_data.json",
        {
            "global_tags": {"Modality": "CT", "0008|0080": "Lab", "PatientAge": "040Y"},
            "series_tags": {
                "Case01": {"0008|103E": "Portal venous", "InstitutionName": "Other lab"},
            },
        },
    )
    plan = plan_nifti_tree(tmp_path)
    (series,) = convert_case(plan, plan.cases[0], tmp_path / "out", dataset_uid_seed="t")
    ds = header(series)
    assert (ds.Modality, ds.SOPClassUID) == ("CT", pydicom.uid.CTImageStorage)
    assert ds.SeriesDescription == "Portal venous"
    assert ds.InstitutionName == "Other lab"
    assert ds.PatientAge == "040Y"


def test_convert_case_geometry_attributes(tmp_path: Path) -> None:
    """PixelSpacing is (row, column) spacing; positions step along the slice axis in LPS."""
    image(tmp_path / "Case01.nii.gz")
    plan = plan_nifti_tree(tmp_path)
    (series,) = convert_case(plan, plan.cases[0], tmp_path / "out", dataset_uid_seed="g")
    first, second = header(series, 0), header(series, 1)
    # The affine went through the NIfTI header as float32, hence approx.
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([0.9, 0.7])
    assert [float(v) for v in first.ImageOrientationPatient] == [-1, 0, 0, 0, -1, 0]
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == 3.0
    assert [float(v) for v in second.ImagePositionPatient] == [0, 0, 3.0]
    assert (first.Rows, first.Columns) == (SHAPE[1], SHAPE[0])
    assert len(series.files) == SHAPE[2]


def encoded(tmp_path: Path, data: np.ndarray) -> tuple[pydicom.Dataset, ConvertedSeries]:
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "Case01.nii.gz")
    plan = plan_nifti_tree(tmp_path)
    (series,) = convert_case(plan, plan.cases[0], tmp_path / "out", dataset_uid_seed="v")
    return pydicom.dcmread(series.files[0]), series


def test_convert_case_integer_range_wider_than_16_bits_warns(tmp_path: Path) -> None:
    """Integers spanning more than 65535 are rescaled with a warning naming the error bound."""
    data = np.zeros(SHAPE, dtype=np.int32)
    data[0, 0, 0], data[1, 0, 0] = -100_000, 100_000
    ds, series = encoded(tmp_path, data)
    assert len(series.warnings) == 1
    assert "exceeds 16 bits" in series.warnings[0]
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    decoded = ds.pixel_array.astype(np.float64) * slope + intercept
    assert abs(decoded[0, 0] + 100_000) <= slope / 2


def test_convert_case_integral_floats_stored_exactly(tmp_path: Path) -> None:
    """Float data holding only integers is stored as 16-bit integers without rescale."""
    ds, series = encoded(tmp_path, np.full(SHAPE, -7.0, dtype=np.float32))
    assert (ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept) == (1, 1, 0)
    assert int(ds.pixel_array[0, 0]) == -7
    assert series.warnings == ()


def test_convert_case_reports_label_warnings(tmp_path: Path) -> None:
    """Declared labels absent and undeclared values present become warnings on the SEG."""
    image(tmp_path / "Case01.nii.gz")
    labels(tmp_path / "Case01_seg.nii.gz", values=(1, 5))
    write_json(
        tmp_path / "seg_info.json",
        {
            "algorithm": "Ground truth",
            "seg_info": [{"label_name": "a", "label_int": 1}, {"label_name": "b", "label_int": 2}],
        },
    )
    plan = plan_nifti_tree(tmp_path)
    _image, seg = convert_case(plan, plan.cases[0], tmp_path / "out", dataset_uid_seed="w")
    assert any("declared label 2 (b) does not occur" in w for w in seg.warnings)
    assert any("undeclared label value(s) [5]" in w for w in seg.warnings)


def test_is_nifti_tree_detects_nifti(tmp_path: Path) -> None:
    """A tree is NIfTI when it holds a .nii/.nii.gz file outside hidden folders."""
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "x.nii.gz").write_bytes(b"")
    assert not is_nifti_tree(tmp_path)
    image(tmp_path / "sub" / "Case01.nii")
    assert is_nifti_tree(tmp_path)


# --- bad inputs: each a ConversionError naming the problem, nothing written ---------------------


def meta(tags: dict[str, Any]) -> dict[str, Any]:
    return {"global_tags": tags}


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"meta_data.json": "{not json"}, r"meta_data\.json: invalid JSON"),
        ({"meta_data.json": meta({"0008|zzzz": "x"})}, r"unknown tag key '0008\|zzzz'"),
        ({"meta_data.json": meta({"PatientsAge": "040Y"})}, "unknown tag key 'PatientsAge'"),
        ({"meta_data.json": meta({"PatientAge": "forty"})}, r"PatientAge.*'forty'.*AS"),
        ({"meta_data.json": meta({"Modality": "SEG"})}, "not a DICOM image modality"),
        ({"meta_data.json": meta({"PixelSpacing": [1, 1]})}, "set by the converter"),
        ({"meta_data.json": meta({"ImageType": ["A", 1.5]})}, "ImageType"),
        (
            {"meta_data.json": {"series_tags": {"Case0": {"Modality": "CT"}}}},
            r"series_tags\['Case0'\] matches no image",
        ),
        ({"meta_data.json": {"global_tag": {}}}, r"unknown key\(s\) \['global_tag'\]"),
        ({"Case01.nii": "image"}, "ambiguous case 'Case01'"),
        ({"Case01_seg.nii.gz": "labels", "Case01_segmentation.nii.gz": "labels"}, "ambiguous"),
        ({"Case02_seg.nii.gz": "labels"}, r"orphaned segmentation Case02_seg\.nii\.gz"),
        ({"Case01_seg.nii.gz": "labels", "seg_info.json": None}, "seg_info.json: missing"),
    ],
)
def test_plan_nifti_tree_rejects_bad_input(
    tmp_path: Path, files: dict[str, Any], match: str
) -> None:
    """Invalid JSON, unknown keys, wrong VR values, ambiguous and orphaned names are refused."""
    image(tmp_path / "Case01.nii.gz")
    if "seg_info.json" not in files:
        write_json(tmp_path / "seg_info.json", SEG_INFO)
    for name, content in files.items():
        if content == "image":
            image(tmp_path / name)
        elif content == "labels":
            labels(tmp_path / name)
        elif isinstance(content, str):
            (tmp_path / name).write_text(content)
        elif content is not None:
            write_json(tmp_path / name, content)
    with pytest.raises(ConversionError, match=match):
        plan_nifti_tree(tmp_path)


def test_plan_nifti_tree_rejects_missing_nnunet_channel(tmp_path: Path) -> None:
    """A case lacking one of the channels named in dataset.json is an error naming the file."""
    nnunet(tmp_path, {"0": "T1", "1": "T2"}, ["hip_001"], [])
    (tmp_path / "imagesTr" / "hip_001_0001.nii.gz").unlink()
    with pytest.raises(ConversionError, match=r"missing channel file\(s\) hip_001_0001\.nii\.gz"):
        plan_nifti_tree(tmp_path)


def test_plan_nifti_tree_rejects_orphaned_nnunet_label(tmp_path: Path) -> None:
    """A label file without its case's images is an error naming the file."""
    nnunet(tmp_path, {"0": "CT"}, ["hip_001"], [])
    labels(tmp_path / "labelsTr" / "hip_002.nii.gz")
    with pytest.raises(ConversionError, match=r"orphaned label labelsTr/hip_002\.nii\.gz"):
        plan_nifti_tree(tmp_path)


def test_plan_nifti_tree_rejects_empty_tree(tmp_path: Path) -> None:
    """A tree without NIfTI files is an error."""
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ConversionError, match="no NIfTI files"):
        plan_nifti_tree(tmp_path)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == []


def test_convert_case_rejects_mismatched_label_shape(tmp_path: Path) -> None:
    """A label map whose shape differs from the image fails the case and writes nothing."""
    image(tmp_path / "Case01.nii.gz")
    labels(tmp_path / "Case01_seg.nii.gz", shape=(8, 6, 5))
    write_json(tmp_path / "seg_info.json", SEG_INFO)
    plan = plan_nifti_tree(tmp_path)
    with pytest.raises(ConversionError, match=r"case Case01: Case01_seg\.nii\.gz: shape"):
        convert_case(plan, plan.cases[0], tmp_path / "out", dataset_uid_seed="x")
    assert_nothing_written(tmp_path / "out")


def test_convert_case_rejects_missing_file(tmp_path: Path) -> None:
    """An image that disappeared after planning fails the case and writes nothing."""
    path = image(tmp_path / "Case01.nii.gz")
    plan = plan_nifti_tree(tmp_path)
    path.unlink()
    with pytest.raises(ConversionError, match=r"case Case01: Case01\.nii\.gz: cannot read"):
        convert_case(plan, plan.cases[0], tmp_path / "out", dataset_uid_seed="x")
    assert_nothing_written(tmp_path / "out")


def test_convert_case_rejects_4d_image(tmp_path: Path) -> None:
    """A 4-D image (nibabel's functional.nii) is refused with a clear error."""
    (tmp_path / "functional.nii").write_bytes((Path(data_path) / "functional.nii").read_bytes())
    plan = plan_nifti_tree(tmp_path)
    with pytest.raises(ConversionError, match="4-D image"):
        convert_case(plan, plan.cases[0], tmp_path / "out", dataset_uid_seed="x")
    assert_nothing_written(tmp_path / "out")


def _decoded_volume(files: tuple[Path, ...]) -> tuple[np.ndarray, np.ndarray, Any]:
    """(modality values, stored values, first header) of a converted series, as (i, j, k)."""
    slices = [pydicom.dcmread(f) for f in files]
    stored = np.stack([ds.pixel_array.T for ds in slices], axis=2)
    first = slices[0]
    values = stored * float(first.RescaleSlope) + float(first.RescaleIntercept)
    return values, stored, first


def _convert_volume(tmp_path: Path, data: np.ndarray) -> Any:
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "Case01.nii.gz")
    plan = plan_nifti_tree(tmp_path)
    (image,) = convert_case(plan, plan.cases[0], tmp_path / "out", dataset_uid_seed="x")
    return image


def test_convert_case_pads_nan_and_infinite_voxels(tmp_path: Path) -> None:
    """NaN/inf voxels become PixelPaddingValue, outside the data; finite voxels keep the bound."""
    rng = np.random.default_rng(7)
    data = rng.uniform(-3.5, 120.25, SHAPE).astype(np.float32)
    data[0, 0, 0], data[1, 2, 3], data[7, 5, 0] = np.nan, np.inf, -np.inf
    image = _convert_volume(tmp_path, data)
    values, stored, first = _decoded_volume(image.files)
    finite = np.isfinite(data)
    slope = float(first.RescaleSlope)
    assert np.max(np.abs(values[finite] - data[finite])) <= slope / 2 + 1e-9
    padding = int(first.PixelPaddingValue)
    assert (stored[~finite] == padding).all()
    assert (stored[finite] != padding).all()
    assert padding * slope + float(first.RescaleIntercept) > data[finite].max()
    assert any("3 NaN or infinite voxels" in w for w in image.warnings), image.warnings


def test_convert_case_pads_nan_in_integer_valued_volume_exactly(tmp_path: Path) -> None:
    """Whole-number floats with NaN keep their integers exactly; the padding lies outside them."""
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) - 1024
    data[2, 3, 1] = np.nan
    image = _convert_volume(tmp_path, data)
    values, stored, first = _decoded_volume(image.files)
    finite = np.isfinite(data)
    assert np.array_equal(values[finite], data[finite])
    padding = int(first.PixelPaddingValue)
    assert stored[2, 3, 1] == padding
    assert not (padding >= stored[finite].min() and padding <= stored[finite].max())


def test_convert_case_rejects_volume_without_finite_voxels(tmp_path: Path) -> None:
    """A volume that is NaN everywhere has nothing to store and is refused."""
    data = np.full(SHAPE, np.nan, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "Case01.nii.gz")
    plan = plan_nifti_tree(tmp_path)
    with pytest.raises(ConversionError, match="every voxel is NaN"):
        convert_case(plan, plan.cases[0], tmp_path / "out", dataset_uid_seed="x")
    assert_nothing_written(tmp_path / "out")
