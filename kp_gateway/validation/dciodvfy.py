"""Validates the instances of one series with dciodvfy (dicom3tools); the HTML report of the
result is rendered by :mod:`kp_gateway.validation.report`.

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
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

RawFinding = tuple[str, str | None, str | None, str, str | None]

_LINE_RE = re.compile(r"^(Error|Warning)(?:\s+-\s*(.*))?$")
# -new locations look like </Seq(0008,1140)[1]/Keyword(0008,1150)>; there may be no location.
_LOCATION_RE = re.compile(r"^(<[^<>]*>)(?:\s+-\s*(.*))?$", re.DOTALL)
_MODULE_RE = re.compile(r"\s+-\s*Module=<([^<>]*)>\s*$")
# The legacy (non -new) format names tags as (0x0008,0x1060) inside the message.
_TAG_RE = re.compile(r"\((?:0x)?([0-9A-Fa-f]{4}),(?:0x)?([0-9A-Fa-f]{4})\)")
_VERSION_RE = re.compile(r"Version:\s*(\S+)")


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
