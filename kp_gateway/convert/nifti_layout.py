"""Discovery of NIfTI datasets in a folder tree and exact matching of their files.

Two layouts are recognised (user documentation, "NIfTI data"):

* **basic**: a folder with NIfTI cases, an optional ``meta_data.json`` (``global_tags``,
  ``series_tags``) and, when there are segmentations, a ``seg_info.json``. Segmentations sit
  beside the cases as ``<case>_segmentation.nii(.gz)`` / ``<case>_seg.nii(.gz)`` (option one) or
  in ``segs/`` with the same name as the case in ``cases/`` (option two).
* **nnU-Net v2**: a folder with ``dataset.json`` and ``imagesTr``/``imagesTs`` holding
  ``<case>_<XXXX><file_ending>`` channel files and ``labelsTr``/``labelsTs`` holding
  ``<case><file_ending>`` label maps. An optional ``meta_data.json`` beside ``dataset.json``
  adds tags the same way as in the basic layout.

Matching is exact: a case id is the file name minus ``.nii``/``.nii.gz``, a segmentation belongs to
the one case whose id it names, and a ``series_tags`` key names one file. Anything ambiguous or
orphaned raises :class:`~kp_gateway.errors.ConversionError` naming the files; nothing is guessed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from kp_gateway.convert.nifti_tags import (
    Code,
    LabelSpec,
    SegSpec,
    TagValue,
    check_keys,
    merge_tags,
    modality_for_channel,
    parse_nnunet_labels,
    parse_seg_info,
    parse_tags,
    validated,
)
from kp_gateway.errors import ConversionError

__all__ = [
    "CasePlan",
    "Code",
    "ImageSpec",
    "LabelSpec",
    "Layout",
    "NiftiPlan",
    "SegSpec",
    "is_nifti_tree",
    "nifti_stem",
    "plan_nifti_tree",
]

logger = logging.getLogger(__name__)

_SEG_SUFFIX = re.compile(r"^(?P<case>.+)_(?:seg|segmentation)$", re.IGNORECASE)
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_NNUNET_FOLDERS = (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"))
_NNUNET_NAMES = frozenset(name for pair in _NNUNET_FOLDERS for name in pair)
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
# meta_data.json, seg_info.json and dataset.json describe tags and labels: a few KB, rarely more
# than a few hundred KB. Anything past 16 MiB is not metadata and is refused before reading.
_MAX_JSON_BYTES = 16 * 1024 * 1024


class Layout(StrEnum):
    """Which documented layout a case came from."""

    BASIC = "basic"
    NNUNET_V2 = "nnunet-v2"


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """One NIfTI image that becomes one DICOM image series."""

    path: Path
    role: str  # dataset-relative name without suffix; stable input for the series UIDs
    series_number: int
    series_description: str
    modality: str
    tags: tuple[TagValue, ...]  # global then series_tags, already validated


@dataclass(frozen=True, slots=True)
class CasePlan:
    """What one case converts to: its image series (channel 0 first) and an optional SEG."""

    case_id: str
    dataset: str  # dataset folder relative to the plan root, "." for the root itself
    layout: Layout
    series: tuple[ImageSpec, ...]
    label: Path | None
    seg: SegSpec | None
    output_name: str  # folder name under out_dir, unique within the plan

    @property
    def images(self) -> tuple[Path, ...]:
        """The NIfTI image files, in series order."""
        return tuple(spec.path for spec in self.series)


@dataclass(frozen=True, slots=True)
class NiftiPlan:
    """Every case found under ``root``, in a stable order, plus planning warnings."""

    root: Path
    cases: tuple[CasePlan, ...]
    warnings: tuple[str, ...] = field(default=())


def nifti_stem(name: str) -> str | None:
    """Return `name` without ``.nii``/``.nii.gz`` (any case), or None if it is not NIfTI.

    Blocking and CPU-bound; call in a worker process.
    """
    lower = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _hidden(name: str) -> bool:
    # macOS zips carry __MACOSX/ and ._* resource forks that are not images.
    return name.startswith(".") or name == "__MACOSX"


def is_nifti_tree(root: Path) -> bool:
    """Return True if `root` holds at least one NIfTI file (hidden entries ignored).

    Blocking (walks the tree); call in a worker process. It does not validate the layout;
    :func:`plan_nifti_tree` does.
    """
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        if any(nifti_stem(f) is not None for f in filenames if not _hidden(f)):
            return True
    return False


class _Loader:
    """Reads the JSON files of one tree, naming files relative to its root in errors."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.warnings: list[str] = []

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if path != self.root else "."

    def json(self, path: Path) -> Any:
        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            # One pass with a set: linear in the keys (60,000 keys take milliseconds).
            seen: set[str] = set()
            dupes: set[str] = set()
            for key, _ in pairs:
                (dupes if key in seen else seen).add(key)
            if dupes:
                # json.loads silently keeps the last one; a lost tag is worse than an error.
                shown = sorted(dupes)
                more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
                raise ConversionError(f"{self.rel(path)}: duplicate key(s) {shown[:10]}{more}")
            return dict(pairs)

        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ConversionError(f"{self.rel(path)}: cannot read: {exc}") from exc
        if size > _MAX_JSON_BYTES:
            raise ConversionError(
                f"{self.rel(path)}: {size} bytes; metadata files are limited to {_MAX_JSON_BYTES}"
            )
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{self.rel(path)}: cannot read: {exc}") from exc
        try:
            return json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{self.rel(path)}: invalid JSON: {exc}") from exc

    def optional_json(self, folder: Path, *names: str) -> tuple[Path | None, Any]:
        # The user guide spells these both meta_data.json and meta-data.json.
        found = [folder / name for name in names if (folder / name).is_file()]
        if len(found) > 1:
            raise ConversionError(
                f"{self.rel(folder)}: both {' and '.join(p.name for p in found)} exist; keep one"
            )
        if not found:
            return None, None
        return found[0], self.json(found[0])


def _nifti_files(loader: _Loader, folder: Path) -> dict[str, Path]:
    """Map case stem to file for the NIfTI files directly in `folder`; stems must be unique."""
    by_stem: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if _hidden(entry.name) or not entry.is_file():
            continue
        stem = nifti_stem(entry.name)
        if stem is None:
            continue
        if stem in by_stem:
            raise ConversionError(
                f"ambiguous case {stem!r}: both {loader.rel(by_stem[stem])} and "
                f"{loader.rel(entry)} exist"
            )
        by_stem[stem] = entry
    return by_stem


def _output_name(dataset: str, case_id: str) -> str:
    name = case_id if dataset == "." else f"{dataset}/{case_id}"
    return _UNSAFE_NAME.sub("_", name.replace("/", "__"))


def _meta_tags(
    loader: _Loader, folder: Path, images: Mapping[str, Path], segs: Mapping[str, Path]
) -> tuple[tuple[TagValue, ...], dict[Path, tuple[TagValue, ...]]]:
    """Parse ``meta_data.json`` of `folder`; `images`/`segs` map dataset-relative ids to files."""
    path, raw = loader.optional_json(folder, "meta_data.json", "meta-data.json")
    if path is None:
        return (), {}
    where = loader.rel(path)
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{where}: expected a JSON object")
    check_keys(raw, {"global_tags", "series_tags"}, where)
    global_tags = parse_tags(raw.get("global_tags", {}), f"{where}: global_tags")
    if any(tag.keyword == "SeriesInstanceUID" for tag in global_tags):
        raise ConversionError(
            f"{where}: global_tags: SeriesInstanceUID would merge every case into one series"
        )
    series_raw = raw.get("series_tags", {})
    if not isinstance(series_raw, Mapping):
        raise ConversionError(f"{where}: 'series_tags' must be an object keyed by file name")
    per_file: dict[Path, tuple[TagValue, ...]] = {}
    claimed: dict[Path, str] = {}
    for key, tags in series_raw.items():
        # Exact match on the file name (or dataset-relative path) with or without the NIfTI
        # suffix: "Case00.nii" names Case00.nii.gz, and never Case001.nii.gz.
        ident = key.removeprefix("./")
        ident = nifti_stem(ident) or ident
        target = images.get(ident)
        if target is None:
            if ident in segs:
                raise ConversionError(
                    f"{where}: series_tags[{key!r}] names a segmentation; "
                    "segmentation metadata belongs in seg_info.json"
                )
            raise ConversionError(f"{where}: series_tags[{key!r}] matches no image file")
        if target in claimed:
            raise ConversionError(
                f"{where}: series_tags keys {claimed[target]!r} and {key!r} name the same file"
            )
        claimed[target] = key
        per_file[target] = parse_tags(tags, f"{where}: series_tags[{key!r}]")
    return global_tags, per_file


def _image_spec(
    loader: _Loader,
    dataset_dir: Path,
    path: Path,
    series_number: int,
    description: str,
    modality: str,
    tags: tuple[TagValue, ...],
) -> ImageSpec:
    if len(description) > 64:
        # SeriesDescription is LO (64 characters); keep the start, which carries the name.
        loader.warnings.append(f"{loader.rel(path)}: SeriesDescription truncated to 64 chars")
        description = description[:64]
    given = {tag.keyword: tag for tag in tags}
    if "Modality" in given and isinstance(given["Modality"].value, str):
        modality = given["Modality"].value
    rel = path.relative_to(dataset_dir).as_posix()
    return ImageSpec(
        path=path,
        role=nifti_stem(rel) or rel,
        series_number=series_number,
        series_description=description,
        modality=modality,
        tags=tags,
    )


def _check_case_id(loader: _Loader, case_id: str, tags: tuple[TagValue, ...], where: Path) -> None:
    # The case id becomes PatientID (LO) and PatientName (PN) unless the user sets them.
    given = {tag.keyword for tag in tags}
    if "PatientID" not in given:
        validated("LO", case_id, f"{loader.rel(where)}: case id as PatientID")
    if "PatientName" not in given:
        validated("PN", case_id, f"{loader.rel(where)}: case id as PatientName")


def _plan_basic(loader: _Loader, folder: Path, two_folders: bool) -> list[CasePlan]:
    dataset = loader.rel(folder)
    segs: dict[str, Path] = {}
    if two_folders:
        cases = _nifti_files(loader, folder / "cases")
        if (folder / "segs").is_dir():
            segs = _nifti_files(loader, folder / "segs")
        for stem, seg in segs.items():
            if stem not in cases:
                raise ConversionError(
                    f"orphaned segmentation {loader.rel(seg)}: no cases/{stem}.nii(.gz); in the "
                    "cases/ + segs/ layout a segmentation has the same name as its case"
                )
        seg_by_case = dict(segs)
    else:
        cases = {}
        seg_by_case = {}
        files = _nifti_files(loader, folder)
        for stem, path in files.items():
            if _SEG_SUFFIX.match(stem) is None:
                cases[stem] = path
        for stem, path in files.items():
            match = _SEG_SUFFIX.match(stem)
            if match is None:
                continue
            segs[stem] = path
            case = match.group("case")
            if case not in cases:
                raise ConversionError(
                    f"orphaned segmentation {loader.rel(path)}: no case file {case}.nii(.gz) "
                    "beside it"
                )
            if case in seg_by_case:
                raise ConversionError(
                    f"ambiguous segmentation for case {case!r}: {loader.rel(seg_by_case[case])} "
                    f"and {loader.rel(path)}"
                )
            seg_by_case[case] = path
    if not cases:
        raise ConversionError(f"{dataset}: no NIfTI cases found")
    seg_spec: SegSpec | None = None
    info_path, info_raw = loader.optional_json(folder, "seg_info.json", "seg-info.json")
    if info_path is not None:
        seg_spec = parse_seg_info(info_raw, loader.rel(info_path), loader.warnings)
    if seg_by_case and seg_spec is None:
        raise ConversionError(
            f"{loader.rel(folder / 'seg_info.json')}: missing, but segmentations were found "
            f"({', '.join(sorted(seg_by_case))}); it names their labels"
        )
    # series_tags may name a file by its name or by its path inside the dataset folder.
    image_ids = dict(cases)
    for path in cases.values():
        rel = path.relative_to(folder).as_posix()
        image_ids[nifti_stem(rel) or rel] = path
    global_tags, per_file = _meta_tags(loader, folder, image_ids, segs)
    plans = []
    for case_id, path in sorted(cases.items()):
        tags = merge_tags(global_tags, per_file.get(path, ()))
        _check_case_id(loader, case_id, tags, path)
        spec = _image_spec(loader, folder, path, 1, case_id, "OT", tags)
        label = seg_by_case.get(case_id)
        plans.append(
            CasePlan(
                case_id=case_id,
                dataset=dataset,
                layout=Layout.BASIC,
                series=(spec,),
                label=label,
                seg=seg_spec if label is not None else None,
                output_name=_output_name(dataset, case_id),
            )
        )
    return plans


def _plan_nnunet(loader: _Loader, folder: Path) -> list[CasePlan]:
    dataset = loader.rel(folder)
    where = loader.rel(folder / "dataset.json")
    raw = loader.json(folder / "dataset.json")
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{where}: expected a JSON object")
    v1_keys = sorted({"modality", "training", "test", "tensorImageSize"} & set(raw))
    if v1_keys or "channel_names" not in raw:
        raise ConversionError(
            f"{where}: not an nnU-Net v2 dataset.json (has {v1_keys or 'no channel_names'}); "
            "nnU-Net v1 datasets must be converted with nnUNetv2_convert_old_nnUNet_dataset"
        )
    channels_raw = raw["channel_names"]
    if not isinstance(channels_raw, Mapping) or not channels_raw:
        raise ConversionError(f"{where}: 'channel_names' must be a non-empty object")
    channels: dict[int, str] = {}
    for key, name in channels_raw.items():
        if not str(key).isdigit() or not isinstance(name, str) or not name.strip():
            raise ConversionError(f"{where}: channel_names[{key!r}] must map a number to a name")
        channels[int(key)] = name.strip()
    file_ending = raw.get("file_ending")
    if not isinstance(file_ending, str):
        raise ConversionError(f"{where}: 'file_ending' is required (e.g. \".nii.gz\")")
    if file_ending.lower() not in (".nii", ".nii.gz"):
        raise ConversionError(f"{where}: file_ending {file_ending!r} is not NIfTI")
    seg_spec = parse_nnunet_labels(raw.get("labels"), where)

    found: dict[str, dict[int, Path]] = {}
    labels: dict[str, Path] = {}
    for images_name, labels_name in _NNUNET_FOLDERS:
        images_dir, labels_dir = folder / images_name, folder / labels_name
        here: dict[str, dict[int, Path]] = {}
        for entry in sorted(images_dir.iterdir()) if images_dir.is_dir() else []:
            if _hidden(entry.name) or not entry.is_file():
                continue
            if not entry.name.endswith(file_ending):
                raise ConversionError(f"{loader.rel(entry)}: does not end with {file_ending!r}")
            match = _CHANNEL.match(entry.name[: -len(file_ending)])
            if match is None:
                raise ConversionError(
                    f"{loader.rel(entry)}: expected <case>_<XXXX>{file_ending} (4-digit channel)"
                )
            case, channel = match.group("case"), int(match.group("channel"))
            if channel not in channels:
                raise ConversionError(
                    f"{loader.rel(entry)}: channel {channel:04d} is not in channel_names"
                )
            if case in found:
                raise ConversionError(
                    f"case {case!r} appears in more than one images folder of {dataset}"
                )
            here.setdefault(case, {})[channel] = entry
        for entry in sorted(labels_dir.iterdir()) if labels_dir.is_dir() else []:
            if _hidden(entry.name) or not entry.is_file():
                continue
            if not entry.name.endswith(file_ending):
                raise ConversionError(f"{loader.rel(entry)}: does not end with {file_ending!r}")
            case = entry.name[: -len(file_ending)]
            if case not in here:
                raise ConversionError(
                    f"orphaned label {loader.rel(entry)}: no {images_name}/{case}_0000{file_ending}"
                )
            labels[case] = entry
        found.update(here)
    if not found:
        raise ConversionError(f"{dataset}: dataset.json but no images in imagesTr/ or imagesTs/")
    for case, by_channel in found.items():
        missing = sorted(set(channels) - set(by_channel))
        if missing:
            names = ", ".join(f"{case}_{c:04d}{file_ending}" for c in missing)
            raise ConversionError(f"case {case!r} of {dataset}: missing channel file(s) {names}")

    image_ids: dict[str, Path] = {}
    for by_channel in found.values():
        for path in by_channel.values():
            image_ids[nifti_stem(path.name) or path.name] = path
            rel = path.relative_to(folder).as_posix()
            image_ids[nifti_stem(rel) or rel] = path
    seg_ids = {nifti_stem(p.name) or p.name: p for p in labels.values()}
    global_tags, per_file = _meta_tags(loader, folder, image_ids, seg_ids)
    plans = []
    for case_id in sorted(found):
        specs = []
        for channel in sorted(channels):
            path = found[case_id][channel]
            tags = merge_tags(global_tags, per_file.get(path, ()))
            _check_case_id(loader, case_id, tags, path)
            name = channels[channel]
            modality = modality_for_channel(name) or "OT"
            specs.append(_image_spec(loader, folder, path, channel + 1, name, modality, tags))
        label = labels.get(case_id)
        plans.append(
            CasePlan(
                case_id=case_id,
                dataset=dataset,
                layout=Layout.NNUNET_V2,
                series=tuple(specs),
                label=label,
                seg=seg_spec if label is not None else None,
                output_name=_output_name(dataset, case_id),
            )
        )
    return plans


def plan_nifti_tree(root: Path) -> NiftiPlan:
    """Find every NIfTI dataset under `root` and match its files into cases.

    Blocking (reads the tree and the JSON files, not the images); call in a worker process.

    Parameters
    ----------
    root
        The extracted upload. Hidden entries and ``__MACOSX`` are ignored.

    Returns
    -------
    NiftiPlan
        Cases sorted by dataset folder, then case id.

    Raises
    ------
    ConversionError
        Naming the files for: no NIfTI at all, invalid JSON, an nnU-Net v1 ``dataset.json``,
        unknown tag keys or invalid tag values, ambiguous or orphaned segmentations, a
        ``series_tags`` key that names no file, missing nnU-Net channels, segmentations without
        ``seg_info.json``, or ``imagesTr``/``segs`` folders outside their layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"{root}: not a directory")
    loader = _Loader(root)
    cases: list[CasePlan] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        folder = Path(dirpath)
        niftis = sorted(f for f in filenames if not _hidden(f) and nifti_stem(f) is not None)
        if "dataset.json" in filenames:
            cases.extend(_plan_nnunet(loader, folder))
            if niftis:
                loader.warnings.append(
                    f"{loader.rel(folder)}: NIfTI files beside dataset.json ignored"
                )
            dirnames[:] = [d for d in dirnames if d not in _NNUNET_NAMES]
        elif "cases" in dirnames:
            if niftis:
                raise ConversionError(
                    f"{loader.rel(folder)}: has both cases/ and NIfTI files ({niftis[0]}, ...); "
                    "use either the cases/ + segs/ layout or files beside each other"
                )
            cases.extend(_plan_basic(loader, folder, two_folders=True))
            dirnames[:] = [d for d in dirnames if d not in ("cases", "segs")]
        elif folder.name in _NNUNET_NAMES and niftis:
            raise ConversionError(
                f"{loader.rel(folder)}: nnU-Net folder without dataset.json in its parent"
            )
        elif folder.name == "segs" and niftis:
            raise ConversionError(f"{loader.rel(folder)}: segs/ without a sibling cases/ folder")
        elif niftis:
            cases.extend(_plan_basic(loader, folder, two_folders=False))
    if not cases:
        raise ConversionError(f"{root}: no NIfTI files found")
    names: dict[str, CasePlan] = {}
    for case in cases:
        other = names.setdefault(case.output_name, case)
        if other is not case:
            raise ConversionError(
                f"cases {other.dataset}/{other.case_id} and {case.dataset}/{case.case_id} "
                "would be written to the same folder"
            )
    logger.debug("planned %d NIfTI case(s) under %s", len(cases), root)
    return NiftiPlan(root=root, cases=tuple(cases), warnings=tuple(loader.warnings))
