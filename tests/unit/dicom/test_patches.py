"""Every pynetdicom internal the receive path uses still exists, as the gateway expects.

Run after changing the pynetdicom pin: each failure names the internal that moved.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import tomllib
from pathlib import Path
from typing import Any

import pynetdicom.acse
import pynetdicom.association
import pynetdicom.dimse_messages
import pynetdicom.dul
import pytest

from kp_gateway.dicom import fastpath, negotiation, patches, reactor
from kp_gateway.errors import IncompatibleDependencyError

REPO = Path(__file__).resolve().parents[3]


def _resolve(dotted: str) -> tuple[Any, str]:
    """The object holding the last name of `dotted`, and that name."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for name in parts[split:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1]
    raise AssertionError(f"no module in {dotted}")


def test_the_listed_patched_names() -> None:
    """The inventory itself: a change to it is a change to what an upgrade may break."""
    assert [p.target for p in patches.PATCHES] == [
        "pynetdicom.acse.negotiate_unrestricted",
        "pynetdicom.dimse_messages.create_file_meta",
        "pynetdicom.dimse_messages.write_file_meta_info",
        "pynetdicom.dimse_messages.NamedTemporaryFile",
        "pynetdicom.association.time",
        "pynetdicom.dul.time",
        "pynetdicom.transport.AssociationSocket.recv",
        "pynetdicom.transport.AssociationSocket.ready",
        "pynetdicom.transport.AssociationSocket._is_connected",
        "pynetdicom.transport.RequestHandler._create_association",
        "pynetdicom.ae.ApplicationEntity._servers",
        "pynetdicom.dimse.DIMSEServiceProvider.receive_primitive",
        "pynetdicom.dimse.DIMSEServiceProvider.send_msg",
        "pynetdicom.dul.DULServiceProvider.run",
        "pynetdicom.dul.DULServiceProvider.to_provider_queue",
        "pynetdicom.dul.DULServiceProvider.to_user_queue",
        "pynetdicom.dul.DULServiceProvider.event_queue",
        "pynetdicom.dimse.DIMSEServiceProvider.msg_queue",
    ]


@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda p: p.target)
def test_each_patched_name_exists_in_the_installed_pynetdicom(patch: patches.Patch) -> None:
    owner, name = _resolve(patch.target)
    if patch.kind == "read" and inspect.isclass(owner) and not hasattr(owner, name):
        # An instance attribute: set in the class's own code.
        source = inspect.getsource(owner)
        assert re.search(rf"self\.{name}\b(: [^=]+)? =", source), patch.target
        return
    assert hasattr(owner, name), patch.target


@pytest.mark.parametrize(
    "patch", [p for p in patches.PATCHES if p.kind == "overridden"], ids=lambda p: p.target
)
def test_each_override_keeps_the_signature_pynetdicom_calls(patch: patches.Patch) -> None:
    theirs_owner, name = _resolve(patch.target)
    ours_owner, ours_name = _resolve(patch.by)
    theirs, ours = getattr(theirs_owner, name), getattr(ours_owner, ours_name)
    if isinstance(theirs, property):
        assert isinstance(ours, property), patch.by
        return
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters), (
        patch.target
    )


def test_replaced_functions_keep_the_keywords_pynetdicom_passes() -> None:
    theirs = inspect.signature(pynetdicom.dimse_messages.create_file_meta).parameters
    ours = inspect.signature(fastpath.create_plain_file_meta).parameters
    assert {n for n, p in theirs.items() if p.default is inspect.Parameter.empty} <= set(ours)
    assert list(inspect.signature(pynetdicom.acse.negotiate_unrestricted).parameters) == list(
        inspect.signature(negotiation.negotiate_storage_only).parameters
    )


def test_install_puts_every_replacement_in_place() -> None:
    saved = {
        (module, name): getattr(module, name)
        for module, name in (
            (pynetdicom.acse, "negotiate_unrestricted"),
            (pynetdicom.dimse_messages, "create_file_meta"),
            (pynetdicom.dimse_messages, "write_file_meta_info"),
            (pynetdicom.dimse_messages, "NamedTemporaryFile"),
            (pynetdicom.association, "time"),
            (pynetdicom.dul, "time"),
        )
    }
    try:
        patches.install()
        assert pynetdicom.acse.negotiate_unrestricted is negotiation.negotiate_storage_only
        assert pynetdicom.dimse_messages.write_file_meta_info is fastpath.write_file_meta
        assert pynetdicom.dimse_messages.NamedTemporaryFile is fastpath.named_temporary_file
        assert isinstance(pynetdicom.dul.time, reactor.ReactorClock)
        assert isinstance(pynetdicom.association.time, reactor.ReactorClock)
        replaced = [p for p in patches.PATCHES if p.kind == "replaced"]
        assert len(replaced) == len(saved)
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def test_the_pin_matches_pyproject_and_other_versions_are_refused() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("pynetdicom")]
    assert pins == [f"pynetdicom=={patches.PINNED_PYNETDICOM}"]
    assert importlib.metadata.version("pynetdicom") == patches.PINNED_PYNETDICOM
    patches.check_version()
    with pytest.raises(IncompatibleDependencyError, match=r"pynetdicom 3\.1\.0 is installed"):
        patches.check_version("3.1.0")
