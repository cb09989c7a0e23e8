"""AE-title routing: which project and dataset an association's AE titles name.

Pure; called on association threads when an association is requested.
"""

from __future__ import annotations

AE_PREFIX = "kp-"


def parse_called_ae(called_ae_title: str, default_project: str) -> str:
    """Project named by a called AE title: ``kp-<project>`` (any case) else the default."""
    title = called_ae_title.strip()
    if title.lower().startswith(AE_PREFIX) and len(title) > len(AE_PREFIX):
        return title[len(AE_PREFIX) :].lower()
    return default_project


def parse_calling_ae(calling_ae_title: str) -> str:
    """Dataset named by a calling AE title: ``kp-<dataset>``, else the title itself, lower case."""
    title = calling_ae_title.strip()
    if title.lower().startswith(AE_PREFIX) and len(title) > len(AE_PREFIX):
        title = title[len(AE_PREFIX) :]
    # Datasets become names in URLs and the UI; keep them printable and slash-free.
    cleaned = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in title)
    return cleaned.lower() or "unnamed"


__all__ = ["parse_called_ae", "parse_calling_ae"]
