"""The C-STORE SCP: pynetdicom AE, AE-title routing, the receive path and the bridge to the loop.

Handlers named ``handle_*`` run on pynetdicom's association threads. They reach the event loop
only through the :class:`~kp_gateway.pipeline.ingest.ThreadIntake` they are given (admission,
the end of a source, the project lookup), and write only into the :class:`Spool`.

The receive path never decodes the dataset: pynetdicom writes the received bytes into a spool
file on our filesystem (chunked mode, flat memory) or hands them over in memory; we fsync the
file and its folder, admit it to the pipeline, and only then answer 0x0000.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    StoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from kp_gateway.config import PROJECT_NAME_RE, DicomConfig
from kp_gateway.dicom import patches, reactor
from kp_gateway.dicom.ae_titles import parse_called_ae, parse_calling_ae
from kp_gateway.dicom.fastpath import (
    FastStoreDIMSE,
    use_precreated_files,
)
from kp_gateway.dicom.part10 import (
    InstanceUids,
    Reader,
    check_instance,
    dataset_head_from_file,
    fd_reader,
    plausible_dataset_start,
    received_dataset_head,
)
from kp_gateway.dicom.receive_files import PrecreatedFiles, ReceiveBudget, SpoolFile
from kp_gateway.errors import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    BackendUnavailableError,
    DatasetMismatchError,
    InvalidDicomError,
    PipelineFull,
    dimse_status_for,
)
from kp_gateway.metrics import Metrics
from kp_gateway.model import IngestItem, Routing
from kp_gateway.pipeline.ingest import ThreadIntake
from kp_gateway.pipeline.spool import Spool
from kp_gateway.uids import is_valid_uid

logger = logging.getLogger(__name__)

# PS3.8 9.3.4: A-ASSOCIATE-RJ result / source / reason values.
_REJECTED_PERMANENT = 0x01
_SOURCE_SERVICE_USER = 0x01
_REASON_CALLED_AE_NOT_RECOGNISED = 0x07
_REJECTED_TRANSIENT = 0x02
_SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
_REASON_LOCAL_LIMIT_EXCEEDED = 0x02

# The first block a PDU read allocates; it doubles as the bytes arrive (memory follows them).
_FIRST_RECV_BLOCK = 64 << 10

# Spool files kept created ahead of need (chunked receive): a few hundred milliseconds of
# C-STOREs at full rate, a few open descriptors and write buffers.
PRECREATED_SPOOL_FILES = 32


class CappedAssociationSocket(AssociationSocket):
    """An AssociationSocket that refuses PDUs longer than a cap and reads in large blocks.

    pynetdicom reads whatever PDU length the peer declares, 4 KiB at a time; a peer declaring
    4 GiB would make us allocate it. Over the cap, ``recv`` raises OSError, which pynetdicom
    treats as a closed connection (the association ends, nothing is acknowledged). Under it,
    the buffer grows with the bytes that actually arrive (doubling from 64 KiB), so a
    6-byte header declaring 64 MiB costs 64 KiB, not 64 MiB.
    """

    max_pdu_length = 64 << 20

    @property
    def ready(self) -> bool:
        """Whether data waits on the socket. pynetdicom asks ``select``, which fails for
        descriptors >= 1024 and so ended every association once ~960 HTTP connections were
        open; ``poll`` has no such limit."""
        if self.socket is None or self._is_connected is False:
            return False
        poller = select.poll()
        try:
            poller.register(self.socket, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed, as pynetdicom does
            return False

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_pdu_length:
            raise OSError(
                f"peer declared a PDU of {nr_bytes} bytes, over the cap of {self.max_pdu_length}"
            )
        sock = self.socket
        assert sock is not None
        buffer = bytearray(min(nr_bytes, _FIRST_RECV_BLOCK))
        received = 0
        while received < nr_bytes:
            if received == len(buffer):
                buffer += bytes(min(len(buffer), nr_bytes - len(buffer)))
            try:
                with memoryview(buffer) as view:
                    count = sock.recv_into(view[received:], len(buffer) - received)
            except TimeoutError:
                raise OSError(
                    f"no data for {sock.gettimeout()} s in the middle of a PDU "
                    f"({received} of {nr_bytes} bytes)"
                ) from None
            if count == 0:
                del buffer[received:]
                return buffer
            received += count
        return buffer


class _RequestHandler(RequestHandler):
    def _create_association(self) -> Any:
        assoc = super()._create_association()
        server = cast(_Server, self.server)
        sock = cast(Any, assoc.dul.socket)
        # Re-class the wrapper pynetdicom just made: a second wrapper would announce the
        # connection to the state machine twice.
        sock.__class__ = CappedAssociationSocket
        sock.max_pdu_length = server.max_pdu_length
        # A blocking read in the middle of a PDU keeps the DUL thread from its ARTIM and idle
        # timers: 20 bytes of an A-ASSOCIATE-RQ would hold the slot forever. With a socket
        # timeout a PDU (or a send) that stops making progress ends the connection.
        if sock.socket is not None:
            sock.socket.settimeout(server.pdu_timeout_s)
        # Same for the DIMSE provider: plain C-STORE requests and responses skip pydicom.
        assoc.dimse.__class__ = FastStoreDIMSE
        # Event-driven reactor threads: woken by data, idle checks every poll_interval_s.
        reactor.install(assoc, server.poll_interval_s)
        if server.spool_files is not None:
            use_precreated_files(assoc.dul, server.spool_files)
        # On the DUL thread as it ends (the only thread writing received data sets): a data set
        # cut off by an abort or a dropped connection leaves no spool file behind.
        reactor.add_exit_callback(assoc.dul, cast(FastStoreDIMSE, assoc.dimse).discard_incoming)
        return assoc


class _Server(ThreadedAssociationServer):
    """Refuses connections beyond a bound, so a flood of idle sockets cannot pile up threads."""

    max_pdu_length = 64 << 20
    max_connections = 64
    max_per_peer = 32
    pdu_timeout_s = 30.0
    poll_interval_s = 0.05
    spool_files: PrecreatedFiles | None = None

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Runs on the acceptor thread, before a thread or an association exists."""
        active = self.ae.active_associations
        if len(active) >= self.max_connections:
            logger.warning("refusing connection from %s: too many connections", client_address)
            return False
        peer = client_address[0]
        if sum(1 for assoc in active if assoc.requestor.address == peer) >= self.max_per_peer:
            # One peer (a stuck sender, or an attacker) must leave room for the others.
            logger.warning(
                "refusing connection from %s: it holds %d connections already "
                "(dicom.max_associations_per_peer)",
                peer,
                self.max_per_peer,
            )
            return False
        return True


@dataclass
class _AssociationState:
    routing: Routing
    folder: Path | None = None


class Scp:
    """The DICOM listener; :meth:`start` and :meth:`stop` are called from the loop."""

    def __init__(
        self, cfg: DicomConfig, *, intake: ThreadIntake, spool: Spool, metrics: Metrics
    ) -> None:
        self._cfg = cfg
        self._intake = intake
        self._spool = spool
        self._metrics = metrics
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._states: dict[int, _AssociationState] = {}
        self._lock = threading.Lock()
        self._free_checked_at = 0.0
        self._free_ok = True
        self._spool_files: PrecreatedFiles | None = None
        # Bound once: label lookups on every C-STORE add up at hundreds per second.
        self._received_bytes = metrics.received_bytes
        self._received_instances = metrics.instances_total.labels(source="dicom")
        self._cstore_success = metrics.cstore_total.labels(status="0x0000")
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self._cfg.ae_title)
        ae.maximum_associations = self._cfg.max_associations
        # 0 = unlimited: peers send PDUs as large as they like (far fewer round trips);
        # CappedAssociationSocket still bounds what one PDU may claim.
        ae.maximum_pdu_size = 0
        ae.acse_timeout = self._cfg.acse_timeout_s
        ae.dimse_timeout = self._cfg.dimse_timeout_s
        ae.network_timeout = self._cfg.network_timeout_s
        ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        return ae

    @property
    def precreated_files(self) -> PrecreatedFiles | None:
        """The reserve of spool files received datasets go into (chunked mode, once started)."""
        return self._spool_files

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve on a background thread. Blocking (binds a socket)."""
        # Process-wide pynetdicom flags, set once here (pynetdicom has no per-AE switch).
        _config.STORE_RECV_CHUNKED_DATASET = self._cfg.receive_mode == "chunked"
        # Every replaced pynetdicom global (file meta writer, spool files, negotiation, the
        # reactor's clocks), after checking the pinned version: patches.py lists them all.
        patches.install()
        # Private and newer storage SOP classes are storage too: accept them all, but no
        # other service (negotiation.py: pynetdicom's own rule let MWL and Q/R models in).
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        # Identifiers carry patient data: never log them.
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        # pynetdicom's standard event handlers format every DIMSE message for INFO logging
        # (a few per cent of the receiving interpreter); bind them only when it would show.
        pynetdicom_logs = logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
        _config.LOG_HANDLER_LEVEL = "standard" if pynetdicom_logs else "none"
        spool = self._spool
        spool.tmp.mkdir(parents=True, exist_ok=True)
        spool.receiving.mkdir(parents=True, exist_ok=True)
        if self._cfg.receive_mode == "chunked":
            # On the data filesystem, so the spool commit is a rename, never a copy.
            budget = ReceiveBudget(self._cfg.max_dataset_bytes, self._cfg.min_free_bytes)
            self._spool_files = PrecreatedFiles(spool.receiving, PRECREATED_SPOOL_FILES, budget)
            self._spool_files.start()
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_ESTABLISHED, self.handle_established),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_RELEASED, self.handle_closed),
            (evt.EVT_ABORTED, self.handle_closed),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
        ]
        server = cast(
            _Server,
            self.ae.make_server(
                (self._cfg.host, self._cfg.port),
                evt_handlers=handlers,
                server_class=_Server,
                request_handler=_RequestHandler,
            ),
        )
        # start_server() would register the server; make_server() leaves that to us.
        self.ae._servers.append(server)
        server.max_pdu_length = self._cfg.max_pdu_length_bytes
        server.max_connections = self._cfg.max_associations * 2
        server.max_per_peer = self._cfg.max_associations_per_peer or max(
            1, self._cfg.max_associations * 3 // 4
        )
        server.pdu_timeout_s = self._cfg.pdu_timeout_s
        server.poll_interval_s = self._cfg.poll_interval_s
        server.spool_files = self._spool_files
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="dicom-acceptor", daemon=True
        )
        self._thread.start()
        logger.info("DICOM listening on %s:%d as %s", self._cfg.host, self.port, self._cfg.ae_title)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, wait up to `grace_s` for open associations, abort the rest."""
        server = self._server
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        deadline = time.monotonic() + grace_s
        # Wait for established associations only: a connection still negotiating (or a
        # half-open socket) has nothing acknowledged and is aborted right away.
        while time.monotonic() < deadline and any(
            assoc.is_established for assoc in self.ae.active_associations
        ):
            await asyncio.sleep(0.05)
        if self.ae.active_associations:
            logger.warning("aborting %d associations", len(self.ae.active_associations))
        await asyncio.to_thread(self.ae.shutdown)
        server.server_close()
        self._server = None
        if self._spool_files is not None:
            await asyncio.to_thread(self._spool_files.stop)
            self._spool_files = None

    # -- association lifecycle (association threads) -------------------------------------

    def _project_exists(self, name: str) -> bool:
        return self._intake.project_exists_from_thread(name, timeout_s=10.0)

    def handle_requested(self, event: evt.Event) -> None:
        """Route the association by AE titles; reject an unknown project (A-ASSOCIATE-RJ).

        Runs on an association thread.
        """
        assoc = event.assoc
        primitive = cast(Any, assoc.requestor.primitive)
        called = str(primitive.called_ae_title).strip()
        calling = str(primitive.calling_ae_title).strip()
        project = parse_called_ae(called, self._cfg.default_project, self._cfg.ae_title)
        try:
            known = PROJECT_NAME_RE.fullmatch(project) is not None and self._project_exists(project)
        except Exception:
            logger.exception("project lookup failed; rejecting transiently")
            self._reject(
                assoc,
                _REJECTED_TRANSIENT,
                _SOURCE_SERVICE_PROVIDER_PRESENTATION,
                _REASON_LOCAL_LIMIT_EXCEEDED,
            )
            return
        if not known:
            logger.warning(
                "rejecting association from %s: called AE %r names no project", calling, called
            )
            self._reject(
                assoc, _REJECTED_PERMANENT, _SOURCE_SERVICE_USER, _REASON_CALLED_AE_NOT_RECOGNISED
            )
            return
        routing = Routing(
            project=project,
            dataset=parse_calling_ae(calling),
            source_id=f"assoc-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}",
            calling_ae_title=calling,
            called_ae_title=called,
        )
        with self._lock:
            self._states[id(assoc)] = _AssociationState(routing)

    def _reject(self, assoc: Any, result: int, source: int, reason: int) -> None:
        assoc.acse.send_reject(result, source, reason)
        # As pynetdicom does after its own rejections: wait until the A-ASSOCIATE-RJ is on the
        # wire, or closing the socket right after this handler would swallow it.
        assoc.kill()
        self._metrics.associations_total.labels(result="rejected").inc()

    def handle_rejected(self, event: evt.Event) -> None:
        """Log and count an association pynetdicom refused itself. Runs on an association thread.

        Our own refusals (unknown project) go through :meth:`_reject`; this is the other kind,
        chiefly the association limit (A-ASSOCIATE-RJ transient, local-limit-exceeded), which
        a sender sees as "busy" and which an operator must be able to see too.
        """
        assoc = event.assoc
        acceptors = sum(1 for a in self.ae.active_associations if a.is_acceptor)
        why = (
            f"the association limit (dicom.max_associations = {self._cfg.max_associations}) "
            "is reached"
            if acceptors > self._cfg.max_associations
            else "refused during negotiation"
        )
        primitive = cast(Any, assoc.requestor.primitive)
        calling = str(getattr(primitive, "calling_ae_title", "") or "").strip()
        logger.warning(
            "rejecting association from %s (%s:%s): %s",
            calling or "?",
            assoc.requestor.address,
            assoc.requestor.port,
            why,
        )
        self._metrics.associations_total.labels(result="rejected").inc()

    def handle_established(self, event: evt.Event) -> None:
        """Count the association. Runs on an association thread."""
        self._metrics.associations_total.labels(result="accepted").inc()
        self._metrics.active_associations.inc()

    def handle_closed(self, event: evt.Event) -> None:
        """Tell series completion the source ended. Runs on an association thread."""
        with self._lock:
            state = self._states.pop(id(event.assoc), None)
        if state is None:
            return
        self._metrics.active_associations.dec()
        source_id = state.routing.source_id
        self._intake.source_closed_from_thread(source_id)

    def handle_echo(self, event: evt.Event) -> int:
        """C-ECHO: always success. Runs on an association thread."""
        return STATUS_SUCCESS

    # -- C-STORE (association threads) ----------------------------------------------------

    def _storage_has_room(self) -> bool:
        now = time.monotonic()
        if now - self._free_checked_at > 1.0:
            self._free_checked_at = now
            try:
                free = shutil.disk_usage(self._spool.root).free
                self._free_ok = free >= self._cfg.min_free_bytes
            except OSError:
                self._free_ok = False
        return self._free_ok

    def handle_store(self, event: evt.Event) -> int:
        """Spool the received bytes durably, admit them to the pipeline, return the status.

        Runs on an association thread. Returns 0x0000 once the file and its folder are
        fsynced and admitted; 0xA700 when storage is full or the pipeline stays saturated
        past ``dicom.admission_wait_s``; 0xC210 when the bytes are not a whole instance the
        store stage would keep (:func:`~kp_gateway.dicom.part10.check_instance`: invalid or
        missing UIDs, cut off); 0xA900 when the dataset's SOP Class or Instance UID is not
        the request's. Nothing refused is kept. Never raises: pynetdicom would answer 0xC211
        for us.
        """
        spooled: Path | None = None
        try:
            with self._lock:
                state = self._states.get(id(event.assoc))
            if state is None:
                raise InvalidDicomError("C-STORE on an association that was never routed")
            if not self._storage_has_room():
                raise PipelineFull("storage is below dicom.min_free_bytes")
            request = cast(Any, event.request)
            sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
            if not is_valid_uid(sop_instance_uid):
                raise InvalidDicomError(f"AffectedSOPInstanceUID {sop_instance_uid!r} is invalid")
            requested = _RequestedInstance(
                str(request.AffectedSOPClassUID or ""),
                sop_instance_uid,
                str(event.context.transfer_syntax),
            )
            if state.folder is None:
                state.folder = self._spool.open_source(state.routing)
            spooled, size = self._spool_received(event, state.folder, requested)
            item = IngestItem(spooled, state.routing, time.time())
            self._intake.submit_from_thread(item, self._cfg.admission_wait_s)
            self._received_bytes.inc(size)
            self._received_instances.inc()
            self._cstore_success.inc()
            return STATUS_SUCCESS
        except Exception as exc:
            status = dimse_status_for(exc)
            if status == STATUS_OUT_OF_RESOURCES or isinstance(exc, InvalidDicomError):
                logger.warning("C-STORE refused with 0x%04X: %s", status, exc)
            else:
                logger.exception("C-STORE failed with 0x%04X", status)
            if spooled is not None:
                # Not acknowledged, so not ours to keep.
                with contextlib.suppress(OSError):
                    spooled.unlink()
            self._metrics.cstore_total.labels(status=f"0x{status:04X}").inc()
            return status

    def _spool_received(
        self, event: evt.Event, folder: Path, requested: _RequestedInstance
    ) -> tuple[Path, int]:
        spool = self._spool
        if self._cfg.receive_mode == "chunked":
            received = cast(Any, event.request)._dataset_file
            if isinstance(received, SpoolFile):
                return self._commit_spool_file(received, folder, requested)
            return self._commit_received_path(Path(event.dataset_path), folder, requested)
        data = event.encoded_dataset(include_meta=True)
        dataset_length = len(cast(Any, event.request).DataSet.getbuffer())
        meta_end = len(data) - dataset_length
        head = bytes(data[meta_end : meta_end + 16])
        if not plausible_dataset_start(head, requested.transfer_syntax, dataset_length):
            raise InvalidDicomError("the received bytes do not start like a DICOM dataset")
        view = memoryview(data)
        _check_received(
            lambda offset, count: bytes(view[offset : offset + count]),
            len(data),
            meta_end,
            requested,
        )
        return spool.write_file(data, folder), len(data)

    def _commit_spool_file(
        self, received: SpoolFile, folder: Path, requested: _RequestedInstance
    ) -> tuple[Path, int]:
        # The usual case: a precreated file, still open, whose first bytes are in memory.
        spool = self._spool
        try:
            if received.error is not None:
                raise received.error
            head, dataset_start = received_dataset_head(received)
            dataset_length = received.size - dataset_start
            if not plausible_dataset_start(head, requested.transfer_syntax, dataset_length):
                raise InvalidDicomError("the received bytes do not start like a DICOM dataset")
            received.flush()  # the walk reads the file back through its descriptor
            _check_received(fd_reader(received.fd), received.size, dataset_start, requested)
            received.sync(durable=spool.fsync)
            return spool.commit_file(received.name, folder, already_synced=True), received.size
        except OSError as exc:
            # A full or failing disk: out of resources (0xA700), the sender may retry.
            raise BackendUnavailableError(f"spooling the received data set failed: {exc}") from exc

    def _commit_received_path(
        self, received: Path, folder: Path, requested: _RequestedInstance
    ) -> tuple[Path, int]:
        # A file pynetdicom created itself (no precreated file was handed to this association).
        spool = self._spool
        try:
            # One descriptor for the sniff and the fsync: this runs once per C-STORE.
            fd = os.open(received, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                head, dataset_start = dataset_head_from_file(fd)
                transfer_syntax = requested.transfer_syntax
                if not plausible_dataset_start(head, transfer_syntax, size - dataset_start):
                    raise InvalidDicomError("the received bytes do not start like a DICOM dataset")
                _check_received(fd_reader(fd), size, dataset_start, requested)
                if spool.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            return spool.commit_file(received, folder, already_synced=True), size
        except OSError as exc:
            # A full or failing disk, or pynetdicom's file on another filesystem: 0xA700.
            raise BackendUnavailableError(f"spooling the received data set failed: {exc}") from exc


class _RequestedInstance(NamedTuple):
    """What a C-STORE-RQ and its presentation context say the dataset is."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def _check_received(
    read: Reader, size: int, dataset_start: int, requested: _RequestedInstance
) -> InstanceUids:
    """Refuse, before it is acknowledged, a received dataset the store stage would refuse
    (or store under another UID than the one confirmed). Runs on an association thread;
    blocking (reads the element headers back, about one read per instance).

    Raises
    ------
    InvalidDicomError
        From :func:`~kp_gateway.dicom.part10.check_instance`: invalid UIDs, cut off.
    DatasetMismatchError
        The dataset's SOP Class or Instance UID is not the request's (PS3.4 B.2.3, 0xA900).
    """
    uids = check_instance(
        read, size, dataset_start, requested.transfer_syntax, requested.sop_class_uid
    )
    if uids.sop_instance_uid != requested.sop_instance_uid:
        raise DatasetMismatchError(
            f"the dataset's SOPInstanceUID {uids.sop_instance_uid} is not the request's "
            f"AffectedSOPInstanceUID {requested.sop_instance_uid}"
        )
    if uids.sop_class_uid != requested.sop_class_uid:
        raise DatasetMismatchError(
            f"the dataset's SOPClassUID {uids.sop_class_uid} is not the request's "
            f"AffectedSOPClassUID {requested.sop_class_uid}"
        )
    return uids


__all__ = ["Scp"]
