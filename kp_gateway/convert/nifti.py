"""NIfTI to DICOM conversion: image series with exact geometry and values, label maps as SEG.

Synchronous and pure: it imports no asyncio and touches nothing but the input tree and
``out_dir``, so the pipeline runs it in a worker process. :func:`plan_nifti_tree` (in
:mod:`.nifti_layout`) finds and matches the files; :func:`convert_case` writes one case.

Decisions, each a fix of Kaapana's converter (kaapana-behaviour.md section 8):

* **Geometry.** The NIfTI affine (sform if its code > 0, else qform; nibabel's
  ``get_best_affine``) maps voxels to RAS+; DICOM patient space is LPS, so x and y flip. Voxel
  axis i runs along a row (DICOM column index), j down the columns, k across slices. Each slice
  gets its own ImagePositionPatient; PixelSpacing is (row spacing, column spacing) =
  (``|j step|``, ``|i step|``). An in-plane shear cannot be expressed in DICOM and is refused;
  a slice axis that is not perpendicular to the plane (gantry tilt) is kept exactly through the
  per-slice positions and reported as a warning.
* **4-D.** Images with more than one volume along the fourth axis are refused with a
  ConversionError (put each volume in its own file, or use nnU-Net channels). A trailing axis of
  length 1 is dropped; 2-D images become one slice.
* **Integers are stored exactly.** Values in 0..65535 are stored as unsigned 16 bits, values in
  -32768..32767 as signed 16 bits, any other set whose range (max - min) fits in 65535 as
  unsigned with RescaleIntercept = min and RescaleSlope = 1. Only an integer range wider than
  65535 is rescaled like float data, with a warning in :attr:`ConvertedSeries.warnings`.
  Float data whose values are all integers is treated as integers.
* **Floats** are stored as unsigned 16 bits with RescaleIntercept = min and
  RescaleSlope = (max - min) / 65535, so the decoded value ``stored * slope + intercept``
  differs from the original by at most ``slope / 2`` (plus about 1e-12 relative error from the
  16-character DS encoding, which is included when the stored values are computed). A NIfTI
  that stores 16-bit integers with ``scl_slope``/``scl_inter`` keeps its own integers and
  scaling, which is exact. NaN or infinite voxels (resampled images have them outside the field
  of view) are stored as PixelPaddingValue, a stored value outside the finite voxels' range (the
  top stored value is kept free for it), with a warning; every finite voxel keeps the bounds above.
* **SOP classes.** Modality CT gives CT Image Storage, MR gives MR Image Storage, every other
  image modality Secondary Capture Image Storage with the Image Plane attributes added (dciodvfy
  reports no errors for any of them). One instance per slice, InstanceNumber from 1.
* **Identity.** One study and one frame of reference per case; PatientID defaults to the case id,
  PatientName to the case id as family name (``<case>^``); Modality defaults to OT. Every UID
  is derived from ``dataset_uid_seed``, the dataset folder, the case id and the role of the
  object, so converting the same upload again gives the same UIDs and a re-import is idempotent.
* **SEG** (highdicom, BINARY, empty frames omitted): one segment per declared label, MANUAL for
  ground truth, else AUTOMATIC naming the algorithm; it references the case's first series.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import tempfile
import warnings as warnings_module
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import numpy.typing as npt
from nibabel.filebasedimages import ImageFileError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from kp_gateway.convert.nifti_layout import (
    CasePlan,
    ImageSpec,
    Layout,
    NiftiPlan,
    SegSpec,
    is_nifti_tree,
    plan_nifti_tree,
)
from kp_gateway.errors import ConversionError

__all__ = [
    "CasePlan",
    "ConvertedSeries",
    "Layout",
    "NiftiPlan",
    "convert_case",
    "is_nifti_tree",
    "plan_nifti_tree",
]

logger = logging.getLogger(__name__)

# Bump when the UID derivation changes, so old and new conversions never share UIDs by accident.
_UID_NAMESPACE = "kp-gateway/nifti/1"
_MANUFACTURER = "kp-gateway"
_SOFTWARE_VERSION = "1"
_UINT16_MAX = 65535
# Orthogonality / parallelism tolerance for direction cosines (unit vectors).
_DIRECTION_TOL = 1e-4
# Label maps must sit on the image grid; 1e-3 mm is well above float32 rounding of real affines.
_AFFINE_TOL = 1e-3
# Distinct, colour-blind friendly RGB colours (Okabe-Ito, then Tableau) for segments.
_PALETTE = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
    (213, 94, 0), (204, 121, 167), (31, 119, 180), (255, 127, 14), (44, 160, 44),
    (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (188, 189, 34),
)  # fmt: skip
_SOP_CLASS_BY_MODALITY = {"CT": CTImageStorage, "MR": MRImageStorage}
# Default of upload.nifti_max_volume_bytes: a 512 x 512 x 1000 float64 volume is 2 GiB.
DEFAULT_MAX_VOLUME_BYTES = 2 * 1024**3
# zlib's largest expansion (RFC 1951: about 1032 output bytes per input byte). A .nii.gz cannot
# hold more voxel bytes than this many times its own size, whatever its header declares.
_DEFLATE_MAX_RATIO = 1032
_IMAGE_TYPE_3 = {CTImageStorage: ("AXIAL",), MRImageStorage: ("OTHER",)}


@dataclasses.dataclass(frozen=True, slots=True)
class ConvertedSeries:
    """One DICOM series written by :func:`convert_case`."""

    case_id: str
    kind: str  # "image" | "seg"
    series_instance_uid: str
    study_instance_uid: str
    files: tuple[Path, ...]
    warnings: tuple[str, ...]
    source: Path  # the NIfTI file it was converted from


@dataclasses.dataclass(frozen=True, slots=True)
class _Geometry:
    row_direction: npt.NDArray[np.float64]  # LPS unit vector along a row (voxel axis i)
    column_direction: npt.NDArray[np.float64]  # LPS unit vector down a column (voxel axis j)
    pixel_spacing: tuple[float, float]  # (between rows, between columns), PS3.3 10.7.1.3
    positions: npt.NDArray[np.float64]  # (slices, 3) LPS position of each slice's first voxel
    slice_thickness: float
    spacing_between_slices: float
    warnings: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class _Pixels:
    stored: npt.NDArray[np.uint16] | npt.NDArray[np.int16]  # (i, j, k) like the NIfTI volume
    slope: str  # DS strings exactly as written, so readers decode what we computed
    intercept: str
    real_min: float
    real_max: float
    warnings: tuple[str, ...]
    padding: int | None = None  # PixelPaddingValue in stored units, for NaN/infinite voxels


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=[_UID_NAMESPACE, *parts]))


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _check_declared_size(img: nib.Nifti1Image, path: Path, max_volume_bytes: int) -> None:
    """Refuse, before any voxel is read, a volume the file cannot hold or the cap forbids.

    nibabel allocates the whole declared array before reading into it, so a 188-byte
    ``.nii.gz`` declaring 20000 x 20000 x 1000 would otherwise cost gigabytes. The voxel bytes
    must fit the file (after the voxel offset; for gzip, its size times zlib's largest
    expansion, 1032), and the array as loaded (8-byte floats when ``scl_slope``/``scl_inter``
    scale it) must fit `max_volume_bytes`. Pure arithmetic on the header.
    """
    voxels = 1
    for n in img.shape:
        voxels *= max(0, int(n))
    itemsize = int(img.get_data_dtype().itemsize)  # type: ignore[no-untyped-call]
    on_disk = voxels * itemsize
    slope, inter = img.dataobj.slope, img.dataobj.inter  # type: ignore[attr-defined]
    loaded = voxels * max(itemsize, 8 if (slope, inter) != (1.0, 0.0) else 0)
    size = path.stat().st_size
    declared = f"{path.name}: header declares {'x'.join(str(int(n)) for n in img.shape)} voxels"
    if path.name.lower().endswith(".gz"):
        holds = size * _DEFLATE_MAX_RATIO
        if on_disk > holds:
            raise ConversionError(
                f"{declared} ({on_disk} bytes), more than a {size}-byte gzip file can hold "
                f"({holds} bytes)"
            )
    else:
        holds = size - int(img.dataobj.offset)  # type: ignore[attr-defined]
        if on_disk > holds:
            raise ConversionError(
                f"{declared} ({on_disk} bytes), but the file holds {max(0, holds)} bytes of "
                "voxel data"
            )
    if loaded > max_volume_bytes:
        raise ConversionError(
            f"{declared} ({loaded} bytes loaded), more than the limit of {max_volume_bytes} "
            "bytes (upload.nifti_max_volume_bytes)"
        )


def _load(
    path: Path, max_volume_bytes: int
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64], nib.Nifti1Image]:
    """Load a NIfTI image as a 3-D array (i, j, k) and its best affine."""
    try:
        img = nib.load(path)
    except (OSError, ImageFileError, ValueError) as exc:
        raise ConversionError(f"{path.name}: cannot read NIfTI: {exc}") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ConversionError(f"{path.name}: not a NIfTI-1/2 image")
    _check_declared_size(img, path, max_volume_bytes)
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise ConversionError(
            f"{path.name}: {len(shape)}-D image of shape {shape}; only 3-D images are converted "
            "(put each volume in its own file)"
        )
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, ValueError, EOFError) as exc:
        raise ConversionError(f"{path.name}: cannot read voxel data: {exc}") from exc
    data = data.reshape(shape + (1,) * (3 - len(shape)))
    # sform when its code > 0, else qform, else the pixdim-only fallback (nibabel's rule).
    affine = np.asarray(img.header.get_best_affine(), dtype=np.float64)  # type: ignore[no-untyped-call]
    return data, affine, img


def _geometry(affine: npt.NDArray[np.float64], n_slices: int, name: str) -> _Geometry:
    """Translate a RAS+ voxel-to-world affine into DICOM LPS image plane attributes."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    steps = lps[:3, :3]
    norms = np.linalg.norm(steps, axis=0)
    if not np.all(np.isfinite(lps)) or np.any(norms < 1e-9):
        raise ConversionError(f"{name}: the affine is degenerate (a zero or non-finite axis)")
    row_dir, col_dir = steps[:, 0] / norms[0], steps[:, 1] / norms[1]
    if abs(float(row_dir @ col_dir)) > _DIRECTION_TOL:
        raise ConversionError(
            f"{name}: the affine shears the image plane; DICOM rows and columns must be orthogonal"
        )
    normal = np.cross(row_dir, col_dir)
    slice_step = steps[:, 2]
    warnings = []
    spacing = abs(float(slice_step @ normal))
    if np.linalg.norm(np.cross(slice_step / norms[2], normal)) > _DIRECTION_TOL:
        warnings.append(
            f"{name}: slices are sheared relative to the image plane (gantry tilt); positions "
            "are exact but some viewers resample"
        )
    positions = lps[:3, 3][None, :] + np.arange(n_slices)[:, None] * slice_step[None, :]
    return _Geometry(
        row_direction=row_dir,
        column_direction=col_dir,
        pixel_spacing=(float(norms[1]), float(norms[0])),
        positions=positions,
        slice_thickness=float(norms[2]),
        spacing_between_slices=spacing,
        warnings=tuple(warnings),
    )


def _orientation_letters(direction: npt.NDArray[np.float64]) -> str:
    """PS3.3 C.7.6.1.1.1 letters of an LPS direction, dominant axis first."""
    letters = []
    for axis in np.argsort(-np.abs(direction)):
        component = float(direction[axis])
        if abs(component) > _DIRECTION_TOL:
            letters.append(("LR", "PA", "HF")[axis][0 if component > 0 else 1])
    return "".join(letters)


def _all_integral(
    data: npt.NDArray[np.generic], finite: npt.NDArray[np.bool_] | None = None
) -> bool:
    """True if every (finite) value of a float array is whole (slice by slice, to save memory)."""
    for k in range(data.shape[2]):
        plane = data[:, :, k]
        if finite is not None:
            plane = plane[finite[:, :, k]]
        if not np.array_equal(plane, np.round(plane)):
            return False
    return True


def _fit_integers(values: npt.NDArray[np.generic]) -> tuple[np.ndarray, int] | None:
    """Return (stored array, intercept) when the integers fit 16 bits exactly, else None."""
    lo, hi = int(values.min()), int(values.max())
    if lo >= 0 and hi <= _UINT16_MAX:
        return values.astype(np.uint16), 0
    if lo >= -32768 and hi <= 32767:
        return values.astype(np.int16), 0
    if hi - lo <= _UINT16_MAX:
        return (values.astype(np.int64) - lo).astype(np.uint16), lo
    return None


def _padding_code(stored: npt.NDArray[np.generic]) -> int | None:
    """A stored value outside the data's stored range, at an end of the 16-bit type, if free."""
    lo, hi = int(stored.min()), int(stored.max())
    if stored.dtype == np.int16:
        return -32768 if lo > -32768 else (32767 if hi < 32767 else None)
    return _UINT16_MAX if hi < _UINT16_MAX else (0 if lo > 0 else None)


def _with_padding(pixels: _Pixels, padded: npt.NDArray[np.bool_] | None, name: str) -> _Pixels:
    """Write PixelPaddingValue (PS3.3 C.7.5.1.1.2) where the NIfTI had NaN or infinity."""
    if padded is None:
        return pixels
    code = _padding_code(pixels.stored)  # padded voxels hold the minimum until now
    if code is None:  # pragma: no cover - callers leave the top code free
        raise ConversionError(f"{name}: no stored value is free for the NaN voxels")
    pixels.stored[padded] = code
    count = int(np.count_nonzero(padded))
    warning = (
        f"{name}: {count} NaN or infinite voxels stored as PixelPaddingValue {code} "
        "(outside the data's values)"
    )
    return dataclasses.replace(pixels, padding=code, warnings=(*pixels.warnings, warning))


def _encode(data: npt.NDArray[np.generic], img: nib.Nifti1Image, name: str) -> _Pixels:
    """Choose the stored 16-bit representation and the rescale of one volume.

    NaN and infinite voxels (resampled or registered images carry them outside the field of
    view) become PixelPaddingValue: a stored value outside the range the finite voxels use.
    """
    if data.dtype.kind == "b":
        data = data.astype(np.uint8)
    if data.dtype.kind not in "iuf":
        raise ConversionError(f"{name}: voxel type {data.dtype} cannot be stored as grayscale")
    if data.size == 0:
        raise ConversionError(f"{name}: the image has no voxels")
    finite: npt.NDArray[np.bool_] | None = None
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if finite.all():
            finite = None
        elif not finite.any():
            raise ConversionError(f"{name}: every voxel is NaN or infinite")
    padded = None if finite is None else ~finite
    if finite is None:
        real_min, real_max = float(data.min()), float(data.max())
    else:
        real_min = float(np.min(data, where=finite, initial=np.inf))
        real_max = float(np.max(data, where=finite, initial=-np.inf))

    # A NIfTI storing integers with scl_slope/scl_inter: keep its integers and its scaling,
    # which is exact, instead of re-quantising the scaled floats.
    slope, inter = img.dataobj.slope, img.dataobj.inter  # type: ignore[attr-defined]
    if data.dtype.kind == "f" and (slope, inter) != (1.0, 0.0) and finite is None:
        raw = np.asanyarray(img.dataobj.get_unscaled()).reshape(data.shape)  # type: ignore[attr-defined]
        if raw.dtype.kind in "iu":
            fitted = _fit_integers(raw)
            if fitted is not None and fitted[1] == 0:
                return _Pixels(fitted[0], _ds(slope), _ds(inter), real_min, real_max, warnings=())

    if data.dtype.kind == "f" and _all_integral(data, finite) and abs(real_min) < 2**53:
        data = (data if finite is None else np.where(finite, data, real_min)).astype(np.int64)
    # With padding, the top stored value stays free for it.
    top = _UINT16_MAX if padded is None else _UINT16_MAX - 1
    warnings: tuple[str, ...] = ()
    if data.dtype.kind in "iu":
        fitted = _fit_integers(data)
        if fitted is not None and (padded is None or _padding_code(fitted[0]) is not None):
            pixels = _Pixels(fitted[0], "1", str(fitted[1]), real_min, real_max, warnings=())
            return _with_padding(pixels, padded, name)
        reason = "exceeds 16 bits" if fitted is None else "leaves no 16-bit value for padding"
        warnings = (
            f"{name}: integer range {real_min:.0f}..{real_max:.0f} {reason}; values "
            f"rescaled, maximum error {(real_max - real_min) / top / 2:.6g}",
        )
    slope_s = "1" if real_max == real_min else _ds((real_max - real_min) / top)
    intercept_s = _ds(real_min)
    # Quantise with the decoded DS values, so the bound holds for what readers compute.
    stored = np.empty(data.shape, dtype=np.uint16)
    for k in range(data.shape[2]):
        # Slice by slice: a float64 copy of a whole 512x512x200 volume would be 400 MB.
        plane = data[:, :, k].astype(np.float64)
        if finite is not None:
            plane[~finite[:, :, k]] = real_min  # overwritten by the padding value below
        plane = (plane - float(intercept_s)) / float(slope_s)
        stored[:, :, k] = np.clip(np.rint(plane), 0, top)
    pixels = _Pixels(stored, slope_s, intercept_s, real_min, real_max, warnings)
    return _with_padding(pixels, padded, name)


def _base_dataset(
    spec: ImageSpec,
    case: CasePlan,
    geometry: _Geometry,
    pixels: _Pixels,
    study_uid: str,
    frame_uid: str,
    series_uid: str,
) -> Dataset:
    """Everything that is the same for all slices of one series, user tags applied last."""
    sop_class = _SOP_CLASS_BY_MODALITY.get(spec.modality, SecondaryCaptureImageStorage)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    # Value 3 is required by the CT (AXIAL|LOCALIZER) and MR (PS3.3 C.8.3.1.1.1) modules.
    ds.ImageType = ["DERIVED", "SECONDARY", *_IMAGE_TYPE_3.get(sop_class, ())]
    # A trailing caret marks a one-component (family) name; a bare one is the retired form.
    ds.PatientName = f"{case.case_id}^"
    ds.PatientID = case.case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = ""
    # StudyID is SH (16 characters); a longer case id stays in PatientID only.
    ds.StudyID = case.case_id if len(case.case_id) <= 16 else ""
    ds.Modality = spec.modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = spec.series_number
    ds.SeriesDescription = spec.series_description
    # Type 2C (PS3.3 C.7.3.1): unknown, so present and empty.
    ds.Laterality = ""
    ds.PatientPosition = ""
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = _MANUFACTURER
    ds.SoftwareVersions = _SOFTWARE_VERSION
    if sop_class == SecondaryCaptureImageStorage:
        ds.ConversionType = "WSD"  # PS3.3 C.8.6.1: produced on a workstation
        # The SC IOD has no Image Plane module, so General Image asks for this (Type 2C).
        ds.PatientOrientation = [
            _orientation_letters(geometry.row_direction),
            _orientation_letters(geometry.column_direction),
        ]
    elif sop_class == CTImageStorage:
        ds.KVP = ""
        ds.AcquisitionNumber = ""
    else:
        # MR Image module (PS3.3 C.8.3.1) Type 1/2 attributes; "RM" = research mode, the honest
        # value for a sequence we know nothing about.
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = ""
        ds.RepetitionTime = ""
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
    ds.ImageOrientationPatient = [
        _ds(v) for v in (*geometry.row_direction, *geometry.column_direction)
    ]
    ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
    ds.SliceThickness = _ds(geometry.slice_thickness)
    ds.SpacingBetweenSlices = _ds(geometry.spacing_between_slices)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(pixels.stored.shape[1])
    ds.Columns = int(pixels.stored.shape[0])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.stored.dtype == np.int16 else 0
    ds.RescaleIntercept = pixels.intercept
    ds.RescaleSlope = pixels.slope
    if pixels.padding is not None:
        ds.PixelPaddingValue = pixels.padding
    if sop_class != CTImageStorage:
        ds.RescaleType = "US"  # unspecified units; PS3.3 C.11.1.1.2
    ds.WindowCenter = _ds((pixels.real_min + pixels.real_max) / 2)
    ds.WindowWidth = _ds(max(pixels.real_max - pixels.real_min, 1.0))
    for tag in spec.tags:
        ds.add_new(tag.tag, tag.vr, list(tag.value) if isinstance(tag.value, tuple) else tag.value)
    return ds


def _write(ds: Dataset, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _convert_image(
    spec: ImageSpec,
    case: CasePlan,
    ids: tuple[str, str, str],
    work: Path,
    final: Path,
    max_volume_bytes: int,
) -> tuple[ConvertedSeries, list[Dataset], npt.NDArray[np.float64], tuple[int, ...]]:
    """Write one image series; return it, its header-only slices, affine and shape."""
    seed, study_uid, frame_uid = ids
    data, affine, img = _load(spec.path, max_volume_bytes)
    geometry = _geometry(affine, data.shape[2], spec.path.name)
    pixels = _encode(data, img, spec.path.name)
    del data
    series_uid = _uid(seed, case.dataset, case.case_id, "series", spec.role)
    for tag in spec.tags:
        if tag.keyword == "SeriesInstanceUID" and isinstance(tag.value, str):
            series_uid = tag.value
    base = _base_dataset(spec, case, geometry, pixels, study_uid, frame_uid, series_uid)
    study_uid = str(base.StudyInstanceUID)
    normal = np.cross(geometry.row_direction, geometry.column_direction)
    headers: list[Dataset] = []
    files: list[Path] = []
    for k in range(pixels.stored.shape[2]):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = _uid(seed, case.dataset, case.case_id, "sop", spec.role, str(k))
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in geometry.positions[k]]
        ds.SliceLocation = _ds(float(geometry.positions[k] @ normal))
        headers.append(copy.deepcopy(ds))
        # Rows run along NIfTI j and columns along i, so a slice is the transposed (i, j) plane.
        plane = np.ascontiguousarray(pixels.stored[:, :, k].T)
        ds.PixelData = plane.astype(plane.dtype.newbyteorder("<")).tobytes()
        name = f"{series_uid}/{k + 1:05d}.dcm"
        _write(ds, work / name)
        files.append(final / name)
    series = ConvertedSeries(
        case_id=case.case_id,
        kind="image",
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        files=tuple(files),
        warnings=geometry.warnings + pixels.warnings,
        source=spec.path,
    )
    return series, headers, affine, tuple(pixels.stored.shape)


def _segment_descriptions(seg: SegSpec) -> list[hd.seg.SegmentDescription]:
    algorithm = (
        None
        if seg.algorithm is None
        else hd.AlgorithmIdentificationSequence(
            name=seg.algorithm, family=codes.cid7162.ArtificialIntelligence, version="unknown"
        )
    )
    out = []
    for number, label in enumerate(seg.labels, start=1):
        rgb = _PALETTE[(label.value - 1) % len(_PALETTE)]
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label.name,
                segmented_property_category=hd.sr.CodedConcept(
                    label.property_category.value,
                    label.property_category.scheme,
                    label.property_category.meaning,
                ),
                segmented_property_type=hd.sr.CodedConcept(
                    label.property_type.value,
                    label.property_type.scheme,
                    label.property_type.meaning,
                ),
                algorithm_type="MANUAL" if algorithm is None else "AUTOMATIC",
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*rgb),
            )
        )
    return out


def _convert_seg(
    case: CasePlan,
    seg: SegSpec,
    label_path: Path,
    source: tuple[ConvertedSeries, list[Dataset], npt.NDArray[np.float64], tuple[int, ...]],
    seed: str,
    work: Path,
    final: Path,
    max_volume_bytes: int,
) -> ConvertedSeries:
    """Write the SEG of one case, referencing its first image series."""
    image, headers, image_affine, image_shape = source
    data, affine, _img = _load(label_path, max_volume_bytes)
    name = label_path.name
    if tuple(data.shape) != image_shape:
        raise ConversionError(
            f"{name}: shape {tuple(data.shape)} differs from image {image.source.name} "
            f"{image_shape}"
        )
    if not np.allclose(affine, image_affine, rtol=0.0, atol=_AFFINE_TOL):
        raise ConversionError(f"{name}: affine differs from image {image.source.name}")
    if data.dtype.kind == "f" and not (np.all(np.isfinite(data)) and _all_integral(data)):
        raise ConversionError(f"{name}: label map has non-integer values")
    if data.dtype.kind not in "iufb":
        raise ConversionError(f"{name}: voxel type {data.dtype} is not a label map")
    values = np.unique(data).astype(np.int64)
    if values.size and values[0] < 0:
        raise ConversionError(f"{name}: label map has negative values")
    present = {int(v) for v in values if v != 0}
    declared = {label.value for label in seg.labels}
    warnings = [
        f"{name}: declared label {label.value} ({label.name}) does not occur"
        for label in seg.labels
        if label.value not in present
    ]
    undeclared = sorted(present - declared)
    if undeclared:
        warnings.append(f"{name}: undeclared label value(s) {undeclared} left out of the SEG")
    if not present & declared:
        image_warnings = (*image.warnings, *warnings, f"{name}: no declared label; no SEG written")
        raise _NoSegment(image_warnings)
    # Segment numbers are 1..N in declaration order; highdicom takes a label map of them.
    lut = np.zeros(int(values[-1]) + 1, dtype=np.uint16)
    for number, label in enumerate(seg.labels, start=1):
        if label.value < lut.size:
            lut[label.value] = number
    # Frames are (slice, row, column) = NIfTI (k, j, i), matching `headers` slice for slice.
    index = data if data.dtype.kind == "u" else data.astype(np.min_scalar_type(int(values[-1])))
    frames = np.ascontiguousarray(np.transpose(lut[index], (2, 1, 0)))
    del data
    series_uid = _uid(seed, case.dataset, case.case_id, "seg-series")
    try:
        # highdicom warns about dubious input (e.g. one-component names); the user should see
        # those in the upload status rather than only in a worker's stderr.
        with warnings_module.catch_warnings(record=True) as caught:
            warnings_module.simplefilter("always")
            seg_ds = hd.seg.Segmentation(
                source_images=headers,
                pixel_array=frames,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=_segment_descriptions(seg),
                series_instance_uid=series_uid,
                series_number=len(case.series) + 1,
                sop_instance_uid=_uid(seed, case.dataset, case.case_id, "seg-instance"),
                instance_number=1,
                manufacturer=_MANUFACTURER,
                manufacturer_model_name="nifti-converter",
                software_versions=_SOFTWARE_VERSION,
                device_serial_number="0",
                omit_empty_frames=True,
                series_description=(
                    "Segmentation" if seg.algorithm is None else f"Segmentation {seg.algorithm}"
                )[:64],
            )
    except ValueError as exc:
        raise ConversionError(f"{name}: cannot build the SEG: {exc}") from exc
    warnings.extend(f"{name}: {item.message}" for item in caught)
    if seg.body_part is not None:
        seg_ds.BodyPartExamined = seg.body_part
    rel = f"{series_uid}/00001.dcm"
    (work / series_uid).mkdir(parents=True, exist_ok=True)
    seg_ds.save_as(work / rel, enforce_file_format=True)
    return ConvertedSeries(
        case_id=case.case_id,
        kind="seg",
        series_instance_uid=series_uid,
        study_instance_uid=image.study_instance_uid,
        files=(final / rel,),
        warnings=tuple(warnings),
        source=label_path,
    )


class _NoSegment(Exception):
    """No declared label occurs: the SEG is skipped and its warnings go to the image series."""

    def __init__(self, warnings: tuple[str, ...]) -> None:
        super().__init__("no segment")
        self.warnings = warnings


@contextmanager
def _staging(out_dir: Path, name: str) -> Iterator[Path]:
    """Yield a temporary folder inside `out_dir` that replaces ``out_dir/name`` on success."""
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=out_dir))
    try:
        yield work
        final = out_dir / name
        if final.exists():
            # A re-run replaces the previous output; rename first so a crash leaves one copy.
            old = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=out_dir))
            final.replace(old / name)
            work.replace(final)
            shutil.rmtree(old)
        else:
            work.replace(final)
    finally:
        if work.exists():
            shutil.rmtree(work)


def convert_case(
    plan: NiftiPlan,
    case: CasePlan,
    out_dir: Path,
    *,
    dataset_uid_seed: str,
    max_volume_bytes: int = DEFAULT_MAX_VOLUME_BYTES,
) -> list[ConvertedSeries]:
    """Convert one planned case to DICOM files under ``out_dir/<case.output_name>/``.

    Blocking and CPU-bound; call in a worker process.

    Parameters
    ----------
    plan
        The plan `case` came from (its root names files in messages).
    case
        One of ``plan.cases``.
    out_dir
        Created if needed. The case is written to a hidden temporary folder first and renamed
        into place, so a failure leaves nothing of this case behind (and keeps a previous
        successful output).
    dataset_uid_seed
        Stable name of the target dataset; with the dataset folder and case id it determines
        every UID, so the same input and seed always give the same UIDs.
    max_volume_bytes
        Largest voxel array one image or label map may declare (see
        :func:`_check_declared_size`); checked before anything is allocated.

    Returns
    -------
    list of ConvertedSeries
        Image series in channel order, then the SEG if the case has a label map with at least
        one declared label present. File paths are the final ones.

    Raises
    ------
    ConversionError
        Prefixed with the case id: unreadable NIfTI, a declared size the file cannot hold
        or over `max_volume_bytes`, 4-D data, NaN voxels, degenerate or
        sheared affines, a label map whose shape or affine differs from the image, non-integer
        labels, or a SEG highdicom refuses.
    """
    where = case.case_id if case.dataset == "." else f"{case.dataset}/{case.case_id}"
    seed = dataset_uid_seed
    study_uid = _uid(seed, case.dataset, case.case_id, "study")
    frame_uid = _uid(seed, case.dataset, case.case_id, "frame-of-reference")
    final = Path(out_dir) / case.output_name
    results: list[ConvertedSeries] = []
    try:
        with _staging(Path(out_dir), case.output_name) as work:
            first = None
            for spec in case.series:
                ids = (seed, study_uid, frame_uid)
                converted = _convert_image(spec, case, ids, work, final, max_volume_bytes)
                results.append(converted[0])
                if first is None:
                    first = converted
            if case.label is not None and case.seg is not None and first is not None:
                try:
                    seg = _convert_seg(
                        case, case.seg, case.label, first, seed, work, final, max_volume_bytes
                    )
                except _NoSegment as skipped:
                    results[0] = dataclasses.replace(results[0], warnings=skipped.warnings)
                else:
                    results.append(seg)
    except ConversionError as exc:
        raise ConversionError(f"case {where}: {exc}") from exc
    except OSError as exc:
        raise ConversionError(f"case {where}: cannot write DICOM: {exc}") from exc
    logger.debug("converted case %s of %s: %d series", case.case_id, plan.root, len(results))
    return results
