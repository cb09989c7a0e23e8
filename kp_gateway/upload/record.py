"""The upload record: one upload's durable status (``<data dir>/uploads-state/<id>.json``), its
states and kinds, and reading the records back at start-up.

:class:`Upload` is mutated on the event loop only; :func:`read_records` is blocking (worker
thread via ``asyncio.to_thread``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kp_gateway.errors import error_code_for

logger = logging.getLogger(__name__)

# Status documents are rewritten while importing; keep them small whatever the upload holds.
MAX_LISTED_ERRORS = 1000
MAX_LISTED_FILES = 10_000
MAX_LISTED_SERIES = 10_000


class UploadState(enum.StrEnum):
    """Where an upload is: receiving bytes, importing them, or ended (done or failed)."""

    RECEIVING = "receiving"
    IMPORTING = "importing"
    DONE = "done"
    FAILED = "failed"


RECEIVING, IMPORTING, DONE, FAILED = (
    UploadState.RECEIVING,
    UploadState.IMPORTING,
    UploadState.DONE,
    UploadState.FAILED,
)
KINDS = ("auto", "dicom", "nifti", "files")


@dataclass(slots=True, kw_only=True)
class Upload:
    """One upload's durable status record (``<data dir>/uploads-state/<id>.json``).

    Mutated on the event loop only; persisted by :class:`kp_gateway.upload.service.UploadService`.
    """

    id: str
    protocol: str  # "post" or "tus"
    project: str
    dataset: str
    kind: str
    extension: str = ""
    filename: str = ""
    state: UploadState = RECEIVING
    detail: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None
    bytes_expected: int | None = None
    bytes_received: int = 0
    container: str = ""  # "zip" or "file", known once received
    members_total: int = 0
    members_done: int = 0  # import checkpoint: members before this index are spooled
    files_seen: int = 0
    files_skipped: int = 0
    files_stored: int = 0
    instances_submitted: int = 0
    instances_imported: int = 0
    instances_failed: int = 0
    errors_total: int = 0
    cases_total: int = 0  # NIfTI cases planned in the upload's tree
    cases_done: int = 0  # converted and every file admitted to the pipeline
    cases_failed: int = 0  # not converted; one error each, nothing of them imported
    warnings_total: int = 0
    resumes: int = 0
    series: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # files deliberately not imported

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Upload:
        """Rebuild a record from its JSON; unknown keys (a newer version's) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in doc.items() if k in names}
        if "state" in known:
            known["state"] = UploadState(known["state"])  # ValueError for an unknown state
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document that is persisted."""
        return dataclasses.asdict(self)

    def add_error(self, file: str, exc: BaseException | str, code: str = "") -> None:
        """Record a per-file error (the list is capped; the total is not)."""
        self.errors_total += 1
        if len(self.errors) < MAX_LISTED_ERRORS:
            if isinstance(exc, BaseException):
                code, detail = code or error_code_for(exc), str(exc)
            else:
                detail = exc
            self.errors.append({"file": file, "error": code or "rejected", "detail": detail})

    def add_skipped(self, file: str, reason: str) -> None:
        """Record a file left out on purpose, with why (the list is capped; the count is not)."""
        self.files_skipped += 1
        if len(self.skipped) < MAX_LISTED_ERRORS:
            self.skipped.append({"file": file, "reason": reason})

    def add_warning(self, message: str) -> None:
        """Record a conversion warning (the list is capped; the total is not)."""
        self.warnings_total += 1
        if len(self.warnings) < MAX_LISTED_ERRORS:
            self.warnings.append(message)

    def add_series(self, uid: str) -> None:
        """Remember a series this upload delivered to."""
        if uid not in self.series and len(self.series) < MAX_LISTED_SERIES:
            self.series.append(uid)


def read_records(folder: Path) -> list[Upload]:
    """Blocking. Every readable ``*.json`` upload record in `folder`, oldest first."""
    found: list[Upload] = []
    if not folder.is_dir():
        return found
    for leftover in folder.glob(".*.tmp"):  # a crash between write and rename
        leftover.unlink(missing_ok=True)
    for path in folder.glob("*.json"):
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
            if not isinstance(doc, dict):
                raise TypeError(f"a JSON {type(doc).__name__}, not an object")
            upload = Upload.from_dict(doc)
            if not isinstance(upload.created_at, int | float):
                raise TypeError(f"created_at is {upload.created_at!r}, not a time")
            found.append(upload)
        # One broken record must not stop the gateway from starting.
        except (OSError, ValueError, TypeError) as exc:
            logger.error("unreadable upload record %s (%s); left in place", path, exc)
    return sorted(found, key=lambda u: u.created_at)


__all__ = [
    "DONE",
    "FAILED",
    "IMPORTING",
    "KINDS",
    "MAX_LISTED_ERRORS",
    "MAX_LISTED_FILES",
    "MAX_LISTED_SERIES",
    "RECEIVING",
    "Upload",
    "UploadState",
    "read_records",
]
