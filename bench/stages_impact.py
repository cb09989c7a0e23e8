"""Series-stage impact benchmark: C-STORE rate on one association while the gateway renders the
thumbnail and validates a large series received on another one (issue 3).

For each mode (``off``: ``--set series.enabled=false``; ``on``: the default, stages running) and
each repetition, a fresh gateway (``pipeline.series_idle_s=1``) receives:

- association A: a large CT series (default 300 slices of 512x512 int16) with ``dcmsend``;
- association B, started as soon as A's ``dcmsend`` exits: 2000 small 64x64 instances, timed.

About 1 s after A ends the CT series completes and, in the ``on`` mode, its completeness,
thumbnail and validation stages start while B is still sending. A thread samples
``/health/ready`` (stages running/queued), ``/metrics`` (``kp_gateway_series_stage_runs_total``,
``kp_gateway_series_stage_queue_depth``) and the CT series' document every 200 ms, so the report
says how much of B overlapped with stage work. The claim is that B's rate with the stages on
stays within 20% of its rate with them off (ratio of medians >= 0.8).

Run with the repository's venv: ``.venv/bin/python bench/stages_impact.py [--quick]``.
See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_bench import (  # after the sys.path change
    BENCH_DIR,
    MIB,
    REPO_DIR,
    BenchError,
    GatewayReceiver,
    RssSampler,
    Workload,
    generate_ct,
    generate_small,
    http_get_json,
    median,
    send,
    temp_root,
    tool_versions,
)

MODES = ("off", "on")
SAMPLE_S = 0.2
THUMBNAIL_KEY = "ThumbnailStrategy_keyword"
RATIO_GOAL = 0.8
METRIC_PREFIXES = (
    "kp_gateway_series_stage_runs_total",
    "kp_gateway_series_stage_queue_depth",
    "kp_gateway_series_completed_total",
    "kp_gateway_scp_cstore_total",
)


# -- sampling the gateway during B ------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """The series-stage and completion series of a Prometheus text page, by full sample name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(METRIC_PREFIXES):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def stage_runs(metrics: dict[str, float]) -> float:
    """Finished series-stage runs (every stage and outcome)."""
    return sum(v for k, v in metrics.items() if k.startswith("kp_gateway_series_stage_runs_total"))


@dataclass
class Probe:
    """One sample of the gateway's state, ``t`` seconds after B started (negative: before)."""

    t: float
    running: int | None = None
    queued: int | None = None
    queue_depth: float | None = None
    stage_runs: float | None = None
    series_completed: float | None = None
    cstores: float | None = None  # C-STORE requests answered so far (A's and B's)
    ct_thumbnail: bool = False
    ct_validated: bool = False


class Prober:
    """Samples ``/health/ready``, ``/metrics`` and the CT series every 200 ms in a thread."""

    def __init__(self, base: str, ct_uid: str) -> None:
        self.base = base
        self.ct_uid = ct_uid
        self.t0 = time.monotonic()
        self.probes: list[Probe] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def _probe(self) -> Probe:
        p = Probe(time.monotonic() - self.t0)
        try:
            ready = http_get_json(f"{self.base}/health/ready", timeout=2)
        except urllib.error.HTTPError as exc:  # 503 still carries the components
            ready = json.loads(exc.read() or b"{}")
        except (urllib.error.URLError, OSError, ValueError):
            ready = {}
        stages = ready.get("components", {}).get("series_stages")
        if stages:
            p.running, p.queued = int(stages.get("running", 0)), int(stages.get("queued", 0))
        try:
            with urllib.request.urlopen(f"{self.base}/metrics", timeout=2) as resp:
                m = parse_metrics(resp.read().decode())
            p.stage_runs = stage_runs(m)
            p.queue_depth = m.get("kp_gateway_series_stage_queue_depth")
            p.series_completed = m.get("kp_gateway_series_completed_total")
            p.cstores = sum(v for k, v in m.items() if k.startswith("kp_gateway_scp_cstore_total"))
        except (urllib.error.URLError, OSError, ValueError):
            pass
        try:
            series = http_get_json(f"{self.base}/api/series/{self.ct_uid}", timeout=2)
            p.ct_thumbnail = any(THUMBNAIL_KEY in k for k in series.get("document", {}))
            p.ct_validated = bool(series.get("validation"))
        except (urllib.error.URLError, OSError, ValueError):
            pass
        return p

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.probes.append(self._probe())
            self._stop.wait(max(0.0, SAMPLE_S - (time.monotonic() - started)))

    def start(self) -> None:
        """Start sampling; times are relative to :meth:`mark` (now until it is called)."""
        self._thread.start()

    def mark(self) -> None:
        """B starts now: shift every time to this origin."""
        now = time.monotonic()
        shift = now - self.t0
        for p in list(self.probes):
            p.t -= shift
        self.t0 = now

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()

    def wait_for(self, cond: Any, timeout: float) -> bool:
        """Wait until ``cond(latest probe)`` holds, up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.probes and cond(self.probes[-1]):
                return True
            time.sleep(SAMPLE_S / 2)
        return False


# -- one measurement --------------------------------------------------------------------------


@dataclass
class Run:
    """One repetition in one mode: A then B against a fresh gateway."""

    mode: str
    repeat: int
    ok: bool = False
    error: str = ""
    loadavg_1m: float | None = None
    a_wall_s: float | None = None
    a_instances_per_s: float | None = None
    b_wall_s: float | None = None
    b_instances_per_s: float | None = None
    b_mib_per_s: float | None = None
    stage_start_s: float | None = None  # first sample with stage work, relative to B's start
    ct_stages_done_s: float | None = None  # CT thumbnail and validation both present
    ct_overlap_s: float | None = None  # part of B inside [stage_start, ct_stages_done]
    ct_overlap_fraction: float | None = None
    busy_fraction: float | None = None  # B's samples with a series' stages running or queued
    stage_runs_during_b: float | None = None
    # B's rate from the C-STORE counter: while the CT's stages ran (mode on), or over the
    # middle of B (mode off, the same counter-based method over B's sampled span)
    b_rate_sampled: float | None = None
    b_rate_window_s: float | None = None
    ct_thumbnail: bool | None = None
    ct_validated: bool | None = None
    searchable_s: float | None = None
    peak_rss_mib: float | None = None
    gateway_exit: int | None = None
    probes: list[dict[str, Any]] = field(default_factory=list)


def busy(p: Probe) -> bool:
    """Whether a series' stages were running or queued at this sample."""
    return (p.running or 0) > 0 or (p.queued or 0) > 0


def counter_rate(probes: list[Probe], lo: float, hi: float) -> tuple[float, float] | None:
    """C-STORE rate between the first sample at or after ``lo`` and the last at or before
    ``hi``; (instances/s, seconds spanned), None when fewer than 2 samples fall inside."""
    inside = [p for p in probes if lo <= p.t <= hi and p.cstores is not None]
    if len(inside) < 2 or inside[-1].t - inside[0].t <= 0:
        return None
    first, last = inside[0], inside[-1]
    assert first.cstores is not None and last.cstores is not None
    return (last.cstores - first.cstores) / (last.t - first.t), last.t - first.t


def analyse(run: Run, probes: list[Probe]) -> None:
    """Fill the overlap figures of ``run`` from the samples (B runs from 0 to b_wall_s)."""
    assert run.b_wall_s is not None
    b_end = run.b_wall_s
    start = next((p.t for p in probes if busy(p)), None)
    done = next((p.t for p in probes if p.ct_thumbnail and p.ct_validated), None)
    run.stage_start_s = start
    run.ct_stages_done_s = done
    if start is not None:
        end = done if done is not None else probes[-1].t
        run.ct_overlap_s = max(0.0, min(end, b_end) - max(start, 0.0))
        run.ct_overlap_fraction = run.ct_overlap_s / b_end
    during = [p for p in probes if 0.0 <= p.t <= b_end]
    if during:
        run.busy_fraction = sum(1 for p in during if busy(p)) / len(during)
    before = [p.stage_runs for p in probes if p.t <= 0.0 and p.stage_runs is not None]
    after = [p.stage_runs for p in during if p.stage_runs is not None]
    if after:
        run.stage_runs_during_b = after[-1] - (before[-1] if before else 0.0)
    # dcmsend needs a moment to scan its files before the first C-STORE: skip B's first 0.5 s
    if run.mode == "on" and start is not None:
        rate = counter_rate(probes, max(start, 0.5), min(done or b_end, b_end))
    else:
        rate = counter_rate(probes, 0.5, b_end)
    if rate is not None:
        run.b_rate_sampled, run.b_rate_window_s = rate


def measure(
    mode: str,
    rep: int,
    ct: Workload,
    small: Workload,
    ct_uid: str,
    work_base: Path,
    log_dir: Path,
    opts: argparse.Namespace,
) -> Run:
    """Fresh gateway, A (large CT) then B (small instances, timed), checks, stop."""
    tag = f"{mode}-r{rep}"
    run = Run(mode, rep, loadavg_1m=os.getloadavg()[0])
    gw_opts = argparse.Namespace(**vars(opts))
    gw_opts.gateway_set = list(opts.gateway_set) + (
        ["series.enabled=false"] if mode == "off" else []
    )
    workdir = work_base / tag
    rx = GatewayReceiver(workdir, log_dir / f"{tag}.gateway.log", gw_opts)
    prober: Prober | None = None
    both = Workload(
        "ct+small",
        ct.root,
        ct.files + small.files,
        ct.n_series + small.n_series,
        ct.total_bytes + small.total_bytes,
    )
    try:
        rx.start()
        assert rx.proc is not None
        with RssSampler(rx.proc.pid) as rss:
            try:
                wall_a = send(rx.port, ct.dirs_for(1), log_dir, f"{tag}-A", opts.send_timeout)
                run.a_wall_s, run.a_instances_per_s = wall_a, ct.n_instances / wall_a
                prober = Prober(rx.base, ct_uid)
                prober.start()
                prober.mark()
                wall_b = send(rx.port, small.dirs_for(1), log_dir, f"{tag}-B", opts.send_timeout)
                run.b_wall_s, run.b_instances_per_s = wall_b, small.n_instances / wall_b
                run.b_mib_per_s = small.total_bytes / MIB / wall_b
                run.searchable_s = rx.wait_searchable(both, opts.searchable_timeout)
                if mode == "on" and not prober.wait_for(
                    lambda p: p.ct_thumbnail and p.ct_validated, opts.stage_timeout
                ):
                    raise BenchError(
                        f"CT thumbnail/validation missing {opts.stage_timeout:.0f} s after B"
                    )
                if mode == "off":
                    time.sleep(2 * SAMPLE_S + 1.0)  # stages would have shown up by now
            finally:
                run.peak_rss_mib = rss.peak_mib
                if prober is not None:
                    prober.stop()
        assert prober is not None
        last = prober.probes[-1]
        run.ct_thumbnail, run.ct_validated = last.ct_thumbnail, last.ct_validated
        analyse(run, prober.probes)
        run.probes = [asdict(p) for p in prober.probes]
        stored = rx.count_stored()
        if stored != both.n_instances:
            raise BenchError(f"gateway holds {stored}/{both.n_instances} instances")
        if mode == "off" and (
            run.ct_thumbnail or run.ct_validated or run.stage_start_s is not None
        ):
            raise BenchError("stages ran although series.enabled=false")
        if mode == "on" and run.stage_start_s is None:
            raise BenchError("no stage work was seen while sampling")
        rx.after(tag)
        run.ok = True
    except (BenchError, OSError, ValueError, KeyError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        run.gateway_exit = rx.stop()
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        os.sync()
    if run.ok and run.gateway_exit != 0:
        run.ok, run.error = False, f"gateway exited {run.gateway_exit} on SIGTERM"
    if not run.ok:
        print(f"    FAILED: {run.error}\n    log: {rx.log_path}", file=sys.stderr)
    return run


def describe(run: Run) -> str:
    """One progress line."""
    if not run.ok or run.b_instances_per_s is None:
        return "FAILED"
    text = (
        f"A {run.a_instances_per_s:6.1f} inst/s, B {run.b_instances_per_s:7.1f} inst/s "
        f"({run.b_wall_s:.2f} s), rss {run.peak_rss_mib:5.0f} MiB"
    )
    if run.mode == "on":
        text += (
            f"; stages from {fmt(run.stage_start_s, '.1f')} s to "
            f"{fmt(run.ct_stages_done_s, '.1f')} s (CT done), overlap with B "
            f"{fmt(run.ct_overlap_s, '.2f')} s = {fmt_pct(run.ct_overlap_fraction)}, "
            f"busy samples {fmt_pct(run.busy_fraction)}, "
            f"stage runs during B {fmt(run.stage_runs_during_b, '.0f')}, "
            f"B {fmt(run.b_rate_sampled, '.1f')} inst/s while they ran"
        )
    return text


def fmt(value: float | None, spec: str) -> str:
    """Format a number or '-' for missing."""
    return "-" if value is None else format(value, spec)


def fmt_pct(value: float | None) -> str:
    """A fraction as a percentage or '-'."""
    return "-" if value is None else f"{100 * value:.0f}%"


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    default_gw = Path(sys.executable).parent / "kp-gateway"
    if not default_gw.exists():
        default_gw = REPO_DIR / ".venv" / "bin" / "kp-gateway"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--ct-slices", type=int, default=300, help="large CT series on A (512x512)")
    p.add_argument("--small-count", type=int, default=2000, help="64x64 instances on B")
    p.add_argument(
        "--b-series-size",
        type=int,
        default=0,
        help="B's instances per series (0: one series, so only the CT's stages run during B)",
    )
    p.add_argument("--repeat", type=int, default=3, help="repetitions of each mode")
    p.add_argument("--gateway-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gateway-cmd", default=str(default_gw))
    p.add_argument("--quick", action="store_true", help="40 slices, 300 instances, repeat 1")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--tmp-dir", default=None)
    p.add_argument("--results-dir", default=str(BENCH_DIR / "results"))
    p.add_argument("--send-timeout", type=float, default=300.0)
    p.add_argument("--searchable-timeout", type=float, default=60.0)
    p.add_argument("--stage-timeout", type=float, default=180.0, help="CT stages after B")
    p.add_argument("--stop-timeout", type=float, default=90.0)
    p.add_argument("--time-budget", type=float, default=1500.0, help="skip runs after this")
    p.add_argument("--seed", type=int, default=1234)
    opts = p.parse_args(argv)
    if opts.quick:
        opts.ct_slices, opts.small_count, opts.repeat = 40, 300, 1
    if opts.repeat < 1 or opts.ct_slices < 1 or opts.small_count < 1:
        p.error("--repeat, --ct-slices and --small-count must be >= 1")
    for tool in ("dcmsend",):
        if shutil.which(tool) is None:
            p.error(f"missing program: {tool}")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    """Generate, measure both modes, print and save; exit 1 if a run failed."""
    opts = parse_args(argv)
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results_dir = Path(opts.results_dir)
    log_dir = results_dir / f"stages-{run_id}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    t_run = time.monotonic()
    load = os.getloadavg()[0]
    print(f"load average before the run: {load:.2f} (1 min) on {os.cpu_count()} CPUs")
    runs: list[Run] = []
    skipped = 0
    with temp_root(opts) as root:
        rng = np.random.default_rng(opts.seed)
        t0 = time.monotonic()
        ct = generate_ct(root / "data" / "ct", opts.ct_slices, rng)
        b_size = opts.b_series_size or opts.small_count
        small = generate_small(root / "data" / "small", opts.small_count, rng, b_size)
        import pydicom

        ct_uid = str(pydicom.dcmread(ct.files[0], stop_before_pixels=True).SeriesInstanceUID)
        print(
            f"generated A: {ct.n_instances} CT slices ({ct.total_bytes / MIB:.0f} MiB); "
            f"B: {small.n_instances} instances in {small.n_series} series "
            f"({small.total_bytes / MIB:.1f} MiB) in {time.monotonic() - t0:.0f} s"
        )
        work_base = root / "gateways"
        work_base.mkdir()
        for rep in range(opts.repeat):
            for mode in MODES:
                if time.monotonic() - t_run > opts.time_budget:
                    skipped += 1
                    continue
                run = measure(mode, rep, ct, small, ct_uid, work_base, log_dir, opts)
                runs.append(run)
                print(f"  [{rep + 1}/{opts.repeat}] stages {mode:<3} {describe(run)}", flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        good = [r for r in runs if r.mode == mode and r.ok]
        summary[mode] = {
            "runs_ok": len(good),
            "runs": sum(1 for r in runs if r.mode == mode),
            "b_instances_per_s": median([r.b_instances_per_s for r in good]),
            "a_instances_per_s": median([r.a_instances_per_s for r in good]),
            "peak_rss_mib": median([r.peak_rss_mib for r in good]),
            "ct_overlap_fraction": median([r.ct_overlap_fraction for r in good]),
            "busy_fraction": median([r.busy_fraction for r in good]),
            "b_rate_sampled": median([r.b_rate_sampled for r in good]),
        }
    off, on = summary["off"]["b_instances_per_s"], summary["on"]["b_instances_per_s"]
    ratio = on / off if on and off else None
    print(
        f"\nmedians over {opts.repeat} run(s); A: {opts.ct_slices} CT slices 512x512, "
        f"B: {opts.small_count} instances 64x64 in {small.n_series} series"
    )
    print(
        "(B sampled: B's rate from the C-STORE counter while the CT's stages ran (on) or over "
        "B after its first 0.5 s (off))"
    )
    print(
        f"{'stages':<7} {'B inst/s':>9} {'B sampled':>9} {'A inst/s':>9} "
        f"{'peak RSS MiB':>12} {'CT stages overlap B':>19} {'runs ok':>7}"
    )
    for mode in MODES:
        s = summary[mode]
        print(
            f"{mode:<7} {fmt(s['b_instances_per_s'], '.1f'):>9} "
            f"{fmt(s['b_rate_sampled'], '.1f'):>9} {fmt(s['a_instances_per_s'], '.1f'):>9} "
            f"{fmt(s['peak_rss_mib'], '.0f'):>12} "
            f"{(fmt_pct(s['ct_overlap_fraction']) if mode == 'on' else '-'):>19} "
            f"{s['runs_ok']:>3}/{s['runs']}"
        )
    verdict = None
    if ratio is not None:
        verdict = ratio >= RATIO_GOAL
        print(
            f"\n{'PASS' if verdict else 'FAIL'}  B rate with stages on / off = "
            f"{on:.1f} / {off:.1f} = {ratio:.3f} (goal >= {RATIO_GOAL})"
        )
    s_off, s_on = summary["off"]["b_rate_sampled"], summary["on"]["b_rate_sampled"]
    strict = s_on / s_off if s_on and s_off else None
    if strict is not None:
        print(
            f"{'PASS' if strict >= RATIO_GOAL else 'FAIL'}  stricter: B rate while the CT's "
            f"stages ran / B rate with stages off (from the C-STORE counter) = "
            f"{s_on:.1f} / {s_off:.1f} = {strict:.3f} (goal >= {RATIO_GOAL})"
        )
    overlap = summary["on"]["ct_overlap_fraction"]
    if overlap is not None and overlap < 0.5:
        print(
            f"NOTE: the CT's stage work overlapped only {fmt_pct(overlap)} of B (median): "
            "the stages finished early or started late, so B was mostly measured without them"
        )
    if load > 0.5:
        print(
            f"\nWARNING: the 1-minute load average was {load:.2f} before the run started: "
            "other processes were busy, figures may be noisy (per-run load in the JSON)"
        )
    failed = [r for r in runs if not r.ok]
    if skipped:
        print(f"\n{skipped} run(s) skipped: time budget of {opts.time_budget:.0f} s spent")
    for r in failed:
        print(f"FAILED run: stages {r.mode} repeat {r.repeat}: {r.error}")
    report = {
        "run_id": run_id,
        "duration_s": time.monotonic() - t_run,
        "loadavg_1m_at_start": load,
        "options": {
            k: v for k, v in vars(opts).items() if isinstance(v, str | int | float | bool | list)
        },
        "versions": tool_versions(),
        "workloads": {
            "a": {"instances": ct.n_instances, "bytes": ct.total_bytes, "series": 1},
            "b": {
                "instances": small.n_instances,
                "bytes": small.total_bytes,
                "series": small.n_series,
            },
        },
        "summary": summary,
        "ratio_on_off": ratio,
        "ratio_during_stages": strict,
        "goal": RATIO_GOAL,
        "pass": verdict,
        "skipped": skipped,
        "runs": [asdict(r) for r in runs],
        "logs": str(log_dir),
    }
    out = results_dir / f"stages-{run_id}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nresults: {out}  (run took {report['duration_s']:.0f} s)")
    return 1 if failed or skipped or ratio is None else 0


if __name__ == "__main__":
    sys.exit(main())
