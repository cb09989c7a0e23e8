"""Where a series goes: the projects whose index holds its document (:func:`index_targets`),
and its routing record, the one place where the project and dataset a series was routed to
survive the loss of the index.

The index stage writes one record per series, project and dataset before it commits;
``kp-gateway reindex`` reads them back::

    routing/<SeriesInstanceUID>/<sha1(project NUL dataset)>.json
        {"project", "dataset", "calling_ae_title", "called_ae_title",
         "series_instance_uid", "document_sop_instance_uid", "received_at"}

Pure: rules, encoding and parsing only, no I/O.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from kp_gateway.kaapana.keys import ADMIN_PROJECT
from kp_gateway.model import IngestItem, Routing

logger = logging.getLogger(__name__)

ROUTING_PREFIX = "routing/"


def index_targets(routing: Routing, existing_projects: set[str]) -> list[str]:
    """Projects a series is indexed under: always ``admin``, plus its own project if it exists.

    A project deleted while its association was open leaves the data visible in admin. Pure
    (it logs that case).
    """
    targets = [ADMIN_PROJECT]
    if routing.project != ADMIN_PROJECT:
        if routing.project in existing_projects:
            targets.append(routing.project)
        else:
            logger.warning(
                "project %s vanished before its series was indexed; mapped to admin only",
                routing.project,
            )
    return targets


def routing_record_key(series_instance_uid: str, project: str, dataset: str) -> str:
    """``routing/<SeriesInstanceUID>/<sha1 of project NUL dataset>.json``. Pure."""
    digest = hashlib.sha1(f"{project}\x00{dataset}".encode(), usedforsecurity=False).hexdigest()
    return f"{ROUTING_PREFIX}{series_instance_uid}/{digest}.json"


def routing_record(item: IngestItem) -> bytes:
    """The JSON routing record of `item`'s series and routing. Pure.

    Stored DICOM objects are never modified, so this is the only place where the project
    and dataset of a series survive the loss of the index (``kp-gateway reindex``).
    """
    assert item.record is not None
    record = {
        "project": item.routing.project,
        "dataset": item.routing.dataset,
        "calling_ae_title": item.routing.calling_ae_title,
        "called_ae_title": item.routing.called_ae_title,
        "series_instance_uid": item.record.series_instance_uid,
        "document_sop_instance_uid": item.record.sop_instance_uid,
        "received_at": item.received_at,
    }
    return json.dumps(record, sort_keys=True).encode()


@dataclass(frozen=True, slots=True)
class RoutingRecord:
    """One stored routing record of a series."""

    routing: Routing
    document_sop_instance_uid: str
    received_at: float

    @classmethod
    def parse(cls, data: bytes, source_id: str) -> RoutingRecord:
        """Decode a record; raises ValueError/KeyError/TypeError when malformed. Pure."""
        doc = json.loads(data)
        routing = Routing(
            project=str(doc["project"]),
            dataset=str(doc["dataset"]),
            source_id=source_id,
            calling_ae_title=str(doc.get("calling_ae_title", "")),
            called_ae_title=str(doc.get("called_ae_title", "")),
        )
        return cls(
            routing, str(doc.get("document_sop_instance_uid", "")), float(doc["received_at"])
        )


__all__ = [
    "ROUTING_PREFIX",
    "RoutingRecord",
    "index_targets",
    "routing_record",
    "routing_record_key",
]
