"""The completion rule of the documents and the projects a series is indexed under."""

from __future__ import annotations

import logging

import pytest

from kp_gateway.kaapana.completion import completion_fields, missing_numbers
from kp_gateway.kaapana.keys import (
    ADMIN_PROJECT,
    KEY_COMPLETE,
    KEY_MAX_IN,
    KEY_MIN_IN,
    KEY_MISSING_IN,
)
from kp_gateway.kaapana.routing_record import index_targets
from kp_gateway.model import Routing


@pytest.mark.parametrize(
    ("numbers", "count", "expected"),
    [
        ([1, 2, 3], 3, {KEY_COMPLETE: True, KEY_MISSING_IN: [], KEY_MIN_IN: 1, KEY_MAX_IN: 3}),
        ([5, 1, 2], 3, {KEY_COMPLETE: False, KEY_MISSING_IN: [3, 4], KEY_MIN_IN: 1, KEY_MAX_IN: 5}),
        # Kaapana: a lone instance without an InstanceNumber is number 1.
        ([], 1, {KEY_COMPLETE: True, KEY_MISSING_IN: [], KEY_MIN_IN: 1, KEY_MAX_IN: 1}),
        # Several instances, none numbered: nothing is known to be missing, no min or max.
        ([], 2, {KEY_COMPLETE: True, KEY_MISSING_IN: []}),
        # Only the numbered ones count; a duplicate number is one number.
        ([2, 2, 4], 4, {KEY_COMPLETE: False, KEY_MISSING_IN: [3], KEY_MIN_IN: 2, KEY_MAX_IN: 4}),
    ],
)
def test_completion_fields(numbers: list[int], count: int, expected: dict[str, object]) -> None:
    assert completion_fields(numbers, count) == expected


def test_missing_numbers_between_min_and_max() -> None:
    assert missing_numbers([]) == []
    assert missing_numbers([3, 7, 5]) == [4, 6]


def test_index_targets_admin_always_own_project_if_it_exists(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A series goes to admin and its project; a project deleted meanwhile leaves admin only."""

    def routing(project: str) -> Routing:
        return Routing(project=project, dataset="ds", source_id="s")

    assert index_targets(routing(ADMIN_PROJECT), {ADMIN_PROJECT}) == [ADMIN_PROJECT]
    assert index_targets(routing("lung"), {ADMIN_PROJECT, "lung"}) == [ADMIN_PROJECT, "lung"]
    with caplog.at_level(logging.WARNING):
        assert index_targets(routing("gone"), {ADMIN_PROJECT}) == [ADMIN_PROJECT]
    assert "project gone vanished" in caplog.text
