"""The durable upload record (kp_gateway.upload.record): JSON round trip, caps, recovery."""

from __future__ import annotations

import json
from pathlib import Path

from kp_gateway.durable import write_atomic
from kp_gateway.errors import InvalidDicomError
from kp_gateway.upload.record import (
    IMPORTING,
    MAX_LISTED_ERRORS,
    MAX_LISTED_SERIES,
    Upload,
    read_records,
)


def _upload(upload_id: str, created_at: float) -> Upload:
    return Upload(
        id=upload_id,
        protocol="tus",
        project="lung",
        dataset="cohort1",
        kind="auto",
        created_at=created_at,
        bytes_expected=1000,
    )


def test_round_trip_through_the_state_folder_oldest_first(tmp_path: Path) -> None:
    newer, older = _upload("b", 20.0), _upload("a", 10.0)
    newer.state = IMPORTING
    newer.add_series("1.2.3")
    newer.add_error("x.dcm", InvalidDicomError("cut off"))
    newer.add_skipped("DICOMDIR", "an index")
    newer.add_warning("spacing rounded")
    newer.files.append({"path": "notes.txt", "size": 5})
    for upload in (newer, older):
        write_atomic(tmp_path / f"{upload.id}.json", upload.to_dict())
    loaded = read_records(tmp_path)
    assert [u.id for u in loaded] == ["a", "b"]
    assert loaded[1] == newer
    assert loaded[1].errors == [{"file": "x.dcm", "error": "invalid_dicom", "detail": "cut off"}]


def test_unknown_keys_of_a_newer_version_are_ignored(tmp_path: Path) -> None:
    doc = {**_upload("a", 1.0).to_dict(), "added_later": {"x": 1}}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    assert read_records(tmp_path)[0] == _upload("a", 1.0)


def test_unreadable_records_are_left_in_place_and_temp_files_removed(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / ".a.json.0123.tmp").write_text("half written")
    write_atomic(tmp_path / "a.json", _upload("a", 1.0).to_dict())
    assert [u.id for u in read_records(tmp_path)] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "broken.json"]
    assert read_records(tmp_path / "missing") == []


def test_lists_are_capped_while_totals_keep_counting() -> None:
    upload = _upload("a", 1.0)
    for n in range(MAX_LISTED_ERRORS + 5):
        upload.add_error(f"{n}.dcm", "bad")
        upload.add_warning(f"w{n}")
        upload.add_skipped(f"s{n}", "why")
    assert (upload.errors_total, len(upload.errors)) == (MAX_LISTED_ERRORS + 5, MAX_LISTED_ERRORS)
    assert (upload.warnings_total, len(upload.warnings)) == (
        MAX_LISTED_ERRORS + 5,
        MAX_LISTED_ERRORS,
    )
    assert (upload.files_skipped, len(upload.skipped)) == (MAX_LISTED_ERRORS + 5, MAX_LISTED_ERRORS)
    for n in range(MAX_LISTED_SERIES + 5):
        upload.add_series(f"1.2.{n}")
        upload.add_series(f"1.2.{n}")  # the same series twice is listed once
    assert len(upload.series) == MAX_LISTED_SERIES
    assert upload.series[:2] == ["1.2.0", "1.2.1"]
