"""QIDO-RS queries (PS3.18 §8.3.4, §10.6): parsing the query string into a :class:`QidoQuery`
the index runs, and composing the DICOM JSON answer from the texts it returns.

Matching kinds (PS3.4 C.2.2.2): universal (``PatientName=``), single value, UID list
(``StudyInstanceUID=1.2,1.3``), wildcard (``*`` and ``?``; case-insensitive for person names,
as viewers expect) and range (``StudyDate=20240101-20241231``, open at either end).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR

from kp_gateway.dicomweb.attributes import (
    LEVEL_TAGS,
    MODALITIES_IN_STUDY,
    NUMBER_OF_SERIES_RELATED_INSTANCES,
    NUMBER_OF_STUDY_RELATED_INSTANCES,
    NUMBER_OF_STUDY_RELATED_SERIES,
    RETRIEVE_URL,
    Level,
    tag_of,
)
from kp_gateway.errors import BadQueryError

# Without ``limit`` an answer holds at most this many results (and says so in a Warning).
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
_CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}
_RANGE_VRS = {"DA", "TM", "DT"}
_NUMBER_VRS = {"IS", "US", "UL", "SS", "SL", "DS", "FL", "FD"}
# Which levels' attributes a search at each level may match on (PS3.18 table 10.6.1-2).
_SEARCHABLE = {
    Level.STUDY: (Level.STUDY,),
    Level.SERIES: (Level.STUDY, Level.SERIES),
    Level.INSTANCE: (Level.STUDY, Level.SERIES, Level.INSTANCE),
}
UID_TAGS = {
    "0020000D": Level.STUDY,  # StudyInstanceUID
    "0020000E": Level.SERIES,  # SeriesInstanceUID
    "00080018": Level.INSTANCE,  # SOPInstanceUID
}


class MatchKind(enum.StrEnum):
    UNIVERSAL = "universal"
    SINGLE = "single"
    LIST = "list"
    WILDCARD = "wildcard"
    RANGE = "range"


@dataclass(frozen=True, slots=True)
class Match:
    """One matching key: `values` is the value, the UIDs of a list, or (low, high) of a range
    where ``""`` is an open end."""

    tag: str
    level: Level
    vr: str
    kind: MatchKind
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class QidoQuery:
    """A QIDO-RS search at one `level`, within one project's series."""

    level: Level
    project: str
    matches: tuple[Match, ...] = ()
    modalities_in_study: tuple[str, ...] = ()
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    limit_given: bool = False
    fuzzy: bool = False
    ignored: tuple[str, ...] = field(default=())

    def uid(self, level: Level) -> tuple[str, ...]:
        """The UIDs the query names at `level` (path or single/list match), or ()."""
        for m in self.matches:
            if (
                m.level is level
                and m.tag in UID_TAGS
                and m.kind in (MatchKind.SINGLE, MatchKind.LIST)
            ):
                return m.values
        return ()


def _int(raw: str, name: str, lo: int, hi: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise BadQueryError(f"{name} must be an integer, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise BadQueryError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _level_of(tag: str) -> Level | None:
    for level, tags in LEVEL_TAGS.items():
        if tag in tags:
            return level
    return None


def _match(tag: str, level: Level, raw: str) -> Match:
    try:
        vr = dictionary_VR(int(tag, 16))
    except KeyError:
        vr = "UN"
    if raw == "":
        return Match(tag, level, vr, MatchKind.UNIVERSAL)
    if vr == "UI":
        uids = tuple(u.strip() for u in raw.replace("\\", ",").split(","))
        if any(not u or not all(c.isdigit() or c == "." for c in u) for u in uids):
            raise BadQueryError(f"{tag}: not a UID list: {raw[:80]!r}")
        return Match(tag, level, vr, MatchKind.LIST if len(uids) > 1 else MatchKind.SINGLE, uids)
    if vr in _RANGE_VRS and "-" in raw:
        low, _, high = raw.partition("-")
        if "-" in high or not (low or high):
            raise BadQueryError(f"{tag}: not a range: {raw[:80]!r}")
        for end in (low, high):
            if end and not all(c.isdigit() or c in ".+" for c in end):
                raise BadQueryError(f"{tag}: not a {vr} value: {end[:40]!r}")
        return Match(tag, level, vr, MatchKind.RANGE, (low, high))
    if vr in _NUMBER_VRS:
        try:
            float(raw)
        except ValueError:
            raise BadQueryError(f"{tag}: not a number: {raw[:40]!r}") from None
        return Match(tag, level, vr, MatchKind.SINGLE, (raw,))
    if "*" in raw or "?" in raw:
        return Match(tag, level, vr, MatchKind.WILDCARD, (raw,))
    if "\\" in raw:
        return Match(tag, level, vr, MatchKind.LIST, tuple(raw.split("\\")))
    return Match(tag, level, vr, MatchKind.SINGLE, (raw,))


def parse_query(
    level: Level,
    project: str,
    params: Iterable[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> QidoQuery:
    """The query string of a QIDO-RS request at `level`, with the UIDs of its path.

    Raises
    ------
    BadQueryError
        An unknown attribute, a value its VR cannot hold, a bad range, limit or offset.
    """
    matches: list[Match] = []
    modalities: tuple[str, ...] = ()
    limit, offset, limit_given, fuzzy = DEFAULT_LIMIT, 0, False, False
    ignored: list[str] = []
    if study_uid is not None:
        matches.append(_match("0020000D", Level.STUDY, study_uid))
    if series_uid is not None:
        matches.append(_match("0020000E", Level.SERIES, series_uid))
    for key, raw in params:
        if key == "limit":
            limit, limit_given = _int(raw, "limit", 1, MAX_LIMIT), True
        elif key == "offset":
            offset = _int(raw, "offset", 0, 10**9)
        elif key == "fuzzymatching":
            if raw not in ("true", "false"):
                raise BadQueryError(f"fuzzymatching must be true or false, got {raw[:20]!r}")
            fuzzy = raw == "true"
        elif key == "includefield":
            for name in raw.split(","):
                if name != "all" and tag_of(name.strip()) is None:
                    raise BadQueryError(f"includefield: unknown attribute {name[:64]!r}")
        else:
            tag = tag_of(key)
            if tag is None:
                raise BadQueryError(f"unknown attribute {key[:64]!r}")
            if tag == MODALITIES_IN_STUDY:
                modalities = tuple(m for m in raw.replace("\\", ",").split(",") if m)
                continue
            tag_level = UID_TAGS.get(tag) or _level_of(tag)
            if tag_level is None or tag_level not in _SEARCHABLE[level]:
                ignored.append(key)  # PS3.18: an unsupported key is ignored, with a Warning
                continue
            matches.append(_match(tag, tag_level, raw))
    return QidoQuery(
        level=level,
        project=project,
        matches=tuple(matches),
        modalities_in_study=modalities,
        limit=limit,
        offset=offset,
        limit_given=limit_given,
        fuzzy=fuzzy,
        ignored=tuple(ignored),
    )


@dataclass(frozen=True, slots=True)
class QidoRow:
    """One result as the index returns it: the JSON texts of its levels and the counts."""

    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None
    study_json: str = "{}"
    series_json: str = "{}"
    instance_json: str = "{}"
    modalities: Sequence[str] = ()
    study_series: int | None = None
    study_instances: int | None = None
    series_instances: int | None = None


def _element(tag: str, vr: str, values: Sequence[object]) -> str:
    body = {"vr": vr, "Value": list(values)} if values else {"vr": vr}
    return f'"{tag}":{json.dumps(body, separators=(",", ":"))}'


def _inner(text: str) -> str:
    return text.strip()[1:-1]


def result_json(level: Level, row: QidoRow, root: str) -> str:
    """One QIDO result: the stored attributes of its level and those above it, the
    attributes the index counts, and its RetrieveURL under `root`."""
    parts = [_inner(row.study_json)]
    url = f"{root}/studies/{row.study_uid}"
    if level is Level.STUDY:
        parts.append(_element(MODALITIES_IN_STUDY, "CS", sorted(set(row.modalities))))
        parts.append(_element(NUMBER_OF_STUDY_RELATED_SERIES, "IS", [row.study_series or 0]))
        parts.append(_element(NUMBER_OF_STUDY_RELATED_INSTANCES, "IS", [row.study_instances or 0]))
    else:
        parts.append(_inner(row.series_json))
        url += f"/series/{row.series_uid}"
        if level is Level.SERIES:
            count = [row.series_instances or 0]
            parts.append(_element(NUMBER_OF_SERIES_RELATED_INSTANCES, "IS", count))
        else:
            parts.append(_inner(row.instance_json))
            url += f"/instances/{row.sop_uid}"
    parts.append(_element(RETRIEVE_URL, "UR", [url]))
    return "{" + ",".join(p for p in parts if p) + "}"


def response_json(level: Level, rows: Sequence[QidoRow], root: str) -> str:
    """The ``application/dicom+json`` body of a search."""
    return "[" + ",".join(result_json(level, row, root) for row in rows) + "]"


def warnings_for(query: QidoQuery, returned: int, more: bool) -> list[str]:
    """``Warning`` header values PS3.18 §8.3.4 asks for: ignored keys, a truncated answer."""
    out = [
        f"299 kp-gateway: The attribute {key} is not supported for matching and was ignored"
        for key in query.ignored
    ]
    if more:
        out.append(
            "299 kp-gateway: There are more results than the "
            f"{'limit' if query.limit_given else 'default limit'} of {query.limit}; "
            f"ask with offset={query.offset + returned}"
        )
    return out


__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "Match",
    "MatchKind",
    "QidoQuery",
    "QidoRow",
    "parse_query",
    "response_json",
    "result_json",
    "warnings_for",
]
