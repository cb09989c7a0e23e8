"""Render one PNG thumbnail per DICOM series: middle slice, SEG/RTSTRUCT overlay, slide or card.

Everything here is blocking and CPU-bound and runs in a worker process. The output is always
scaled so that its longer side is exactly ``size_px`` (small images are enlarged too, so every
card in the UI has the same size); the physical aspect ratio (PixelSpacing) is kept.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.pixels.utils import iter_pixels, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    RTStructureSetStorage,
    SegmentationStorage,
    VLWholeSlideMicroscopyImageStorage,
)

logger = logging.getLogger(__name__)

PathType = str | os.PathLike[str]
FloatArray = npt.NDArray[np.float64]
ByteArray = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]
RGB = tuple[int, int, int]

# Largest decoded frame (rows * columns * samples * bytes per sample) a thumbnail decodes. The
# display mapping holds about three float64 copies of a frame, so 64 MiB of 16-bit samples
# costs the worker about 800 MB; a 4300 x 3500 radiograph is 30 MB.
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
# zlib's largest expansion (RFC 1950/1951: at most about 1032 output bytes per input byte);
# a deflated dataset cannot hold more pixel bytes than this many times its file size.
_DEFLATE_MAX_RATIO = 1032
# Every frame of encapsulated Pixel Data has at least one fragment, and every fragment an
# 8-byte item header (PS3.5 A.4), so a value of N bytes holds at most N // 8 frames.
_ITEM_HEADER_BYTES = 8
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA_TAGS = frozenset({(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)})
_PIXEL_DATA_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"UN"})
# A TILED_FULL level is reassembled only up to this many pixels (~50 MB as RGB); beyond that
# one tile is shown instead of risking the worker's memory.
_MAX_WSI_PIXELS = 4096 * 4096
_DARK: RGB = (18, 18, 18)
# Fixed, distinguishable colours (Kelly/Tableau-like) so thumbnails are reproducible.
_PALETTE: tuple[RGB, ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """A rendered series thumbnail.

    Attributes
    ----------
    png : bytes
        The PNG-encoded picture, longer side ``size_px``.
    source_sop_instance_uid : str | None
        SOPInstanceUID of the instance the picture comes from; None for placeholder cards.
    strategy : str
        One of "slice", "overlay-seg", "overlay-rtstruct", "mask-only", "wsi", "placeholder".
    """

    png: bytes
    source_sop_instance_uid: str | None
    strategy: str


@dataclass(frozen=True, slots=True)
class _Plane:
    """Image plane geometry (PS3.3 C.7.6.2): pixel (row, column) to patient coordinates."""

    origin: FloatArray  # ImagePositionPatient: centre of the first transmitted pixel
    row_cosines: FloatArray  # direction of increasing column index
    column_cosines: FloatArray  # direction of increasing row index
    row_spacing: float  # PixelSpacing[0]: distance between rows
    column_spacing: float  # PixelSpacing[1]: distance between columns

    @property
    def normal(self) -> FloatArray:
        return np.cross(self.row_cosines, self.column_cosines)

    def to_pixel(self, points: FloatArray) -> FloatArray:
        """Map (N, 3) patient points to (N, 2) (column, row) pixel coordinates."""
        offset = points - self.origin
        along = np.column_stack((offset @ self.row_cosines, offset @ self.column_cosines))
        return np.asarray(along / (self.column_spacing, self.row_spacing), dtype=np.float64)


@dataclass(frozen=True, slots=True)
class _Slice:
    """One frame of the referenced series, a candidate background for an overlay."""

    path: PathType
    ds: Dataset  # header only
    frame: int
    sop_instance_uid: str
    plane: _Plane


def render_series_thumbnail(
    paths: Sequence[PathType],
    *,
    reference_paths: Sequence[PathType] = (),
    size_px: int = 300,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> Thumbnail:
    """Blocking and CPU-bound; call in a worker process.

    Parameters
    ----------
    paths : Sequence[str | os.PathLike[str]]
        All stored files of one series.
    reference_paths : Sequence[str | os.PathLike[str]], optional
        Files of the series a SEG or RTSTRUCT refers to, if they are stored.
    size_px : int, optional
        Length of the longer side of the PNG.
    max_frame_bytes : int, optional
        Largest decoded frame accepted. Files whose declared image is larger, or larger than
        their stored Pixel Data can hold (see :func:`check_pixel_budget`), are skipped before
        anything is decoded or any per-frame work starts.

    Returns
    -------
    Thumbnail

    Raises
    ------
    ValueError
        If no file can be read as DICOM within those bounds, or the chosen pixel data cannot
        be decoded.
    """
    if size_px < 1:
        raise ValueError(f"size_px must be positive, got {size_px}")
    headers = _read_headers(paths, max_frame_bytes)
    first = headers[0][1]
    sop_class_uid = str(first.get("SOPClassUID", ""))
    modality = str(first.get("Modality", "")).upper()
    if sop_class_uid == SegmentationStorage or modality == "SEG":
        return _render_seg(headers[0], _Reference(reference_paths, max_frame_bytes), size_px)
    if sop_class_uid == RTStructureSetStorage or modality == "RTSTRUCT":
        return _render_rtstruct(first, _Reference(reference_paths, max_frame_bytes), size_px)
    images = [(path, ds) for path, ds in headers if "Rows" in ds and "Columns" in ds]
    if not images:
        return _placeholder(first, size_px)
    if sop_class_uid == VLWholeSlideMicroscopyImageStorage or modality == "SM":
        return _render_wsi(images, size_px)
    path, ds = _middle_slice(images)
    frame = _middle_frame(ds)
    logger.debug("slice thumbnail from %s frame %d of %d files", os.fspath(path), frame, len(paths))
    image = _fit(_to_display(_decode(path, frame), ds, frame), _pixel_spacing(ds, frame), size_px)
    return Thumbnail(_png(image), str(ds.get("SOPInstanceUID", "")) or None, "slice")


def render_frame(
    path: PathType,
    frame: int = 0,
    *,
    viewport: tuple[int, int] | None = None,
    window: tuple[float, float] | None = None,
    jpeg_quality: int | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> bytes:
    """One frame as a displayable image (DICOMweb ``/rendered``, PS3.18 8.3.5.1). Blocking
    and CPU-bound; call in a worker process.

    The frame (0-based) gets the Modality LUT, then `window` (center, width, linear) or the
    file's own VOI, and is scaled to fit `viewport` (columns, rows) keeping its aspect; PNG,
    or JPEG when `jpeg_quality` is given.

    Raises
    ------
    ValueError
        The file is unreadable, the frame does not exist, or its image is over the bounds of
        :func:`check_pixel_budget`.
    """
    ds, stored = _read_header(path)
    check_pixel_budget(ds, stored, path, max_frame_bytes)
    if "Rows" not in ds or stored is None:
        raise ValueError(f"{os.fspath(path)} has no image")
    if not 0 <= frame < _frame_count(ds):
        raise ValueError(f"frame {frame + 1} does not exist (the instance has {_frame_count(ds)})")
    pixels = _decode(path, frame)
    if window is not None and pixels.ndim == 2:
        center, width = window
        values = _modality(pixels, ds, frame)
        scaled = np.clip((values - (center - 0.5)) / max(width - 1, 1.0) + 0.5, 0.0, 1.0)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            scaled = 1.0 - scaled
        display = np.asarray(np.round(scaled * 255.0), dtype=np.uint8)
    else:
        display = _to_display(pixels, ds, frame)
    image = Image.fromarray(display)
    if viewport is not None and (image.width > viewport[0] or image.height > viewport[1]):
        image.thumbnail(viewport, Image.Resampling.LANCZOS)
    if jpeg_quality is None:
        return _png(image)
    buffer = io.BytesIO()
    image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(
        buffer, format="JPEG", quality=jpeg_quality
    )
    return buffer.getvalue()


def referenced_series_uid(path: PathType) -> str | None:
    """Blocking and CPU-bound; call in a worker process.

    Parameters
    ----------
    path : str | os.PathLike[str]
        One file of a series.

    Returns
    -------
    str | None
        For SEG, the first ReferencedSeriesSequence entry (PS3.3 C.7.4.2); for RTSTRUCT, the
        first RTReferencedSeriesSequence entry (PS3.3 C.8.8.5); None for anything else.

    Raises
    ------
    ValueError
        If the file cannot be read as DICOM.
    """
    ds, _ = _read_header(path)
    sop_class_uid = str(ds.get("SOPClassUID", ""))
    if sop_class_uid == SegmentationStorage:
        for item in ds.get("ReferencedSeriesSequence", []):
            if item.get("SeriesInstanceUID"):
                return str(item.SeriesInstanceUID)
    elif sop_class_uid == RTStructureSetStorage:
        for frame_of_reference in ds.get("ReferencedFrameOfReferenceSequence", []):
            for study in frame_of_reference.get("RTReferencedStudySequence", []):
                for series in study.get("RTReferencedSeriesSequence", []):
                    if series.get("SeriesInstanceUID"):
                        return str(series.SeriesInstanceUID)
    return None


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _StoredPixels:
    """Where a file's Pixel Data value lies, read from its element header (nothing decoded)."""

    length: int | None  # the value's length; None when undefined (encapsulated)
    file_bytes: int  # bytes from the value's start to the end of the file
    deflated: bool  # offsets and lengths are in the inflated stream, not in the file


def _read_header(path: PathType) -> tuple[Dataset, _StoredPixels | None]:
    """The header up to Pixel Data, and where the Pixel Data value lies (None: no pixels)."""
    try:
        with open(path, "rb") as fp:
            try:
                ds = dcmread(fp, stop_before_pixels=True)
            except InvalidDicomError:
                # Tolerate files written without the 128-byte preamble, but only if they parse
                # as a composite instance.
                fp.seek(0)
                ds = dcmread(fp, stop_before_pixels=True, force=True)
                if "SOPClassUID" not in ds:
                    raise
            return ds, _stored_pixels(fp, ds)
    except (InvalidDicomError, OSError, EOFError, struct.error) as exc:
        raise ValueError(f"cannot read {os.fspath(path)} as DICOM: {exc}") from exc


def _stored_pixels(fp: io.BufferedReader, ds: Dataset) -> _StoredPixels | None:
    """Read the Pixel Data element header at `fp`'s position (where dcmread stopped)."""
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = None if file_meta is None else file_meta.get("TransferSyntaxUID")
    deflated = transfer_syntax == DeflatedExplicitVRLittleEndian
    start = fp.tell()
    size = os.fstat(fp.fileno()).st_size
    if deflated:
        # dcmread stopped inside the inflated stream; only the file size bounds the pixels.
        return _StoredPixels(None, size, deflated=True)
    header = fp.read(12)
    if len(header) < 8:
        return None  # no Pixel Data element
    little = UID(transfer_syntax).is_little_endian if transfer_syntax else True
    endian = "<" if little else ">"
    group, element = struct.unpack(f"{endian}HH", header[:4])
    if (group, element) not in _PIXEL_DATA_TAGS:
        return None  # dcmread stopped at trailing padding or the end
    # Look at the bytes, as dcmread does: some senders write implicit VR under an explicit
    # transfer syntax (pydicom's SC_rgb_jpeg.dcm).
    if header[4:6] not in _PIXEL_DATA_VRS or header[6:8] != b"\0\0":
        (length,) = struct.unpack(f"{endian}L", header[4:8])
        value_start = start + 8
    else:
        (length,) = struct.unpack(f"{endian}L", header[8:12])
        value_start = start + 12
    return _StoredPixels(
        None if length == _UNDEFINED_LENGTH else length, max(0, size - value_start), False
    )


def _positive(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ValueError(f"{keyword} is {value!r}; the image has no size")
    return number


def check_pixel_budget(
    ds: Dataset, stored: _StoredPixels | None, path: PathType, max_frame_bytes: int
) -> None:
    """Refuse, before anything is allocated, an image its stored bytes or the cap cannot hold.

    Pure arithmetic on the header (O(1) whatever NumberOfFrames says). The declared image is
    ``Rows * Columns * SamplesPerPixel * BitsAllocated * NumberOfFrames``; it must fit

    * native Pixel Data: in the stored value (PS3.5 8.1.1; YBR_FULL_422 holds 2/3 of it);
    * encapsulated Pixel Data: one frame decoded within `max_frame_bytes`, and at most one
      frame per 8 bytes of the value (every frame has a fragment with an 8-byte header);
    * deflated datasets: one frame within `max_frame_bytes`, and the whole image within the
      file size times zlib's largest expansion (1032).

    `stored` comes from :func:`_read_header`; a file without Pixel Data (None) passes.

    Raises
    ------
    ValueError
        Naming the file, what it declares and what its bytes hold.
    """
    if stored is None:
        return
    name = os.path.basename(os.fspath(path))  # the SOP UID in storage; the error is shown short
    try:
        rows, columns = _positive(ds, "Rows"), _positive(ds, "Columns")
        samples = _positive(ds, "SamplesPerPixel", 1)
        bits = _positive(ds, "BitsAllocated")
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    frames = _frame_count(ds)
    declared = f"{rows} x {columns} x {samples} samples x {bits} bits x {frames} frames"
    frame_bytes = rows * columns * samples * -(-bits // 8)  # decoded: 1-bit becomes a byte
    if frame_bytes > max_frame_bytes:
        raise ValueError(
            f"{name}: declares {declared}; one decoded frame ({frame_bytes} bytes) exceeds "
            f"the limit of {max_frame_bytes} bytes (series.max_frame_bytes)"
        )
    if stored.deflated:
        needed, holds = frame_bytes * frames, stored.file_bytes * _DEFLATE_MAX_RATIO
        what = f"a {stored.file_bytes}-byte deflated file inflates to at most {holds} bytes"
    elif stored.length is None:
        needed, holds = frames * _ITEM_HEADER_BYTES, stored.file_bytes
        what = f"its {holds} bytes of encapsulated Pixel Data hold at most {holds // 8} frames"
    else:
        needed = -(-(rows * columns * samples * bits * frames) // 8)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "YBR_FULL_422":
            needed = needed // 3 * 2
        holds = min(stored.length, stored.file_bytes)
        what = f"its native Pixel Data has {holds} bytes, {needed} needed"
    if needed > holds:
        raise ValueError(f"{name}: declares {declared}, but {what}")


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1  # a malformed IS value; the decoder will complain if it matters


def _read_headers(
    paths: Sequence[PathType], max_frame_bytes: int
) -> list[tuple[PathType, Dataset]]:
    """Headers of the readable files whose declared image passes :func:`check_pixel_budget`."""
    headers: list[tuple[PathType, Dataset]] = []
    first_problem = ""
    for path in paths:
        try:
            ds, stored = _read_header(path)
            check_pixel_budget(ds, stored, path, max_frame_bytes)
        except ValueError as exc:
            # One broken file should not cost the whole series its thumbnail.
            logger.warning("skipping file %s: %s", os.fspath(path), exc)
            first_problem = first_problem or str(exc)
            continue
        headers.append((path, ds))
    if not headers:
        raise ValueError(f"none of the {len(paths)} files can be used: {first_problem}")
    return headers


def _pixel_source(path: PathType) -> PathType | Dataset:
    """What pydicom's pixel functions should read for `path`: the file, or its inflated dataset.

    ``pixel_array``/``iter_pixels`` given a path read the dataset's bytes as they lie in the
    file; in Deflated Explicit VR Little Endian (PS3.5 A.5) those bytes are a zlib stream, in
    which they find no Pixel Data. ``dcmread`` inflates, so a deflated file is read whole.
    """
    try:
        transfer_syntax = read_file_meta_info(path).get("TransferSyntaxUID")
    except (InvalidDicomError, OSError, EOFError):
        return path  # no readable file meta: let the decoder report what is wrong
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return dcmread(path)
    return path


def _decode(path: PathType, frame: int) -> npt.NDArray[Any]:
    """Decode one frame; YBR is converted to RGB."""
    try:
        return pixel_array(_pixel_source(path), index=frame)
    except Exception as exc:
        # pydicom's handlers raise many types (RuntimeError, NotImplementedError, ...).
        raise ValueError(f"cannot decode pixel data of {os.fspath(path)}: {exc}") from exc


def _group_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """First item of a functional group macro for `frame`, per-frame before shared (C.7.6.16)."""
    for keyword_, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(keyword_)
        if items is not None and index < len(items) and keyword in items[index]:
            sequence = items[index].get(keyword)
            if sequence:
                item: Dataset = sequence[0]
                return item
    return None


def _attribute(ds: Dataset, frame: int, group: str, keyword: str) -> Any:
    """An attribute from the top level of `ds`, else from its functional group `group`."""
    if keyword in ds:
        return ds[keyword].value
    item = _group_item(ds, frame, group)
    return None if item is None else item.get(keyword)


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        return float(value[0]) if len(value) > 0 else None
    return float(value)


def _plane(ds: Dataset, frame: int = 0) -> _Plane | None:
    position = _attribute(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
    orientation = _attribute(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _attribute(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    if not position or not orientation or len(position) != 3 or len(orientation) != 6:
        return None
    row_spacing, column_spacing = (float(v) for v in spacing) if spacing else (1.0, 1.0)
    cosines = np.asarray(orientation, dtype=np.float64)
    origin = np.asarray(position, dtype=np.float64)
    return _Plane(origin, cosines[:3], cosines[3:], row_spacing, column_spacing)


def _pixel_spacing(ds: Dataset, frame: int) -> tuple[float, float]:
    spacing = _attribute(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    if spacing is None:
        spacing = ds.get("PixelAspectRatio")  # vertical\horizontal, same order as PixelSpacing
    try:
        row, column = (float(v) for v in spacing)
    except (TypeError, ValueError):
        return 1.0, 1.0
    return (row, column) if row > 0 and column > 0 else (1.0, 1.0)


# --- choosing the slice ----------------------------------------------------------------------


def _middle_index(planes: Sequence[_Plane | None], numbers: Sequence[float]) -> int:
    """Index of the middle item by position along the slice normal, else by `numbers`."""
    located = [p for p in planes if p is not None]
    if located and len(located) == len(planes):
        normal = located[0].normal
        keys = [(float(p.origin @ normal), n) for p, n in zip(located, numbers, strict=True)]
    else:
        keys = [(n, 0.0) for n in numbers]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return order[(len(order) - 1) // 2]


def _middle_slice(images: list[tuple[PathType, Dataset]]) -> tuple[PathType, Dataset]:
    # Localizers share the series with the axial stack on some scanners: keep the largest group
    # of parallel images so they cannot distort the ordering.
    groups: dict[tuple[float, ...], list[tuple[PathType, Dataset]]] = {}
    for path, ds in images:
        orientation = ds.get("ImageOrientationPatient") or ()
        groups.setdefault(tuple(round(float(v), 3) for v in orientation), []).append((path, ds))
    stack = max(groups.values(), key=len)
    numbers = [float(ds.get("InstanceNumber") or i) for i, (_, ds) in enumerate(stack)]
    return stack[_middle_index([_plane(ds) for _, ds in stack], numbers)]


def _middle_frame(ds: Dataset) -> int:
    """The middle frame by position; O(1) in NumberOfFrames unless each frame has a position.

    Without one PerFrameFunctionalGroupsSequence item per frame, every frame has the same
    plane (shared group or top level) or none, so frame order decides: the middle index.
    With them, the loop is bounded by items actually stored in the file.
    """
    frames = _frame_count(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if frames == 1 or per_frame is None or len(per_frame) != frames:
        return (frames - 1) // 2
    planes = [_plane(ds, i) for i in range(frames)]
    return _middle_index(planes, range(frames))


# --- pixel values to display values ----------------------------------------------------------


def _to_display(pixels: npt.NDArray[Any], ds: Dataset, frame: int) -> ByteArray:
    """Map stored values to 8-bit display values: (H, W) greyscale or (H, W, 3) RGB."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        # LUT entries are 8 or 16 bit (PS3.3 C.7.6.3.1.5); some 16-bit LUTs only use 8 bits.
        scale = 255.0 / 65535.0 if rgb.max() > 255 else 1.0
        return np.clip(rgb * scale + 0.5, 0, 255).astype(np.uint8)
    if pixels.ndim == 3:
        # RGB (YBR already converted by the decoder); 16-bit colour is rare but legal.
        bits = int(ds.get("BitsStored") or 8)
        shifted = pixels >> (bits - 8) if bits > 8 else pixels
        return np.asarray(np.clip(shifted, 0, 255), dtype=np.uint8)
    values = _modality(pixels, ds, frame)
    scaled = _voi(values, ds, frame)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled  # minimum value is white (PS3.3 C.7.6.3.1.2)
    return np.asarray(np.round(scaled * 255.0), dtype=np.uint8)


def _modality(pixels: npt.NDArray[Any], ds: Dataset, frame: int) -> FloatArray:
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    group = "PixelValueTransformationSequence"
    slope = _first(_attribute(ds, frame, group, "RescaleSlope"))
    intercept = _first(_attribute(ds, frame, group, "RescaleIntercept"))
    values = pixels.astype(np.float64)
    return values * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)


def _voi(values: FloatArray, ds: Dataset, frame: int) -> FloatArray:
    """Apply the file's VOI window (first value), else a robust 1st-99th percentile one; 0..1."""
    group = "FrameVOILUTSequence"
    center = _first(_attribute(ds, frame, group, "WindowCenter"))
    width = _first(_attribute(ds, frame, group, "WindowWidth"))
    function = str(_attribute(ds, frame, group, "VOILUTFunction") or "LINEAR").upper()
    if center is not None and width is not None and width > 0:
        # PS3.3 C.11.2.1.2 window functions.
        if function == "SIGMOID":
            return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)), np.float64)
        if function == "LINEAR_EXACT" or width <= 1:
            return np.clip((values - (center - width / 2)) / width, 0.0, 1.0)
        return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if "VOILUTSequence" in ds:
        mapped = np.asarray(apply_voi(np.round(values).astype(np.int64), ds), np.float64)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return np.clip(mapped / float(2**bits - 1), 0.0, 1.0)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    low, high = (float(v) for v in np.percentile(finite, [1.0, 99.0]))
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros_like(values)  # a flat image: black rather than a division by zero
    return np.clip((values - low) / (high - low), 0.0, 1.0)


# --- output ----------------------------------------------------------------------------------


def _fit(pixels: ByteArray, spacing: tuple[float, float], size_px: int) -> Image.Image:
    """Scale so the longer physical side is `size_px` pixels."""
    image = Image.fromarray(pixels)
    height_mm, width_mm = pixels.shape[0] * spacing[0], pixels.shape[1] * spacing[1]
    scale = size_px / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _placeholder(ds: Dataset, size_px: int) -> Thumbnail:
    """A card naming Modality and SOP class, for instances without pixel data (PDF, SR, ...)."""
    modality = str(ds.get("Modality") or "?")
    sop_class_uid = str(ds.get("SOPClassUID") or "")
    sop_class = UID(sop_class_uid).name if sop_class_uid else "Unknown SOP class"
    image = Image.new("RGB", (size_px, size_px), (44, 48, 56))
    draw = ImageDraw.Draw(image)
    margin = max(2, size_px // 20)
    draw.rectangle((margin, margin, size_px - margin, size_px - margin), outline=(120, 128, 140))
    title = ImageFont.load_default(size=max(8, size_px // 6))
    body = ImageFont.load_default(size=max(6, size_px // 18))
    draw.text(
        (size_px / 2, size_px * 0.38), modality, fill=(235, 235, 235), font=title, anchor="mm"
    )
    lines = textwrap.wrap(sop_class, width=28)[:4]
    draw.multiline_text(
        (size_px / 2, size_px * 0.68), "\n".join(lines), fill=(190, 195, 205), font=body,
        anchor="mm", align="center",
    )  # fmt: skip
    logger.debug("placeholder thumbnail for %s (%s)", modality, sop_class_uid)
    return Thumbnail(_png(image), None, "placeholder")


# --- SEG and RTSTRUCT overlays ---------------------------------------------------------------


class _Reference:
    """The frames of the referenced series, looked up by SOPInstanceUID or by position."""

    def __init__(self, paths: Sequence[PathType], max_frame_bytes: int) -> None:
        self.slices: list[_Slice] = []
        for path, ds in _read_headers(paths, max_frame_bytes) if paths else []:
            for frame in range(_frame_count(ds)):
                plane = _plane(ds, frame)
                if plane is not None and "Rows" in ds:
                    uid = str(ds.get("SOPInstanceUID", ""))
                    self.slices.append(_Slice(path, ds, frame, uid, plane))
        self.by_uid = {s.sop_instance_uid: i for i, s in enumerate(self.slices) if s.frame == 0}
        self.normal = self.slices[0].plane.normal if self.slices else np.zeros(3)
        self.positions = np.array([s.plane.origin @ self.normal for s in self.slices])
        gaps = np.diff(np.unique(np.round(self.positions, 3)))
        # Half the slice spacing: a point between two slices belongs to the nearer one.
        self.tolerance = 0.5 * float(np.median(gaps)) + 1e-3 if gaps.size else 1.0

    def find(self, sop_instance_uid: str | None, point: FloatArray | None) -> int | None:
        """Index of the slice with this SOPInstanceUID, else of the plane through `point`."""
        if sop_instance_uid in self.by_uid:
            return self.by_uid[sop_instance_uid]
        if point is None or not self.slices:
            return None
        distances = np.abs(self.positions - point @ self.normal)
        index = int(np.argmin(distances))
        return index if distances[index] <= self.tolerance else None


def _best(stats: dict[Any, dict[int, float]]) -> Any:
    """Key with the most labels present, ties broken by the larger total area."""
    return max(stats, key=lambda k: (len(stats[k]), sum(stats[k].values())))


def _compose(base: ByteArray, layers: list[tuple[BoolArray, RGB]], alpha: float) -> ByteArray:
    """Blend each mask in its colour and draw its outline opaque."""
    out = base.astype(np.float32)
    for mask, colour in layers:
        if mask.shape != base.shape[:2]:
            # Different grid (rare): nearest neighbour, as Kaapana does, rather than no overlay.
            resized = Image.fromarray(mask).resize(
                (base.shape[1], base.shape[0]), Image.Resampling.NEAREST
            )
            mask = np.asarray(resized, dtype=bool)
        paint = np.asarray(colour, dtype=np.float32)
        out[mask] = (1.0 - alpha) * out[mask] + alpha * paint
        padded = np.pad(mask, 1, mode="edge")
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        out[mask & ~inner] = paint
    return np.asarray(np.round(out), dtype=np.uint8)


def _dicom_lab_to_rgb(value: Sequence[int]) -> RGB:
    """Convert a DICOM-scaled CIELab triplet (PS3.3 C.10.7.1.1, D65 white) to 8-bit sRGB."""
    lightness, a, b = np.asarray(value, dtype=np.float64) / 65535.0 * [100.0, 255.0, 255.0] - [
        0,
        128.0,
        128.0,
    ]
    fy = (lightness + 16.0) / 116.0
    f = np.array([fy + a / 500.0, fy, fy - b / 200.0])
    xyz = np.where(f > 6.0 / 29.0, f**3, 3.0 * (6.0 / 29.0) ** 2 * (f - 4.0 / 29.0))
    xyz *= np.array([0.95047, 1.0, 1.08883])
    to_linear_rgb = np.array(
        [[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]]
    )
    linear = np.clip(to_linear_rgb @ xyz, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1.0 / 2.4) - 0.055)
    red, green, blue = (round(float(c) * 255.0) for c in srgb)
    return red, green, blue


def _segment_colours(seg: Dataset) -> dict[int, RGB]:
    colours: dict[int, RGB] = {}
    for index, segment in enumerate(seg.get("SegmentSequence", [])):
        number = int(segment.SegmentNumber)
        if segment.get("RecommendedDisplayCIELabValue"):
            colours[number] = _dicom_lab_to_rgb(
                [int(v) for v in segment.RecommendedDisplayCIELabValue]
            )
        else:
            colours[number] = _PALETTE[index % len(_PALETTE)]
    return colours


def _seg_labels(
    frame: npt.NDArray[Any], segment_number: int | None, threshold: float
) -> dict[int, BoolArray]:
    if segment_number is None:  # LABELMAP: the pixel value is the segment number
        return {int(v): frame == v for v in np.unique(frame) if v != 0}
    mask = frame > threshold
    return {segment_number: mask} if mask.any() else {}


def _overlay(
    picture: ByteArray | _Slice,
    masks: dict[int, BoolArray],
    colours: dict[int, RGB],
    spacing: tuple[float, float],
    size_px: int,
) -> bytes:
    """Draw `masks` on a reference slice (alpha 0.45) or on a dark canvas (alpha 0.85)."""
    alpha = 0.85
    if isinstance(picture, _Slice):
        display = _to_display(_decode(picture.path, picture.frame), picture.ds, picture.frame)
        spacing, alpha = _pixel_spacing(picture.ds, picture.frame), 0.45
        picture = np.repeat(display[..., None], 3, axis=2) if display.ndim == 2 else display
    layers = [
        (mask, colours.get(number, _PALETTE[(number - 1) % len(_PALETTE)]))
        for number, mask in sorted(masks.items())
    ]
    return _png(_fit(_compose(picture, layers, alpha), spacing, size_px))


def _render_seg(header: tuple[PathType, Dataset], reference: _Reference, size_px: int) -> Thumbnail:
    path, seg = header
    labelmap = str(seg.get("SegmentationType", "")).upper() == "LABELMAP"
    # FRACTIONAL: count a pixel when it is at least half way to MaximumFractionalValue.
    threshold = float(seg.get("MaximumFractionalValue") or 0) / 2.0
    keys: list[Any] = []  # reference slice index, or without reference a position along the normal
    numbers: list[int | None] = []
    for i in range(_frame_count(seg)):
        identification = _group_item(seg, i, "SegmentIdentificationSequence")
        numbers.append(
            None
            if labelmap or identification is None
            else int(identification.ReferencedSegmentNumber)
        )
        derivation = _group_item(seg, i, "DerivationImageSequence")
        sources = derivation.get("SourceImageSequence", []) if derivation is not None else []
        sop = str(sources[0].ReferencedSOPInstanceUID) if sources else None
        plane = _plane(seg, i)
        if reference.slices:
            keys.append(reference.find(sop, None if plane is None else plane.origin))
        else:
            keys.append(sop or i if plane is None else round(float(plane.origin @ plane.normal), 2))
    if reference.slices and all(key is None for key in keys):
        logger.warning("SEG %s matches no reference slice; mask only", os.fspath(path))
        return _render_seg(header, _Reference((), 0), size_px)
    stats: dict[Any, dict[int, float]] = {}
    try:
        source = _pixel_source(path)
        # Frame by frame, so a large SEG never has to be decoded into memory at once.
        for i, frame in enumerate(iter_pixels(source)):
            for number, mask in _seg_labels(frame, numbers[i], threshold).items():
                if keys[i] is not None:
                    areas = stats.setdefault(keys[i], {})
                    areas[number] = areas.get(number, 0.0) + float(mask.sum())
        if not stats:
            logger.info("SEG %s has no foreground pixel", os.fspath(path))
            return _placeholder(seg, size_px)
        best = _best(stats)
        chosen = [i for i, key in enumerate(keys) if key == best]
        masks: dict[int, BoolArray] = {}
        for i, frame in zip(chosen, iter_pixels(source, indices=chosen), strict=True):
            for number, mask in _seg_labels(frame, numbers[i], threshold).items():
                masks[number] = masks[number] | mask if number in masks else mask
    except Exception as exc:
        raise ValueError(f"cannot decode pixel data of {os.fspath(path)}: {exc}") from exc
    colours = _segment_colours(seg)
    if reference.slices:
        png = _overlay(reference.slices[best], masks, colours, (1.0, 1.0), size_px)
        return Thumbnail(png, reference.slices[best].sop_instance_uid, "overlay-seg")
    canvas = np.full((int(seg.Rows), int(seg.Columns), 3), _DARK, dtype=np.uint8)
    png = _overlay(canvas, masks, colours, _pixel_spacing(seg, chosen[0]), size_px)
    return Thumbnail(png, str(seg.SOPInstanceUID), "mask-only")


def _roi_colours(rtstruct: Dataset) -> dict[int, RGB]:
    colours: dict[int, RGB] = {}
    for index, roi in enumerate(rtstruct.get("ROIContourSequence", [])):
        display = roi.get("ROIDisplayColor")
        colour = tuple(int(v) for v in display) if display and len(display) == 3 else None
        colours[int(roi.ReferencedROINumber)] = colour or _PALETTE[index % len(_PALETTE)]  # type: ignore[assignment]
    return colours


def _contours(rtstruct: Dataset) -> list[tuple[int, FloatArray, str | None]]:
    """(ROI number, (N, 3) points, referenced SOPInstanceUID) for each closed planar contour."""
    found: list[tuple[int, FloatArray, str | None]] = []
    for roi in rtstruct.get("ROIContourSequence", []):
        for contour in roi.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue  # points and open polylines have no area to fill
            data = contour.get("ContourData") or []
            if len(data) < 9 or len(data) % 3:
                continue
            images = contour.get("ContourImageSequence") or [None]
            sop = str(images[0].ReferencedSOPInstanceUID) if images[0] is not None else None
            found.append(
                (
                    int(roi.ReferencedROINumber),
                    np.asarray(data, dtype=np.float64).reshape(-1, 3),
                    sop,
                )
            )
    return found


def _polygon_area(points: FloatArray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(x @ np.roll(y, 1) - y @ np.roll(x, 1)))


def _rasterise(
    polygons: list[tuple[int, FloatArray]], shape: tuple[int, int]
) -> dict[int, BoolArray]:
    """Fill each ROI's contours; XOR so that inner contours of the same ROI cut holes."""
    masks: dict[int, BoolArray] = {}
    for number, points in polygons:
        canvas = Image.new("1", (shape[1], shape[0]), 0)
        ImageDraw.Draw(canvas).polygon([(float(c), float(r)) for c, r in points], fill=1, outline=1)
        mask = np.asarray(canvas, dtype=bool)
        masks[number] = masks[number] ^ mask if number in masks else mask
    return masks


def _projection_basis(normal: FloatArray) -> tuple[FloatArray, FloatArray]:
    """In-plane axes for the usual radiological view (axial: L right; others: head up)."""
    dominant = int(np.argmax(np.abs(normal)))
    u, v = {
        2: ((1.0, 0, 0), (0, 1.0, 0)),
        1: ((1.0, 0, 0), (0, 0, -1.0)),
        0: ((0, 1.0, 0), (0, 0, -1.0)),
    }[dominant]
    axes = []
    for axis in (np.array(u), np.array(v)):
        axis = axis - (axis @ normal) * normal
        axes.append(axis / np.linalg.norm(axis))
    return axes[0], axes[1]


def _render_rtstruct(rtstruct: Dataset, reference: _Reference, size_px: int) -> Thumbnail:
    contours = _contours(rtstruct)
    if not contours:
        return _placeholder(rtstruct, size_px)
    slices = reference.slices
    if slices:
        keys: list[Any] = [reference.find(sop, p.mean(axis=0)) for _, p, sop in contours]
        normal = reference.normal
    else:
        # Without the images the geometry comes from the contours themselves (Newell's normal).
        centred = contours[0][1] - contours[0][1].mean(axis=0)
        normal = np.cross(centred, np.roll(centred, -1, axis=0)).sum(axis=0)
        normal = normal / (np.linalg.norm(normal) or 1.0)
        normal = normal if normal[int(np.argmax(np.abs(normal)))] > 0 else -normal
        keys = [round(float(p.mean(axis=0) @ normal), 1) for _, p, _ in contours]
    u, v = _projection_basis(normal)

    def project(key: Any, points: FloatArray) -> FloatArray:
        return (
            slices[key].plane.to_pixel(points) if slices else np.stack([points @ u, points @ v], 1)
        )

    stats: dict[Any, dict[int, float]] = {}
    for key, (number, points, _) in zip(keys, contours, strict=True):
        if key is not None:
            areas = stats.setdefault(key, {})
            areas[number] = areas.get(number, 0.0) + _polygon_area(project(key, points))
    if not stats:
        logger.warning("RTSTRUCT contours match no reference slice; mask only")
        return _render_rtstruct(rtstruct, _Reference((), 0), size_px)
    best = _best(stats)
    polygons = [
        (n, project(best, p)) for k, (n, p, _) in zip(keys, contours, strict=True) if k == best
    ]
    colours = _roi_colours(rtstruct)
    if slices:
        shape = (int(slices[best].ds.Rows), int(slices[best].ds.Columns))
        png = _overlay(slices[best], _rasterise(polygons, shape), colours, (1.0, 1.0), size_px)
        return Thumbnail(png, slices[best].sop_instance_uid, "overlay-rtstruct")
    # Fit the outlines (in mm) into the thumbnail with a 10 % margin on each side.
    every = np.concatenate([p for _, p in polygons])
    low, extent = every.min(axis=0), np.maximum(np.ptp(every, axis=0), 1e-6)
    scale = 0.8 * size_px / float(extent.max())
    width, height = (max(1, round(float(e) * scale / 0.8)) for e in extent)
    offset = (np.array([width, height]) - extent * scale) / 2.0
    masks = _rasterise([(n, (p - low) * scale + offset) for n, p in polygons], (height, width))
    canvas = np.full((height, width, 3), _DARK, dtype=np.uint8)
    png = _overlay(canvas, masks, colours, (1.0, 1.0), size_px)
    return Thumbnail(png, str(rtstruct.get("SOPInstanceUID", "")) or None, "mask-only")


# --- whole slide -----------------------------------------------------------------------------


def _image_flavour(ds: Dataset) -> str:
    image_type = ds.get("ImageType") or []
    return str(image_type[2]).upper() if len(image_type) > 2 else ""


def _total_pixels(ds: Dataset) -> int:
    rows = int(ds.get("TotalPixelMatrixRows") or ds.get("Rows") or 0)
    columns = int(ds.get("TotalPixelMatrixColumns") or ds.get("Columns") or 0)
    return rows * columns


def _render_wsi(images: list[tuple[PathType, Dataset]], size_px: int) -> Thumbnail:
    """OVERVIEW if present, else the smallest pyramid level; never LABEL (it may carry identity)."""
    usable = [(p, ds) for p, ds in images if _image_flavour(ds) != "LABEL"]
    if not usable:
        return _placeholder(images[0][1], size_px)
    overview = [(p, ds) for p, ds in usable if _image_flavour(ds) == "OVERVIEW"]
    path, ds = overview[0] if overview else min(usable, key=lambda item: _total_pixels(item[1]))
    frames = _frame_count(ds)
    rows, columns = int(ds.Rows), int(ds.Columns)
    total_rows = int(ds.get("TotalPixelMatrixRows") or rows)
    total_columns = int(ds.get("TotalPixelMatrixColumns") or columns)
    across = -(-total_columns // columns)
    down = -(-total_rows // rows)
    tiled_full = str(ds.get("DimensionOrganizationType", "")).upper() == "TILED_FULL"
    if frames == 1 or not tiled_full or total_rows * total_columns > _MAX_WSI_PIXELS:
        # One tile: the middle one is more likely to show tissue than the corner.
        frame = min(frames - 1, (down // 2) * across + across // 2) if tiled_full else frames // 2
        pixels = _decode(path, frame)
        logger.debug("WSI thumbnail from tile %d of %s", frame, os.fspath(path))
    else:
        # TILED_FULL (PS3.3 C.7.6.17.3): columns fastest, then rows; the first across*down frames
        # are the first focal plane and optical path.
        count = min(frames, across * down)
        try:
            tiles = list(iter_pixels(_pixel_source(path), indices=range(count)))
        except Exception as exc:
            raise ValueError(f"cannot decode pixel data of {os.fspath(path)}: {exc}") from exc
        pixels = np.zeros(
            (down * rows, across * columns, *tiles[0].shape[2:]), dtype=tiles[0].dtype
        )
        for index, tile in enumerate(tiles):
            top, left = (index // across) * rows, (index % across) * columns
            pixels[top : top + rows, left : left + columns] = tile
        pixels = pixels[:total_rows, :total_columns]
        frame = 0
    image = _fit(_to_display(pixels, ds, frame), _pixel_spacing(ds, frame), size_px)
    return Thumbnail(_png(image), str(ds.get("SOPInstanceUID", "")) or None, "wsi")
