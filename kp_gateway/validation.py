"""Validates the instances of one series with dciodvfy (dicom3tools) and renders the HTML report.

Everything here blocks (subprocesses, no asyncio); the pipeline calls it via ``asyncio.to_thread``.

dciodvfy runs once per instance as ``dciodvfy -new <absolute path>`` (``-new`` selects the
structured ``Severity - </Keyword(gggg,eeee)[n]> - message - Module=<Name>`` line format; it is
dropped when the installed dciodvfy does not know it). Both stdout and stderr are parsed; lines
that are neither ``Error - ...`` nor ``Warning - ...`` (the IOD name, version banners) are ignored,
lines with fewer parts than usual are kept rather than crashing the way Kaapana's parser does.

Sampling: a series with more than ``max_instances`` instances is not checked in full. Instead
``max_instances`` instances at evenly spaced positions in the given order are checked, always
including the first and the last, and the result says ``sampled=True``. Instances of one series
share almost all of their header, so a sample finds the same problems at a bounded cost.

Findings are de-duplicated across instances on (severity, tag, attribute path, message); each one
lists the SOPInstanceUIDs that have it, and "n of m" always uses the number of instances that
dciodvfy actually finished on as m (Kaapana divides by the number of files that had *any* finding).
dciodvfy repeats some findings per module (e.g. SamplesPerPixel for both the Image Pixel macro and
the CT Image module); such a finding is kept once with the module names joined.
"""

from __future__ import annotations

import datetime
import functools
import html
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

logger = logging.getLogger(__name__)

RawFinding = tuple[str, str | None, str | None, str, str | None]

_LINE_RE = re.compile(r"^(Error|Warning)(?:\s+-\s*(.*))?$")
# -new locations look like </Seq(0008,1140)[1]/Keyword(0008,1150)>; there may be no location.
_LOCATION_RE = re.compile(r"^(<[^<>]*>)(?:\s+-\s*(.*))?$", re.DOTALL)
_MODULE_RE = re.compile(r"\s+-\s*Module=<([^<>]*)>\s*$")
# The legacy (non -new) format names tags as (0x0008,0x1060) inside the message.
_TAG_RE = re.compile(r"\((?:0x)?([0-9A-Fa-f]{4}),(?:0x)?([0-9A-Fa-f]{4})\)")
_VERSION_RE = re.compile(r"Version:\s*(\S+)")
_LONG_UID_LIST = 5  # more affected instances than this are collapsed into <details>


class ValidatorUnavailableError(RuntimeError):
    """dciodvfy is not on PATH (the dicom3tools package is not installed)."""


class ValidatorRunError(RuntimeError):
    """dciodvfy timed out, crashed, or could not read the file, so it produced no verdict."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One de-duplicated dciodvfy message across the checked instances of a series."""

    severity: str
    tag: str | None
    attribute_path: str | None
    message: str
    module: str | None
    sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SeriesValidation:
    """The validation result of one series; counts are distinct findings, not occurrences."""

    errors: tuple[Finding, ...]
    warnings: tuple[Finding, ...]
    instances_checked: int
    instances_total: int
    sampled: bool
    instances_failed_to_run: tuple[str, ...]
    validated_at: datetime.datetime
    validator: str = "dciodvfy"
    validator_version: str | None = None

    @property
    def error_count(self) -> int:
        """Number of distinct error findings."""
        return len(self.errors)

    @property
    def warning_count(self) -> int:
        """Number of distinct warning findings."""
        return len(self.warnings)


def dciodvfy_path() -> str | None:
    """Blocking; call via asyncio.to_thread. Return the dciodvfy executable on PATH, or None."""
    return shutil.which("dciodvfy")


def _require_dciodvfy() -> str:
    executable = dciodvfy_path()
    if executable is None:
        raise ValidatorUnavailableError("dciodvfy not found on PATH (install dicom3tools)")
    return executable


@functools.lru_cache(maxsize=4)
def _probe(executable: str) -> tuple[bool, str | None]:
    """Blocking; call via asyncio.to_thread. Return (supports ``-new``, version) for `executable`.

    ``-new`` is undocumented in dciodvfy's usage text, so it is probed rather than assumed; an
    unknown option makes dciodvfy print ``-new: unrecognized option``.
    """

    def run(args: list[str]) -> str:
        try:
            proc = subprocess.run(
                [executable, *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            logger.warning("could not probe %s", executable, exc_info=True)
            return ""
        return (proc.stdout + proc.stderr).decode("utf-8", "replace")

    out = run(["-new", "-version"])
    supports_new = "-new: unrecognized option" not in out
    if not supports_new:
        out = run(["-version"])
    match = _VERSION_RE.search(out)
    return supports_new, match.group(1) if match else None


def _normalise_tag(match: re.Match[str]) -> str:
    return f"({match.group(1).upper()},{match.group(2).upper()})"


def parse_line(line: str) -> RawFinding | None:
    """Parse one line of dciodvfy output into (severity, tag, path, message, module), or None.

    Pure; tolerant of lines with fewer than four `` - `` separated parts.
    """
    match = _LINE_RE.match(line.strip())
    if match is None:
        return None
    severity = match.group(1).lower()
    rest = match.group(2) or ""
    path: str | None = None
    tag: str | None = None
    loc = _LOCATION_RE.match(rest)
    if loc is not None:
        path = loc.group(1)[1:-1]
        rest = loc.group(2) or ""
    module: str | None = None
    mod = _MODULE_RE.search(rest)
    if mod is not None:
        module = mod.group(1)
        rest = rest[: mod.start()]
    # The innermost (last) tag of a sequence path is the attribute the message is about.
    tags = list(_TAG_RE.finditer(path if path is not None else rest))
    if tags:
        tag = _normalise_tag(tags[-1])
    return severity, tag, path, rest.strip(), module


def validate_instance(path: str | os.PathLike[str], *, timeout_s: float) -> list[RawFinding]:
    """Blocking; call via asyncio.to_thread. Run dciodvfy on one file and parse its findings.

    Parameters
    ----------
    path : str or os.PathLike
        The DICOM file.
    timeout_s : float
        Wall-clock limit; dciodvfy is killed when it is exceeded.

    Returns
    -------
    list of (severity, tag, attribute_path, message, module)
        One entry per Error/Warning line, in dciodvfy's order, duplicates kept.

    Raises
    ------
    ValidatorUnavailableError
        dciodvfy is not on PATH.
    ValidatorRunError
        dciodvfy timed out, was killed by a signal, aborted, or failed without any finding.
    """
    executable = _require_dciodvfy()
    supports_new, _ = _probe(executable)
    # An absolute path never starts with "-", so a file name cannot be read as an option.
    args = [executable, *(["-new"] if supports_new else []), str(Path(path).absolute())]
    try:
        # subprocess.run kills the child itself when the timeout expires.
        proc = subprocess.run(
            args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        raise ValidatorRunError(f"dciodvfy timed out after {timeout_s} s") from exc
    except FileNotFoundError as exc:
        raise ValidatorUnavailableError(f"dciodvfy disappeared: {executable}") from exc
    except OSError as exc:
        raise ValidatorRunError(f"dciodvfy could not be started: {exc}") from exc
    if proc.returncode < 0:
        raise ValidatorRunError(f"dciodvfy was killed by signal {-proc.returncode}")
    lines = (proc.stdout + b"\n" + proc.stderr).decode("utf-8", "replace").splitlines()
    aborts = [line.strip() for line in lines if line.startswith("Abort")]
    if aborts:
        raise ValidatorRunError(aborts[0])
    findings = [parsed for line in lines if (parsed := parse_line(line)) is not None]
    # Exit status 1 just means "errors found"; failing with nothing to show is a crash.
    if proc.returncode != 0 and not findings:
        raise ValidatorRunError(f"dciodvfy exited with status {proc.returncode} and no findings")
    return findings


def sample_indices(total: int, max_instances: int) -> list[int]:
    """Return evenly spaced indices into ``range(total)``, first and last included. Pure."""
    if total <= max_instances:
        return list(range(total))
    if max_instances == 1:
        return [0]
    step = (total - 1) / (max_instances - 1)  # >= 1 because total > max_instances
    return [round(i * step) for i in range(max_instances)]


def validate_series(
    instances: Sequence[tuple[str, str | os.PathLike[str]]],
    *,
    timeout_s: float = 30.0,
    max_instances: int = 50,
    workers: int = 2,
) -> SeriesValidation:
    """Blocking; call via asyncio.to_thread. Validate one series with dciodvfy.

    Parameters
    ----------
    instances : sequence of (sop_instance_uid, path)
        The series' instances, in the order used for sampling (e.g. by InstanceNumber).
    timeout_s : float
        Per-instance dciodvfy limit; an instance that exceeds it is listed in
        ``instances_failed_to_run`` instead of failing the series.
    max_instances : int
        Larger series are sampled (see the module docstring).
    workers : int
        At most this many dciodvfy processes run at once.

    Returns
    -------
    SeriesValidation

    Raises
    ------
    ValidatorUnavailableError
        dciodvfy is not on PATH.
    ValueError
        A limit is not positive.
    """
    if timeout_s <= 0 or max_instances < 1 or workers < 1:
        raise ValueError("timeout_s, max_instances and workers must be positive")
    executable = _require_dciodvfy()
    _, version = _probe(executable)
    chosen = [instances[i] for i in sample_indices(len(instances), max_instances)]

    def run_one(item: tuple[str, str | os.PathLike[str]]) -> list[RawFinding] | None:
        uid, path = item
        try:
            return validate_instance(path, timeout_s=timeout_s)
        except ValidatorRunError as exc:
            logger.warning("dciodvfy gave no verdict for %s: %s", uid, exc)
            return None

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dciodvfy") as pool:
        results = list(pool.map(run_one, chosen))

    # Dicts keep first-seen order, which is dciodvfy's module order, as in its own output.
    merged: dict[tuple[str, str | None, str | None, str], tuple[dict[str, None], set[str]]] = {}
    failed: list[str] = []
    for (uid, _path), raw in zip(chosen, results, strict=True):
        if raw is None:
            failed.append(uid)
            continue
        for severity, tag, attr_path, message, module in raw:
            modules, uids = merged.setdefault((severity, tag, attr_path, message), ({}, set()))
            if module is not None:
                modules[module] = None
            uids.add(uid)

    findings = [
        Finding(sev, tag, attr_path, msg, ", ".join(mods) or None, tuple(sorted(uids)))
        for (sev, tag, attr_path, msg), (mods, uids) in merged.items()
    ]
    result = SeriesValidation(
        errors=tuple(f for f in findings if f.severity == "error"),
        warnings=tuple(f for f in findings if f.severity == "warning"),
        instances_checked=len(chosen) - len(failed),
        instances_total=len(instances),
        sampled=len(chosen) < len(instances),
        instances_failed_to_run=tuple(failed),
        validated_at=datetime.datetime.now(datetime.UTC),
        validator_version=version,
    )
    n_checked, n_total = result.instances_checked, result.instances_total
    logger.debug("dciodvfy checked %d of %d instances, %d failed", n_checked, n_total, len(failed))
    return result


_CSS = """
body{font-family:system-ui,sans-serif;background:#f2f2f2;color:#222;margin:0;padding:1rem}
main{max-width:60rem;margin:auto;background:#fff;padding:1.5rem;border-radius:6px}
h1{font-size:1.4rem;margin-top:0}code{overflow-wrap:anywhere}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem}dt{font-weight:600}
.alert{padding:.6rem;border-radius:4px;background:#fde2e1;border:1px solid #e0a0a0}
.ok{background:#e3f5e1;border-color:#9ccf98}.note{background:#fff6d6;border-color:#e6cf7a}
.count{display:inline-block;min-width:1.5em;padding:0 .4em;border-radius:1em;color:#fff;
text-align:center}.count.error{background:#c62828}.count.warning{background:#b26a00}
ol.findings{padding-left:1.2rem}li.finding{margin-bottom:.9rem}
.tag{font-family:monospace;padding:0 .4em;border-radius:4px;color:#fff}
.error .tag{background:#c62828}.warning .tag{background:#b26a00}
.meta{color:#555;font-size:.9rem}ul.uids{font-family:monospace;font-size:.85rem}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _format_time(moment: datetime.datetime, zone: datetime.tzinfo, zone_name: str) -> str:
    local = moment.astimezone(zone)
    abbrev = local.tzname() or ""
    label = abbrev if abbrev == zone_name else f"{abbrev} ({zone_name})"
    return f'<time datetime="{local.isoformat()}">{local:%Y-%m-%d %H:%M:%S} {_e(label)}</time>'


def _render_findings(title: str, css_class: str, findings: Sequence[Finding], checked: int) -> str:
    parts = [
        f'<section id="{css_class}s" class="{css_class}s" data-count="{len(findings)}">',
        f'<h2>{title} <span class="count {css_class}">{len(findings)}</span></h2>',
    ]
    if not findings:
        parts.append(f"<p>No {title.lower()}.</p></section>")
        return "\n".join(parts)
    parts.append('<ol class="findings">')
    for f in findings:
        n = len(f.sop_instance_uids)
        uid_items = "".join(f"<li>{_e(uid)}</li>" for uid in f.sop_instance_uids)
        uid_list = f'<ul class="uids">{uid_items}</ul>'
        if n > _LONG_UID_LIST:
            uid_list = (
                f"<details><summary>Affected SOPInstanceUIDs ({n})</summary>{uid_list}</details>"
            )
        parts.append(
            f'<li class="finding {css_class}" data-tag="{_e(f.tag or "")}" data-occurrences="{n}">'
            f'<span class="tag">{_e(f.tag or "no tag")}</span> '
            f"<code>{_e(f.attribute_path or '')}</code>"
            f'<div class="message">{_e(f.message)}</div>'
            f'<div class="meta">Module: {_e(f.module or "not named")} · '
            f"{n} of {checked} instances</div>{uid_list}</li>"
        )
    parts.append("</ol></section>")
    return "\n".join(parts)


def _render_completeness(completeness: Mapping[str, Any]) -> str:
    complete = completeness.get("complete", completeness.get("is_complete"))
    low = completeness.get("min_instance_number")
    high = completeness.get("max_instance_number")
    missing = [str(m) for m in completeness.get("missing_instance_numbers") or ()]
    state = "unknown" if complete is None else ("yes" if complete else "no")
    css = "alert ok" if complete else "alert"
    missing_text = ", ".join(missing) if missing else "none"
    return (
        f'<section id="completeness" class="{css}" data-complete="{_e(state)}" '
        f'data-min-instance-number="{_e(low if low is not None else "")}" '
        f'data-max-instance-number="{_e(high if high is not None else "")}" '
        f'data-missing-instance-numbers="{_e(",".join(missing))}">'
        f"<h2>Completeness</h2><dl><dt>Complete</dt><dd>{_e(state)}</dd>"
        f"<dt>InstanceNumber range</dt><dd>{_e(low if low is not None else '?')} to "
        f"{_e(high if high is not None else '?')}</dd>"
        f"<dt>Missing InstanceNumbers</dt><dd>{_e(missing_text)}</dd></dl></section>"
    )


def render_report_html(
    validation: SeriesValidation,
    *,
    series_instance_uid: str,
    series_description: str | None,
    modality: str | None,
    completeness: Mapping[str, Any] | None,
    site_timezone: str = "UTC",
) -> str:
    """Blocking; call via asyncio.to_thread. Render one self-contained HTML5 validation report.

    Parameters
    ----------
    validation : SeriesValidation
    series_instance_uid, series_description, modality : str
        Shown in the title and summary; everything is HTML-escaped.
    completeness : mapping or None
        Keys ``complete`` (bool, ``is_complete`` also accepted), ``min_instance_number``,
        ``max_instance_number`` and ``missing_instance_numbers``; the block is left out if None.
    site_timezone : str
        IANA zone the validation time is also shown in; an unknown zone falls back to UTC.

    Returns
    -------
    str
        The page; no scripts, inline CSS, machine-readable ``data-*`` attributes on the summary.
    """
    try:
        zone: datetime.tzinfo = ZoneInfo(site_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        logger.warning("unknown site timezone %r; showing UTC only", site_timezone)
        zone, site_timezone = datetime.UTC, "UTC"
    v = validation
    name = series_description or "Unnamed series"
    version = f" {v.validator_version}" if v.validator_version else ""
    sample_note = (
        f'<p class="alert note">Sampled: this series has {v.instances_total} instances; '
        f"{v.instances_checked + len(v.instances_failed_to_run)} evenly spaced ones (including "
        "the first and the last) were checked.</p>"
        if v.sampled
        else ""
    )
    failed_note = ""
    if v.instances_failed_to_run:
        items = "".join(f"<li>{_e(uid)}</li>" for uid in v.instances_failed_to_run)
        failed_note = (
            '<div class="alert"><p>dciodvfy gave no verdict (timeout or crash) for '
            f'{len(v.instances_failed_to_run)} instance(s):</p><ul class="uids">{items}</ul></div>'
        )
    checked_text = f"{v.instances_checked} of {v.instances_total}"
    summary = (
        '<section id="summary" class="summary"'
        f' data-series-instance-uid="{_e(series_instance_uid)}"'
        f' data-error-count="{v.error_count}" data-warning-count="{v.warning_count}"'
        f' data-instances-checked="{v.instances_checked}"'
        f' data-instances-total="{v.instances_total}"'
        f' data-instances-failed="{len(v.instances_failed_to_run)}"'
        f' data-sampled="{str(v.sampled).lower()}"'
        f' data-validated-at="{_e(v.validated_at.astimezone(datetime.UTC).isoformat())}">'
        "<h2>Summary</h2><dl>"
        f"<dt>Modality</dt><dd>{_e(modality or 'unknown')}</dd>"
        f"<dt>Errors</dt><dd>{v.error_count}</dd><dt>Warnings</dt><dd>{v.warning_count}</dd>"
        f"<dt>Instances checked</dt><dd>{checked_text}</dd>"
        f"<dt>Sampled</dt><dd>{'yes' if v.sampled else 'no'}</dd>"
        f"<dt>Validator</dt><dd>{_e(v.validator + version)}</dd>"
        f"<dt>Validated (UTC)</dt><dd>{_format_time(v.validated_at, datetime.UTC, 'UTC')}</dd>"
        f"<dt>Validated (site)</dt><dd>{_format_time(v.validated_at, zone, site_timezone)}</dd>"
        f"</dl>{sample_note}{failed_note}</section>"
    )
    body = [
        f"<h1>Validation report: {_e(name)}</h1>",
        f"<p>SeriesInstanceUID <code>{_e(series_instance_uid)}</code></p>",
        summary,
        _render_completeness(completeness) if completeness is not None else "",
        _render_findings("Errors", "error", v.errors, v.instances_checked),
        _render_findings("Warnings", "warning", v.warnings, v.instances_checked),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Validation report: {_e(name)} ({_e(series_instance_uid)})</title>"
        f"<style>{_CSS}</style></head>\n<body><main>\n"
        + "\n".join(part for part in body if part)
        + "\n</main></body></html>\n"
    )
