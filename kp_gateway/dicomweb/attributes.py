"""The attributes QIDO-RS searches and returns, per level, as DICOM JSON (PS3.18 annex F).

The store stage's header parse (:func:`qido_attributes`, in the process pool) keeps them for
every instance; the index splits them by level (:data:`LEVEL_TAGS`) into study, series and
instance rows. They are the matching and return keys PS3.18 table 10.6.1-5 requires, plus
what viewers show in their study lists.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import Tag


class Level(enum.StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


def _tags(*keywords: str) -> dict[str, str]:
    """keyword -> 8-digit tag, as DICOM JSON names attributes."""
    return {kw: f"{int(Tag(kw)):08X}" for kw in keywords}


STUDY_KEYWORDS = _tags(
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "StudyID", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "IssuerOfPatientID", "PatientAge",
)  # fmt: skip
SERIES_KEYWORDS = _tags(
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate",
    "SeriesTime", "BodyPartExamined", "Manufacturer", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)  # fmt: skip
INSTANCE_KEYWORDS = _tags(
    "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
    "NumberOfFrames", "ContentDate", "ContentTime", "ImageType",
)  # fmt: skip
LEVEL_TAGS: dict[Level, frozenset[str]] = {
    Level.STUDY: frozenset(STUDY_KEYWORDS.values()),
    Level.SERIES: frozenset(SERIES_KEYWORDS.values()),
    Level.INSTANCE: frozenset(INSTANCE_KEYWORDS.values()),
}
KEYWORD_TAGS = {**STUDY_KEYWORDS, **SERIES_KEYWORDS, **INSTANCE_KEYWORDS}
# Computed by the index, never stored with an instance.
MODALITIES_IN_STUDY = "00080061"
NUMBER_OF_STUDY_RELATED_SERIES = "00201206"
NUMBER_OF_STUDY_RELATED_INSTANCES = "00201208"
NUMBER_OF_SERIES_RELATED_INSTANCES = "00201209"
RETRIEVE_URL = "00081190"
TIMEZONE_OFFSET = "00080201"
COMPUTED_KEYWORDS = {
    "ModalitiesInStudy": MODALITIES_IN_STUDY,
    "NumberOfStudyRelatedSeries": NUMBER_OF_STUDY_RELATED_SERIES,
    "NumberOfStudyRelatedInstances": NUMBER_OF_STUDY_RELATED_INSTANCES,
    "NumberOfSeriesRelatedInstances": NUMBER_OF_SERIES_RELATED_INSTANCES,
    "RetrieveURL": RETRIEVE_URL,
}
ALL_TAGS = frozenset(KEYWORD_TAGS.values())
_ALL_TAGS = tuple((int(tag, 16), tag) for tag in KEYWORD_TAGS.values())
# A value longer than this is left out (no study list shows it; it would bloat every row).
MAX_VALUE_CHARS = 256


def qido_attributes(ds: Dataset) -> dict[str, Any]:
    """The QIDO attributes of one header, DICOM JSON keyed by tag. Runs in a worker process."""
    out: dict[str, Any] = {}
    for number, tag in _ALL_TAGS:
        if number not in ds:
            continue
        try:
            elem = ds[number]
            if len(str(elem.value)) > MAX_VALUE_CHARS:
                continue
            encoded = elem.to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=1024)
        except (ValueError, TypeError, KeyError):
            continue  # an undecodable value is left out, as a missing one
        out[tag] = encoded
    return out


def level_attributes_json(ds: Dataset) -> tuple[str, str, str]:
    """The QIDO attributes of one header as three JSON texts: study, series, instance.

    Runs in a worker process. Text crosses back to the receiving interpreter more cheaply
    than dicts, and the index stores it as it is.
    """
    attrs = qido_attributes(ds)
    study, series, instance = (
        json.dumps(
            {t: v for t, v in attrs.items() if t in LEVEL_TAGS[level]}, separators=(",", ":")
        )
        for level in (Level.STUDY, Level.SERIES, Level.INSTANCE)
    )
    return study, series, instance


def tag_of(key: str) -> str | None:
    """The 8-digit tag a QIDO key names: a keyword (``PatientName``) or a tag (``00100010``)."""
    if key in KEYWORD_TAGS:
        return KEYWORD_TAGS[key]
    if key in COMPUTED_KEYWORDS:
        return COMPUTED_KEYWORDS[key]
    if len(key) == 8:
        try:
            int(key, 16)
        except ValueError:
            return None
        return key.upper()
    try:
        return f"{int(Tag(key)):08X}"
    except (ValueError, TypeError):
        return None


def _match_value(vr: str, value: Any) -> str | None:
    """The form a value is matched in: a person name's alphabetic group in lower case, a
    number in one canonical spelling, anything else as it is."""
    if isinstance(value, dict):
        alphabetic = value.get("Alphabetic")
        return None if alphabetic is None else str(alphabetic).lower()
    if vr in NUMERIC_VRS:
        return canonical_number(value)
    return str(value)


NUMERIC_VRS = frozenset({"IS", "US", "UL", "SS", "SL", "DS", "FL", "FD"})


def canonical_number(value: Any) -> str | None:
    """``"2"``, ``2`` and ``"2.0"`` alike (``repr`` of the float), None when not a number."""
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return None


def match_values(level_json: str) -> dict[str, list[str]]:
    """Per tag, the values of one level's attributes (a JSON text of
    :func:`level_attributes_json`) in their matching form: what an index that cannot read
    DICOM JSON (OpenSearch) matches on."""
    out: dict[str, list[str]] = {}
    for tag, element in json.loads(level_json).items():
        vr = str(element.get("vr", ""))
        values = [v for v in (_match_value(vr, x) for x in element.get("Value", [])) if v]
        if values:
            out[tag] = values
    return out
