"""AE-title routing: which project and dataset an association's AE titles name.

Pure; called on association threads when an association is requested.
"""

from __future__ import annotations

from kp_gateway.names import AE_PREFIX, dataset_name_for_ae_title


def parse_called_ae(called_ae_title: str, default_project: str, own_ae_title: str = "") -> str:
    """Project named by a called AE title: ``kp-<project>`` (any case) else the default.

    The gateway's own AE title (``dicom.ae_title``, e.g. ``KP-GATEWAY``) is what a PACS
    administrator types first; it names the default project even though it has the prefix.
    """
    title = called_ae_title.strip()
    if own_ae_title and title.upper() == own_ae_title.strip().upper():
        return default_project
    if title.lower().startswith(AE_PREFIX) and len(title) > len(AE_PREFIX):
        return title[len(AE_PREFIX) :].lower()
    return default_project


def parse_calling_ae(calling_ae_title: str) -> str:
    """Dataset named by a calling AE title (the rule of :mod:`kp_gateway.names`)."""
    return dataset_name_for_ae_title(calling_ae_title)


__all__ = ["AE_PREFIX", "parse_called_ae", "parse_calling_ae"]
