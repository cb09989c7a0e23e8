"""Series metadata documents in Kaapana's OpenSearch format, built from one decoded DICOM header.

The document follows ``reference/kaapana-behaviour.md`` section 3 (keys ``"<TAG> <Name>_<type>"``,
value encodings by VR, derived ``00000000 …`` fields), with the listed Kaapana bugs fixed:
date-times are converted to UTC once, honouring the value's own offset, TimezoneOffsetFromUTC
(0008,0201) or the site time zone; multi-item sequences and multi-valued person names are kept as
arrays; numeric keys never hold strings.
"""

import codecs
import datetime
import functools
import logging
import math
import re
import struct
import zoneinfo
from typing import Any, Final

from pydicom.datadict import dictionary_description, dictionary_has_tag, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from kp_gateway.kaapana.keys import (
    KEY_ANNOTATION_LABEL,
    KEY_ANNOTATION_LABELS,
    KEY_ARRIVED,
    KEY_ARRIVED_DATE,
    KEY_ARRIVED_HOUR,
    KEY_BODY_PART,
    KEY_CURATED_MODALITY,
    KEY_DATASET,
    KEY_DAY_OF_WEEK,
    KEY_DERIVED_AGE,
    KEY_ORIGINAL_DATASET,
    KEY_ORIGINAL_PROJECT,
    KEY_PROJECT,
    KEY_SEGMENT_ALGORITHM,
    KEY_TIME_TAG_USED,
    KEY_TIMESTAMP,
    SEG_ALGORITHM_NAME,
    SEG_ALGORITHM_TYPE,
)

__all__ = ["build_series_document", "document_key"]

logger = logging.getLogger(__name__)

_UTC: Final = datetime.UTC

# Type suffix by VR, as kaapana-behaviour.md 3.3. PN keys get a component-group suffix on top.
_SUFFIX_BY_VR: Final[dict[str, str]] = {
    **dict.fromkeys(
        ("AE", "AS", "AT", "CS", "LO", "LT", "SH", "ST", "UC", "UI", "UT", "UR"), "keyword"
    ),
    # Kaapana's catch-all for VRs it has no rule for; values are stored as strings.
    **dict.fromkeys(("SV", "UV"), "keyword"),
    "PN": "keyword",
    "DA": "date",
    "DT": "datetime",
    "TM": "time",
    **dict.fromkeys(("DS", "FL", "FD"), "float"),
    **dict.fromkeys(("IS", "SL", "SS", "UL", "US"), "integer"),
    # Ambiguous VRs pydicom could not resolve: a decoded number is indexed, raw bytes are not.
    **dict.fromkeys(("US or SS", "US or OW", "US or SS or OW"), "integer"),
    "SQ": "object",
}
# Binary VRs (OB, OD, OF, OL, OV, OW, UN) are absent on purpose: Dataset.to_json_dict() encodes
# them as InlineBinary, which Kaapana never indexes.

# Bulk data Kaapana deletes before conversion; pixel data is absent anyway (stop_before_pixels).
_SKIPPED_TAGS: Final = frozenset({0x00143080, 0x7FE00008, 0x7FE00009, 0x7FE00010})

# Where pydicom's names differ from Kaapana's beyond the possessive rule: the standard writes µ.
_NAME_OVERRIDES: Final = {0x00188150: "ExposureTimeinµS", 0x00188151: "X-RayTubeCurrentinµA"}
_POSSESSIVE_RE: Final = re.compile(r"'s\b")

# Struct formats of the binary number VRs (PS3.5 table 6.2-1).
_NUMBER_FORMATS: Final = dict(
    zip(("US", "SS", "UL", "SL", "FL", "FD", "SV", "UV"), "HhIifdqQ", strict=True)
)
# Default character repertoire only (PS3.5 6.1.2): decoding cannot depend on (0008,0005).
_ASCII_VRS: Final = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
_CHARSET_VRS: Final = frozenset({"LO", "SH", "UC", "LT", "ST", "UT"})
_SINGLE_VALUED_VRS: Final = frozenset({"LT", "ST", "UT", "UR"})

# Bounds on what one document carries. Kaapana indexed no multi-item sequence at all; keeping
# them must not put per-frame functional groups or RTSTRUCT contour points into OpenSearch.
_MAX_SEQUENCE_ITEMS: Final = 64
_MAX_VALUE_BYTES: Final = 16 * 1024

# Strings are stripped as Kaapana does; UI values are padded with NUL (PS3.5 6.2).
_PADDING: Final = " \x00\t\n\r\f\v"

_PN_GROUPS: Final = ("alphabetic", "ideographic", "phonetic")

_DA_RE: Final = re.compile(r"(\d{4})[.-]?(\d{2})[.-]?(\d{2})")
_TM_RE: Final = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{0,6}))?)?)?")
# PS3.5 table 6.2-1: YYYY[MM[DD[HH[MM[SS[.F{1-6}]]]]]][&ZZXX]
_DT_RE: Final = re.compile(
    r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{0,6}))?([+-]\d{4})?"
)
_OFFSET_RE: Final = re.compile(r"([+-]?)(\d{2})(\d{2})")
_AS_RE: Final = re.compile(r"(\d{1,3})\s*([DWMY])")
_DAYS_PER_AGE_UNIT: Final = {"D": 365, "W": 52, "M": 12, "Y": 1}

# Attributes the derived fields read back from the normalised document.
_ACQUISITION_DATETIME: Final = "0008002A AcquisitionDateTime_datetime"
# Kaapana's order of preference for the series date and time.
_DATE_KEYS: Final = (
    "00080022 AcquisitionDate_date",
    "00080021 SeriesDate_date",
    "00080023 ContentDate_date",
    "00080020 StudyDate_date",
)
_TIME_KEYS: Final = (
    "00080032 AcquisitionTime_time",
    "00080031 SeriesTime_time",
    "00080033 ContentTime_time",
    "00080030 StudyTime_time",
)
_MODALITY: Final = "00080060 Modality_keyword"
_IMAGE_TYPE: Final = "00080008 ImageType_keyword"
_BIRTH_DATE: Final = "00100030 PatientBirthDate_date"
_PATIENT_AGE: Final = "00101010 PatientAge_keyword"


def document_key(tag: int | BaseTag, vr: str) -> str | None:
    """Pure; safe to call in a worker process. Return the document key of a data element.

    Parameters
    ----------
    tag : int or pydicom.tag.BaseTag
        The element's tag.
    vr : str
        The element's VR. For PN the returned key is the stem to which ``_alphabetic``,
        ``_ideographic`` or ``_phonetic`` is appended.

    Returns
    -------
    str or None
        ``"<8 upper hex tag> <Name>_<type>"``, e.g. ``"00100020 PatientID_keyword"``; None for
        tags without a standard name (private, unknown, repeating groups), groups 0000/0002,
        bulk data and binary VRs.
    """
    return _document_key(int(tag), vr)


@functools.lru_cache(maxsize=8192)
def _document_key(tag: int, vr: str) -> str | None:
    suffix = _SUFFIX_BY_VR.get(vr)
    group = tag >> 16
    if suffix is None or group in (0x0000, 0x0002) or tag in _SKIPPED_TAGS:
        return None
    name = _standard_name(tag)
    return None if name is None else f"{tag:08X} {name}_{suffix}"


@functools.lru_cache(maxsize=8192)
def _standard_name(tag: int) -> str | None:
    """Return the standard's attribute name without spaces, None if the tag has none."""
    # dictionary_has_tag() first: dictionary_description() alone also matches repeating groups
    # (60xx overlays), which Kaapana's dictionary lists with a literal "xx" and never indexes.
    if (tag >> 16) & 1 or not dictionary_has_tag(tag):
        return None
    name = _NAME_OVERRIDES.get(tag)
    if name is None:
        # The name, not the keyword: "Image Position (Patient)" keeps its parentheses, as in
        # Kaapana's dicom_tag_dict.json, whose names also drop a possessive "'s" ("Patient's
        # Name" -> "PatientName") but keep a plural one ("Operators' Name" -> "Operators'Name").
        name = _POSSESSIVE_RE.sub("", dictionary_description(tag))
    return "".join(name.split())


def build_series_document(
    ds: Dataset,
    *,
    project: str,
    dataset: str,
    arrived_at: datetime.datetime,
    site_timezone: str = "UTC",
) -> dict[str, Any]:
    """Pure; safe to call in a worker process. Build the OpenSearch document of one series.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        One instance of the series, read with ``stop_before_pixels=True``.
    project, dataset : str
        Routing decided by the gateway, stored as ClinicalTrialProtocolID (0012,0020) and
        ClinicalTrialSponsorName (0012,0010); the sender's own values move to
        ``00000000 OriginalClinicalTrialProtocolID_keyword`` / ``…SponsorName_keyword``.
    arrived_at : datetime.datetime
        Time zone aware arrival time.
    site_timezone : str
        IANA zone for date-times that carry no offset when (0008,0201) is absent or invalid.

    Returns
    -------
    dict
        The document, JSON-serialisable (kaapana-behaviour.md section 3, bugs fixed).

    Raises
    ------
    ValueError
        If `arrived_at` is naive or `site_timezone` is malformed.
    zoneinfo.ZoneInfoNotFoundError
        If `site_timezone` is unknown.
    """
    if arrived_at.utcoffset() is None:
        raise ValueError("arrived_at must be timezone aware")
    arrived = arrived_at.astimezone(_UTC)
    zone = _dataset_zone(ds, site_timezone)
    document = _normalise_dataset(ds, zone, _text_codec(ds))

    modality = document.get(_MODALITY)
    if modality in ("SEG", "RTSTRUCT"):
        document.update(_annotation_fields(ds, modality))

    timestamp, time_tag_used = _series_timestamp(document, zone, arrived)
    document[KEY_TIMESTAMP] = _format_datetime(timestamp)
    document[KEY_TIME_TAG_USED] = time_tag_used
    document[KEY_ARRIVED] = _format_datetime(arrived)
    document[KEY_ARRIVED_DATE] = arrived.date().isoformat()
    document[KEY_ARRIVED_HOUR] = arrived.hour
    document[KEY_DAY_OF_WEEK] = timestamp.weekday()

    age = _derived_patient_age(document, timestamp.date())
    if age is not None:
        document[KEY_DERIVED_AGE] = age
    if isinstance(modality, str):
        image_type = document.get(_IMAGE_TYPE)
        is_localizer = (
            modality == "CT"
            and isinstance(image_type, list)
            and len(image_type) >= 3
            and "LOCALIZER" in image_type
        )
        document[KEY_CURATED_MODALITY] = "XR" if is_localizer else modality
    document[KEY_BODY_PART] = "N/A"

    # Routing comes from the gateway; the sender's values are kept but never used for routing.
    for key, original_key in (
        (KEY_PROJECT, KEY_ORIGINAL_PROJECT),
        (KEY_DATASET, KEY_ORIGINAL_DATASET),
    ):
        if key in document:
            document[original_key] = document.pop(key)
    document[KEY_PROJECT] = project
    document[KEY_DATASET] = dataset
    return document


def _normalise_dataset(ds: Dataset, zone: datetime.tzinfo, codec: str | None) -> dict[str, Any]:
    """Encode every indexable element of `ds` (recursing into sequences) by its VR."""
    out: dict[str, Any] = {}
    for tag in list(ds.keys()):
        # A plain int: BaseTag.__eq__ is Python code and dominates the cached lookups below.
        tag_number = int(tag)
        # Filter on the tag before decoding: vendor headers are mostly private tags.
        if tag_number in _SKIPPED_TAGS or _standard_name(tag_number) is None:
            continue
        try:
            vr, value = _element_value(ds, tag, codec)
        except (ValueError, TypeError, BytesLengthException):
            # Tolerant decoding: one malformed element must not cost the series its document.
            logger.debug("skipping undecodable element %s", tag)
            continue
        key = _document_key(tag_number, vr)
        if key is None or value is None or isinstance(value, bytes | bytearray):
            continue
        if vr == "PN":
            out.update(_person_name_fields(key, value))
            continue
        if vr == "SQ":
            if len(value) > _MAX_SEQUENCE_ITEMS:
                logger.debug("dropping %s: %d items", key, len(value))
                continue
            items = [
                # An item with its own SpecificCharacterSet is left to pydicom.
                _normalise_dataset(item, zone, None if 0x00080005 in item else codec)
                for item in value
            ]
            encoded: Any = items[0] if len(items) == 1 else items or None
        else:
            encoded = _encode_values(vr, _as_list(value), zone)
        if encoded is not None:
            out[key] = encoded
    return out


def _element_value(ds: Dataset, tag: BaseTag, codec: str | None) -> tuple[str, Any]:
    """Return the VR and value of an element, decoding the common VRs from the raw bytes.

    ``ds[tag]`` costs ~15 us an element (it re-resolves the character set each time), most of
    the budget for a header; sequences, PN, ambiguous VRs and ISO 2022 text still take it.
    """
    elem: DataElement | RawDataElement = ds.get_item(tag)
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        vr = elem.VR or _dictionary_vr(tag)
        if vr not in _SUFFIX_BY_VR and vr != "UN":
            return vr, None  # binary: never indexed, not worth decoding
        # UN is left to pydicom, which gives a known tag its dictionary VR.
        if len(elem.value) > _MAX_VALUE_BYTES and vr != "SQ":
            logger.debug("dropping %s: %d bytes", tag, len(elem.value))
            return vr, None
        values = _raw_values(elem.value, vr, elem.is_little_endian, codec)
        if values is not None:
            return vr, values
    decoded = ds[tag]
    return decoded.VR, decoded.value


def _raw_values(data: bytes, vr: str, little_endian: bool, codec: str | None) -> list[Any] | None:
    """Decode numbers and single-byte-safe text; None leaves the element to pydicom."""
    number_format = _NUMBER_FORMATS.get(vr)
    if number_format is not None:
        count, remainder = divmod(len(data), struct.calcsize(number_format))
        if remainder:
            return None  # pydicom raises BytesLengthException
        byte_order = "<" if little_endian else ">"
        return list(struct.unpack(f"{byte_order}{count}{number_format}", data))
    if vr in _ASCII_VRS:
        text = data.decode("latin_1")
    elif vr in _CHARSET_VRS and codec is not None and b"\x1b" not in data:
        text = data.decode(codec, errors="replace")
    else:
        return None
    # PS3.5 6.4: LT, ST, UT and UR have one value; a backslash in them is text.
    if vr in _SINGLE_VALUED_VRS:
        return [text.strip(_PADDING)]
    return [value.strip(_PADDING) for value in text.split("\\")]


def _text_codec(ds: Dataset) -> str | None:
    """Return the one Python codec of `ds`'s text, None where pydicom must decode it."""
    encodings = ds.original_character_set
    if isinstance(encodings, str):
        encodings = [encodings]
    if len(encodings) != 1 or encodings[0].startswith("iso2022"):
        return None  # code extensions switch character sets with escape sequences
    try:
        return codecs.lookup(encodings[0]).name
    except LookupError:
        return None


@functools.lru_cache(maxsize=8192)
def _dictionary_vr(tag: int) -> str:
    return dictionary_VR(tag)


def _as_list(value: Any) -> list[Any]:
    if type(value) is list:
        return value
    if isinstance(value, MultiValue | Sequence | list | tuple):
        return list(value)
    return [value]


def _encode_values(vr: str, values: list[Any], zone: datetime.tzinfo) -> Any:
    """Encode the value(s) of one non-sequence, non-PN element; None drops the element."""
    suffix = _SUFFIX_BY_VR[vr]
    encoded: list[Any]
    if suffix == "keyword":
        if "nan" in values:
            # Kaapana drops an element whose value list holds the exact string "nan".
            return None
        if vr == "AT":
            encoded = [f"{int(v):08X}" for v in values]
        else:
            encoded = [str(v).strip(_PADDING) for v in values]
        if not any(encoded):
            return None
    else:
        # Each value is parsed on its own: an unparseable one is dropped instead of failing the
        # series (Kaapana) or being stored as a string under a numeric key (a mapping conflict).
        parse = _PARSERS[suffix]
        parsed = (parse(v, zone) for v in values)
        encoded = [v for v in parsed if v is not None]
        if not encoded:
            return None
    return encoded[0] if len(encoded) == 1 else encoded


def _parse_integer(value: Any, _zone: datetime.tzinfo) -> int | None:
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    # Kaapana's rule: an IS of "0.5" becomes 0, via float.
    number = _parse_float(value, _zone)
    return None if number is None else int(number)


def _parse_float(value: Any, _zone: datetime.tzinfo) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    # NaN and infinities are not valid JSON and OpenSearch rejects them.
    return number if math.isfinite(number) else None


def _parse_date(value: Any, _zone: datetime.tzinfo) -> str | None:
    match = _DA_RE.fullmatch(str(value).strip())
    if match is None:
        return None
    try:
        return datetime.date(*map(int, match.groups())).isoformat()
    except ValueError:
        return None


def _parse_time(value: Any, _zone: datetime.tzinfo) -> str | None:
    # TM has no time zone in DICOM, so it is formatted, never converted.
    match = _TM_RE.fullmatch(str(value).strip())
    if match is None:
        return None
    hour, minute, second, fraction = match.groups()
    try:
        time = datetime.time(int(hour), int(minute or 0), int(second or 0), _microseconds(fraction))
    except ValueError:
        return None
    return time.isoformat(timespec="microseconds")


def _parse_datetime(value: Any, zone: datetime.tzinfo) -> str | None:
    match = _DT_RE.fullmatch(str(value).strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    if fraction is not None and second is None:
        return None
    hours, minutes, seconds = (int(part or 0) for part in (hour, minute, second))
    try:
        local = datetime.datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            hours,
            minutes,
            seconds,
            _microseconds(fraction),
        )
    except ValueError:
        return None
    if hour is None:
        # Date precision has no wall-clock time to shift; Kaapana moved such values to the
        # previous evening in summer.
        return _format_datetime(local)
    value_zone = zone if offset is None else _parse_offset(offset)
    if value_zone is None:
        return None
    try:
        return _format_datetime(local.replace(tzinfo=value_zone).astimezone(_UTC))
    except OverflowError:
        return None


_PARSERS: Final = {
    "integer": _parse_integer,
    "float": _parse_float,
    "date": _parse_date,
    "time": _parse_time,
    "datetime": _parse_datetime,
}


def _parse_offset(text: str) -> datetime.timezone | None:
    """Parse a DICOM UTC offset ``&ZZXX`` (PS3.3 C.12.1.1.8: -1200 to +1400)."""
    match = _OFFSET_RE.fullmatch(text.strip())
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    if int(hours) > 14 or int(minutes) >= 60:
        return None
    delta = datetime.timedelta(hours=int(hours), minutes=int(minutes))
    return datetime.timezone(-delta if sign == "-" else delta)


def _person_name_fields(key: str, value: Any) -> dict[str, Any]:
    """Return one key per present PN component group; multiple names stay an array."""
    names = _as_list(value)
    groups: list[list[str]] = [[], [], []]
    for name in names:
        components = name.components if isinstance(name, PersonName) else str(name).split("=")
        for index, group in enumerate(groups):
            group.append(components[index].strip() if index < len(components) else "")
    # Arrays keep one entry per name (an empty string where a group is missing) so the n-th
    # alphabetic and n-th ideographic value describe the same person.
    return {
        f"{key}_{suffix}": values[0] if len(values) == 1 else values
        for suffix, values in zip(_PN_GROUPS, groups, strict=True)
        if any(values)
    }


def _dataset_zone(ds: Dataset, site_timezone: str) -> datetime.tzinfo:
    """Return the zone for date-times without an offset: (0008,0201), else the site's."""
    site_zone = zoneinfo.ZoneInfo(site_timezone)
    offset = ds.get("TimezoneOffsetFromUTC")
    if offset is None or isinstance(offset, bytes):
        return site_zone
    zone = _parse_offset(str(offset))
    if zone is None:
        logger.debug("invalid TimezoneOffsetFromUTC; using site time zone %s", site_timezone)
        return site_zone
    return zone


def _first_present(document: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, str]:
    """Return the value of the first of `keys` present and its attribute name."""
    for key in keys:
        value = document.get(key)
        if isinstance(value, str):
            return value, key[9:].rsplit("_", 1)[0]
    return None, ""


def _series_timestamp(
    document: dict[str, Any], zone: datetime.tzinfo, arrived: datetime.datetime
) -> tuple[datetime.datetime, str]:
    """Return the series time in UTC and a description of the attributes it came from."""
    acquired = document.get(_ACQUISITION_DATETIME)
    if isinstance(acquired, list):
        acquired = acquired[0]
    if isinstance(acquired, str):
        # Already UTC: converting again was Kaapana's double-conversion bug.
        return datetime.datetime.fromisoformat(acquired).replace(tzinfo=_UTC), (
            "AcquisitionDateTime_datetime"
        )
    date_text, date_keyword = _first_present(document, _DATE_KEYS)
    time_text, time_keyword = _first_present(document, _TIME_KEYS)
    # Missing parts come from the arrival time seen on the same wall clock as the dataset.
    local_arrival = arrived.astimezone(zone)
    date = local_arrival.date() if date_text is None else datetime.date.fromisoformat(date_text)
    time = local_arrival.time() if time_text is None else datetime.time.fromisoformat(time_text)
    local = datetime.datetime.combine(date, time).replace(tzinfo=zone)
    used = (date_keyword or "date not found -> arriving date") + " + "
    used += time_keyword or "time not found -> arriving time"
    try:
        return local.astimezone(_UTC), used
    except OverflowError:  # a date at the edge of the calendar, e.g. 00010101 east of UTC
        return arrived, "date not found -> arriving date + time not found -> arriving time"


def _derived_patient_age(document: dict[str, Any], on: datetime.date) -> int | None:
    """Return the age in years from PatientBirthDate (preferred) or PatientAge."""
    from_age = _age_from_age_string(document.get(_PATIENT_AGE))
    birth_date = document.get(_BIRTH_DATE)
    if isinstance(birth_date, str):
        born = datetime.date.fromisoformat(birth_date)
        years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
        if years >= 0:
            if from_age is not None and from_age != years:
                logger.debug("PatientBirthDate and PatientAge disagree; using PatientBirthDate")
            return years
    return from_age


def _age_from_age_string(value: Any) -> int | None:
    # AS is nnnD, nnnW, nnnM or nnnY (PS3.5 table 6.2-1); Kaapana divided weeks by 7.
    match = _AS_RE.fullmatch(value.strip().upper()) if isinstance(value, str) else None
    return None if match is None else int(match[1]) // _DAYS_PER_AGE_UNIT[match[2]]


def _annotation_fields(ds: Dataset, modality: str) -> dict[str, Any]:
    """Return the SEG/RTSTRUCT label fields Kaapana adds (kaapana-behaviour.md 3.4)."""
    if modality == "SEG":
        sequence_keyword, label_keyword = "SegmentSequence", "SegmentLabel"
    else:
        sequence_keyword, label_keyword = "StructureSetROISequence", "ROIName"
    labels: list[str] = []
    algorithm: dict[str, str] = {}
    for item in ds.get(sequence_keyword) or ():
        label = item.get(label_keyword)
        if isinstance(label, str) and label.strip():
            # Commas would break the comma-joined AnnotationLabelsList.
            labels.append(label.strip().replace(",", "-"))
        found = {
            key: str(item.get(keyword)).strip()
            for key, keyword in (
                (SEG_ALGORITHM_TYPE, "SegmentAlgorithmType"),
                (SEG_ALGORITHM_NAME, "SegmentAlgorithmName"),
            )
            if item.get(keyword)
        }
        if found:
            algorithm = found
    fields: dict[str, Any] = {
        KEY_ANNOTATION_LABEL: labels,
        KEY_ANNOTATION_LABELS: ",".join(sorted(labels)) or None,
    }
    if modality == "SEG" and algorithm:
        fields[KEY_SEGMENT_ALGORITHM] = algorithm
    return fields


def _microseconds(fraction: str | None) -> int:
    return int((fraction or "0").ljust(6, "0"))


def _format_datetime(value: datetime.datetime) -> str:
    return value.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
