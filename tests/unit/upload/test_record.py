"""Unit tests for kp_gateway.upload.record: the durable upload record and reading it back."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kp_gateway.durable import write_atomic
from kp_gateway.errors import InvalidDicomError, UnsafeArchiveError
from kp_gateway.upload.record import (
    DONE,
    IMPORTING,
    MAX_LISTED_ERRORS,
    MAX_LISTED_SERIES,
    RECEIVING,
    Upload,
    UploadState,
    read_records,
)


def make_upload(upload_id: str = "20240315-abc", created_at: float = 100.0) -> Upload:
    return Upload(
        id=upload_id,
        protocol="tus",
        project="admin",
        dataset="upload-20240315",
        kind="dicom",
        created_at=created_at,
        updated_at=created_at,
    )


def save(folder: Path, upload: Upload) -> Path:
    """Persist `upload` the way the service does."""
    path = folder / f"{upload.id}.json"
    write_atomic(path, upload.to_dict(), fsync=False)
    return path


def test_new_record_defaults() -> None:
    upload = make_upload()
    assert upload.state == RECEIVING
    assert upload.bytes_received == 0
    assert upload.finished_at is None
    assert (upload.series, upload.warnings) == ([], [])
    assert (upload.files, upload.errors, upload.skipped) == ([], [], [])


def test_record_round_trips_through_the_state_folder(tmp_path: Path) -> None:
    """Every field, lists and None included, survives to_dict, JSON and read_records."""
    upload = make_upload()
    upload.state, upload.detail, upload.finished_at = DONE, "2 instances", 123.5
    upload.extension, upload.filename, upload.container = ".dcm", "study.zip", "zip"
    upload.bytes_expected = upload.bytes_received = 4096
    upload.members_total = upload.members_done = 3
    upload.instances_imported = 2
    upload.resumes = 1
    upload.add_series("1.2.3.4")
    upload.add_error("a.txt", InvalidDicomError("no DICM header"))
    upload.add_warning("slice spacing is uneven")
    upload.add_skipped("DICOMDIR", "a DICOMDIR")
    upload.files.append({"path": "notes/readme.txt", "size": 12})
    save(tmp_path, upload)
    (loaded,) = read_records(tmp_path)
    assert loaded == upload
    assert loaded is not upload
    assert json.loads((tmp_path / f"{upload.id}.json").read_text()) == upload.to_dict()


def test_read_records_oldest_first(tmp_path: Path) -> None:
    for upload_id, created in [("b", 300.0), ("a", 100.0), ("c", 200.0)]:
        save(tmp_path, make_upload(upload_id, created))
    assert [u.id for u in read_records(tmp_path)] == ["a", "c", "b"]


def test_read_records_missing_folder_is_empty(tmp_path: Path) -> None:
    assert read_records(tmp_path / "uploads-state") == []


def test_read_records_ignores_bodies_and_removes_leftover_temp_files(tmp_path: Path) -> None:
    """Bodies (.part, .body) stay; a write interrupted before its rename leaves a temp file,
    which is removed."""
    upload = make_upload()
    save(tmp_path, upload)
    (tmp_path / f"{upload.id}.part").write_bytes(b"partial")
    (tmp_path / f"{upload.id}.body").write_bytes(b"whole")
    leftover = tmp_path / f".{upload.id}.json.0123abcd.tmp"
    leftover.write_text("{")
    assert [u.id for u in read_records(tmp_path)] == [upload.id]
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{upload.id}.body",
        f"{upload.id}.json",
        f"{upload.id}.part",
    ]


@pytest.mark.parametrize(
    "content",
    [
        b'{"id": "broken", "protocol": "post", "proj',  # cut off mid-write
        b"\xff\xfe not utf-8",
        b'{"protocol": "post"}',  # the required fields missing
    ],
)
def test_read_records_skips_unreadable_record_and_leaves_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    """An unreadable record is logged and left in place; the others still load."""
    save(tmp_path, make_upload("good"))
    bad = tmp_path / "broken.json"
    bad.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="kp_gateway.upload.record"):
        loaded = read_records(tmp_path)
    assert [u.id for u in loaded] == ["good"]
    assert bad.read_bytes() == content
    assert "unreadable upload record" in caplog.text
    assert "broken.json" in caplog.text


@pytest.mark.parametrize(
    "content",
    [
        b"[]",
        b"null",
        b'{"id": "x", "created_at": "soon"}',
        b'{"id": "x", "protocol": "post", "project": "p", "dataset": "d", "kind": "auto", '
        b'"state": "half-done"}',
    ],
)
def test_read_records_skips_json_that_is_not_an_object(tmp_path: Path, content: bytes) -> None:
    save(tmp_path, make_upload("good"))
    (tmp_path / "broken.json").write_bytes(content)
    assert [u.id for u in read_records(tmp_path)] == ["good"]


def test_from_dict_ignores_unknown_keys() -> None:
    """A record written by a newer version still loads."""
    doc = {**make_upload().to_dict(), "added_in_a_later_version": 7}
    assert Upload.from_dict(doc) == make_upload()


def test_add_error_codes_and_cap() -> None:
    """Errors are listed with their code up to MAX_LISTED_ERRORS; the total keeps counting."""
    upload = make_upload()
    upload.add_error("a.dcm", InvalidDicomError("cut off"))
    upload.add_error("b.zip", UnsafeArchiveError("traversal"), code="custom")
    upload.add_error("c.nii", "no affine", "conversion")
    upload.add_error("d.bin", "plain reason")
    assert upload.errors == [
        {"file": "a.dcm", "error": "invalid_dicom", "detail": "cut off"},
        {"file": "b.zip", "error": "custom", "detail": "traversal"},
        {"file": "c.nii", "error": "conversion", "detail": "no affine"},
        {"file": "d.bin", "error": "rejected", "detail": "plain reason"},
    ]
    for i in range(MAX_LISTED_ERRORS + 5):
        upload.add_error(f"f{i}", "bad")
    assert len(upload.errors) == MAX_LISTED_ERRORS
    assert upload.errors_total == MAX_LISTED_ERRORS + 9
    assert upload.errors[-1]["file"] == f"f{MAX_LISTED_ERRORS - 5}"


def test_add_skipped_and_add_warning_are_capped_but_counted() -> None:
    upload = make_upload()
    for i in range(MAX_LISTED_ERRORS + 3):
        upload.add_skipped(f"DICOMDIR{i}", "a DICOMDIR")
        upload.add_warning(f"warning {i}")
    assert len(upload.skipped) == len(upload.warnings) == MAX_LISTED_ERRORS
    assert upload.files_skipped == upload.warnings_total == MAX_LISTED_ERRORS + 3
    assert upload.skipped[0] == {"file": "DICOMDIR0", "reason": "a DICOMDIR"}
    assert upload.warnings[-1] == f"warning {MAX_LISTED_ERRORS - 1}"


def test_add_series_deduplicates_in_order() -> None:
    upload = make_upload()
    for uid in ["1.2.3", "1.2.4", "1.2.3", "1.2.5", "1.2.4"]:
        upload.add_series(uid)
    assert upload.series == ["1.2.3", "1.2.4", "1.2.5"]


def test_add_series_is_capped() -> None:
    upload = make_upload()
    for i in range(MAX_LISTED_SERIES + 2):
        upload.add_series(f"1.2.{i}")
    assert len(upload.series) == MAX_LISTED_SERIES
    upload.add_series("1.2.0")  # already listed: still no duplicate
    assert upload.series.count("1.2.0") == 1


def test_capped_record_stays_small_on_disk(tmp_path: Path) -> None:
    """A record holding every list at its cap still round-trips (the status document the
    service rewrites while importing)."""
    upload = make_upload()
    upload.state = IMPORTING
    for i in range(MAX_LISTED_ERRORS * 3):
        upload.add_error(f"member{i}.dcm", "cut off")
    path = save(tmp_path, upload)
    (loaded,) = read_records(tmp_path)
    assert len(loaded.errors) == MAX_LISTED_ERRORS
    assert loaded.errors_total == MAX_LISTED_ERRORS * 3
    assert path.stat().st_size < 200 * MAX_LISTED_ERRORS


def test_state_is_an_enum_that_round_trips_as_its_string(tmp_path: Path) -> None:
    upload = make_upload("a")
    upload.state = UploadState.IMPORTING
    save(tmp_path, upload)
    assert json.loads((tmp_path / "a.json").read_text())["state"] == "importing"
    (loaded,) = read_records(tmp_path)
    assert loaded.state is UploadState.IMPORTING and loaded.state == "importing"
