"""The HTML validation report of one series (:func:`render_report_html`), rendered from a
:class:`~kp_gateway.validation.dciodvfy.SeriesValidation`.

Blocking (pure CPU work, no I/O); the pipeline calls it via ``asyncio.to_thread``.
"""

from __future__ import annotations

import datetime
import html
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kp_gateway.validation.dciodvfy import Finding, SeriesValidation

logger = logging.getLogger(__name__)

_LONG_UID_LIST = 5  # more affected instances than this are collapsed into <details>

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


__all__ = ["render_report_html"]
