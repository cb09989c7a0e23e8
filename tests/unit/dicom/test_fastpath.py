"""The hand-coded C-STORE request, response and file meta equal what pynetdicom does."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, _config, dimse_messages, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

from kp_gateway.dicom.fastpath import (
    FastStoreDIMSE,
    create_plain_file_meta,
    encode_store_response,
    parse_store_request,
    use_precreated_files,
    write_file_meta,
)
from kp_gateway.dicom.part10 import PlainFileMeta, encode_file_meta
from kp_gateway.dicom.receive_files import PrecreatedFiles, SpoolFile


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
    assoc.dimse.__class__ = FastStoreDIMSE
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
                dimse_messages.create_file_meta = create_plain_file_meta
                dimse_messages.write_file_meta_info = write_file_meta
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


# -- C-STORE-RQ decoded directly ------------------------------------------------------------

DATASET = (
    b"\x08\x00\x16\x00\x1a\x00\x00\x00"
    + b"1.2.840.10008.5.1.4.1.1.2\x00"
    + b"\x10\x00\x10\x00\x04\x00\x00\x00AB^C"
)


def store_request(
    message_id: int = 7,
    sop_instance: str = "1.2.826.0.1.3680043.8.498.1",
    dataset: bytes = DATASET,
    **extra: Any,
) -> C_STORE:
    rq = C_STORE()
    rq.MessageID = message_id
    rq.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rq.AffectedSOPInstanceUID = sop_instance
    rq.Priority = 2
    rq.DataSet = io.BytesIO(dataset)
    for name, value in extra.items():
        setattr(rq, name, value)
    return rq


def request_pdata(rq: C_STORE, context_id: int = 1, max_pdu: int = 0) -> list[P_DATA]:
    """The P-DATA primitives pynetdicom's own SCU would send for `rq`."""
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    return list(message.encode_msg(context_id, max_pdu))


def command_set_of(rq: C_STORE) -> bytes:
    first = request_pdata(rq)[0].presentation_data_value_list[0][1]
    assert first[0] & 3 == 3
    return bytes(first[1:])


def test_parsed_request_equals_pynetdicoms_decoding() -> None:
    rq = store_request(message_id=65535)
    parsed = parse_store_request(command_set_of(rq))
    assert parsed is not None
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    decoded = message.message_to_primitive()
    for name in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority"):
        assert getattr(parsed, name) == getattr(decoded, name), name
    assert isinstance(parsed.AffectedSOPClassUID, UID)


@pytest.mark.parametrize(
    "case", ["echo", "move originator", "no data set", "bad uid", "truncated", "other group"]
)
def test_unusual_commands_are_left_to_pynetdicom(case: str) -> None:
    if case == "echo":
        echo = C_ECHO_RQ()
        primitive = C_ECHO()
        primitive.MessageID = 1
        primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
        echo.primitive_to_message(primitive)
        command = bytes(next(echo.encode_msg(1, 0)).presentation_data_value_list[0][1][1:])
    elif case == "move originator":
        command = command_set_of(
            store_request(MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=3)
        )
    else:
        command = command_set_of(store_request())
        if case == "no data set":
            command = command.replace(
                b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x00",
                b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x01",
            )
        elif case == "bad uid":
            command = command.replace(
                b"1.2.826.0.1.3680043.8.498.1", b"1.2.826.0.1.3680043.8.4x8.1"
            )
        elif case == "truncated":
            command = command[:-3]
        elif case == "other group":
            command += b"\x08\x00\x18\x00\x02\x00\x00\x001\x00"
    assert parse_store_request(command) is None


@pytest.fixture
def no_pynetdicom_logging() -> Iterator[None]:
    """Associations made meanwhile get no logging handlers, as when the gateway's log is quiet;
    pynetdicom's own path decodes in memory (an in-process gateway may have left its chunked
    mode on: the flag is process-wide)."""
    flags = (_config.LOG_HANDLER_LEVEL, _config.STORE_RECV_CHUNKED_DATASET)
    _config.LOG_HANDLER_LEVEL = "none"
    _config.STORE_RECV_CHUNKED_DATASET = False
    try:
        yield
    finally:
        _config.LOG_HANDLER_LEVEL, _config.STORE_RECV_CHUNKED_DATASET = flags


def accept_ct_context(assoc: Association) -> None:
    """Context 1 accepted: CT Image Storage in explicit VR little endian."""
    context = PresentationContext()
    context.context_id = 1
    context.abstract_syntax = "1.2.840.10008.5.1.4.1.1.2"
    context.transfer_syntax = ["1.2.840.10008.1.2.1"]
    assoc._accepted_cx = {1: context}


def fast_provider(tmp_path: Path) -> tuple[Any, Association, PrecreatedFiles]:
    """An unstarted acceptor association with one accepted context, re-classed as in scp.py."""
    provider, assoc = make_provider()
    assert not assoc.get_handlers(evt.EVT_DIMSE_RECV), "use the no_pynetdicom_logging fixture"
    accept_ct_context(assoc)
    spool_files = PrecreatedFiles(tmp_path, depth=1)
    use_precreated_files(assoc.dul, spool_files)
    return provider, assoc, spool_files


def pynetdicom_received_file(rq: C_STORE, tmp_path: Path, max_pdu: int) -> bytes:
    """What pynetdicom's own chunked receive writes for the same request."""
    assoc = Association(AE(), MODE_ACCEPTOR)
    accept_ct_context(assoc)
    chunked = _config.STORE_RECV_CHUNKED_DATASET
    _config.STORE_RECV_CHUNKED_DATASET = True
    try:
        for pdata in request_pdata(rq, 1, max_pdu):
            assoc.dimse.receive_primitive(pdata)
        _, primitive = assoc.dimse.msg_queue.get_nowait()
        path = Path(primitive._dataset_path)
        primitive._dataset_file.close()
        data = path.read_bytes()
        path.unlink()
        return data
    finally:
        _config.STORE_RECV_CHUNKED_DATASET = chunked


@pytest.mark.parametrize("max_pdu", [0, 256])
def test_received_request_and_file_equal_pynetdicoms(
    no_pynetdicom_logging: None, tmp_path: Path, max_pdu: int
) -> None:
    """Whole or in many fragments, the same primitive and the same file as pynetdicom's."""
    rq = store_request(dataset=DATASET * 20)
    provider, assoc, _ = fast_provider(tmp_path)
    pdatas = request_pdata(rq, 1, max_pdu)
    assert (len(pdatas) > 2) == bool(max_pdu)  # command, then one or several data PDVs
    for pdata in pdatas[:-1]:
        provider.receive_primitive(pdata)
        assert assoc.dimse.msg_queue.empty()
    provider.receive_primitive(pdatas[-1])
    context_id, received = assoc.dimse.msg_queue.get_nowait()
    assert context_id == 1 and provider.message is None
    assert isinstance(received._dataset_file, SpoolFile)
    assert received.MessageID == 7 and received.Priority == 2
    assert received.AffectedSOPInstanceUID == "1.2.826.0.1.3680043.8.498.1"
    received._dataset_file.close()
    assert Path(received._dataset_path).read_bytes() == pynetdicom_received_file(
        rq, tmp_path, max_pdu
    )


def test_data_set_end_and_next_request_in_one_pdata(
    no_pynetdicom_logging: None, tmp_path: Path
) -> None:
    first, second = store_request(message_id=1), store_request(message_id=2, dataset=DATASET * 3)
    provider, assoc, _ = fast_provider(tmp_path)
    values = [
        value
        for rq in (first, second)
        for pdata in request_pdata(rq)
        for value in pdata.presentation_data_value_list
    ]
    combined = P_DATA()
    combined.presentation_data_value_list.extend(values)
    provider.receive_primitive(combined)
    received = [assoc.dimse.msg_queue.get_nowait()[1] for _ in range(2)]
    assert [rq.MessageID for rq in received] == [1, 2]
    for rq, dataset in zip(received, (DATASET, DATASET * 3), strict=True):
        rq._dataset_file.close()
        assert Path(rq._dataset_path).read_bytes().endswith(dataset)


def test_command_in_the_middle_of_a_data_set_aborts(
    no_pynetdicom_logging: None, tmp_path: Path
) -> None:
    provider, assoc, _ = fast_provider(tmp_path)
    command, first_fragment = request_pdata(store_request(dataset=DATASET * 20), 1, 256)[:2]
    provider.receive_primitive(command)
    provider.receive_primitive(first_fragment)
    assert list(tmp_path.iterdir())  # the data set is being written
    provider.receive_primitive(command)  # a second command before the data set ended
    assert assoc.dul.event_queue.get_nowait() == "Evt19"
    assert list(tmp_path.iterdir()) == []
    assert assoc.dimse.msg_queue.empty()


@pytest.mark.parametrize("case", ["no spool files", "receive handler", "fragmented command"])
def test_pynetdicom_decodes_without_spool_files_or_with_a_receive_handler(
    no_pynetdicom_logging: None, tmp_path: Path, case: str
) -> None:
    """Memory mode (no spool files), a bound EVT_DIMSE_RECV or a command set in several
    fragments keep pynetdicom's own path (here in memory: its chunked mode is off)."""
    max_pdu = 40 if case == "fragmented command" else 0  # 40: the command takes 5 PDVs
    if case == "no spool files":
        provider, assoc = make_provider()
    else:
        provider, assoc, _ = fast_provider(tmp_path)
    if case == "receive handler":
        assoc.bind(evt.EVT_DIMSE_RECV, lambda event: None)
    for pdata in request_pdata(store_request(), 1, max_pdu):
        provider.receive_primitive(pdata)
    _, received = assoc.dimse.msg_queue.get_nowait()
    assert received._dataset_file is None
    assert received.DataSet.getvalue() == DATASET
    assert list(tmp_path.iterdir()) == []


def test_many_requests_in_one_pdata_are_all_queued(
    no_pynetdicom_logging: None, tmp_path: Path
) -> None:
    """A peer packing a thousand small C-STOREs into one P-DATA gets each one served."""
    provider, assoc, _ = fast_provider(tmp_path)
    combined = P_DATA()
    for message_id in range(1, 1201):
        for pdata in request_pdata(store_request(message_id=message_id)):
            combined.presentation_data_value_list.extend(pdata.presentation_data_value_list)
    provider.receive_primitive(combined)
    received = [assoc.dimse.msg_queue.get_nowait()[1] for _ in range(1200)]
    assert [rq.MessageID for rq in received] == list(range(1, 1201))
    for rq in received:
        rq._dataset_file.close()
