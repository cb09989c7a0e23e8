"""Tests for kp_gateway.thumbnails on pydicom's bundled test files and synthetic series."""

from __future__ import annotations

import io
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from highdicom.color import CIELabColor
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)

from kp_gateway.thumbnails import Thumbnail, referenced_series_uid, render_series_thumbnail
from tests.conftest import tissue_segment, write_segmentation

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SIZE = 64  # rows and columns of the synthetic CT slices
SPACING = 0.8  # mm; the slices span -25.6 .. +25.6 mm in x and y


# --- helpers -----------------------------------------------------------------------------------


def _testdata(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not bundled with this pydicom"
    return str(path)


def _pixels(thumbnail: Thumbnail) -> npt.NDArray[np.uint8]:
    with Image.open(io.BytesIO(thumbnail.png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.save_as(path, enforce_file_format=True)
    return path


def _patient_study(ds: Dataset, study_uid: str, modality: str, sop_class_uid: str) -> None:
    ds.PatientName = "Test^Thumbnail"
    ds.PatientID = "KP-THUMB-1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.Manufacturer = "kp-gateway tests"


def _ct_series(
    directory: Path,
    *,
    count: int = 9,
    orientation: Sequence[float] = AXIAL,
    with_position: bool = True,
) -> list[Path]:
    """A CT stack whose slice k (by position) has a bright disc of radius 4 + 2k pixels.

    Files are written in shuffled order with shuffled InstanceNumbers so that neither the file
    order nor InstanceNumber says which slice is in the middle.
    """
    rng = random.Random(20240101)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    # InstanceNumber runs against position and is rotated, so it never marks the middle slice.
    instance_numbers = [(count - k + 2) % count + 1 for k in range(count)]
    row_cosines, column_cosines = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_cosines, column_cosines)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    paths = []
    for k in range(count):
        ds = Dataset()
        _patient_study(ds, study_uid, "CT", CTImageStorage)
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = instance_numbers[k]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        # The first pixel sits at -25.6 mm along both in-plane axes, whatever their direction.
        origin = -(SIZE / 2) * SPACING * (row_cosines + column_cosines) + k * 2.5 * normal
        if with_position:
            ds.ImagePositionPatient = [round(float(v), 4) for v in origin]
            ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = [SPACING, SPACING]
        ds.SliceThickness = 2.5
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
        disc = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 <= (4 + 2 * k) ** 2
        ds.PixelData = np.where(disc, 1024 + 300, 1024 - 100).astype(np.uint16).tobytes()
        paths.append(_save(ds, directory / f"ct-{k}.dcm"))
    rng.shuffle(paths)
    return paths


def _by_position(paths: Sequence[Path]) -> list[Dataset]:
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    cosines = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    return sorted(headers, key=lambda ds: float(np.array(ds.ImagePositionPatient) @ normal))


def _seg(
    directory: Path,
    ct_paths: Sequence[Path],
    labelled: dict[int, Sequence[int]],
    colours: dict[int, CIELabColor] | None = None,
) -> Path:
    """A binary SEG over the CT stack; `labelled` maps segment number to slice indices."""
    sources = _by_position(ct_paths)
    for ds in sources:
        ds.PixelData = dcmread(ct_paths[0]).PixelData  # pixel data is not used by highdicom
    mask = np.zeros((len(sources), SIZE, SIZE, len(labelled)), dtype=bool)
    for column, (_, slices) in enumerate(sorted(labelled.items())):
        # Segment 1 is a large square, later ones are small squares stacked at the left.
        rows, columns = (
            (slice(16, 40), slice(20, 44))
            if column == 0
            else (slice(10 * column, 10 * column + 8), slice(4, 12))
        )
        for index in slices:
            mask[index, rows, columns, column] = True
    descriptions = [
        tissue_segment(number, f"segment {number}", (colours or {}).get(number))
        for number in sorted(labelled)
    ]
    path = directory / "seg.dcm"
    write_segmentation(path, sources, mask, descriptions)
    return path


def _rtstruct(directory: Path, ct_paths: Sequence[Path], slice_index: int) -> Path:
    """An RTSTRUCT with one green square ROI at x 5..20 mm, y -20..-5 mm on one slice."""
    reference = _by_position(ct_paths)[slice_index]
    ds = Dataset()
    _patient_study(ds, str(reference.StudyInstanceUID), "RTSTRUCT", RTStructureSetStorage)
    ds.StructureSetLabel = "unit"
    ds.StructureSetDate = "20240101"
    ds.StructureSetTime = "120000"
    image = Dataset()
    image.ReferencedSOPClassUID = CTImageStorage
    image.ReferencedSOPInstanceUID = reference.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = reference.SeriesInstanceUID
    series.ContourImageSequence = DicomSequence([image])
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = reference.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = reference.FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = reference.FrameOfReferenceUID
    roi.ROIName = "square"
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = DicomSequence([roi])
    z = float(reference.ImagePositionPatient[2])
    contour = Dataset()
    contour.ContourGeometricType = "CLOSED_PLANAR"
    contour.NumberOfContourPoints = 4
    contour.ContourData = [5.0, -20.0, z, 20.0, -20.0, z, 20.0, -5.0, z, 5.0, -5.0, z]
    contour.ContourImageSequence = DicomSequence([image])
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = [0, 255, 0]
    roi_contour.ContourSequence = DicomSequence([contour])
    ds.ROIContourSequence = DicomSequence([roi_contour])
    return _save(ds, directory / "rtstruct.dcm")


def _greenish(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    red, green, blue = (pixels[..., i].astype(int) for i in range(3))
    return np.asarray((green - red > 60) & (green - blue > 60), dtype=bool)


# --- slice-based ------------------------------------------------------------------------------


def test_render_series_thumbnail_ct_small_scaled_and_not_blank() -> None:
    """A single CT image becomes a 300 px, non-blank slice thumbnail of that instance."""
    path = _testdata("CT_small.dcm")
    thumbnail = render_series_thumbnail([path])
    pixels = _pixels(thumbnail)
    assert thumbnail.strategy == "slice"
    assert thumbnail.source_sop_instance_uid == dcmread(path).SOPInstanceUID
    assert max(pixels.shape[:2]) == 300
    assert pixels.std() > 0


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("MR_small_RLE.dcm", (128, 128)),
        ("MR_small_jp2klossless.dcm", (128, 128)),
        ("MR_small_jpeg_ls_lossless.dcm", (128, 128)),
        ("JPEG2000.dcm", (128, 32)),  # 1024 x 256: aspect kept
        ("JPGExtended.dcm", (128, 32)),
        ("SC_rgb_rle.dcm", (128, 128)),
        ("SC_rgb_dcmtk_+eb+cy+n2.dcm", (128, 128)),  # YBR_FULL JPEG baseline
        ("SC_ybr_full_422_uncompressed.dcm", (128, 128)),
        ("examples_palette.dcm", (56, 128)),  # PALETTE COLOR, 350 x 800
        ("SC_rgb_rle_2frame.dcm", (128, 128)),  # multi-frame colour
        ("rtdose.dcm", (128, 128)),  # multi-frame greyscale
        ("examples_ybr_color.dcm", (96, 128)),  # multi-frame YBR_FULL_422 JPEG
    ],
)
def test_render_series_thumbnail_decodes_pydicom_testdata(
    name: str, shape: tuple[int, int]
) -> None:
    """Compressed, colour, palette and multi-frame files render at size_px with content."""
    thumbnail = render_series_thumbnail([_testdata(name)], size_px=128)
    pixels = _pixels(thumbnail)
    assert thumbnail.strategy == "slice"
    assert pixels.shape[:2] == shape
    assert pixels.std() > 0


def test_render_series_thumbnail_inflates_deflated_explicit_vr(tmp_path: Path) -> None:
    """Deflated Explicit VR Little Endian renders the same picture as the inflated original."""
    deflated = _testdata("image_dfl.dcm")
    ds = dcmread(deflated)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    inflated = tmp_path / "inflated.dcm"
    ds.save_as(inflated, enforce_file_format=True)
    thumbnail = render_series_thumbnail([deflated], size_px=128)
    assert thumbnail.strategy == "slice"
    assert np.array_equal(
        _pixels(thumbnail), _pixels(render_series_thumbnail([inflated], size_px=128))
    )
    assert _pixels(thumbnail).std() > 10


def test_render_series_thumbnail_ybr_matches_rgb() -> None:
    """YBR_FULL JPEG is converted to RGB: it looks like the RGB original, red bar included."""
    rgb = _pixels(render_series_thumbnail([_testdata("SC_rgb_rle.dcm")], size_px=100))
    ybr = _pixels(render_series_thumbnail([_testdata("SC_rgb_dcmtk_+eb+cy+n2.dcm")], size_px=100))
    assert np.abs(rgb.astype(int) - ybr.astype(int)).mean() < 8
    assert ((ybr[..., 0] > 200) & (ybr[..., 1] < 60) & (ybr[..., 2] < 60)).any()


def test_render_series_thumbnail_monochrome1_inverted(tmp_path: Path) -> None:
    """A MONOCHROME1 copy of a MONOCHROME2 image renders as its negative."""
    ds = dcmread(_testdata("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "mono1.dcm"
    ds.save_as(inverted)
    normal = _pixels(render_series_thumbnail([_testdata("MR_small.dcm")]))[..., 0].astype(int)
    negative = _pixels(render_series_thumbnail([inverted]))[..., 0].astype(int)
    assert normal.std() > 0
    assert np.abs(normal + negative - 255).max() <= 1


def test_render_series_thumbnail_percentile_window_without_voi(tmp_path: Path) -> None:
    """Without a window in the file one outlier pixel does not squash the image to black."""
    ds = dcmread(_testdata("CT_small.dcm"))
    gradient = np.tile(np.linspace(0, 1000, 128), (128, 1)).astype(np.int16)
    gradient[0, 0] = 30000
    ds.PixelData = gradient.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    path = tmp_path / "outlier.dcm"
    ds.save_as(path)
    pixels = _pixels(render_series_thumbnail([path]))[..., 0]
    assert 100 < float(np.median(pixels)) < 160


def test_render_series_thumbnail_middle_slice_by_position(tmp_path: Path) -> None:
    """The middle slice by position along the normal wins over file order and InstanceNumber."""
    paths = _ct_series(tmp_path, orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0))  # coronal
    middle = _by_position(paths)[4]
    thumbnail = render_series_thumbnail(paths)
    assert thumbnail.strategy == "slice"
    assert thumbnail.source_sop_instance_uid == middle.SOPInstanceUID
    assert middle.InstanceNumber != 5


def test_render_series_thumbnail_middle_slice_by_instance_number(tmp_path: Path) -> None:
    """Without ImagePositionPatient the middle InstanceNumber is used."""
    paths = _ct_series(tmp_path, with_position=False)
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    middle = next(ds for ds in headers if ds.InstanceNumber == 5)
    assert "ImagePositionPatient" not in middle
    assert render_series_thumbnail(paths).source_sop_instance_uid == middle.SOPInstanceUID


def test_render_series_thumbnail_skips_unreadable_file(tmp_path: Path) -> None:
    """A non-DICOM file in the series is skipped; a series of only such files is an error."""
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    assert render_series_thumbnail([junk, _testdata("CT_small.dcm")]).strategy == "slice"
    with pytest.raises(ValueError, match=r"none of the 1 files .* cannot read .* as DICOM"):
        render_series_thumbnail([junk])


def test_render_series_thumbnail_truncated_pixel_data(tmp_path: Path) -> None:
    """Native Pixel Data shorter than the image is refused before decoding, naming the file."""
    path = tmp_path / "MR_truncated.dcm"
    shutil.copy(_testdata("MR_truncated.dcm"), path)
    with pytest.raises(ValueError, match=r"MR_truncated\.dcm: declares .* has 8130 bytes, 8192"):
        render_series_thumbnail([path])


def test_render_series_thumbnail_invalid_size() -> None:
    """A non-positive size_px is rejected."""
    with pytest.raises(ValueError, match="size_px"):
        render_series_thumbnail([_testdata("CT_small.dcm")], size_px=0)


# --- placeholders -----------------------------------------------------------------------------


def test_render_series_thumbnail_encapsulated_pdf_placeholder(tmp_path: Path) -> None:
    """An encapsulated PDF gets a square placeholder card without a source instance."""
    ds = Dataset()
    _patient_study(ds, generate_uid(), "DOC", EncapsulatedPDFStorage)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    thumbnail = render_series_thumbnail([_save(ds, tmp_path / "doc.dcm")], size_px=200)
    pixels = _pixels(thumbnail)
    assert (thumbnail.strategy, thumbnail.source_sop_instance_uid) == ("placeholder", None)
    assert pixels.shape == (200, 200, 3)
    assert pixels.std() > 0


def test_render_series_thumbnail_sr_placeholder() -> None:
    """A structured report gets a placeholder card."""
    thumbnail = render_series_thumbnail([_testdata("test-SR.dcm")])
    assert thumbnail.strategy == "placeholder"
    assert _pixels(thumbnail).shape == (300, 300, 3)


# --- SEG and RTSTRUCT -------------------------------------------------------------------------


def test_render_series_thumbnail_seg_overlay_on_labelled_slice(tmp_path: Path) -> None:
    """A SEG labelled only on slice 6 is drawn in its CIELab colour on that reference slice."""
    ct_paths = _ct_series(tmp_path)
    green = CIELabColor(87.73, -86.18, 83.18)  # sRGB (0, 255, 0)
    seg_path = _seg(tmp_path, ct_paths, {1: [6]}, {1: green})
    thumbnail = render_series_thumbnail([seg_path], reference_paths=ct_paths)
    pixels = _pixels(thumbnail)
    assert thumbnail.strategy == "overlay-seg"
    assert thumbnail.source_sop_instance_uid == _by_position(ct_paths)[6].SOPInstanceUID
    assert pixels.shape == (300, 300, 3)
    assert _greenish(pixels).sum() > 1000


def test_render_series_thumbnail_seg_prefers_most_segments(tmp_path: Path) -> None:
    """The slice holding the most segments wins over slices with a larger single segment."""
    ct_paths = _ct_series(tmp_path)
    seg_path = _seg(tmp_path, ct_paths, {1: [1, 2, 4], 2: [3], 3: [3]})
    thumbnail = render_series_thumbnail([seg_path], reference_paths=ct_paths, size_px=100)
    assert thumbnail.source_sop_instance_uid == _by_position(ct_paths)[3].SOPInstanceUID


def test_render_series_thumbnail_seg_mask_only_without_reference(tmp_path: Path) -> None:
    """Without the referenced series a SEG renders as a coloured mask on a dark background."""
    ct_paths = _ct_series(tmp_path)
    seg_path = _seg(tmp_path, ct_paths, {1: [6]}, {1: CIELabColor(87.73, -86.18, 83.18)})
    thumbnail = render_series_thumbnail([seg_path])
    pixels = _pixels(thumbnail)
    assert thumbnail.strategy == "mask-only"
    assert thumbnail.source_sop_instance_uid == dcmread(seg_path).SOPInstanceUID
    assert pixels.shape == (300, 300, 3)
    assert _greenish(pixels).sum() > 1000
    assert pixels[0, 0].max() < 40


@pytest.mark.parametrize("segmentation_type", ["FRACTIONAL", "LABELMAP"])
def test_render_series_thumbnail_seg_fractional_and_labelmap(
    tmp_path: Path, segmentation_type: str
) -> None:
    """FRACTIONAL (thresholded at half the maximum) and LABELMAP SEGs pick the labelled slice."""
    ct_paths = _ct_series(tmp_path)
    sources = _by_position(ct_paths)
    for ds in sources:
        ds.PixelData = dcmread(ct_paths[0]).PixelData
    probability = np.zeros((len(sources), SIZE, SIZE), dtype=np.float32)
    probability[6, 10:30, 10:30] = 0.9
    probability[2, 10:40, 10:40] = 0.2  # below half the maximum: not foreground
    write_segmentation(
        tmp_path / "seg.dcm",
        sources,
        probability if segmentation_type == "FRACTIONAL" else probability > 0.5,
        [tissue_segment(1, "tissue")],
        segmentation_type=segmentation_type,
    )
    thumbnail = render_series_thumbnail([tmp_path / "seg.dcm"], reference_paths=ct_paths)
    assert thumbnail.strategy == "overlay-seg"
    assert thumbnail.source_sop_instance_uid == sources[6].SOPInstanceUID


@pytest.mark.parametrize(
    ("orientation", "columns"),
    [
        (AXIAL, slice(150, 300)),  # x grows with the column index: the square is on the right
        ((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), slice(0, 150)),  # x grows leftwards
    ],
)
def test_render_series_thumbnail_rtstruct_overlay_respects_orientation(
    tmp_path: Path, orientation: Sequence[float], columns: slice
) -> None:
    """RTSTRUCT contours are mapped through the slice affine onto the referenced slice."""
    ct_paths = _ct_series(tmp_path, orientation=orientation)
    rtstruct = _rtstruct(tmp_path, ct_paths, slice_index=6)
    thumbnail = render_series_thumbnail([rtstruct], reference_paths=ct_paths)
    green = _greenish(_pixels(thumbnail))
    assert thumbnail.strategy == "overlay-rtstruct"
    assert thumbnail.source_sop_instance_uid == _by_position(ct_paths)[6].SOPInstanceUID
    assert green[:150, columns].sum() > 1000
    assert green.sum() == green[:150, columns].sum()


def test_render_series_thumbnail_rtstruct_mask_only_without_reference(tmp_path: Path) -> None:
    """Without the referenced series an RTSTRUCT renders its contours on a dark background."""
    rtstruct = _rtstruct(tmp_path, _ct_series(tmp_path), slice_index=6)
    thumbnail = render_series_thumbnail([rtstruct])
    pixels = _pixels(thumbnail)
    assert thumbnail.strategy == "mask-only"
    assert max(pixels.shape[:2]) == 300
    assert _greenish(pixels).sum() > 1000


def test_referenced_series_uid_seg_rtstruct_and_image(tmp_path: Path) -> None:
    """SEG and RTSTRUCT name the referenced series; an image references none."""
    ct_paths = _ct_series(tmp_path, count=3)
    series_uid = dcmread(ct_paths[0]).SeriesInstanceUID
    assert referenced_series_uid(_seg(tmp_path, ct_paths, {1: [1]})) == series_uid
    assert referenced_series_uid(_rtstruct(tmp_path, ct_paths, slice_index=1)) == series_uid
    assert referenced_series_uid(ct_paths[0]) is None


# --- whole slide ------------------------------------------------------------------------------


def _sm_image(
    directory: Path,
    name: str,
    flavour: str,
    colour: tuple[int, int, int],
    total: tuple[int, int],
    tile: int,
) -> Path:
    """A TILED_FULL RGB slide image of one flat colour; `total` is (rows, columns)."""
    ds = Dataset()
    _patient_study(ds, "1.2.826.0.1.3680043.8.498.1", "SM", VLWholeSlideMicroscopyImageStorage)
    ds.ImageType = ["ORIGINAL", "PRIMARY", flavour, "NONE"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = total
    ds.Rows = ds.Columns = tile
    across, down = -(-total[1] // tile), -(-total[0] // tile)
    ds.NumberOfFrames = across * down
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    frames = np.zeros((across * down, tile, tile, 3), dtype=np.uint8)
    frames[...] = colour
    ds.PixelData = frames.tobytes()
    return _save(ds, directory / name)


def test_render_series_thumbnail_wsi_smallest_volume_never_label(tmp_path: Path) -> None:
    """Without OVERVIEW the smallest VOLUME level is tiled together; LABEL is never shown."""
    paths = [
        _sm_image(tmp_path, "label.dcm", "LABEL", (255, 0, 0), (16, 16), 16),
        _sm_image(tmp_path, "level0.dcm", "VOLUME", (0, 0, 255), (96, 128), 32),
        _sm_image(tmp_path, "level1.dcm", "VOLUME", (0, 255, 0), (24, 32), 16),
    ]
    thumbnail = render_series_thumbnail(paths)
    pixels = _pixels(thumbnail)
    assert thumbnail.strategy == "wsi"
    assert thumbnail.source_sop_instance_uid == dcmread(paths[2]).SOPInstanceUID
    assert pixels.shape == (225, 300, 3)
    assert _greenish(pixels).all()


def test_render_series_thumbnail_wsi_prefers_overview(tmp_path: Path) -> None:
    """An OVERVIEW image is preferred to any pyramid level."""
    paths = [
        _sm_image(tmp_path, "level.dcm", "VOLUME", (0, 0, 255), (24, 32), 16),
        _sm_image(tmp_path, "overview.dcm", "OVERVIEW", (0, 255, 0), (40, 40), 40),
    ]
    thumbnail = render_series_thumbnail(paths, size_px=50)
    assert thumbnail.source_sop_instance_uid == dcmread(paths[1]).SOPInstanceUID
    assert _greenish(_pixels(thumbnail)).all()
