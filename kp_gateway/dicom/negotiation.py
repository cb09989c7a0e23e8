"""Presentation-context negotiation: every storage SOP class, and no other service.

Runs on association threads, inside pynetdicom's ACSE, while an A-ASSOCIATE-RQ is answered.

pynetdicom's unrestricted storage (``_config.UNRESTRICTED_STORAGE_SERVICE``) accepts, as
storage, every abstract syntax whose pydicom keyword is not an attribute of
``pynetdicom.sop_class``. Keywords differ between the two libraries for some non-storage
classes (Modality Worklist FIND, the Color Palette Q/R models), so those were accepted and then
failed at the first C-FIND with 0xC311. Here a context is storage-like only if pynetdicom's own
UID table (:func:`pynetdicom.sop_class.uid_to_service_class`) says Storage, or the UID is one it
does not know (private or newer storage classes); a known non-storage class is refused unless
the AE supports it (Verification), with result 0x03 "abstract syntax not supported" (PS3.8 9.3.3.2).
"""

from __future__ import annotations

from typing import Any

from pynetdicom.presentation import PresentationContext, negotiate_unrestricted
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

# PS3.8 Table 9-18: presentation context result "abstract-syntax-not-supported".
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03


def is_storage_like(abstract_syntax: str) -> bool:
    """True for Storage SOP classes and for UIDs pynetdicom does not know (private or newer)."""
    service = uid_to_service_class(abstract_syntax)
    return service is StorageServiceClass or service is ServiceClass


def negotiate_storage_only(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: Any = None,
) -> tuple[list[PresentationContext], list[Any]]:
    """pynetdicom's unrestricted negotiation, with known non-storage classes refused.

    Same signature and result as :func:`pynetdicom.presentation.negotiate_unrestricted`.
    """
    supported = {str(cx.abstract_syntax) for cx in ac_contexts}
    allowed: list[PresentationContext] = []
    refused: list[PresentationContext] = []
    for cx in rq_contexts:
        syntax = str(cx.abstract_syntax)
        (allowed if syntax in supported or is_storage_like(syntax) else refused).append(cx)
    result, roles_out = negotiate_unrestricted(allowed, ac_contexts, roles)
    for rq in refused:
        cx = PresentationContext()
        cx.context_id = rq.context_id
        cx.abstract_syntax = rq.abstract_syntax
        cx.transfer_syntax = [rq.transfer_syntax[0]] if rq.transfer_syntax else []
        cx.result = ABSTRACT_SYNTAX_NOT_SUPPORTED
        result.append(cx)
    result.sort(key=lambda cx: int(cx.context_id or 0))
    return result, roles_out


__all__ = ["ABSTRACT_SYNTAX_NOT_SUPPORTED", "is_storage_like", "negotiate_storage_only"]
