"""The hand-encoded C-STORE response is byte for byte what pynetdicom would send."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, dimse_messages, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA

from kp_gateway.dimse_fastpath import (
    FastStoreResponseDIMSE,
    PlainFileMeta,
    encode_file_meta,
    encode_store_response,
    install_file_meta_writer,
)


def pynetdicom_encoding(primitive: C_STORE, context_id: int, max_pdu: int = 0) -> list[bytes]:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return [
        bytes(value)
        for pdata in message.encode_msg(context_id, max_pdu)
        for _, value in pdata.presentation_data_value_list
    ]


def store_response(status: int, message_id: int, sop_class: str, sop_instance: str) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    return rsp


CASES = [
    (0x0000, 1, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"),  # even-length UIDs
    (0xA700, 65535, "1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.1"),  # odd
    (0xC210, 7, "1.2.840.10008.5.1.4.1.1.7", "2.25.3"),
    (0xB000, 300, "1.2.840.10008.5.1.4.1.1.66.4", "1" * 64),
]


@pytest.mark.parametrize(("status", "message_id", "sop_class", "sop_instance"), CASES)
def test_encoding_equals_pynetdicom(
    status: int, message_id: int, sop_class: str, sop_instance: str
) -> None:
    primitive = store_response(status, message_id, sop_class, sop_instance)
    expected = pynetdicom_encoding(primitive, context_id=5)
    encoded = encode_store_response(message_id, sop_class, sop_instance, status)
    assert [b"\x03" + encoded] == expected


def make_provider(max_pdu: int = 0) -> tuple[Any, Association]:
    """A real (unstarted) acceptor association whose DIMSE provider is re-classed as in scp.py."""
    assoc = Association(AE(), MODE_ACCEPTOR)
    assoc.requestor.maximum_length = max_pdu
    assoc.dimse.__class__ = FastStoreResponseDIMSE
    return assoc.dimse, assoc


def sent_values(assoc: Association) -> list[bytes]:
    """What the provider handed to the DUL for sending."""
    sent: list[bytes] = []
    while not assoc.dul.to_provider_queue.empty():
        pdata = assoc.dul.to_provider_queue.get_nowait()
        assert isinstance(pdata, P_DATA)
        sent.extend(bytes(value) for _, value in pdata.presentation_data_value_list)
    return sent


@pytest.mark.parametrize("max_pdu", [0, 16384])
def test_provider_sends_one_pdv_like_pynetdicom(max_pdu: int) -> None:
    primitive = store_response(*CASES[1])
    provider, assoc = make_provider(max_pdu)
    provider.send_msg(primitive, 3)
    assert sent_values(assoc) == pynetdicom_encoding(primitive, 3, max_pdu)


@pytest.mark.parametrize(
    "case", ["error comment", "offending element", "logging handler", "tiny pdu", "request"]
)
def test_provider_falls_back_to_pynetdicom(case: str) -> None:
    """Whatever the fast path does not cover is encoded by pynetdicom (fragments and all)."""
    primitive: Any = store_response(0xC000, 9, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5")
    max_pdu = 40 if case == "tiny pdu" else 0  # 40: the command set needs several fragments
    provider, assoc = make_provider(max_pdu)
    if case == "error comment":
        primitive.ErrorComment = "could not store"
    elif case == "offending element":
        primitive.OffendingElement = [0x00100010]
    elif case == "logging handler":
        assoc.bind(evt.EVT_DIMSE_SENT, lambda event: None)
    if case == "request":
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        request.AffectedSOPInstanceUID = "1.2.3"
        request.Priority = 2
        assert provider._plain_store_response(request) is None
        return
    assert provider._plain_store_response(primitive) is None
    expected = pynetdicom_encoding(primitive, 1, max_pdu)
    provider.send_msg(primitive, 1)
    assert sent_values(assoc) == expected
    if case == "tiny pdu":
        assert len(expected) > 1


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "transfer_syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even / odd
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.12345", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.77.1.6", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.50"),
        ("1.2.840.10008.5.1.4.1.1.66.4", "1.2", "1.2.840.10008.1.2.4.201"),
    ],
)
def test_file_meta_equals_pydicom(sop_class: str, sop_instance: str, transfer_syntax: str) -> None:
    """The file meta pynetdicom writes in front of a received dataset, byte for byte."""
    expected = io.BytesIO()
    write_file_meta_info(
        expected,  # type: ignore[arg-type]
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(transfer_syntax),
        ),
    )
    plain = PlainFileMeta(sop_class, sop_instance, transfer_syntax)
    assert encode_file_meta(plain) == expected.getvalue()
    # Odd-length implementation version names are padded with a space, as pydicom does.
    odd = create_file_meta(
        sop_class_uid=UID(sop_class),
        sop_instance_uid=UID(sop_instance),
        transfer_syntax=UID(transfer_syntax),
        implementation_version="KP_1",
    )
    expected = io.BytesIO()
    write_file_meta_info(expected, odd)  # type: ignore[arg-type]
    odd_plain = PlainFileMeta(
        sop_class, sop_instance, transfer_syntax, implementation_version="KP_1"
    )
    assert encode_file_meta(odd_plain) == expected.getvalue()


def test_received_file_is_the_same_with_either_meta_writer(tmp_path: Path) -> None:
    """pynetdicom's chunked receive writes the same file with the installed writer."""
    ds_bytes = b"\x08\x00\x16\x00\x02\x00\x00\x00AB"
    outputs = []
    for install in (False, True):
        original = (dimse_messages.create_file_meta, dimse_messages.write_file_meta_info)
        try:
            if install:
                install_file_meta_writer()
            meta = dimse_messages.create_file_meta(
                sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"),
                sop_instance_uid=UID("1.2.3.45"),
                transfer_syntax=UID("1.2.840.10008.1.2"),
            )
            path = tmp_path / f"{install}.dcm"
            with open(path, "wb") as fh:
                fh.write(b"\x00" * 128 + b"DICM")
                dimse_messages.write_file_meta_info(fh, meta)
                fh.write(ds_bytes)
            outputs.append(path.read_bytes())
        finally:
            dimse_messages.create_file_meta, dimse_messages.write_file_meta_info = original
    assert outputs[0] == outputs[1]
    parsed = pydicom.dcmread(tmp_path / "True.dcm")
    assert parsed.file_meta.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert parsed.file_meta.ImplementationClassUID == PYNETDICOM_IMPLEMENTATION_UID
