"""Upload benchmark: a zip of CT slices over HTTP, kp-gateway's ``POST /api/uploads`` against
Orthanc's ``POST /instances`` with the same zip (issue 4).

The script writes one stored (uncompressed) zip of 512x512 int16 CT slices (default about
1 GiB, ``--megabytes``), then for each receiver, fresh in a temporary directory:

- **gateway**: ``POST /api/uploads?project=admin&dataset=bench&kind=dicom`` with the zip as a raw
  body streamed from the file (never read into memory), then ``GET /api/uploads/{id}`` every
  100 ms until the state is ``done``, then the ``bench`` dataset's ``instance_count`` must reach
  the number of slices. **upload MiB/s** = zip size / POST time (until the 202);
  **end-to-end MiB/s** = zip size / (POST start to everything counted).
- **orthanc**: ``POST /instances`` with the same zip, streamed the same way (Orthanc >= 1.8.2
  accepts a zip body and imports it before answering; older versions get one POST per member,
  and the output says so); then ``/statistics`` must count every slice. Its upload and
  end-to-end rates are both zip size / time until the POST returned and the count matched.

The target is gateway end-to-end MiB/s >= Orthanc's. Peak RSS of each receiver (with its child
processes) is sampled as in ``run_bench.py``.

Run with the repository's venv: ``.venv/bin/python bench/upload_bench.py [--quick]``.
See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_bench import (  # after the sys.path change
    BENCH_DIR,
    DATASET,
    MIB,
    PROJECT,
    REPO_DIR,
    BenchError,
    GatewayReceiver,
    OrthancReceiver,
    Receiver,
    RssSampler,
    descendants,
    http_get_json,
    iter_ct_slices,
    median,
    part10_bytes,
    status_kib,
    temp_root,
    tool_versions,
)

RECEIVERS = ("gateway", "orthanc")
CHUNK = 1 << 20
POLL_S = 0.1
ORTHANC_ZIP_SINCE = (1, 8, 2)


# -- data -------------------------------------------------------------------------------------


def build_zip(path: Path, megabytes: float, rng: np.random.Generator) -> tuple[int, int]:
    """Write a stored zip of one CT series of about ``megabytes`` MiB; (slices, zip bytes)."""
    probe = len(part10_bytes(next(iter_ct_slices(1, np.random.default_rng(0)))))
    slices = max(1, math.ceil(megabytes * MIB / (probe + 120)))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i, ds in enumerate(iter_ct_slices(slices, rng)):
            zf.writestr(f"CT/slice_{i + 1:05d}.dcm", part10_bytes(ds))
    return slices, path.stat().st_size


# -- HTTP -------------------------------------------------------------------------------------


def post_file(url: str, path: Path, content_type: str, timeout: float) -> tuple[int, bytes]:
    """POST the file at ``path`` as the raw body, streamed in 1 MiB chunks; (status, body)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=timeout)
    try:
        conn.putrequest("POST", u.path + (f"?{u.query}" if u.query else ""))
        conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(path.stat().st_size))
        conn.endheaders()
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    conn.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (an error): read it below
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def orthanc_version() -> tuple[int, ...]:
    """The installed Orthanc's version, e.g. (1, 10, 1); () when unknown."""
    try:
        out = subprocess.run(
            ["Orthanc", "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", out.stdout or out.stderr)
    return tuple(int(x) for x in m.groups()) if m else ()


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Sample:
    """One receiver, one repetition."""

    receiver: str
    repeat: int
    method: str = ""
    ok: bool = False
    error: str = ""
    loadavg_1m: float | None = None
    post_s: float | None = None
    total_s: float | None = None
    upload_mib_per_s: float | None = None
    end_to_end_mib_per_s: float | None = None
    import_s: float | None = None  # gateway: from the 202 to state "done"
    counted_s: float | None = None  # from "done" (or the POST's answer) to every instance counted
    stored: int | None = None
    upload_state: str | None = None
    upload_detail: str | None = None
    rss_before_mib: float | None = None
    peak_rss_mib: float | None = None
    receiver_exit: int | None = None


def tree_rss_mib(pid: int) -> float:
    """Summed VmRSS of a process and its descendants, MiB."""
    return sum(status_kib(p, "VmRSS") for p in descendants(pid)) / 1024


def wait_count(rx: Receiver, want: int, timeout: float) -> int:
    """Poll the receiver's instance count until it reaches ``want``; returns the last count."""
    deadline = time.monotonic() + timeout
    count = -1
    while True:
        try:
            count = rx.count_stored()
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            count = -1
        if count >= want or time.monotonic() > deadline:
            return count
        time.sleep(POLL_S / 4)


def run_gateway(rx: GatewayReceiver, zip_path: Path, n: int, s: Sample, opts: Any) -> None:
    """Streamed raw POST, status polling until done, dataset count."""
    s.method = "POST /api/uploads (raw zip body)"
    query = urllib.parse.urlencode({"project": PROJECT, "dataset": DATASET, "kind": "dicom"})
    t0 = time.monotonic()
    status, body = post_file(
        f"{rx.base}/api/uploads?{query}", zip_path, "application/zip", opts.post_timeout
    )
    t_post = time.monotonic()
    if status != 202:
        raise BenchError(f"POST /api/uploads answered {status}: {body[:500]!r}")
    upload_id = json.loads(body)["id"]
    s.post_s = t_post - t0
    deadline = t_post + opts.import_timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = http_get_json(f"{rx.base}/api/uploads/{upload_id}", timeout=10)
        if info.get("state") in ("done", "failed"):
            break
        time.sleep(POLL_S)
    t_done = time.monotonic()
    s.upload_state, s.upload_detail = info.get("state"), info.get("detail")
    s.import_s = t_done - t_post
    if s.upload_state != "done":
        raise BenchError(f"upload {upload_id} is {s.upload_state!r}: {s.upload_detail}")
    s.stored = wait_count(rx, n, opts.import_timeout)
    s.counted_s = time.monotonic() - t_done
    s.total_s = time.monotonic() - t0


def run_orthanc(rx: OrthancReceiver, zip_path: Path, n: int, s: Sample, opts: Any) -> None:
    """The zip in one POST /instances (or one POST per member on old versions), then count."""
    version = orthanc_version()
    t0 = time.monotonic()
    if version and version >= ORTHANC_ZIP_SINCE:
        s.method = "POST /instances (zip body)"
        status, body = post_file(
            f"{rx.base}/instances", zip_path, "application/zip", opts.post_timeout
        )
        if status != 200:
            raise BenchError(f"POST /instances answered {status}: {body[:500]!r}")
    else:
        s.method = "POST /instances per member (this Orthanc cannot take a zip)"
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                req = urllib.request.Request(
                    f"{rx.base}/instances",
                    data=zf.read(info),
                    headers={"Content-Type": "application/dicom"},
                )
                with urllib.request.urlopen(req, timeout=opts.post_timeout) as resp:
                    resp.read()
    t_post = time.monotonic()
    s.post_s = t_post - t0
    s.stored = wait_count(rx, n, 30.0)
    s.counted_s = time.monotonic() - t_post
    s.total_s = time.monotonic() - t0


def measure(
    name: str,
    rep: int,
    zip_path: Path,
    n: int,
    work_base: Path,
    log_dir: Path,
    opts: argparse.Namespace,
) -> Sample:
    """Fresh receiver, upload, check, stop, delete."""
    tag = f"upload-{name}-r{rep}"
    s = Sample(name, rep, loadavg_1m=os.getloadavg()[0])
    size = zip_path.stat().st_size
    workdir = work_base / tag
    cls = GatewayReceiver if name == "gateway" else OrthancReceiver
    rx = cls(workdir, log_dir / f"{tag}.{name}.log", opts)
    try:
        rx.start()
        assert rx.proc is not None
        s.rss_before_mib = tree_rss_mib(rx.proc.pid)
        with RssSampler(rx.proc.pid) as rss:
            try:
                if isinstance(rx, GatewayReceiver):
                    run_gateway(rx, zip_path, n, s, opts)
                else:
                    assert isinstance(rx, OrthancReceiver)
                    run_orthanc(rx, zip_path, n, s, opts)
            finally:
                s.peak_rss_mib = rss.peak_mib
        assert s.post_s and s.total_s
        s.upload_mib_per_s = size / MIB / s.post_s
        s.end_to_end_mib_per_s = size / MIB / s.total_s
        if s.stored != n:
            raise BenchError(f"{name} holds {s.stored}/{n} instances")
        rx.after(tag)
        s.ok = True
    except (BenchError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        s.error = f"{type(exc).__name__}: {exc}"
    finally:
        s.receiver_exit = rx.stop()
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        os.sync()
    if s.ok and name == "gateway" and s.receiver_exit != 0:
        s.ok, s.error = False, f"gateway exited {s.receiver_exit} on SIGTERM"
    if not s.ok:
        print(f"    FAILED: {s.error}\n    log: {rx.log_path}", file=sys.stderr)
    return s


def fmt(value: float | None, spec: str) -> str:
    """Format a number or '-' for missing."""
    return "-" if value is None else format(value, spec)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    default_gw = Path(sys.executable).parent / "kp-gateway"
    if not default_gw.exists():
        default_gw = REPO_DIR / ".venv" / "bin" / "kp-gateway"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--megabytes", type=float, default=1024, help="zip size in MiB (about)")
    p.add_argument("--repeat", type=int, default=1, help="repetitions (medians reported)")
    p.add_argument("--receivers", default=",".join(RECEIVERS), help="comma separated subset")
    p.add_argument("--gateway-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gateway-cmd", default=str(default_gw))
    p.add_argument("--quick", action="store_true", help="a 64 MiB zip")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--tmp-dir", default=None)
    p.add_argument("--results-dir", default=str(BENCH_DIR / "results"))
    p.add_argument("--post-timeout", type=float, default=600.0, help="socket timeout of a POST")
    p.add_argument("--import-timeout", type=float, default=600.0, help="gateway import limit")
    p.add_argument("--stop-timeout", type=float, default=90.0)
    p.add_argument("--seed", type=int, default=1234)
    opts = p.parse_args(argv)
    if opts.quick:
        opts.megabytes = 64
    opts.receiver_names = [x.strip() for x in opts.receivers.split(",") if x.strip()]
    if set(opts.receiver_names) - set(RECEIVERS) or not opts.receiver_names:
        p.error(f"receivers are {', '.join(RECEIVERS)}")
    if opts.repeat < 1 or opts.megabytes <= 0:
        p.error("--repeat and --megabytes must be positive")
    if "orthanc" in opts.receiver_names and shutil.which("Orthanc") is None:
        p.error("missing program: Orthanc")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the zip, upload it to each receiver, print and save; exit 1 on a failure."""
    opts = parse_args(argv)
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results_dir = Path(opts.results_dir)
    log_dir = results_dir / f"upload-{run_id}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    t_run = time.monotonic()
    load = os.getloadavg()[0]
    print(f"load average before the run: {load:.2f} (1 min) on {os.cpu_count()} CPUs")
    version = orthanc_version()
    if "orthanc" in opts.receiver_names:
        v = ".".join(map(str, version)) or "unknown"
        zip_ok = bool(version) and version >= ORTHANC_ZIP_SINCE
        how = "takes a zip body on POST /instances" if zip_ok else "no zip body: POST per file"
        print(f"Orthanc {v}: {how}")
    samples: list[Sample] = []
    with temp_root(opts) as root:
        zip_path = root / "ct-slices.zip"
        t0 = time.monotonic()
        n, size = build_zip(zip_path, opts.megabytes, np.random.default_rng(opts.seed))
        print(
            f"generated {zip_path.name}: {n} CT slices 512x512 int16, stored zip of "
            f"{size / MIB:.1f} MiB ({size / 1e6:.0f} MB) in {time.monotonic() - t0:.0f} s"
        )
        work_base = root / "receivers"
        work_base.mkdir()
        for rep in range(opts.repeat):
            for name in opts.receiver_names:
                s = measure(name, rep, zip_path, n, work_base, log_dir, opts)
                samples.append(s)
                line = "FAILED"
                if s.ok:
                    line = (
                        f"upload {s.upload_mib_per_s:6.1f} MiB/s ({s.post_s:.1f} s), end-to-end "
                        f"{s.end_to_end_mib_per_s:6.1f} MiB/s ({s.total_s:.1f} s), peak RSS "
                        f"{s.peak_rss_mib:.0f} MiB (at start {s.rss_before_mib:.0f})"
                    )
                print(f"  [{rep + 1}/{opts.repeat}] {name:<8} {line}", flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for name in opts.receiver_names:
        good = [s for s in samples if s.receiver == name and s.ok]
        summary[name] = {
            "runs_ok": len(good),
            "runs": sum(1 for s in samples if s.receiver == name),
            "method": good[0].method if good else "",
            "upload_mib_per_s": median([s.upload_mib_per_s for s in good]),
            "end_to_end_mib_per_s": median([s.end_to_end_mib_per_s for s in good]),
            "post_s": median([s.post_s for s in good]),
            "total_s": median([s.total_s for s in good]),
            "peak_rss_mib": median([s.peak_rss_mib for s in good]),
        }
    print(
        f"\nzip {size / MIB:.0f} MiB, {n} slices; medians over {opts.repeat} run(s); "
        "MiB = 2^20 bytes"
    )
    head = (
        f"{'receiver':<8} {'upload MiB/s':>12} {'end-to-end MiB/s':>16} {'POST s':>7} "
        f"{'total s':>7} {'peak RSS MiB':>12} {'runs ok':>7}  method"
    )
    print(head + "\n" + "-" * len(head))
    for name, r in summary.items():
        print(
            f"{name:<8} {fmt(r['upload_mib_per_s'], '.1f'):>12} "
            f"{fmt(r['end_to_end_mib_per_s'], '.1f'):>16} {fmt(r['post_s'], '.1f'):>7} "
            f"{fmt(r['total_s'], '.1f'):>7} {fmt(r['peak_rss_mib'], '.0f'):>12} "
            f"{r['runs_ok']:>5}/{r['runs']}  {r['method']}"
        )
    gw, oc = summary.get("gateway"), summary.get("orthanc")
    ratio = upload_ratio = verdict = None
    if gw and oc and gw["end_to_end_mib_per_s"] and oc["end_to_end_mib_per_s"]:
        ratio = gw["end_to_end_mib_per_s"] / oc["end_to_end_mib_per_s"]
        upload_ratio = gw["upload_mib_per_s"] / oc["upload_mib_per_s"]
        verdict = ratio >= 1.0
        print(
            f"\nratio gateway/Orthanc: upload {upload_ratio:.3f}, end-to-end {ratio:.3f}"
            f"\n{'PASS' if verdict else 'FAIL'}  end-to-end upload rate >= 1 x Orthanc: "
            f"gateway {gw['end_to_end_mib_per_s']:.1f} MiB/s vs Orthanc "
            f"{oc['end_to_end_mib_per_s']:.1f} MiB/s"
        )
    if load > 0.5:
        print(
            f"\nWARNING: the 1-minute load average was {load:.2f} before the run started: "
            "other processes were busy, figures may be noisy (per-sample load in the JSON)"
        )
    failed = [s for s in samples if not s.ok]
    for s in failed:
        print(f"FAILED: {s.receiver} run {s.repeat}: {s.error}")
    report = {
        "run_id": run_id,
        "duration_s": time.monotonic() - t_run,
        "loadavg_1m_at_start": load,
        "options": {
            k: v for k, v in vars(opts).items() if isinstance(v, str | int | float | bool | list)
        },
        "versions": tool_versions(),
        "zip": {"slices": n, "bytes": size},
        "summary": summary,
        "ratio_end_to_end": ratio,
        "ratio_upload": upload_ratio,
        "pass": verdict,
        "samples": [asdict(s) for s in samples],
        "logs": str(log_dir),
    }
    out = results_dir / f"upload-{run_id}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nresults: {out}  (run took {report['duration_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
