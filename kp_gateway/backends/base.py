"""The storage and index backend contracts (Protocols); implementations live beside this file.

Every backend translates its library's exceptions at its edge into
:class:`~kp_gateway.errors.BackendUnavailableError` (transient: retry) or
:class:`~kp_gateway.errors.BackendRejectedError` (permanent), always ``from`` the original;
a missing object is :class:`~kp_gateway.errors.ObjectNotFoundError`, a BackendRejectedError.
All methods are coroutines called on the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from kp_gateway.dicomweb.qido import QidoQuery, QidoRow
from kp_gateway.model import InstanceRecord, Routing


class StorageBackend(Protocol):
    """Object storage with the keys of CONTRACT section 7."""

    async def open(self) -> None:
        """Create what is missing (directories, bucket)."""

    async def aclose(self) -> None:
        """Release clients and threads."""

    async def ping(self) -> None:
        """Raise BackendUnavailableError / BackendRejectedError when storage is unreachable."""

    async def put_file(self, key: str, src: Path) -> int:
        """Store the durable file `src` under `key`, atomically; `src` stays in place.

        Returns the size in bytes. The object is durable when this returns.
        """

    async def put_files(self, items: Sequence[tuple[str, Path]]) -> list[int]:
        """:meth:`put_file` for many objects at once (one durability barrier where possible)."""

    async def put_bytes(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, atomically and durably."""

    async def size(self, key: str) -> int | None:
        """Return the object's size, or None when it does not exist."""

    def read_chunks(self, key: str, chunk_bytes: int = 1 << 20) -> AsyncIterator[bytes]:
        """Stream the object; raises ObjectNotFoundError when it does not exist."""

    async def fetch_to_file(self, key: str, dest: Path) -> None:
        """Copy the object into the local file `dest` (created or replaced), streaming.

        Raises ObjectNotFoundError when it does not exist; a partial `dest` is removed on
        failure.
        """

    def iter_keys(self, prefix: str = "", start_after: str = "") -> AsyncIterator[str]:
        """Every key starting with `prefix` and sorting after `start_after`, in sorted order.

        Sorted as Python sorts str (= S3's UTF-8 byte order), so a listing can be resumed
        from the last key it handled.
        """

    def local_path(self, key: str) -> Path | None:
        """A local file holding the object, when the backend has one (lets HTTP use sendfile).

        None for object stores: read with ``read_chunks`` or ``fetch_to_file`` instead.
        """

    async def delete(self, key: str) -> None:
        """Remove the object if it exists."""

    async def free_bytes(self) -> int | None:
        """Free space where objects go, or None when unknown (object stores)."""


@dataclass(frozen=True, slots=True)
class SeriesQuery:
    """Filters of ``GET /api/projects/{project}/series``."""

    project: str
    dataset: str | None = None
    modality: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    text: str | None = None
    limit: int = 50
    offset: int = 0


@dataclass(frozen=True, slots=True)
class IndexedInstance:
    """One stored instance of the index, with its routing."""

    record: InstanceRecord
    routing: Routing
    received_at: float


class IndexBackend(Protocol):
    """Projects, datasets, series mappings and one Kaapana document per series and project."""

    async def open(self) -> None:
        """Create or migrate the schema; make sure the default project exists."""

    async def aclose(self) -> None:
        """Close connections and threads."""

    async def ping(self) -> None:
        """Raise BackendUnavailableError when the index cannot serve requests."""

    async def write_instances(self, batch: Sequence[IndexedInstance]) -> None:
        """Upsert instances, series, mappings and documents of `batch` in one transaction."""

    async def list_projects(self) -> list[dict[str, Any]]:
        """Projects with series counts."""

    async def project_exists(self, name: str) -> bool:
        """Whether a project of that (lower-case) name exists."""

    async def create_project(self, name: str, description: str = "") -> dict[str, Any]:
        """Create a project; raises BackendRejectedError if it exists."""

    async def delete_project(self, name: str) -> bool:
        """Delete a project and its mappings (never the stored instances)."""

    async def list_datasets(self, project: str) -> list[dict[str, Any]]:
        """Datasets of a project with series and instance counts."""

    async def query_series(self, query: SeriesQuery) -> tuple[int, list[dict[str, Any]]]:
        """Total and one page of series summaries."""

    async def get_series(self, series_instance_uid: str) -> dict[str, Any] | None:
        """Everything known about one series, or None."""

    async def list_instances(self, series_instance_uid: str) -> list[dict[str, Any]]:
        """SOPInstanceUIDs of a series with sizes and instance numbers."""

    async def instance_key(self, series_instance_uid: str, sop_instance_uid: str) -> str | None:
        """The storage key of an instance, or None.

        An instance is its series and its SOPInstanceUID: a SOPInstanceUID reused in another
        series is another instance (as in Orthanc), and the earlier series keeps its copy.
        """

    async def find_instance(self, sop_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance of that SOPInstanceUID (one, unless a sender reused it), newest first:
        ``series_uid``, ``study_uid``, ``storage_key``, ``received_at``."""

    async def qido(self, query: QidoQuery) -> tuple[list[QidoRow], bool]:
        """One page of a QIDO-RS search within ``query.project``, and whether more follow."""

    async def dicomweb_instances(
        self, project: str, study_uid: str, series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """The instances of a study (or series, or one instance) within `project`, for
        WADO-RS: ``study_uid``, ``series_uid``, ``sop_uid``, ``sop_class_uid``,
        ``transfer_syntax_uid``, ``number_of_frames``, ``size``, ``storage_key``,
        ``received_at``."""

    async def incomplete_series(self) -> list[str]:
        """Series not yet marked complete (for completion tracking after a restart)."""

    async def complete_series(self, series_instance_uid: str) -> dict[str, Any]:
        """Compute completion aggregates, write them into every document of the series."""

    async def update_documents(self, series_instance_uid: str, fields: dict[str, Any]) -> None:
        """Merge `fields` into every project document of the series (thumbnail, validation)."""

    async def record_quarantine(self, stage: str, path: str, reason: str) -> None:
        """Remember an item that kept failing."""

    async def list_quarantine(self) -> list[dict[str, Any]]:
        """Quarantined items, newest first."""


async def iter_series(
    index: IndexBackend, query: SeriesQuery, *, page: int = 200, at_most: int | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Every series summary `query` matches (from its offset), fetched `page` at a time.

    Stops after `at_most` summaries when given. Series written meanwhile may shift the pages
    (a summary seen twice or not at all); callers use it for scans that tolerate that.
    """
    offset, seen = query.offset, 0
    while at_most is None or seen < at_most:
        size = page if at_most is None else min(page, at_most - seen)
        total, items = await index.query_series(replace(query, limit=size, offset=offset))
        for item in items:
            yield item
        seen += len(items)
        offset += len(items)
        if not items or offset >= total:
            return
