"""Hand-encoded DIMSE fixtures on pynetdicom's C-STORE path: the response and the file meta.

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
fixed elements. :func:`install_file_meta_writer` swaps in an encoder of those elements; a unit
test checks its bytes against pydicom's.

And the file itself: pynetdicom creates it with ``tempfile.NamedTemporaryFile`` when the
dataset's first fragment arrives, which waits for a journal transaction on the receive path.
:func:`install_spool_file_factory` lets an association's DUL thread take a file created ahead
of time instead (:class:`~kp_gateway.pipeline.spool.PrecreatedFiles`).
"""

from __future__ import annotations

import struct
import tempfile
import threading
from typing import IO, Any, NamedTuple

import pynetdicom.dimse_messages as pynetdicom_dimse_messages
from pydicom.filewriter import write_file_meta_info as pydicom_write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from kp_gateway.pipeline.spool import PrecreatedFiles

_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
# Message control header of a PDV (PS3.8 E.2): command, last fragment.
_LAST_COMMAND_FRAGMENT = b"\x03"
# A PDV item adds its length (4), the context ID (1) and the control header (1) to the bytes.
_PDV_OVERHEAD = 6


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def _ui(element: int, uid: str) -> bytes:
    raw = _padded(uid, b"\x00")  # UI values are padded to even length with NUL (PS3.5 6.2)
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


class FastStoreResponseDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with the plain C-STORE response encoded directly.

    Installed by re-classing an association's provider before the association starts.
    ``send_msg`` runs on the association thread, as in pynetdicom.
    """

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


class PlainFileMeta(NamedTuple):
    """What pynetdicom's ``create_file_meta`` puts in a received dataset's file meta."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION


def _explicit(tag_element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # OB has a reserved field and a 4-byte length (PS3.5 7.1.2)
        return struct.pack("<HH2s2xI", 0x0002, tag_element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(meta: PlainFileMeta) -> bytes:
    """The file meta group (without preamble and prefix), explicit VR little endian."""
    body = b"".join(
        (
            _explicit(0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, b"UI", _padded(meta.sop_class_uid, b"\x00")),
            _explicit(0x0003, b"UI", _padded(meta.sop_instance_uid, b"\x00")),
            _explicit(0x0010, b"UI", _padded(meta.transfer_syntax, b"\x00")),
            _explicit(0x0012, b"UI", _padded(meta.implementation_uid, b"\x00")),
            _explicit(0x0013, b"SH", _padded(meta.implementation_version, b" ")),
        )
    )
    return _explicit(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _create_plain_file_meta(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, **more: str
) -> PlainFileMeta:
    return PlainFileMeta(str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax), **more)


def _write_file_meta(fp: IO[bytes], file_meta: Any, enforce_standard: bool = True) -> None:
    if isinstance(file_meta, PlainFileMeta):
        fp.write(encode_file_meta(file_meta))
    else:
        pydicom_write_file_meta_info(fp, file_meta, enforce_standard)  # type: ignore[arg-type]


def install_file_meta_writer() -> None:
    """Make pynetdicom's chunked receive write file meta with :func:`encode_file_meta`.

    Process-wide; both names are used only where a received C-STORE dataset is spooled.
    """
    pynetdicom_dimse_messages.create_file_meta = _create_plain_file_meta  # type: ignore[attr-defined,assignment]
    pynetdicom_dimse_messages.write_file_meta_info = _write_file_meta  # type: ignore[attr-defined,assignment]


_SPOOL_FILES = "_kp_spool_files"


def use_precreated_files(dul: Any, spool_files: PrecreatedFiles) -> None:
    """Datasets received by this DUL go into `spool_files`. Acceptor thread, before it starts."""
    setattr(dul, _SPOOL_FILES, spool_files)


def _named_temporary_file(**kwargs: Any) -> Any:
    # pynetdicom calls this on the DUL thread of the association receiving the dataset.
    spool_files: PrecreatedFiles | None = getattr(threading.current_thread(), _SPOOL_FILES, None)
    if spool_files is None:
        return tempfile.NamedTemporaryFile(**kwargs)  # pynetdicom closes and unlinks it
    return spool_files.take()


def install_spool_file_factory() -> None:
    """Make pynetdicom's chunked receive take its files from :func:`use_precreated_files`.

    Process-wide; associations without precreated files get ``NamedTemporaryFile`` as before.
    """
    pynetdicom_dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[attr-defined,assignment]


__all__ = [
    "FastStoreResponseDIMSE",
    "PlainFileMeta",
    "encode_file_meta",
    "encode_store_response",
    "install_file_meta_writer",
    "install_spool_file_factory",
    "use_precreated_files",
]
