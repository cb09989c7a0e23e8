"""The vocabulary of the Kaapana series documents: the keys the gateway derives and writes
itself, their sub-keys and values, and the admin project every series is also indexed under.

The keys follow Kaapana's ``"<TTTTTTTT> <Name>_<type>"`` scheme; the per-tag keys of a header
are built by :mod:`kp_gateway.kaapana.document`. Constants only: no I/O, no imports.
"""

from __future__ import annotations

ADMIN_PROJECT = "admin"

# Kaapana's derived completion and validation keys (reference/kaapana-behaviour.md 3.4).
KEY_COMPLETE = "00000000 IsSeriesComplete_boolean"
KEY_MIN_IN = "00000000 MinInstanceNumber_integer"
KEY_MAX_IN = "00000000 MaxInstanceNumber_integer"
KEY_MISSING_IN = "00000000 MissingInstanceNumbers_integer"
KEY_VALIDATION = "00111001 ValidationResults_object"
KEY_THUMBNAIL = "00000000 ThumbnailInstanceUID_keyword"

# Derived document keys the series stages write (Kaapana's "00000000 <Name>_<type>" scheme).
KEY_THUMBNAIL_ERROR = "00000000 ThumbnailError_keyword"
KEY_THUMBNAIL_STRATEGY = "00000000 ThumbnailStrategy_keyword"
KEY_FRAMES_TOTAL = "00000000 NumberOfFramesTotal_integer"
KEY_MULTIFRAME = "00000000 IsMultiFrame_boolean"
KEY_SLICE_SPACING = "00000000 SliceSpacing_float"
KEY_SLICE_GAPS = "00000000 SliceGapCount_integer"
KEY_SLICES_MISSING = "00000000 EstimatedMissingSlices_integer"
KEY_SPACING_REGULAR = "00000000 IsSliceSpacingRegular_boolean"
# Sub-keys of 00111001 ValidationResults_object (element numbers counted up, as Kaapana does).
VAL_ERRORS = "00111002 ValidationErrors_integer"
VAL_WARNINGS = "00111003 ValidationWarnings_integer"
VAL_DATE = "00111004 ValidationDate_datetime"
VAL_STATUS = "00111005 ValidationStatus_keyword"
STATUS_VALIDATED = "validated"
STATUS_UNAVAILABLE = "validator unavailable"


__all__ = [
    "ADMIN_PROJECT",
    "KEY_COMPLETE",
    "KEY_FRAMES_TOTAL",
    "KEY_MAX_IN",
    "KEY_MIN_IN",
    "KEY_MISSING_IN",
    "KEY_MULTIFRAME",
    "KEY_SLICES_MISSING",
    "KEY_SLICE_GAPS",
    "KEY_SLICE_SPACING",
    "KEY_SPACING_REGULAR",
    "KEY_THUMBNAIL",
    "KEY_THUMBNAIL_ERROR",
    "KEY_THUMBNAIL_STRATEGY",
    "KEY_VALIDATION",
    "STATUS_UNAVAILABLE",
    "STATUS_VALIDATED",
    "VAL_DATE",
    "VAL_ERRORS",
    "VAL_STATUS",
    "VAL_WARNINGS",
]
