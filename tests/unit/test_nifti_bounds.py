"""NIfTI conversion of hostile input: declared sizes checked before allocating, linear JSON.

Issue 14 finding 5: a 188-byte zip took a worker from 86 to 3,159 MiB (nibabel allocates the
declared array before reading into it), and a meta_data.json with 60k keys took ~40 s (a
quadratic duplicate-key check). Time bounds are pytest-timeout deadlines; memory is measured
in a fresh interpreter.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kp_gateway.convert.nifti import convert_case
from kp_gateway.convert.nifti_layout import plan_nifti_tree
from kp_gateway.errors import ConversionError
from tests.conftest import REPO

# The unfixed conversion of the 3 GiB declaration peaked at 3,154 MiB; refusing from the header
# keeps the interpreter (numpy, nibabel, highdicom, pydicom) near 100 MiB.
_PEAK_RSS_LIMIT_MIB = 400
_THREE_GIB_SHAPE = (1024, 1024, 1536)  # int16: 3 GiB


def write_declared_only(path: Path, shape: tuple[int, ...], *, gzipped: bool) -> Path:
    """A NIfTI-1 header declaring `shape` of int16 and no voxel bytes at all."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352  # voxels would start after the header and the extension flag
    raw = header.binaryblock + bytes(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    return path


def _convert_tree(root: Path, out: Path, **limits: int) -> None:
    plan = plan_nifti_tree(root)
    for case in plan.cases:
        convert_case(plan, case, out, dataset_uid_seed="bounds", **limits)


@pytest.mark.timeout(60)
def test_convert_case_refuses_huge_volume_in_tiny_gzip_with_flat_memory(tmp_path: Path) -> None:
    """3 GiB declared in a ~60-byte .nii.gz: a per-case error naming both sizes, memory flat."""
    path = write_declared_only(tmp_path / "tree" / "case1.nii.gz", _THREE_GIB_SHAPE, gzipped=True)
    assert path.stat().st_size < 200
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.unit.test_nifti_bounds import _convert_tree\n"
        "try:\n"
        "    _convert_tree(Path(sys.argv[1]), Path(sys.argv[2]))\n"
        "    outcome = 'converted'\n"
        "except Exception as exc:\n"
        "    outcome = f'{type(exc).__name__}: {exc}'\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest,
        # which may hold a GiB by then) across exec; the new memory map's peak starts fresh.
        "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024)\n"
        "print(outcome)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "tree"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        timeout=120,
    )
    peak, outcome = done.stdout.split("\n", 1)
    assert outcome.startswith("ConversionError: case case1: case1.nii.gz: header declares")
    assert "1024x1024x1536 voxels (3221225472 bytes), more than a" in outcome
    assert float(peak) < _PEAK_RSS_LIMIT_MIB


def test_convert_case_refuses_uncompressed_nii_shorter_than_declared(tmp_path: Path) -> None:
    """An uncompressed .nii must hold its voxels after vox_offset."""
    write_declared_only(tmp_path / "case1.nii", (64, 64, 64), gzipped=False)
    with pytest.raises(ConversionError, match=r"\(524288 bytes\), but the file holds 0 bytes"):
        _convert_tree(tmp_path, tmp_path / "out")


def test_convert_case_refuses_volume_over_the_configured_limit(tmp_path: Path) -> None:
    """A real volume larger than max_volume_bytes is refused naming the setting."""
    data = np.arange(32 * 32 * 8, dtype=np.int16).reshape(32, 32, 8)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "case1.nii.gz")
    with pytest.raises(ConversionError, match=r"upload\.nifti_max_volume_bytes"):
        _convert_tree(tmp_path, tmp_path / "out", max_volume_bytes=16 * 1024 - 1)
    _convert_tree(tmp_path, tmp_path / "out", max_volume_bytes=16 * 1024)  # exactly fits


def test_convert_case_counts_scaled_voxels_as_eight_byte_floats(tmp_path: Path) -> None:
    """scl_slope makes nibabel load float64: the limit counts 8 bytes per voxel, not 2."""
    data = np.arange(16 * 16 * 4, dtype=np.int16).reshape(16, 16, 4)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, tmp_path / "case1.nii.gz")
    with pytest.raises(ConversionError, match=r"\(8192 bytes loaded\)"):
        _convert_tree(tmp_path, tmp_path / "out", max_volume_bytes=8191)


@pytest.mark.timeout(30)
def test_plan_meta_data_json_with_60k_keys_fails_fast(tmp_path: Path) -> None:
    """60,000 unknown tag keys: the first is named at once (the quadratic check took ~40 s)."""
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), tmp_path / "c.nii.gz")
    tags = {f"key{i:05d}": "x" for i in range(60_000)}
    (tmp_path / "meta_data.json").write_text(json.dumps({"global_tags": tags}))
    with pytest.raises(ConversionError, match="unknown tag key 'key00000'"):
        plan_nifti_tree(tmp_path)


@pytest.mark.timeout(30)
def test_plan_meta_data_json_duplicate_among_60k_keys_is_named(tmp_path: Path) -> None:
    """A duplicate among 60,000 keys is found in one pass and named."""
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), tmp_path / "c.nii.gz")
    body = ", ".join(f'"key{i:05d}": "x"' for i in range(60_000))
    text = '{"global_tags": {' + body + ', "key00042": "y"}}'
    (tmp_path / "meta_data.json").write_text(text)
    with pytest.raises(ConversionError, match=r"duplicate key\(s\) \['key00042'\]$"):
        plan_nifti_tree(tmp_path)


def test_plan_refuses_metadata_json_over_16_mib(tmp_path: Path) -> None:
    """A metadata file past 16 MiB is refused by its size, before it is read."""
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), tmp_path / "c.nii.gz")
    with open(tmp_path / "meta_data.json", "wb") as big:
        big.truncate(16 * 1024 * 1024 + 1)
    with pytest.raises(ConversionError, match=r"meta_data\.json: 16777217 bytes; metadata"):
        plan_nifti_tree(tmp_path)
