"""Plain value types that cross module boundaries (no I/O, no pydicom datasets)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class StageOutcome(enum.StrEnum):
    """What a stage made of one item (CTP's OK / RETRY / FAIL)."""

    OK = "ok"
    RETRY = "retry"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Routing:
    """Where instances from one source (association or upload) belong."""

    project: str
    dataset: str
    source_id: str  # association or upload id; series completion waits for it to close
    calling_ae_title: str = ""
    called_ae_title: str = ""


@dataclass(slots=True)
class IngestItem:
    """One received instance on its way through the pipeline.

    It carries the durable spool path, never the dataset, so queue memory stays bounded.
    """

    spool_path: Path
    routing: Routing
    received_at: float  # epoch seconds
    record: InstanceRecord | None = None  # filled by the store stage


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """What the store stage learnt about one instance from its header."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str
    instance_number: int | None
    number_of_frames: int | None
    patient_id: str
    series_description: str
    series_date: str
    size_bytes: int
    storage_key: str
    # Built only for the first instance of a series seen by a worker process.
    document: dict[str, Any] | None = None
    # The QIDO-RS attributes of the study, series and instance: DICOM JSON texts
    # (dicomweb/attributes.py: level_attributes_json).
    dicomweb_json: tuple[str, str, str] | None = None

    def __reduce__(self) -> tuple[type[InstanceRecord], tuple[Any, ...]]:
        # Records come back from the process pool, one per instance. Pickling a slots
        # dataclass looks up fields() per object on both sides, which cost about a tenth of
        # the receiving interpreter at a few hundred instances per second; a tuple does not.
        return (InstanceRecord, tuple(getattr(self, name) for name in _INSTANCE_RECORD_FIELDS))


_INSTANCE_RECORD_FIELDS = tuple(f.name for f in fields(InstanceRecord))
