"""AE-title routing: the project and dataset an association's AE titles name."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kp_gateway.dicom.ae_titles import parse_called_ae, parse_calling_ae
from kp_gateway.names import is_dataset_name


@pytest.mark.parametrize(
    ("called", "project"),
    [
        ("kp-lung", "lung"),
        ("KP-Lung", "lung"),
        ("Kp-x1 ", "x1"),
        ("ANY-SCP", "admin"),
        ("kp-", "admin"),
        ("KP-GATEWAY", "admin"),
        ("kp-gateway ", "admin"),
    ],
)
def test_parse_called_ae(called: str, project: str) -> None:
    """kp- prefix and project names are case-insensitive; no prefix means the default project;
    the gateway's own AE title (KP-GATEWAY here) means the default project too."""
    assert parse_called_ae(called, "admin", "KP-GATEWAY") == project


@pytest.mark.parametrize(
    ("calling", "dataset"),
    [
        ("kp-cohort1", "cohort1"),
        ("KP-Cohort", "cohort"),
        ("STORESCU", "storescu"),
        ("US_ROOM.2", "us_room.2"),
        ("kp-", "kp-"),
    ],
)
def test_parse_calling_ae_valid_names_kept(calling: str, dataset: str) -> None:
    """kp-<dataset> names the dataset; otherwise the calling AE title, lower case."""
    assert parse_calling_ae(calling) == dataset


@pytest.mark.parametrize(
    ("calling", "prefix"),
    [("MR SCAN1", "mr_scan1-"), ("KP-Ds*1", "ds_1-"), ("US/ROOM.2", "us_room.2-"), ("**", "ae-")],
)
def test_parse_calling_ae_invalid_characters_replaced_and_kept_apart(
    calling: str, prefix: str
) -> None:
    """Characters outside the dataset rule become _ plus a digest of the title: a valid name
    that no other title maps to (US/ROOM.2 is not US_ROOM.2)."""
    dataset = parse_calling_ae(calling)
    assert is_dataset_name(dataset), dataset
    assert dataset.startswith(prefix) and len(dataset) == len(prefix) + 8


def _normalised(title: str) -> str:
    title = title.strip()
    if title.lower().startswith("kp-") and len(title) > 3:
        title = title[3:]
    return title.lower()


# AE titles: 1-16 characters of the default character repertoire without backslash (PS3.5 6.2).
_AE_TITLES = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
    min_size=1,
    max_size=16,
).filter(lambda t: t.strip())


@given(_AE_TITLES, _AE_TITLES)
def test_parse_calling_ae_always_valid_and_keeps_datasets_apart(a: str, b: str) -> None:
    """Every AE title names a valid dataset, and two titles name the same dataset only when
    they differ in nothing but case, surrounding spaces or the kp- prefix."""
    assert is_dataset_name(parse_calling_ae(a))
    if parse_calling_ae(a) == parse_calling_ae(b):
        assert _normalised(a) == _normalised(b)
