"""Records survive the trip through the process pool unchanged."""

from __future__ import annotations

import pickle

import pytest

from kp_gateway.model import InstanceRecord


@pytest.mark.parametrize("document", [None, {"0020000E UI SeriesInstanceUID_keyword": "1.2.3"}])
def test_instance_record_pickles_to_an_equal_record(document: dict[str, str] | None) -> None:
    record = InstanceRecord(
        sop_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CT",
        instance_number=None,
        number_of_frames=4,
        patient_id="P1",
        series_description="",
        series_date="20260101",
        size_bytes=1234,
        storage_key="admin/x.dcm",
        document=document,
    )
    for protocol in (pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL):
        copy = pickle.loads(pickle.dumps(record, protocol))
        assert copy == record
        assert type(copy) is InstanceRecord
