"""AE-title routing: the project and dataset an association's AE titles name."""

from __future__ import annotations

import pytest

from kp_gateway.dicom.ae_titles import parse_called_ae, parse_calling_ae


@pytest.mark.parametrize(
    ("called", "project"),
    [
        ("kp-lung", "lung"),
        ("KP-Lung", "lung"),
        ("Kp-x1 ", "x1"),
        ("ANY-SCP", "admin"),
        ("kp-", "admin"),
    ],
)
def test_parse_called_ae(called: str, project: str) -> None:
    """kp- prefix and project names are case-insensitive; no prefix means the default project."""
    assert parse_called_ae(called, "admin") == project


@pytest.mark.parametrize(
    ("calling", "dataset"),
    [
        ("kp-cohort1", "cohort1"),
        ("KP-Cohort", "cohort"),
        ("STORESCU", "storescu"),
        ("kp-a/b", "a_b"),
    ],
)
def test_parse_calling_ae(calling: str, dataset: str) -> None:
    """kp-<dataset> names the dataset; otherwise the calling AE title, lower case."""
    assert parse_calling_ae(calling) == dataset
