"""Series completion as the documents state it: min, max and missing InstanceNumbers.

Pure; every index backend calls :func:`completion_fields` when it completes a series, so a new
backend inherits the rule instead of restating it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kp_gateway.kaapana.keys import KEY_COMPLETE, KEY_MAX_IN, KEY_MIN_IN, KEY_MISSING_IN


def missing_numbers(numbers: Sequence[int]) -> list[int]:
    """InstanceNumbers absent between the smallest and the largest present."""
    if not numbers:
        return []
    present = set(numbers)
    return [n for n in range(min(present), max(present) + 1) if n not in present]


def completion_fields(numbers: Sequence[int], count: int) -> dict[str, Any]:
    """The completion fields of a series' documents (reference/kaapana-behaviour.md 6.4).

    Parameters
    ----------
    numbers : sequence of int
        The InstanceNumbers of the series' instances that have one.
    count : int
        How many instances the series has, with or without a number.

    Returns
    -------
    dict
        ``IsSeriesComplete`` (no number missing between min and max) and
        ``MissingInstanceNumbers`` always; ``Min``/``MaxInstanceNumber`` when a number is known.
        A lone instance without a number counts as number 1, as in Kaapana.
    """
    if not numbers and count == 1:
        numbers = [1]
    missing = missing_numbers(numbers)
    fields: dict[str, Any] = {KEY_COMPLETE: not missing, KEY_MISSING_IN: missing}
    if numbers:
        fields[KEY_MIN_IN] = min(numbers)
        fields[KEY_MAX_IN] = max(numbers)
    return fields


__all__ = ["completion_fields", "missing_numbers"]
