"""Tests for kp_gateway.validation (dciodvfy and report) against the real dciodvfy (dicom3tools)."""

from __future__ import annotations

import datetime
import html
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from kp_gateway.validation.dciodvfy import (
    Finding,
    SeriesValidation,
    ValidatorUnavailableError,
    parse_line,
    sample_indices,
    validate_instance,
    validate_series,
)
from kp_gateway.validation.report import render_report_html

needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed"
)
_MODULE_SUFFIX = re.compile(r" - Module=<[^<>]*>$")


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert isinstance(path, str)
    return Path(path)


@pytest.fixture
def incomplete_ct(tmp_path: Path) -> Path:
    """A CT Image Storage instance with only its UIDs and Modality: many Type 1/2 errors."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "incomplete.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _dciodvfy_lines(path: Path) -> list[str]:
    """What dciodvfy itself prints for `path`, both streams, Error/Warning lines only."""
    proc = subprocess.run(
        ["dciodvfy", "-new", str(path)], capture_output=True, text=True, check=False, timeout=30
    )
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    return [line for line in lines if line.startswith(("Error - ", "Warning - "))]


def _distinct(lines: list[str], severity: str) -> int:
    """Distinct lines of one severity once the module suffix is ignored (the de-dup key)."""
    return len({_MODULE_SUFFIX.sub("", line) for line in lines if line.startswith(severity)})


def _copies(source: Path, directory: Path, n: int) -> list[tuple[str, Path]]:
    pairs = []
    for i in range(n):
        target = directory / f"{i}.dcm"
        shutil.copyfile(source, target)
        pairs.append((f"1.2.826.0.1.{i}", target))
    return pairs


@needs_dciodvfy
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "incomplete"])
def test_validate_instance_counts_match_dciodvfy(name: str, incomplete_ct: Path) -> None:
    """Parsed error/warning counts equal the lines dciodvfy prints, raw and de-duplicated."""
    path = incomplete_ct if name == "incomplete" else _testdata(name)
    lines = _dciodvfy_lines(path)
    raw = validate_instance(path, timeout_s=30)
    assert sum(r[0] == "error" for r in raw) == sum(x.startswith("Error") for x in lines)
    assert sum(r[0] == "warning" for r in raw) == sum(x.startswith("Warning") for x in lines)

    result = validate_series([("1.2.3.4", path)])
    assert result.error_count == _distinct(lines, "Error")
    assert result.warning_count == _distinct(lines, "Warning")
    assert result.instances_checked == result.instances_total == 1
    assert not result.sampled
    assert result.validated_at.utcoffset() == datetime.timedelta(0)


@needs_dciodvfy
def test_validate_instance_incomplete_file_has_tags_and_modules(incomplete_ct: Path) -> None:
    """A missing Type 1 attribute has its upper-case tag, path and module; modules merge."""
    raw = validate_instance(incomplete_ct, timeout_s=30)
    assert (
        "error",
        "(0020,000D)",
        "/StudyInstanceUID(0020,000d)",
        "Missing attribute for Type 1 Required",
        "GeneralStudy",
    ) in raw
    # dciodvfy repeats SamplesPerPixel per module; the series finding keeps both module names.
    result = validate_series([("1.2.3.4", incomplete_ct)])
    samples = [f for f in result.errors if f.tag == "(0028,0002)"]
    assert [f.module for f in samples] == ["ImagePixelDescriptionMacro, CTImage"]


@needs_dciodvfy
def test_validate_series_three_copies_counts_three_of_three(
    incomplete_ct: Path, tmp_path: Path
) -> None:
    """Identical findings in three copies merge into one finding affecting all three."""
    pairs = _copies(incomplete_ct, tmp_path, 3)
    result = validate_series(pairs, workers=3)
    single = validate_series(pairs[:1])
    assert (result.error_count, result.warning_count) == (single.error_count, single.warning_count)
    assert result.instances_checked == 3
    uids = tuple(sorted(uid for uid, _ in pairs))
    assert all(f.sop_instance_uids == uids for f in result.errors + result.warnings)


@needs_dciodvfy
def test_validate_series_large_series_samples_first_and_last(tmp_path: Path) -> None:
    """Ten instances with max_instances=4 check four, including the first and the last."""
    pairs = _copies(_testdata("CT_small.dcm"), tmp_path, 10)
    result = validate_series(pairs, max_instances=4)
    assert result.sampled
    assert (result.instances_checked, result.instances_total) == (4, 10)
    expected = tuple(sorted(pairs[i][0] for i in (0, 3, 6, 9)))
    assert result.warnings
    assert all(f.sop_instance_uids == expected for f in result.warnings)


def test_sample_indices_evenly_spaced_with_ends() -> None:
    """Sample positions are evenly spaced, distinct, and include both ends."""
    assert sample_indices(10, 4) == [0, 3, 6, 9]
    assert sample_indices(3, 50) == [0, 1, 2]
    assert sample_indices(7, 1) == [0]
    picked = sample_indices(1000, 50)
    assert len(set(picked)) == 50
    assert (picked[0], picked[-1]) == (0, 999)


@needs_dciodvfy
def test_validate_series_timeout_records_failed_instance() -> None:
    """A dciodvfy that exceeds its timeout is recorded as failed-to-run, not raised."""
    result = validate_series([("1.2.3.9", _testdata("CT_small.dcm"))], timeout_s=0.001)
    assert result.instances_failed_to_run == ("1.2.3.9",)
    assert result.instances_checked == 0
    assert result.errors == result.warnings == ()


@needs_dciodvfy
def test_validate_series_unreadable_file_records_failed_instance(tmp_path: Path) -> None:
    """dciodvfy's "Abort" for a missing file counts as failed-to-run, not as a verdict."""
    ok = ("1.2.3.1", _testdata("CT_small.dcm"))
    result = validate_series([ok, ("1.2.3.2", tmp_path / "gone.dcm")])
    assert result.instances_failed_to_run == ("1.2.3.2",)
    assert result.instances_checked == 1


def test_validate_series_without_dciodvfy_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With dciodvfy absent from PATH both entry points raise ValidatorUnavailableError."""
    monkeypatch.setenv("PATH", str(tmp_path))
    path = tmp_path / "x.dcm"
    with pytest.raises(ValidatorUnavailableError):
        validate_series([("1.2.3", path)])
    with pytest.raises(ValidatorUnavailableError):
        validate_instance(path, timeout_s=1)


def test_validate_series_bad_limits_raise() -> None:
    """Non-positive limits are a caller error."""
    with pytest.raises(ValueError, match="positive"):
        validate_series([], workers=0)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "Error - Information Object Not found",
            ("error", None, None, "Information Object Not found", None),
        ),
        (
            "Warning - </Laterality(0020,0060)>",
            ("warning", "(0020,0060)", "/Laterality(0020,0060)", "", None),
        ),
        (
            "Error - </A(0008,1140)[1]/B(0008,1150)> - bad - x",
            ("error", "(0008,1150)", "/A(0008,1140)[1]/B(0008,1150)", "bad - x", None),
        ),
        (
            "Warning - Value dubious - (0x0008,0x1060) PN",
            ("warning", "(0008,1060)", None, "Value dubious - (0x0008,0x1060) PN", None),
        ),
        ("Error -", ("error", None, None, "", None)),
        ("CTImage", None),
        ("Abort - File open for read failed", None),
        ("Errors everywhere", None),
    ],
)
def test_parse_line_short_and_odd_lines(line: str, expected: object) -> None:
    """Lines with two or three parts parse without crashing; non-findings give None."""
    assert parse_line(line) == expected


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: dict[str, str | None] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.update(attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _synthetic() -> SeriesValidation:
    uids = tuple(f"1.2.3.{i}" for i in range(8))
    return SeriesValidation(
        errors=(
            Finding(
                "error",
                "(0008,0060)",
                "/Modality(0008,0060)",
                "<script>alert(1)</script>",
                "GeneralSeries",
                uids[:2],
            ),
            Finding("error", None, None, "Information Object Not found & more", None, uids),
        ),
        warnings=(
            Finding("warning", "(0020,0060)", "/Laterality(0020,0060)", "empty", None, uids),
        ),
        instances_checked=8,
        instances_total=20,
        sampled=True,
        instances_failed_to_run=("1.2.3.99",),
        validated_at=datetime.datetime(2024, 7, 1, 10, 0, tzinfo=datetime.UTC),
        validator_version="1.00.test",
    )


def test_render_report_html_escapes_and_counts() -> None:
    """The report parses, escapes every message and carries counts in data attributes."""
    page = render_report_html(
        _synthetic(),
        series_instance_uid="1.2.3",
        series_description='Head "&" <neck>',
        modality="CT",
        completeness={
            "complete": False,
            "min_instance_number": 1,
            "max_instance_number": 22,
            "missing_instance_numbers": [4, 5],
        },
        site_timezone="Europe/Berlin",
    )
    parser = _Collector()
    parser.feed(page)
    parser.close()
    text = " ".join(parser.text)
    assert "script" not in parser.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for message in ("<script>alert(1)</script>", "Information Object Not found & more", "empty"):
        assert message in text
    assert 'Head "&" <neck>' in text
    assert parser.attrs["data-error-count"] == "2"
    assert parser.attrs["data-warning-count"] == "1"
    assert parser.attrs["data-sampled"] == "true"
    assert parser.attrs["data-missing-instance-numbers"] == "4,5"
    assert "2 of 8 instances" in text
    assert "8 of 20" in text
    assert "details" in parser.tags  # eight affected UIDs are collapsed
    assert "12:00:00 CEST (Europe/Berlin)" in text
    assert "dciodvfy 1.00.test" in text
    assert "1.2.3.99" in text


def test_render_report_html_unnamed_series_without_completeness() -> None:
    """No description gives "Unnamed series"; no completeness mapping leaves the block out."""
    empty = SeriesValidation((), (), 0, 0, False, (), datetime.datetime.now(datetime.UTC))
    page = render_report_html(
        empty, series_instance_uid="9.9", series_description=None, modality=None, completeness=None
    )
    assert "Unnamed series" in page
    assert 'id="completeness"' not in page
    assert "No errors." in page
    assert 'data-error-count="0"' in page


@needs_dciodvfy
def test_render_report_html_real_findings_all_present(incomplete_ct: Path) -> None:
    """Every finding of a real validation appears escaped in its report."""
    result = validate_series([("1.2.3.4", incomplete_ct)])
    page = render_report_html(
        result,
        series_instance_uid="1.2.3",
        series_description="x",
        modality="CT",
        completeness=None,
    )
    for finding in result.errors + result.warnings:
        assert f'<div class="message">{html.escape(finding.message)}</div>' in page
    assert f'data-error-count="{result.error_count}"' in page
