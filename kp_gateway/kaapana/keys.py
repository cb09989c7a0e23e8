"""The vocabulary of the Kaapana series documents: the keys the gateway derives and writes
itself, their sub-keys and values, and the admin project every series is also indexed under.

The keys follow Kaapana's ``"<TTTTTTTT> <Name>_<type>"`` scheme; the per-tag keys of a header
are built by :mod:`kp_gateway.kaapana.document`. Constants only: no I/O, no imports.
"""

from __future__ import annotations

ADMIN_PROJECT = "admin"

# The routing the gateway decided (CONTRACT section 6); the sender's own values of these two
# attributes move to the KEY_ORIGINAL_* keys.
KEY_PROJECT = "00120020 ClinicalTrialProtocolID_keyword"
KEY_DATASET = "00120010 ClinicalTrialSponsorName_keyword"
KEY_ORIGINAL_PROJECT = "00000000 OriginalClinicalTrialProtocolID_keyword"
KEY_ORIGINAL_DATASET = "00000000 OriginalClinicalTrialSponsorName_keyword"

# Derived keys of every document (reference/kaapana-behaviour.md 3.4).
KEY_TIMESTAMP = "00000000 Timestamp_datetime"
KEY_TIME_TAG_USED = "00000000 TimeTagUsed_keyword"
KEY_ARRIVED = "00000000 TimestampArrived_datetime"
KEY_ARRIVED_DATE = "00000000 TimestampArrived_date"
KEY_ARRIVED_HOUR = "00000000 TimestampArrivedHour_integer"
KEY_DAY_OF_WEEK = "00000000 DayOfWeek_integer"
KEY_DERIVED_AGE = "00000000 DerivedPatientAge_integer"
KEY_CURATED_MODALITY = "00000000 CuratedModality_keyword"
KEY_BODY_PART = "00000000 PredictedBodypart_keyword"
# Derived keys of SEG and RTSTRUCT documents (3.4), and the sub-keys of the segment algorithm.
KEY_ANNOTATION_LABEL = "00000000 AnnotationLabel_keyword"
KEY_ANNOTATION_LABELS = "00000000 AnnotationLabelsList_keyword"
KEY_SEGMENT_ALGORITHM = "00620002 SegmentSequence_object_object"
SEG_ALGORITHM_TYPE = "00620008 SegmentAlgorithmType_keyword"
SEG_ALGORITHM_NAME = "00620009 SegmentAlgorithmName_keyword"
# A header key read back out of documents (the series an annotation references).
KEY_SERIES_INSTANCE_UID = "0020000E SeriesInstanceUID_keyword"

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
    "KEY_ANNOTATION_LABEL",
    "KEY_ANNOTATION_LABELS",
    "KEY_ARRIVED",
    "KEY_ARRIVED_DATE",
    "KEY_ARRIVED_HOUR",
    "KEY_BODY_PART",
    "KEY_COMPLETE",
    "KEY_CURATED_MODALITY",
    "KEY_DATASET",
    "KEY_DAY_OF_WEEK",
    "KEY_DERIVED_AGE",
    "KEY_FRAMES_TOTAL",
    "KEY_MAX_IN",
    "KEY_MIN_IN",
    "KEY_MISSING_IN",
    "KEY_MULTIFRAME",
    "KEY_ORIGINAL_DATASET",
    "KEY_ORIGINAL_PROJECT",
    "KEY_PROJECT",
    "KEY_SEGMENT_ALGORITHM",
    "KEY_SERIES_INSTANCE_UID",
    "KEY_SLICES_MISSING",
    "KEY_SLICE_GAPS",
    "KEY_SLICE_SPACING",
    "KEY_SPACING_REGULAR",
    "KEY_THUMBNAIL",
    "KEY_THUMBNAIL_ERROR",
    "KEY_THUMBNAIL_STRATEGY",
    "KEY_TIMESTAMP",
    "KEY_TIME_TAG_USED",
    "KEY_VALIDATION",
    "SEG_ALGORITHM_NAME",
    "SEG_ALGORITHM_TYPE",
    "STATUS_UNAVAILABLE",
    "STATUS_VALIDATED",
    "VAL_DATE",
    "VAL_ERRORS",
    "VAL_STATUS",
    "VAL_WARNINGS",
]
