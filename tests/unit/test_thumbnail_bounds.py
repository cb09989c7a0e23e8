"""Thumbnails of hostile headers: refused before decoding, in bounded time and memory.

Issue 14 finding 4: a 1 KB instance declaring 20,000,000 frames kept the worker busy for
minutes, and a 676-byte RLE header declaring 20000 x 20000 x 3 x 16 bit made it peak at
2.3 GiB. The time bound of each test is pytest-timeout's deadline (the unfixed code ran for
minutes); memory is measured in a fresh interpreter, whose peak RSS is the render's alone.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from kp_gateway.thumbnails import (
    DEFAULT_MAX_FRAME_BYTES,
    _read_header,
    check_pixel_budget,
    render_series_thumbnail,
)
from tests.conftest import PYDICOM_TEST_FILES, REPO

# A render that refuses before allocating stays near the interpreter's own footprint (numpy,
# pydicom, PIL: about 60 MiB here); the unfixed RLE render peaked at 2,348 MiB.
_PEAK_RSS_LIMIT_MIB = 300


def _instance(transfer_syntax: UID, **image: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "HOSTILE"
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword, value in image.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def write_twenty_million_frames(path: Path) -> Path:
    """About 1 KB: 16 x 16 x 16 bit declared 20,000,000 times over 512 bytes of Pixel Data."""
    ds = _instance(ExplicitVRLittleEndian, Rows=16, Columns=16, NumberOfFrames=20_000_000)
    ds.PixelData = bytes(512)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_rle_header(path: Path, rows: int = 20000, columns: int = 20000) -> Path:
    """An RLE Lossless instance whose only fragment is a 64-byte RLE header and 12 bytes."""
    ds = _instance(
        RLELossless,
        Rows=rows,
        Columns=columns,
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PlanarConfiguration=0,
    )
    rle_header = struct.pack("<16L", 6, *([64] * 6), *([0] * 9))
    ds.PixelData = encapsulate([rle_header + bytes(12)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _peak_rss_mib_of_render(path: Path) -> tuple[float, str]:
    """Render `path` in a fresh interpreter; its peak RSS in MiB and the error it raised."""
    script = (
        "import sys\n"
        "from kp_gateway.thumbnails import render_series_thumbnail\n"
        "try:\n"
        "    render_series_thumbnail([sys.argv[1]])\n"
        "    outcome = 'rendered'\n"
        "except ValueError as exc:\n"
        "    outcome = str(exc)\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest,
        # which may hold a GiB by then) across exec; the new memory map's peak starts fresh.
        "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024)\n"
        "print(outcome)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        timeout=120,
    )
    peak, outcome = done.stdout.split("\n", 1)
    return float(peak), outcome.strip()


@pytest.mark.timeout(30)
def test_render_series_thumbnail_refuses_twenty_million_frames_in_1_kb(tmp_path: Path) -> None:
    """NumberOfFrames = 20,000,000 over 512 stored bytes is refused at once, naming both."""
    path = write_twenty_million_frames(tmp_path / "frames.dcm")
    assert path.stat().st_size < 1400
    with pytest.raises(ValueError, match=r"20000000 frames.* has 512 bytes, 10240000000 needed"):
        render_series_thumbnail([path])


@pytest.mark.timeout(60)
def test_render_series_thumbnail_refuses_rle_header_declaring_20000_squared_rgb16(
    tmp_path: Path,
) -> None:
    """20000 x 20000 x 3 x 16 bit in a 76-byte fragment: refused by the frame cap, memory flat."""
    path = write_rle_header(tmp_path / "rle.dcm")
    assert path.stat().st_size < 1024
    peak_mib, outcome = _peak_rss_mib_of_render(path)
    assert "one decoded frame (2400000000 bytes) exceeds the limit" in outcome
    assert "series.max_frame_bytes" in outcome
    assert peak_mib < _PEAK_RSS_LIMIT_MIB


def test_render_series_thumbnail_small_undecodable_rle_still_reaches_the_decoder(
    tmp_path: Path,
) -> None:
    """Within the bounds, a broken RLE stream is the decoder's ValueError, naming the file."""
    path = write_rle_header(tmp_path / "small.dcm", rows=8, columns=8)
    with pytest.raises(ValueError, match=r"cannot decode pixel data of .*small\.dcm"):
        render_series_thumbnail([path])


def test_render_series_thumbnail_skips_hostile_file_beside_good_ones(tmp_path: Path) -> None:
    """A hostile instance in a series costs only itself: the good slice gets the thumbnail."""
    hostile = write_twenty_million_frames(tmp_path / "frames.dcm")
    good = get_testdata_file("CT_small.dcm")
    assert good is not None
    thumbnail = render_series_thumbnail([hostile, good])
    assert thumbnail.strategy == "slice"
    assert thumbnail.source_sop_instance_uid == str(dcmread(good).SOPInstanceUID)


def test_render_series_thumbnail_refuses_zero_rows(tmp_path: Path) -> None:
    """Rows = 0 would make any frame count fit; it is refused as an image without size."""
    ds = _instance(ExplicitVRLittleEndian, Rows=0, Columns=16, NumberOfFrames=20_000_000)
    ds.PixelData = bytes(512)
    path = tmp_path / "zero.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ValueError, match="Rows is 0; the image has no size"):
        render_series_thumbnail([path])


def test_render_series_thumbnail_multiframe_without_positions_uses_middle_frame(
    tmp_path: Path,
) -> None:
    """Frames without per-frame positions: frame (n - 1) // 2 is drawn (value 2 of 0..4)."""
    frames = np.stack([np.full((8, 8), 400 * i, dtype=np.uint16) for i in range(5)])
    ds = _instance(ExplicitVRLittleEndian, Rows=8, Columns=8, NumberOfFrames=5)
    ds.WindowCenter = 800
    ds.WindowWidth = 1601
    ds.PixelData = frames.tobytes()
    path = tmp_path / "five.dcm"
    ds.save_as(path, enforce_file_format=True)
    thumbnail = render_series_thumbnail([path], size_px=16)
    with Image.open(io.BytesIO(thumbnail.png)) as image:
        grey = np.asarray(image.convert("L"))
    # Frame 2 holds 800, the window's centre: mid-grey; frames 0/4 would be black/white.
    assert 120 <= int(grey.mean()) <= 135


def test_check_pixel_budget_passes_every_decodable_pydicom_test_file() -> None:
    """No false refusal: each of pydicom's test files that pydicom decodes passes the check."""
    checked = 0
    for path in sorted(PYDICOM_TEST_FILES.rglob("*")):
        if not path.is_file():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dcmread(path).pixel_array  # noqa: B018 - decodability is the filter
            except Exception:  # noqa: BLE001 - not decodable: not in this test
                continue
            ds, stored = _read_header(path)
            check_pixel_budget(ds, stored, path, DEFAULT_MAX_FRAME_BYTES)
        checked += 1
    assert checked >= 80  # pydicom 3.0.2 bundles 89 decodable files
