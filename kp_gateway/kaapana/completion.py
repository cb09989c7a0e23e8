"""Series completion as the documents state it: which InstanceNumbers a series lacks.

Pure; the index backends call it when they complete a series.
"""

from __future__ import annotations

from collections.abc import Sequence


def missing_numbers(numbers: Sequence[int]) -> list[int]:
    """InstanceNumbers absent between the smallest and the largest present."""
    if not numbers:
        return []
    present = set(numbers)
    return [n for n in range(min(present), max(present) + 1) if n not in present]


__all__ = ["missing_numbers"]
