"""Parsing and validation of the metadata users give: DICOM tags and segmentation labels.

Keys are ``"gggg|eeee"`` (hex, any case) or DICOM keywords; values are JSON strings, numbers,
``null`` (empty value) or lists (multi-valued). Every value is checked against its VR with
pydicom's own validators in RAISE mode and against the dictionary VM, so a bad value is a
:class:`~kp_gateway.errors.ConversionError` at planning time, never a non-conformant file.
Segment labels come from ``seg_info.json`` or from nnU-Net's ``dataset.json`` ``labels``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom import config
from pydicom.datadict import (
    dictionary_has_tag,
    dictionary_VM,
    dictionary_VR,
    keyword_for_tag,
    tag_for_keyword,
)
from pydicom.valuerep import format_number_as_ds, validate_value

from kp_gateway.errors import ConversionError

__all__ = [
    "DICOM_IMAGE_MODALITIES",
    "MANAGED_KEYWORDS",
    "Code",
    "LabelSpec",
    "SegSpec",
    "TagValue",
    "check_keys",
    "merge_tags",
    "modality_for_channel",
    "parse_nnunet_labels",
    "parse_seg_info",
    "parse_tags",
    "validated",
]

_HEX_KEY = re.compile(r"^([0-9a-fA-F]{4})\|([0-9a-fA-F]{4})$")

# VRs whose values travel as decimal/text strings in DICOM; numbers are formatted for them.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR"}
    | {"UT"}
)
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
# Only these VRs may carry several values separated by a backslash (PS3.5 6.4).
_NO_BACKSLASH_SPLIT = frozenset({"LT", "ST", "UT", "UR"})

# Attributes the converter derives from the pixel data, the geometry or the identity of the
# instance. Letting a user override them would produce files whose header lies about their
# pixels or collide with other instances, so they are refused.
MANAGED_KEYWORDS = frozenset(
    {
        "SOPClassUID",
        "SOPInstanceUID",
        "SpecificCharacterSet",
        "InstanceNumber",
        "FrameOfReferenceUID",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "SliceLocation",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
    }
)

# Modality defined terms of PS3.3 C.7.3.1.1.1 that label *images*; non-image modalities such as
# SEG, SR or RTSTRUCT would make a converted image series lie about its content.
DICOM_IMAGE_MODALITIES = frozenset(
    {
        "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CR", "CT", "DG", "DOC", "DX", "ECG", "EPS",
        "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "LEN", "LS", "MG",
        "MR", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV", "OSS", "OT",
        "PA", "PT", "PX", "RF", "RG", "RWV", "SM", "SMR", "SRF", "STAIN", "TG", "US", "VA",
        "XA", "XC",
    }
)  # fmt: skip

# Channel names that are common spellings of a modality rather than the DICOM code itself.
_MODALITY_ALIASES = {"MRI": "MR", "MRT": "MR", "PET": "PT"}

Scalar = str | int | float

_GROUND_TRUTH = "ground truth"
# Generic codes for a segment that names no code of its own (SNOMED CT, PS3.16 CID 7150/7151).
_CATEGORY_ANATOMY = ("91723000", "SCT", "Anatomical Structure")
_TYPE_TISSUE = ("85756007", "SCT", "Tissue")


@dataclass(frozen=True, slots=True)
class TagValue:
    """One validated user attribute, ready for ``Dataset.add_new``."""

    tag: int
    keyword: str
    vr: str
    value: Scalar | tuple[Scalar, ...] | None


def validated(vr: str, value: str, what: str) -> str:
    """Return `value` if it is valid for `vr`, else raise ConversionError naming `what`.

    Blocking and CPU-bound; call in a worker process.
    """
    try:
        validate_value(vr, value, config.RAISE)
    except ValueError as exc:
        raise ConversionError(f"{what}: {value!r} is not a valid {vr} value ({exc})") from exc
    return value


def modality_for_channel(channel_name: str) -> str | None:
    """Return the DICOM Modality a nnU-Net channel name denotes, or None if it names none.

    Blocking and CPU-bound; call in a worker process.
    """
    name = channel_name.strip().upper()
    name = _MODALITY_ALIASES.get(name, name)
    return name if name in DICOM_IMAGE_MODALITIES else None


def _resolve_key(key: str, where: str) -> tuple[int, str]:
    match = _HEX_KEY.match(key)
    if match:
        tag = int(match.group(1) + match.group(2), 16)
    else:
        found = tag_for_keyword(key)
        if found is None:
            raise ConversionError(
                f"{where}: unknown tag key {key!r} (use 'gggg|eeee' or a DICOM keyword)"
            )
        tag = found
    group = tag >> 16
    if group % 2 == 1:
        raise ConversionError(f"{where}: private tag {key!r} is not supported")
    if not dictionary_has_tag(tag) or group in (0x0000, 0x0002):
        raise ConversionError(f"{where}: unknown tag key {key!r}")
    keyword = keyword_for_tag(tag)
    if keyword in MANAGED_KEYWORDS:
        raise ConversionError(
            f"{where}: {key!r} ({keyword}) is set by the converter and cannot be overridden"
        )
    return tag, keyword


def _vm_allows(vm: str, count: int) -> bool:
    # Dictionary VMs look like "1", "3", "1-3", "1-n", "2-2n" (PS3.6 section 6).
    if "-" not in vm:
        return count == int(vm)
    low, high = vm.split("-", 1)
    if count < int(low):
        return False
    if high.endswith("n"):
        step = int(high[:-1] or "1")
        return count % step == 0
    return count <= int(high)


def _convert_item(item: object, vr: str, what: str) -> Scalar:
    if isinstance(item, bool) or not isinstance(item, str | int | float):
        raise ConversionError(f"{what}: value {item!r} must be a string or a number")
    if vr in _TEXT_VRS:
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ConversionError(f"{what}: {item!r} is not a finite number")
            if vr == "IS" and item.is_integer():
                item = int(item)
            elif vr == "DS":
                item = format_number_as_ds(item)
            else:
                raise ConversionError(f"{what}: {item!r} is not a valid {vr} value")
        return validated(vr, str(item), what)
    if vr in _INT_VRS or vr in _FLOAT_VRS:
        number: int | float
        try:
            number = (int if vr in _INT_VRS else float)(item)
        except ValueError as exc:
            raise ConversionError(f"{what}: {item!r} is not a valid {vr} value") from exc
        if vr in _INT_VRS and isinstance(item, float) and not item.is_integer():
            raise ConversionError(f"{what}: {item!r} is not a valid {vr} value")
        try:
            validate_value(vr, number, config.RAISE)
        except ValueError as exc:
            raise ConversionError(f"{what}: {item!r} is not a valid {vr} value ({exc})") from exc
        return number
    raise ConversionError(f"{what}: attributes with VR {vr} cannot be set from JSON")


def parse_tags(raw: object, where: str) -> tuple[TagValue, ...]:
    """Parse one JSON object of tags (``global_tags`` or one ``series_tags`` entry).

    Blocking and CPU-bound; call in a worker process.

    Parameters
    ----------
    raw
        The decoded JSON value; must be an object mapping tag keys to values.
    where
        Names the source (file and JSON path) in error messages.

    Raises
    ------
    ConversionError
        For a non-object, an unknown or private key, a converter-managed attribute, a key given
        twice (e.g. as keyword and as hex), a value that fails its VR or VM, or an image
        Modality that is not an image modality.
    """
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{where}: expected a JSON object of tags, got {type(raw).__name__}")
    seen: dict[int, str] = {}
    out: list[TagValue] = []
    for key, value in raw.items():
        tag, keyword = _resolve_key(str(key), where)
        if tag in seen:
            raise ConversionError(f"{where}: {key!r} and {seen[tag]!r} name the same attribute")
        seen[tag] = str(key)
        vr = dictionary_VR(tag)
        what = f"{where}: {key!r} ({keyword})"
        converted: Scalar | tuple[Scalar, ...] | None
        if value is None:
            converted = None
        else:
            items: list[object]
            if isinstance(value, list):
                items = list(value)
            elif isinstance(value, str) and "\\" in value and vr not in _NO_BACKSLASH_SPLIT:
                items = list(value.split("\\"))
            else:
                items = [value]
            if not _vm_allows(dictionary_VM(tag), len(items)):
                raise ConversionError(
                    f"{what}: {len(items)} value(s) given, the dictionary allows VM "
                    f"{dictionary_VM(tag)}"
                )
            values = tuple(_convert_item(item, vr, what) for item in items)
            converted = values[0] if len(values) == 1 else values
        if keyword == "Modality" and converted not in DICOM_IMAGE_MODALITIES:
            raise ConversionError(f"{what}: {converted!r} is not a DICOM image modality")
        out.append(TagValue(tag=tag, keyword=keyword, vr=vr, value=converted))
    return tuple(out)


def merge_tags(*layers: Iterable[TagValue]) -> tuple[TagValue, ...]:
    """Merge tag layers; a later layer overrides an earlier one attribute by attribute.

    Blocking and CPU-bound; call in a worker process.
    """
    merged: dict[int, TagValue] = {}
    for layer in layers:
        for item in layer:
            merged[item.tag] = item
    return tuple(merged[tag] for tag in sorted(merged))


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept from ``seg_info.json`` or one of the generic defaults."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True, slots=True)
class LabelSpec:
    """One declared label of a label map; becomes one SEG segment."""

    value: int
    name: str
    property_category: Code
    property_type: Code


@dataclass(frozen=True, slots=True)
class SegSpec:
    """How a case's label map becomes a SEG; ``algorithm`` None means MANUAL."""

    labels: tuple[LabelSpec, ...]
    algorithm: str | None
    body_part: str | None


def check_keys(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    """Raise ConversionError naming the keys of `obj` that are not `allowed`."""
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ConversionError(f"{where}: unknown key(s) {unknown}; expected {sorted(allowed)}")


def _code(raw: object, where: str) -> Code:
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{where}: expected an object with scheme, value and meaning")
    check_keys(raw, {"scheme", "value", "meaning"}, where)
    parts = [raw.get(key) for key in ("value", "scheme", "meaning")]
    if not all(isinstance(part, str) and part for part in parts):
        raise ConversionError(f"{where}: scheme, value and meaning must be non-empty strings")
    value, scheme, meaning = (str(part) for part in parts)
    validated("SH", scheme, f"{where}.scheme")
    validated("UC", value, f"{where}.value")
    validated("LO", meaning, f"{where}.meaning")
    return Code(value=value, scheme=scheme, meaning=meaning)


def _label_spec(value: int, name: str, raw: Mapping[str, Any], where: str) -> LabelSpec:
    validated("LO", name, f"{where}: label name")
    category = _code(raw["category"], f"{where}.category") if "category" in raw else None
    prop = _code(raw["code"], f"{where}.code") if "code" in raw else None
    return LabelSpec(
        value=value,
        name=name,
        property_category=category or Code(*_CATEGORY_ANATOMY),
        property_type=prop or Code(*_TYPE_TISSUE),
    )


def _label_value(raw: object, where: str) -> int:
    if isinstance(raw, bool):
        raise ConversionError(f"{where}: label value {raw!r} is not an integer")
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw.strip())
    if not isinstance(raw, int) or not 0 <= raw <= 65535:
        raise ConversionError(f"{where}: label value {raw!r} is not an integer in 0..65535")
    return raw


def parse_seg_info(raw: object, where: str, warnings: list[str]) -> SegSpec:
    """Parse ``seg_info.json``; non-fatal remarks are appended to `warnings`.

    Blocking and CPU-bound; call in a worker process.

    Raises
    ------
    ConversionError
        For unknown keys, labels that are not integers in 0..65535 or are declared twice,
        names or codes that fail their VR, or a list without any non-background label.
    """
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{where}: expected a JSON object")
    check_keys(raw, {"algorithm", "task_body_part", "seg_info"}, where)
    entries = raw.get("seg_info")
    if not isinstance(entries, list) or not entries:
        raise ConversionError(f"{where}: 'seg_info' must be a non-empty list of labels")
    labels: dict[int, LabelSpec] = {}
    for index, entry in enumerate(entries):
        item_where = f"{where}: seg_info[{index}]"
        if not isinstance(entry, Mapping):
            raise ConversionError(f"{item_where}: expected an object")
        check_keys(entry, {"label_name", "label_int", "code", "category"}, item_where)
        name = entry.get("label_name")
        if not isinstance(name, str) or not name.strip():
            raise ConversionError(f"{item_where}: 'label_name' must be a non-empty string")
        value = _label_value(entry.get("label_int"), item_where)
        if value == 0:
            continue  # background is not a segment
        if value in labels:
            raise ConversionError(f"{item_where}: label value {value} is declared twice")
        labels[value] = _label_spec(value, name, entry, item_where)
    if not labels:
        raise ConversionError(f"{where}: 'seg_info' declares no label other than 0")
    algorithm = raw.get("algorithm")
    if algorithm is not None and (not isinstance(algorithm, str) or not algorithm.strip()):
        raise ConversionError(f"{where}: 'algorithm' must be a non-empty string")
    if algorithm is None:
        warnings.append(f"{where}: no 'algorithm'; segments are recorded as MANUAL")
    elif algorithm.strip().lower() == _GROUND_TRUTH:
        algorithm = None
    else:
        validated("LO", algorithm, f"{where}: algorithm")
    body_part = raw.get("task_body_part")
    if body_part is not None:
        if not isinstance(body_part, str):
            raise ConversionError(f"{where}: 'task_body_part' must be a string")
        body_part = validated("CS", body_part.strip().upper(), f"{where}: task_body_part")
    return SegSpec(labels=tuple(labels.values()), algorithm=algorithm, body_part=body_part)


def parse_nnunet_labels(raw: object, where: str) -> SegSpec:
    """Parse nnU-Net v2 ``labels`` (name -> value); background and "ignore" are no segments.

    Blocking and CPU-bound; call in a worker process.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise ConversionError(f"{where}: 'labels' must be a non-empty object name -> integer")
    if all(str(key).strip().isdigit() for key in raw):
        raise ConversionError(
            f"{where}: 'labels' maps integers to names, which is nnU-Net v1; v2 maps names to "
            "integers (nnUNetv2_convert_old_nnUNet_dataset converts it)"
        )
    labels: dict[int, LabelSpec] = {}
    for name, value in raw.items():
        if isinstance(value, list):
            raise ConversionError(
                f"{where}: label {name!r} is a region (list of values); region-based labels "
                "cannot be converted to a SEG"
            )
        number = _label_value(value, f"{where}: labels[{name!r}]")
        # nnU-Net v2 reserves the name "ignore" for unannotated voxels; it is not a structure.
        if number == 0 or name == "ignore":
            continue
        if number in labels:
            raise ConversionError(f"{where}: label value {number} is declared twice")
        labels[number] = _label_spec(number, name, {}, f"{where}: labels[{name!r}]")
    if not labels:
        raise ConversionError(f"{where}: 'labels' declares no label other than background")
    return SegSpec(labels=tuple(labels.values()), algorithm=None, body_part=None)
