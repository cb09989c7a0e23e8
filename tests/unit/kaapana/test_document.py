"""Unit tests for kp_gateway.kaapana.document: Kaapana-format series documents, bugs fixed."""

import datetime
import io
import json
import re
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from kp_gateway.kaapana.document import build_series_document, document_key

ARRIVED = datetime.datetime(2025, 11, 24, 14, 7, 12, 879623, tzinfo=datetime.UTC)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

KEY_RE = re.compile(
    r"[0-9A-F]{8} \S+_(keyword|integer|float|date|time|datetime|object|boolean)"
    r"(_alphabetic|_ideographic|_phonetic|_object)?"
)
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
TIME_RE = re.compile(r"\d{2}:\d{2}:\d{2}\.\d{6}")
DATETIME_RE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}")

# kaapana-behaviour.md 3.7, with ReferencedImageSequence kept (Kaapana dropped multi-item
# sequences) and the arrival fields of ARRIVED.
WORKED_EXAMPLE: dict[str, Any] = {
    "00000000 CuratedModality_keyword": "CT",
    "00000000 DayOfWeek_integer": 4,
    "00000000 DerivedPatientAge_integer": 43,
    "00000000 PredictedBodypart_keyword": "N/A",
    "00000000 TimeTagUsed_keyword": "AcquisitionDate + AcquisitionTime",
    "00000000 TimestampArrivedHour_integer": 14,
    "00000000 TimestampArrived_date": "2025-11-24",
    "00000000 TimestampArrived_datetime": "2025-11-24 14:07:12.879623",
    "00000000 Timestamp_datetime": "2024-03-15 09:20:05.500000",
    "00080005 SpecificCharacterSet_keyword": "ISO_IR 100",
    "00080008 ImageType_keyword": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "00080016 SOPClassUID_keyword": CT_IMAGE_STORAGE,
    "00080018 SOPInstanceUID_keyword": "1.2.826.0.1.3680043.8.498.100.1",
    "00080020 StudyDate_date": "2024-03-15",
    "00080021 SeriesDate_date": "2024-03-15",
    "00080022 AcquisitionDate_date": "2024-03-15",
    "00080030 StudyTime_time": "10:15:00.000000",
    "00080031 SeriesTime_time": "10:20:00.123000",
    "00080032 AcquisitionTime_time": "10:20:05.500000",
    "00080060 Modality_keyword": "CT",
    "00080070 Manufacturer_keyword": "ACME",
    "00080080 InstitutionName_keyword": "Hospital Nanterre",
    "00080090 ReferringPhysicianName_keyword_alphabetic": "Doe^John",
    "00081030 StudyDescription_keyword": "CT THORAX",
    "00081032 ProcedureCodeSequence_object": {
        "00080100 CodeValue_keyword": "ZZ1",
        "00080102 CodingSchemeDesignator_keyword": "99LOCAL",
        "00080104 CodeMeaning_keyword": "CT Chest",
    },
    "0008103E SeriesDescription_keyword": "Thorax 1.0 B31f",
    "00081140 ReferencedImageSequence_object": [
        {
            "00081150 ReferencedSOPClassUID_keyword": CT_IMAGE_STORAGE,
            "00081155 ReferencedSOPInstanceUID_keyword": "1.2.826.0.1.3680043.8.498.100.2",
        },
        {
            "00081150 ReferencedSOPClassUID_keyword": CT_IMAGE_STORAGE,
            "00081155 ReferencedSOPInstanceUID_keyword": "1.2.826.0.1.3680043.8.498.100.3",
        },
    ],
    "00100010 PatientName_keyword_alphabetic": "Muster^Max",
    "00100020 PatientID_keyword": "P0001",
    "00100030 PatientBirthDate_date": "1980-06-20",
    "00100040 PatientSex_keyword": "M",
    "00101010 PatientAge_keyword": "043Y",
    "00120010 ClinicalTrialSponsorName_keyword": "lungstudy",
    "00120020 ClinicalTrialProtocolID_keyword": "myproject",
    "00180015 BodyPartExamined_keyword": "CHEST",
    "00180050 SliceThickness_float": 1.0,
    "00180060 KVP_float": 120.0,
    "0020000D StudyInstanceUID_keyword": "1.2.826.0.1.3680043.8.498.1",
    "0020000E SeriesInstanceUID_keyword": "1.2.826.0.1.3680043.8.498.2",
    "00200010 StudyID_keyword": "1",
    "00200011 SeriesNumber_integer": 3,
    "00200013 InstanceNumber_integer": 57,
    "00200032 ImagePosition(Patient)_float": [-175.5, -180.0, -320.25],
    "00200037 ImageOrientation(Patient)_float": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    "00200052 FrameofReferenceUID_keyword": "1.2.826.0.1.3680043.8.498.3",
    "00280010 Rows_integer": 512,
    "00280011 Columns_integer": 512,
    "00280030 PixelSpacing_float": [0.703125, 0.703125],
    "00280100 BitsAllocated_integer": 16,
    "00281050 WindowCenter_float": [40.0, -600.0],
    "00281051 WindowWidth_float": [400.0, 1500.0],
    "00281052 RescaleIntercept_float": -1024.0,
    "00281053 RescaleSlope_float": 1.0,
}

REAL_FILES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "ExplVR_BigEnd.dcm",
    "rtstruct.dcm",
    "rtplan.dcm",
    "rtdose.dcm",
    "liver_1frame.dcm",
    "waveform_ecg.dcm",
    "reportsi.dcm",
    "JPEG2000.dcm",
]


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _referenced_image(uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
    item.ReferencedSOPInstanceUID = uid
    return item


def _worked_example_dataset() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.100.1"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240315"
    ds.StudyTime = "101500"
    ds.SeriesTime = "102000.123"
    ds.AcquisitionTime = "102005.5"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.InstitutionName = "Hospital Nanterre"
    ds.ReferringPhysicianName = "Doe^John"
    ds.StudyDescription = "CT THORAX"
    ds.ProcedureCodeSequence = Sequence([_code_item("ZZ1", "99LOCAL", "CT Chest")])
    ds.SeriesDescription = "Thorax 1.0 B31f"
    ds.ReferencedImageSequence = Sequence(
        [
            _referenced_image("1.2.826.0.1.3680043.8.498.100.2"),
            _referenced_image("1.2.826.0.1.3680043.8.498.100.3"),
        ]
    )
    ds.PatientName = "Muster^Max"
    ds.PatientID = "P0001"
    ds.PatientBirthDate = "19800620"
    ds.PatientSex = "M"
    ds.PatientAge = "043Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.StudyID = "1"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 57
    ds.ImagePositionPatient = ["-175.5", "-180.0", "-320.25"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.Rows = ds.Columns = 512
    ds.PixelSpacing = ["0.703125", "0.703125"]
    ds.BitsAllocated = 16
    ds.WindowCenter = ["40", "-600"]
    ds.WindowWidth = ["400", "1500"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    return ds


def _roundtrip(ds: Dataset, transfer_syntax: UID = ExplicitVRLittleEndian) -> Dataset:
    """Encode `ds` as a Part 10 file and read it back the way the gateway does."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CT_IMAGE_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3.4")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer, stop_before_pixels=True)


def _build(ds: Dataset, site_timezone: str = "UTC") -> dict[str, Any]:
    return build_series_document(
        ds,
        project="myproject",
        dataset="lungstudy",
        arrived_at=ARRIVED,
        site_timezone=site_timezone,
    )


def _timed_dataset(**attributes: Any) -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _set_raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Store an element undecoded, as dcmread leaves it, so invalid values reach the module."""
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _assert_well_typed(document: dict[str, Any]) -> None:
    for key, value in document.items():
        assert KEY_RE.fullmatch(key), key
        values = value if isinstance(value, list) else [value]
        if key.endswith("_integer"):
            assert all(type(v) is int for v in values), key
        elif key.endswith("_float"):
            assert all(type(v) is float for v in values), key
        elif key.endswith("_datetime"):
            assert all(DATETIME_RE.fullmatch(v) for v in values), key
        elif key.endswith("_date"):
            assert all(DATE_RE.fullmatch(v) for v in values), key
        elif key.endswith("_time"):
            assert all(TIME_RE.fullmatch(v) for v in values), key
        elif key.endswith("_object"):
            for item in values:
                assert isinstance(item, dict), key
                _assert_well_typed(item)
        else:
            assert all(v is None or type(v) is str for v in values), key


@pytest.mark.parametrize(
    "transfer_syntax", [None, ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=str
)
def test_build_series_document_worked_example(transfer_syntax: UID | None) -> None:
    """The CT example of kaapana-behaviour.md 3.7 is reproduced with the bug fixes applied."""
    ds = _worked_example_dataset()
    if transfer_syntax is not None:
        ds = _roundtrip(ds, transfer_syntax)
    assert _build(ds, site_timezone="Europe/Berlin") == WORKED_EXAMPLE


@pytest.mark.parametrize(
    ("site_timezone", "expected"),
    [
        ("Europe/Berlin", "2024-03-15 09:20:05.500000"),
        ("UTC", "2024-03-15 10:20:05.500000"),
        ("America/New_York", "2024-03-15 14:20:05.500000"),
    ],
)
def test_build_series_document_timestamp_in_site_timezone(
    site_timezone: str, expected: str
) -> None:
    """Without an offset in the dataset, the series time is read in the site time zone."""
    document = _build(_worked_example_dataset(), site_timezone=site_timezone)
    assert document["00000000 Timestamp_datetime"] == expected


def test_build_series_document_timestamp_honours_timezone_offset_from_utc() -> None:
    """TimezoneOffsetFromUTC (0008,0201) wins over the site time zone; TM is not converted."""
    ds = _worked_example_dataset()
    ds.TimezoneOffsetFromUTC = "+0200"
    document = _build(ds, site_timezone="Europe/Berlin")
    assert document["00000000 Timestamp_datetime"] == "2024-03-15 08:20:05.500000"
    assert document["00080032 AcquisitionTime_time"] == "10:20:05.500000"
    assert document["00080022 AcquisitionDate_date"] == "2024-03-15"


def test_build_series_document_datetime_explicit_offset_converted_once() -> None:
    """A DT with &ZZXX is converted once, and Timestamp reuses it without a second conversion."""
    ds = _timed_dataset(AcquisitionDateTime="20240715120000.25+0200", TimezoneOffsetFromUTC="-0500")
    document = _build(ds, site_timezone="Europe/Berlin")
    assert document["0008002A AcquisitionDateTime_datetime"] == "2024-07-15 10:00:00.250000"
    assert document["00000000 Timestamp_datetime"] == "2024-07-15 10:00:00.250000"
    assert document["00000000 TimeTagUsed_keyword"] == "AcquisitionDateTime_datetime"


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        ("-0500", "2024-07-15 17:00:00.000000"),
        ("+0530", "2024-07-15 06:30:00.000000"),
        (None, "2024-07-15 10:00:00.000000"),  # Europe/Berlin in summer is UTC+2
        ("bogus", "2024-07-15 10:00:00.000000"),
    ],
)
def test_build_series_document_datetime_without_offset(offset: str | None, expected: str) -> None:
    """A DT without offset uses TimezoneOffsetFromUTC, else (also if invalid) the site zone."""
    ds = _timed_dataset(AcquisitionDateTime="20240715120000")
    if offset is not None:
        ds.TimezoneOffsetFromUTC = offset
    document = _build(ds, site_timezone="Europe/Berlin")
    assert document["0008002A AcquisitionDateTime_datetime"] == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240701", "2024-07-01 00:00:00.000000"),
        ("2024031510", "2024-03-15 09:00:00.000000"),
        ("202403151020", "2024-03-15 09:20:00.000000"),
        ("20240315102005.123456", "2024-03-15 09:20:05.123456"),
        ("20240315102005-0100", "2024-03-15 11:20:05.000000"),
    ],
)
def test_build_series_document_datetime_precision(value: str, expected: str) -> None:
    """Truncated DT values are accepted; a date-only DT keeps its date (no zone shift)."""
    document = _build(_timed_dataset(AcquisitionDateTime=value), site_timezone="Europe/Berlin")
    assert document["0008002A AcquisitionDateTime_datetime"] == expected


def test_build_series_document_unparseable_dates_dropped() -> None:
    """Unparseable DA, TM and DT values are dropped, never stored as strings."""
    ds = Dataset()
    _set_raw(ds, 0x00080020, "DA", b"20241350")
    _set_raw(ds, 0x00080030, "TM", b"256000")
    _set_raw(ds, 0x0008002A, "DT", b"garbage ")
    _set_raw(ds, 0x00080021, "DA", b"20240315\\bad\\20240316")
    document = _build(ds)
    assert "00080020 StudyDate_date" not in document
    assert "00080030 StudyTime_time" not in document
    assert "0008002A AcquisitionDateTime_datetime" not in document
    assert document["00080021 SeriesDate_date"] == ["2024-03-15", "2024-03-16"]


def test_build_series_document_multi_valued_person_name_kept() -> None:
    """Multi-valued PN is an array per component group, aligned by name."""
    ds = Dataset()
    ds.OperatorsName = ["Smith^Anna=スミス^アンナ", "Jones^Bob"]
    ds.PatientName = "Muster^Max"
    document = _build(ds)
    assert document["00081070 Operators'Name_keyword_alphabetic"] == ["Smith^Anna", "Jones^Bob"]
    assert document["00081070 Operators'Name_keyword_ideographic"] == ["スミス^アンナ", ""]
    assert "00081070 Operators'Name_keyword_phonetic" not in document
    assert document["00100010 PatientName_keyword_alphabetic"] == "Muster^Max"


def test_build_series_document_unparseable_numbers_dropped() -> None:
    """Unparseable IS/DS values are dropped one by one; numeric keys never hold strings."""
    ds = Dataset()
    _set_raw(ds, 0x00200011, "IS", b"0.sd5 ")
    _set_raw(ds, 0x00200013, "IS", b"0.5 ")
    _set_raw(ds, 0x00281050, "DS", b"40\\abc\\nan\\-600")
    _set_raw(ds, 0x00180050, "DS", b"abc ")
    _set_raw(ds, 0x00180088, "DS", b"1e999 ")
    _set_raw(ds, 0x00280010, "US", b"\x00")  # odd length: pydicom cannot decode it at all
    document = _build(ds)
    assert "00200011 SeriesNumber_integer" not in document
    assert document["00200013 InstanceNumber_integer"] == 0  # Kaapana's int(float("0.5"))
    assert document["00281050 WindowCenter_float"] == [40.0, -600.0]
    assert "00180050 SliceThickness_float" not in document
    assert "00180088 SpacingBetweenSlices_float" not in document
    assert "00280010 Rows_integer" not in document
    _assert_well_typed(document)


def test_build_series_document_exact_nan_string_dropped() -> None:
    """An exact "nan" value drops the element, as in Kaapana; "Nancy" is kept."""
    ds = Dataset()
    ds.StudyDescription = "nan"
    ds.InstitutionName = "  Nancy  "
    document = _build(ds)
    assert "00081030 StudyDescription_keyword" not in document
    assert document["00080080 InstitutionName_keyword"] == "Nancy"


def test_build_series_document_seg_annotation_labels() -> None:
    """SEG labels, their sorted list and the last segment's algorithm are added."""
    ds = Dataset()
    ds.Modality = "SEG"
    segments = []
    for number, label in enumerate(["Liver", "Spleen, left"], start=1):
        segment = Dataset()
        segment.SegmentNumber = number
        segment.SegmentLabel = label
        segment.SegmentAlgorithmType = "AUTOMATIC"
        segment.SegmentAlgorithmName = "nnU-Net"
        segments.append(segment)
    ds.SegmentSequence = Sequence(segments)
    document = _build(_roundtrip(ds))
    assert document["00000000 AnnotationLabel_keyword"] == ["Liver", "Spleen- left"]
    assert document["00000000 AnnotationLabelsList_keyword"] == "Liver,Spleen- left"
    assert document["00620002 SegmentSequence_object_object"] == {
        "00620008 SegmentAlgorithmType_keyword": "AUTOMATIC",
        "00620009 SegmentAlgorithmName_keyword": "nnU-Net",
    }
    labels = [
        item["00620005 SegmentLabel_keyword"]
        for item in document["00620002 SegmentSequence_object"]
    ]
    assert labels == ["Liver", "Spleen, left"]


def test_build_series_document_rtstruct_annotation_labels() -> None:
    """RTSTRUCT labels come from StructureSetROISequence ROIName; no algorithm object."""
    ds = Dataset()
    ds.Modality = "RTSTRUCT"
    rois = []
    for number, name in enumerate(["Lung, left", "GTV"], start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ROIName = name
        rois.append(roi)
    ds.StructureSetROISequence = Sequence(rois)
    document = _build(ds)
    assert document["00000000 AnnotationLabel_keyword"] == ["Lung- left", "GTV"]
    assert document["00000000 AnnotationLabelsList_keyword"] == "GTV,Lung- left"
    assert "00620002 SegmentSequence_object_object" not in document


def test_build_series_document_seg_without_segments() -> None:
    """A SEG without segments gets an empty label list and a null label string."""
    ds = Dataset()
    ds.Modality = "SEG"
    document = _build(ds)
    assert document["00000000 AnnotationLabel_keyword"] == []
    assert document["00000000 AnnotationLabelsList_keyword"] is None


@pytest.mark.parametrize(
    ("modality", "image_type", "expected"),
    [
        ("CT", ["ORIGINAL", "PRIMARY", "LOCALIZER"], "XR"),
        ("CT", ["ORIGINAL", "PRIMARY", "AXIAL"], "CT"),
        ("CT", ["LOCALIZER"], "CT"),  # Kaapana's rule needs at least three values
        ("MR", ["ORIGINAL", "PRIMARY", "LOCALIZER"], "MR"),
    ],
)
def test_build_series_document_curated_modality(
    modality: str, image_type: list[str], expected: str
) -> None:
    """A CT LOCALIZER is curated to XR; everything else keeps its Modality."""
    ds = Dataset()
    ds.Modality = modality
    ds.ImageType = image_type
    assert _build(ds)["00000000 CuratedModality_keyword"] == expected


@pytest.mark.parametrize(
    ("patient_age", "birth_date", "expected"),
    [
        ("043Y", None, 43),
        ("018M", None, 1),
        ("006M", None, 0),
        ("104W", None, 2),  # Kaapana divided weeks by 7
        ("400D", None, 1),
        ("abc", None, None),
        ("050Y", "19800620", 43),  # the birth date is preferred
        ("043Y", "20300101", 43),  # a birth date after the series time is ignored
        (None, "19800316", 43),
        (None, "19800315", 44),
    ],
)
def test_build_series_document_derived_patient_age(
    patient_age: str | None, birth_date: str | None, expected: int | None
) -> None:
    """DerivedPatientAge comes from PatientBirthDate, else PatientAge with D/W/M/Y units."""
    ds = _timed_dataset(AcquisitionDate="20240315", AcquisitionTime="120000")
    if patient_age is not None:
        ds.PatientAge = patient_age
    if birth_date is not None:
        ds.PatientBirthDate = birth_date
    assert _build(ds).get("00000000 DerivedPatientAge_integer") == expected


def test_build_series_document_routing_replaces_sender_values() -> None:
    """Project and dataset come from the arguments; the sender's values are kept aside."""
    ds = Dataset()
    ds.ClinicalTrialProtocolID = "kp-otherproject"
    ds.ClinicalTrialSponsorName = "kp-otherdataset"
    document = _build(ds)
    assert document["00120020 ClinicalTrialProtocolID_keyword"] == "myproject"
    assert document["00120010 ClinicalTrialSponsorName_keyword"] == "lungstudy"
    assert document["00000000 OriginalClinicalTrialProtocolID_keyword"] == "kp-otherproject"
    assert document["00000000 OriginalClinicalTrialSponsorName_keyword"] == "kp-otherdataset"


def test_build_series_document_missing_date_and_time_use_arrival() -> None:
    """Without any date or time the series time is the arrival time."""
    document = _build(Dataset(), site_timezone="Europe/Berlin")
    assert document["00000000 Timestamp_datetime"] == "2025-11-24 14:07:12.879623"
    assert document["00000000 TimeTagUsed_keyword"] == (
        "date not found -> arriving date + time not found -> arriving time"
    )
    assert document["00000000 DayOfWeek_integer"] == 0
    assert "00000000 CuratedModality_keyword" not in document


def test_build_series_document_missing_time_uses_local_arrival_time() -> None:
    """A missing time is the arrival time on the dataset's wall clock, converted back once."""
    document = _build(_timed_dataset(StudyDate="20240315"), site_timezone="Europe/Berlin")
    assert document["00000000 Timestamp_datetime"] == "2024-03-15 14:07:12.879623"
    assert document["00000000 TimeTagUsed_keyword"] == "StudyDate + time not found -> arriving time"


def test_build_series_document_skips_private_repeating_and_bulk_tags() -> None:
    """Private tags, overlay groups, file meta, bulk data and binary values are not indexed."""
    ds = _worked_example_dataset()
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "secret")
    ds.add_new(0x60000010, "US", 512)
    ds.add_new(0x00143080, "OB", b"\x00\x01")
    ds.add_new(0x00281201, "OW", b"\x00\x01")
    document = _build(_roundtrip(ds))
    assert not [key for key in document if key[:4] in ("0009", "6000", "0002", "0014")]
    assert not [key for key in document if key.startswith("00281201")]


def test_build_series_document_large_sequence_dropped() -> None:
    """A sequence with more items than the cap is dropped like Kaapana dropped every one."""
    ds = Dataset()
    ds.ReferencedImageSequence = Sequence(
        [_referenced_image(f"1.2.3.{number}") for number in range(65)]
    )
    ds.ProcedureCodeSequence = Sequence()
    document = _build(ds)
    assert "00081140 ReferencedImageSequence_object" not in document
    assert "00081032 ProcedureCodeSequence_object" not in document


def test_build_series_document_decodes_specific_character_set() -> None:
    """Text is decoded with the dataset's SpecificCharacterSet on the raw fast path."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstitutionName = "Hôpital Nantes"
    ds.PatientName = "Müller^Jürgen"
    document = _build(_roundtrip(ds))
    assert document["00080080 InstitutionName_keyword"] == "Hôpital Nantes"
    assert document["00100010 PatientName_keyword_alphabetic"] == "Müller^Jürgen"


def test_build_series_document_naive_arrival_rejected() -> None:
    """A naive arrival time is refused rather than guessed."""
    with pytest.raises(ValueError, match="timezone aware"):
        build_series_document(
            Dataset(), project="p", dataset="d", arrived_at=datetime.datetime(2025, 1, 1)
        )


@pytest.mark.parametrize("name", REAL_FILES)
def test_build_series_document_real_files_well_typed(name: str) -> None:
    """pydicom's test files give JSON-safe documents whose keys and value types match."""
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str)
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    document = _build(ds, site_timezone="Europe/Berlin")
    _assert_well_typed(document)
    json.dumps(document, allow_nan=False)
    assert document["0020000E SeriesInstanceUID_keyword"] == str(ds.SeriesInstanceUID)


@pytest.mark.parametrize(
    ("tag", "vr", "expected"),
    [
        (0x00100020, "LO", "00100020 PatientID_keyword"),
        (BaseTag(0x00280010), "US", "00280010 Rows_integer"),
        (0x00200032, "DS", "00200032 ImagePosition(Patient)_float"),
        (0x00200052, "UI", "00200052 FrameofReferenceUID_keyword"),
        (0x00081070, "PN", "00081070 Operators'Name_keyword"),
        (0x00100010, "PN", "00100010 PatientName_keyword"),
        (0x00080090, "PN", "00080090 ReferringPhysicianName_keyword"),
        (0x00181318, "DS", "00181318 dB/dt_float"),
        (0x00188150, "DS", "00188150 ExposureTimeinµS_float"),
        (0x00080052, "CS", "00080052 Query/RetrieveLevel_keyword"),
        (0x0008002A, "DT", "0008002A AcquisitionDateTime_datetime"),
        (0x00081032, "SQ", "00081032 ProcedureCodeSequence_object"),
        (0x00091001, "LO", None),  # private
        (0x60000010, "US", None),  # repeating group
        (0x00020010, "UI", None),  # file meta
        (0x7FE00010, "OW", None),  # pixel data
        (0x00281201, "OW", None),  # binary VR
        (0x00100010, "XX", None),  # unknown VR
    ],
)
def test_document_key_naming(tag: int, vr: str, expected: str | None) -> None:
    """Keys use the standard's attribute name without spaces and a VR suffix."""
    assert document_key(tag, vr) == expected
