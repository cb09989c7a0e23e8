"""Every use of pynetdicom's internals, listed in one place, checked against the pinned
version, and installed by one call.

The receive path leans on pynetdicom internals for speed and safety: module globals it
replaces, classes it re-classes instances to, private methods it overrides and private
attributes it reads. None of them is public API, so an upgrade of pynetdicom may break any of
them silently. :data:`PATCHES` names each one with the reason; :func:`install` refuses to run
on a pynetdicom other than :data:`PINNED_PYNETDICOM`, and ``tests/unit/dicom/test_patches.py``
checks that every name still exists with the signature the gateway expects. To upgrade:
change the pin in ``pyproject.toml`` and here, run that test, and read each failure.

The replacements themselves live beside the code they serve (``negotiation.py``,
``fastpath.py``, ``reactor.py``, ``scp.py``).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Literal

import pynetdicom.acse as pynetdicom_acse
import pynetdicom.association as pynetdicom_association
import pynetdicom.dimse_messages as pynetdicom_dimse_messages
import pynetdicom.dul as pynetdicom_dul

from kp_gateway.dicom import fastpath, negotiation, reactor
from kp_gateway.errors import IncompatibleDependencyError

# The only pynetdicom these patches were written and tested against (pyproject.toml pins it).
PINNED_PYNETDICOM = "3.0.4"

# replaced: a module global is swapped for ours. overridden: a subclass of ours replaces the
# method (instances are re-classed to the subclass). read: a private attribute we rely on.
PatchKind = Literal["replaced", "overridden", "read"]


@dataclass(frozen=True, slots=True)
class Patch:
    """One use of a pynetdicom internal."""

    target: str  # dotted name inside pynetdicom
    kind: PatchKind
    by: str  # what stands in for it, or who reads it
    why: str


PATCHES: tuple[Patch, ...] = (
    Patch(
        "pynetdicom.acse.negotiate_unrestricted",
        "replaced",
        "kp_gateway.dicom.negotiation.negotiate_storage_only",
        "accept every storage SOP class but no other service (pynetdicom's rule let MWL in)",
    ),
    Patch(
        "pynetdicom.dimse_messages.create_file_meta",
        "replaced",
        "kp_gateway.dicom.fastpath.create_plain_file_meta",
        "the received dataset's file meta without pydicom's generic Dataset machinery",
    ),
    Patch(
        "pynetdicom.dimse_messages.write_file_meta_info",
        "replaced",
        "kp_gateway.dicom.fastpath.write_file_meta",
        "encode that file meta directly (a tenth of the receiving interpreter before)",
    ),
    Patch(
        "pynetdicom.dimse_messages.NamedTemporaryFile",
        "replaced",
        "kp_gateway.dicom.fastpath.named_temporary_file",
        "chunked receive writes into spool files created ahead of need",
    ),
    Patch(
        "pynetdicom.association.time",
        "replaced",
        "kp_gateway.dicom.reactor.ReactorClock",
        "the association thread sleeps until a message arrives instead of polling",
    ),
    Patch(
        "pynetdicom.dul.time",
        "replaced",
        "kp_gateway.dicom.reactor.ReactorClock",
        "the DUL thread sleeps until data arrives instead of polling",
    ),
    Patch(
        "pynetdicom.transport.AssociationSocket.recv",
        "overridden",
        "kp_gateway.dicom.scp.CappedAssociationSocket.recv",
        "cap the PDU length; memory follows the bytes that arrive; a stalled PDU times out",
    ),
    Patch(
        "pynetdicom.transport.AssociationSocket.ready",
        "overridden",
        "kp_gateway.dicom.scp.CappedAssociationSocket.ready",
        "poll instead of select, which fails for descriptors >= 1024",
    ),
    Patch(
        "pynetdicom.transport.AssociationSocket._is_connected",
        "read",
        "kp_gateway.dicom.scp.CappedAssociationSocket.ready",
        "a closed socket is not ready, as pynetdicom's own ready() says",
    ),
    Patch(
        "pynetdicom.transport.RequestHandler._create_association",
        "overridden",
        "kp_gateway.dicom.scp._RequestHandler._create_association",
        "install the capped socket, the fast DIMSE provider and the reactor per association",
    ),
    Patch(
        "pynetdicom.ae.ApplicationEntity._servers",
        "read",
        "kp_gateway.dicom.scp.Scp.start",
        "make_server() does not register the server that shutdown() must stop",
    ),
    Patch(
        "pynetdicom.dimse.DIMSEServiceProvider.receive_primitive",
        "overridden",
        "kp_gateway.dicom.fastpath.FastStoreDIMSE.receive_primitive",
        "decode a plain C-STORE-RQ and stream its dataset into a spool file directly",
    ),
    Patch(
        "pynetdicom.dimse.DIMSEServiceProvider.send_msg",
        "overridden",
        "kp_gateway.dicom.fastpath.FastStoreDIMSE.send_msg",
        "encode a plain C-STORE-RSP directly",
    ),
    Patch(
        "pynetdicom.dul.DULServiceProvider.run",
        "overridden",
        "kp_gateway.dicom.reactor.ExitingDUL.run",
        "callbacks on the DUL thread as it ends (discard a half-received dataset)",
    ),
    Patch(
        "pynetdicom.dul.DULServiceProvider.to_provider_queue",
        "read",
        "kp_gateway.dicom.reactor.DulWaiter",
        "replaced by a queue that wakes the DUL thread",
    ),
    Patch(
        "pynetdicom.dul.DULServiceProvider.to_user_queue",
        "read",
        "kp_gateway.dicom.reactor.AssociationWaiter",
        "replaced by a queue that wakes the association thread",
    ),
    Patch(
        "pynetdicom.dul.DULServiceProvider.event_queue",
        "read",
        "kp_gateway.dicom.fastpath.FastStoreDIMSE, kp_gateway.dicom.reactor.DulWaiter",
        "Evt17/Evt19 for a closed socket or an undecodable message, as pynetdicom posts them",
    ),
    Patch(
        "pynetdicom.dimse.DIMSEServiceProvider.msg_queue",
        "read",
        "kp_gateway.dicom.fastpath.FastStoreDIMSE, kp_gateway.dicom.reactor.AssociationWaiter",
        "where a decoded C-STORE-RQ goes, and what wakes the association thread",
    ),
)


def check_version(installed: str | None = None) -> None:
    """IncompatibleDependencyError unless pynetdicom is :data:`PINNED_PYNETDICOM`."""
    version = installed or importlib.metadata.version("pynetdicom")
    if version != PINNED_PYNETDICOM:
        raise IncompatibleDependencyError(
            f"pynetdicom {version} is installed, but the receive path patches pynetdicom "
            f"{PINNED_PYNETDICOM} internals (kp_gateway/dicom/patches.py); install "
            f"pynetdicom=={PINNED_PYNETDICOM}"
        )


def install() -> None:
    """Check the version, then swap in every replaced module global. Idempotent; call before
    the first association (the subclasses are installed per association by ``scp.py``)."""
    check_version()
    replacements: tuple[tuple[object, str, object], ...] = (
        (pynetdicom_acse, "negotiate_unrestricted", negotiation.negotiate_storage_only),
        (pynetdicom_dimse_messages, "create_file_meta", fastpath.create_plain_file_meta),
        (pynetdicom_dimse_messages, "write_file_meta_info", fastpath.write_file_meta),
        (pynetdicom_dimse_messages, "NamedTemporaryFile", fastpath.named_temporary_file),
        (pynetdicom_association, "time", reactor.ReactorClock(reactor.ASSOCIATION_WAITER)),
        (pynetdicom_dul, "time", reactor.ReactorClock(reactor.DUL_WAITER)),
    )
    for module, name, replacement in replacements:
        setattr(module, name, replacement)


__all__ = ["PATCHES", "PINNED_PYNETDICOM", "Patch", "check_version", "install"]
