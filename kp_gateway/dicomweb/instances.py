"""Work on stored instances for WADO-RS: metadata as DICOM JSON, frames, bulk data.

Every function here is blocking and CPU-bound, and runs in the DICOMweb process pool
(``http/dicomweb.py`` submits it), never in the receiving interpreter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from kp_gateway.errors import BadQueryError, InvalidDicomError, UnknownResourceError
from kp_gateway.thumbnails import render_frame

# Instance URLs in metadata are written against this placeholder and the DICOMweb root of the
# request replaces it, so one cached text serves ``/dicomweb`` and every project's root.
ROOT_PLACEHOLDER = "@@KP_DICOMWEB_ROOT@@"
# Values longer than this are bulk data: a BulkDataURI instead of the value (PS3.18 F.2.6).
BULK_DATA_THRESHOLD = 1024
PIXEL_DATA = 0x7FE00010
_NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
}


def is_native(transfer_syntax_uid: str) -> bool:
    """Whether Pixel Data is stored uncompressed (native) in that transfer syntax."""
    return transfer_syntax_uid in _NATIVE_SYNTAXES


def _read(path: str, *, stop_before_pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except (PydicomInvalidDicomError, ValueError, TypeError, EOFError, KeyError) as exc:
        raise InvalidDicomError(f"stored instance {Path(path).name} cannot be read: {exc}") from exc


def instance_metadata(path: str, instance_path: str) -> str:
    """One instance's header as DICOM JSON (PS3.18 F.2), its bulk data as BulkDataURIs.

    `instance_path` is ``studies/<s>/series/<se>/instances/<i>``; URIs are written under
    :data:`ROOT_PLACEHOLDER`.
    """
    ds = _read(path, stop_before_pixels=True)
    base = f"{ROOT_PLACEHOLDER}/{instance_path}"

    def bulk_uri(elem: DataElement) -> str:
        return f"{base}/bulkdata/{int(elem.tag):08X}"

    body = ds.to_json_dict(BULK_DATA_THRESHOLD, bulk_uri)
    if "Rows" in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        vr = "OB" if not is_native(str(ds.file_meta.get("TransferSyntaxUID", ""))) else "OW"
        body["7FE00010"] = {"vr": vr, "BulkDataURI": f"{base}/bulkdata/7FE00010"}
    return json.dumps(body, separators=(",", ":"))


def series_metadata(items: Sequence[tuple[str, str]]) -> str:
    """The metadata of several instances, ``(path, instance_path)`` each, as one JSON array
    text (what ``/metadata`` answers for a series)."""
    return "[" + ",".join(instance_metadata(path, where) for path, where in items) + "]"


def _frame_numbers(ds: Dataset, numbers: Sequence[int]) -> int:
    count = int(ds.get("NumberOfFrames") or 1)
    for n in numbers:
        if not 1 <= n <= count:
            raise UnknownResourceError(f"frame {n} does not exist (the instance has {count})")
    return count


def read_frames(path: str, numbers: Sequence[int], *, decode: bool) -> tuple[list[bytes], str]:
    """Frames `numbers` (1-based) of one instance, and the transfer syntax they are in.

    Native Pixel Data is cut into frames as stored. Encapsulated frames are returned as
    stored, or decoded to native little-endian bytes when `decode` is true.

    Raises
    ------
    UnknownResourceError
        No Pixel Data, or a frame number past NumberOfFrames.
    """
    ds = _read(path, stop_before_pixels=False)
    if "PixelData" not in ds:
        raise UnknownResourceError("the instance has no Pixel Data")
    count = _frame_numbers(ds, numbers)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if is_native(syntax):
        data = ds.PixelData
        size = len(data) // count
        return [bytes(data[(n - 1) * size : n * size]) for n in numbers], syntax
    if not decode:
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [frames[n - 1] for n in numbers], syntax
    try:
        pixels = [pixel_array(ds, index=n - 1) for n in numbers]
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        raise UnknownResourceError(f"cannot decode {UID(syntax).name}: {exc}") from exc
    return [p.astype(p.dtype.newbyteorder("<")).tobytes() for p in pixels], "1.2.840.10008.1.2.1"


def read_bulkdata(path: str, tag: int) -> bytes:
    """The value of the top-level element `tag` (Pixel Data as stored)."""
    ds = _read(path, stop_before_pixels=tag != PIXEL_DATA)
    if tag not in ds:
        raise UnknownResourceError(f"the instance has no element {tag:08X}")
    elem = ds[tag]
    value = elem.value
    if isinstance(value, bytes):
        return value
    raise BadQueryError(f"element {tag:08X} is not bulk data")


def render(
    path: str,
    frame: int,
    *,
    viewport: tuple[int, int] | None,
    window: tuple[float, float] | None,
    jpeg_quality: int | None,
    max_frame_bytes: int,
) -> bytes:
    """``/rendered`` and ``/thumbnail`` of one frame (1-based `frame`), PNG or JPEG."""
    try:
        return render_frame(
            path, frame - 1, viewport=viewport, window=window, jpeg_quality=jpeg_quality,
            max_frame_bytes=max_frame_bytes,
        )  # fmt: skip
    except ValueError as exc:
        raise UnknownResourceError(f"cannot render: {exc}") from exc
