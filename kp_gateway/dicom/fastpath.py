"""Hand-coded DIMSE on pynetdicom's C-STORE path: the request, the response and the file meta.

pynetdicom turns every response primitive into a pydicom Dataset and encodes it twice (once
to measure the command group length, once to send). For a small instance that is about a fifth
of the receiving interpreter's time per C-STORE, and that interpreter is what limits the
rate. A C-STORE-RSP without an error comment or offending element is seven fixed elements in
implicit VR little endian (PS3.7 9.3.1.2 and E.1), so it is encoded here directly; anything
else, or a peer whose PDU limit the single fragment would exceed, or bound DIMSE-sent handlers
(logging), goes through pynetdicom unchanged. A unit test checks the bytes against pynetdicom's
own encoding.

The same goes for the file meta header pynetdicom writes in front of each dataset it receives
in chunked mode: it builds a pydicom FileMetaDataset and runs pydicom's generic writer for six
fixed elements. :func:`write_file_meta` (installed by :mod:`~kp_gateway.dicom.patches`)
encodes those elements
(:func:`~kp_gateway.dicom.part10.encode_file_meta`); a unit test checks its bytes against
pydicom's.

The request is decoded directly as well: pynetdicom decodes each command set with pydicom,
then copies it element by element into a primitive, validating as it goes; with the file meta
that is about a sixth of the time one small C-STORE takes on one association (measured). A
C-STORE-RQ whose command set comes whole in one PDV and holds only the usual elements is parsed
here with ``struct``, its dataset written straight into a spool file, and the same primitive
queued for the association thread; anything else goes through pynetdicom. A unit test checks
the primitive against pynetdicom's own decoding.

And the file itself: pynetdicom creates it with ``tempfile.NamedTemporaryFile`` when the
dataset's first fragment arrives, which costs 0.5 to 1 ms on the receive path (measured).
:func:`named_temporary_file` (installed by :mod:`~kp_gateway.dicom.patches`) lets an
association's DUL thread take a file created ahead of time instead
(:class:`~kp_gateway.dicom.receive_files.PrecreatedFiles`).
"""

from __future__ import annotations

import io
import logging
import struct
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from pydicom.filewriter import write_file_meta_info as pydicom_write_file_meta_info
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from kp_gateway.dicom.part10 import PlainFileMeta, encode_file_meta, padded
from kp_gateway.dicom.receive_files import PrecreatedFiles, SpoolFile, discard_received_file
from kp_gateway.uids import is_valid_uid

_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
# Message control header of a PDV (PS3.8 E.2): command, last fragment.
_LAST_COMMAND_FRAGMENT = b"\x03"
# A PDV item adds its length (4), the context ID (1) and the control header (1) to the bytes.
_PDV_OVERHEAD = 6
# What pynetdicom writes in front of the file meta of a received dataset (PS3.10 7.1).
_PREAMBLE_AND_PREFIX = bytes(128) + b"DICM"

logger = logging.getLogger(__name__)


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def _ui(element: int, uid: str) -> bytes:
    raw = padded(uid, b"\x00")  # UI values are padded to even length with NUL (PS3.5 6.2)
    return struct.pack("<HHI", 0x0000, element, len(raw)) + raw


def encode_store_response(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int
) -> bytes:
    """The command set of a C-STORE-RSP without optional elements, implicit VR little endian."""
    body = b"".join(
        (
            _ui(0x0002, sop_class_uid),
            _us(0x0100, _C_STORE_RSP),
            _us(0x0120, message_id),
            _us(0x0800, _NO_DATA_SET),
            _us(0x0900, status),
            _ui(0x1000, sop_instance_uid),
        )
    )
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


# The command elements of a plain C-STORE-RQ (PS3.7 9.3.1.1): group length, Affected SOP
# Class UID, Command Field, Message ID, Priority, Command Data Set Type, Affected SOP Instance
# UID. Move originator fields and anything else go through pynetdicom.
_PLAIN_STORE_RQ_ELEMENTS = frozenset((0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000))


def _us_value(value: bytes | None) -> int | None:
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _ui_value(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        uid = value.rstrip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        return None
    return uid if is_valid_uid(uid) else None


def parse_store_request(command_set: bytes) -> C_STORE | None:
    """The C-STORE-RQ primitive of a whole command set (implicit VR little endian), or None
    when it is anything else: another command, no data set, unusual or invalid elements. Pure.
    """
    elements: dict[int, bytes] = {}
    offset, end = 0, len(command_set)
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHI", command_set, offset)
        offset += 8
        if group != 0x0000 or element not in _PLAIN_STORE_RQ_ELEMENTS or offset + length > end:
            return None
        elements[element] = command_set[offset : offset + length]
        offset += length
    message_id = _us_value(elements.get(0x0110))
    priority = _us_value(elements.get(0x0700))
    data_set_type = _us_value(elements.get(0x0800))
    sop_class_uid = _ui_value(elements.get(0x0002))
    sop_instance_uid = _ui_value(elements.get(0x1000))
    if (
        _us_value(elements.get(0x0100)) != _C_STORE_RQ
        or data_set_type is None
        or data_set_type == _NO_DATA_SET
        or message_id is None
        or priority is None
        or sop_class_uid is None
        or sop_instance_uid is None
    ):
        return None
    request = C_STORE()
    # pynetdicom's own setters, so the primitive is validated as pynetdicom would.
    try:
        request.MessageID = message_id
        request.AffectedSOPClassUID = sop_class_uid
        request.AffectedSOPInstanceUID = sop_instance_uid
        request.Priority = priority
    except (TypeError, ValueError):
        return None
    return request


class _IncomingStore:
    """A C-STORE-RQ whose data set is being received into a spool file."""

    __slots__ = ("context_id", "file", "request")

    def __init__(self, context_id: int, request: C_STORE, file: SpoolFile) -> None:
        self.context_id = context_id
        self.request = request
        self.file = file


class FastStoreDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with plain C-STORE requests and responses coded directly.

    Installed by re-classing an association's provider before the association starts.
    ``receive_primitive`` runs on the DUL thread and ``send_msg`` on the association thread,
    as in pynetdicom.
    """

    # Class-level default: re-classing runs no __init__.
    _incoming: _IncomingStore | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        values = primitive.presentation_data_value_list
        index = 0
        while index < len(values):
            incoming = self._incoming
            if incoming is None:
                if self.message is not None or not self._start_store(*values[index]):
                    # pynetdicom decodes the rest (it serves the first message it completes
                    # and drops whatever follows in the same P-DATA).
                    if index:
                        rest = P_DATA()
                        rest.presentation_data_value_list.extend(values[index:])
                        primitive = rest
                    super().receive_primitive(primitive)
                    return
                index += 1
                continue
            context_id, value = values[index]
            index += 1
            if value[0] & 1 or context_id != incoming.context_id:
                # A command, or data on another presentation context, while a data set is
                # arriving: the peer broke PS3.8 E.2; abort (Evt19, invalid PDU) rather than
                # guess which message the bytes belong to.
                self.discard_incoming()
                self.dul.event_queue.put("Evt19")
                return
            incoming.file.write(value[1:])
            if incoming.file.too_large:
                # An endless (or just too large) dataset: nothing can be answered until its
                # last fragment, which may never come; abort rather than read it forever.
                logger.warning("aborting an association: %s", incoming.file.error)
                self.discard_incoming()
                self.dul.event_queue.put("Evt19")
                return
            if value[0] & 2:
                self._finish_store(incoming)

    def _start_store(self, context_id: int, value: bytes) -> bool:
        """Begin a plain C-STORE-RQ from its command PDV; False leaves it to pynetdicom."""
        if value[0] & 3 != 3:  # not a whole command set in one fragment
            return False
        spool_files: PrecreatedFiles | None = getattr(self.dul, _SPOOL_FILES, None)
        if spool_files is None or self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            return False
        request = parse_store_request(value[1:])
        context = self.assoc._accepted_cx.get(context_id)
        if request is None or context is None:
            return False
        meta = PlainFileMeta(
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            str(context.transfer_syntax[0]),
        )
        spool_file = spool_files.take()
        spool_file.write(_PREAMBLE_AND_PREFIX + encode_file_meta(meta))
        self._incoming = _IncomingStore(context_id, request, spool_file)
        return True

    def _finish_store(self, incoming: _IncomingStore) -> None:
        incoming.file.flush()
        request: Any = incoming.request
        request.DataSet = io.BytesIO()  # as pynetdicom leaves it in chunked mode
        request._context_id = incoming.context_id
        request._dataset_path = Path(incoming.file.name)
        request._dataset_file = incoming.file
        self._incoming = None
        self.msg_queue.put((incoming.context_id, request))

    def discard_incoming(self) -> None:
        """Delete the spool file of a data set that will never complete (the association
        ended or broke the protocol mid-transfer), whichever path was receiving it. Runs on
        the DUL thread."""
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            discard_received_file(incoming.file)
        message, self.message = self.message, None
        if message is not None and message._data_set_file is not None:
            discard_received_file(message._data_set_file)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        encoded = self._plain_store_response(primitive)
        if encoded is None:
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + encoded))
        self.dul.send_pdu(pdata)

    def _plain_store_response(self, primitive: Any) -> bytes | None:
        if type(primitive) is not C_STORE:
            return None
        # pynetdicom's stubs type the optional response fields too narrowly for these checks.
        rsp: Any = primitive
        if rsp.MessageIDBeingRespondedTo is None:
            return None
        if rsp.ErrorComment is not None or rsp.OffendingElement is not None:
            return None
        sop_class = rsp.AffectedSOPClassUID
        sop_instance = rsp.AffectedSOPInstanceUID
        if sop_class is None or sop_instance is None or rsp.Status is None:
            return None
        if self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            return None  # someone (pynetdicom's logging) wants the DIMSEMessage object
        encoded = encode_store_response(
            int(rsp.MessageIDBeingRespondedTo),
            str(sop_class),
            str(sop_instance),
            int(rsp.Status),
        )
        limit = self.maximum_pdu_size
        if limit and len(encoded) + _PDV_OVERHEAD > limit:
            return None
        return encoded


def create_plain_file_meta(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, **more: str
) -> PlainFileMeta:
    return PlainFileMeta(str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax), **more)


def write_file_meta(fp: IO[bytes], file_meta: Any, enforce_standard: bool = True) -> None:
    if isinstance(file_meta, PlainFileMeta):
        fp.write(encode_file_meta(file_meta))
    else:
        pydicom_write_file_meta_info(fp, file_meta, enforce_standard)  # type: ignore[arg-type]


_SPOOL_FILES = "_kp_spool_files"


def use_precreated_files(dul: Any, spool_files: PrecreatedFiles) -> None:
    """Datasets received by this DUL go into `spool_files`. Acceptor thread, before it starts."""
    setattr(dul, _SPOOL_FILES, spool_files)


def named_temporary_file(**kwargs: Any) -> Any:
    # pynetdicom calls this on the DUL thread of the association receiving the dataset.
    spool_files: PrecreatedFiles | None = getattr(threading.current_thread(), _SPOOL_FILES, None)
    if spool_files is None:
        return tempfile.NamedTemporaryFile(**kwargs)  # pynetdicom closes and unlinks it
    return spool_files.take()


__all__ = [
    "FastStoreDIMSE",
    "create_plain_file_meta",
    "encode_store_response",
    "named_temporary_file",
    "parse_store_request",
    "use_precreated_files",
    "write_file_meta",
]
