"""NIfTI conversion benchmark: one 512x512xN float32 volume with a 2-label SEG, via convert_case.

The script writes a synthetic CT-like float32 volume (a smooth field plus noise, values about
-1000..2000) and a label map with two spheres (labels 1 and 2) as NIfTI, then converts the case
with :func:`kp_gateway.convert.nifti.convert_case` in a fresh child process, so the peak RSS
reported is the converter's own. The data is generated in another child: Linux carries a
parent's peak RSS over fork and exec into ``ru_maxrss``, so the parent stays small. It prints the
seconds of the conversion, the child's peak RSS (``resource.getrusage``, ``ru_maxrss``) and its
RSS after the imports, and the size of what was written.

Run with the repository's venv::

    .venv/bin/python bench/nifti_bench.py [--slices 200] [--uncompressed] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = 512


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_inputs(folder: Path, slices: int, *, gzip: bool) -> None:
    """Write Case001 image, its segmentation and seg_info.json (basic layout, option one)."""
    import nibabel as nib
    import numpy as np

    suffix = ".nii.gz" if gzip else ".nii"
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-0.7, -0.7, 1.25, 1.0])
    affine[:3, 3] = (180.0, 180.0, -120.0)
    rng = np.random.default_rng(0)
    i = np.linspace(-1.0, 1.0, SIZE, dtype=np.float32)
    plane = 800.0 * np.exp(-(i[:, None] ** 2 + i[None, :] ** 2) * 2.0) - 900.0
    volume = np.empty((SIZE, SIZE, slices), dtype=np.float32)
    labels = np.zeros((SIZE, SIZE, slices), dtype=np.uint8)
    centre = np.array([SIZE / 2, SIZE / 2, slices / 2])
    jj, ii = np.meshgrid(np.arange(SIZE), np.arange(SIZE))
    for k in range(slices):
        noise = rng.normal(0.0, 40.0, size=(SIZE, SIZE)).astype(np.float32)
        volume[:, :, k] = plane + noise + 3.0 * k
        for value, offset, radius in ((1, -60.0, 50.0), (2, 60.0, 35.0)):
            dz = (k - centre[2]) * 1.25
            inside = (ii - centre[0] - offset) ** 2 + (jj - centre[1]) ** 2 + dz**2 < radius**2
            labels[:, :, k][inside] = value
    nib.save(nib.Nifti1Image(volume, affine), folder / f"Case001{suffix}")
    nib.save(nib.Nifti1Image(labels, affine), folder / f"Case001_seg{suffix}")
    (folder / "seg_info.json").write_text(
        json.dumps(
            {
                "algorithm": "bench",
                "seg_info": [
                    {"label_name": "left", "label_int": 1},
                    {"label_name": "right", "label_int": 2},
                ],
            }
        )
    )


def convert(folder: Path, out: Path) -> dict[str, object]:
    """Plan and convert the one case of `folder` into `out` (the child's work)."""
    from kp_gateway.convert.nifti import convert_case, plan_nifti_tree

    baseline = _peak_rss_mib()
    started = time.perf_counter()
    plan = plan_nifti_tree(folder)
    series = convert_case(plan, plan.cases[0], out, dataset_uid_seed="bench")
    seconds = time.perf_counter() - started
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "rss_after_imports_mib": round(baseline, 1),
        "series": [(s.kind, len(s.files)) for s in series],
        "written_mib": round(written / 2**20, 1),
        "warnings": [w for s in series for w in s.warnings],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=200, help="slices of 512x512 (200)")
    parser.add_argument("--uncompressed", action="store_true", help="write .nii, not .nii.gz")
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it")
    parser.add_argument("--convert", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=Path, metavar="IN", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.convert:
        print(json.dumps(convert(Path(args.convert[0]), Path(args.convert[1]))))
        return 0
    if args.generate:
        write_inputs(args.generate, args.slices, gzip=not args.uncompressed)
        return 0

    work = args.keep or Path(tempfile.mkdtemp(prefix="nifti-bench-"))
    try:
        started = time.perf_counter()
        generate = [sys.executable, __file__, "--generate", str(work / "in")]
        generate += ["--slices", str(args.slices)] + (
            ["--uncompressed"] if args.uncompressed else []
        )
        subprocess.run(generate, check=True)
        generated = time.perf_counter() - started
        child = subprocess.run(
            [sys.executable, __file__, "--convert", str(work / "in"), str(work / "out")],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            print(child.stdout + child.stderr, file=sys.stderr)
            return 1
        result = json.loads(child.stdout.strip().splitlines()[-1])
        kind = "nii" if args.uncompressed else "nii.gz"
        print(f"input: {SIZE}x{SIZE}x{args.slices} float32 + uint8 2-label map ({kind})")
        print(f"  generated in {generated:.1f} s")
        print(f"convert_case: {result['seconds']} s")
        print(f"peak RSS of the converting process: {result['peak_rss_mib']} MiB")
        print(f"  (after imports, before converting: {result['rss_after_imports_mib']} MiB)")
        print(f"output: {result['series']} (kind, files), {result['written_mib']} MiB")
        for warning in result["warnings"]:
            print(f"warning: {warning}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
