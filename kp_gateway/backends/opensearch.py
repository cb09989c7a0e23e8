"""OpenSearch index: Kaapana's ``project_<name>`` documents plus the gateway's own ``kp_*`` indices.

Layout (every index is created at :meth:`OpenSearchIndex.open`):

- ``project_<name>``: one Kaapana document per series, ``_id`` = SeriesInstanceUID, mapped by the
  index template ``kp-gateway-project`` (Kaapana's dynamic templates by key suffix), so existing
  Kaapana dashboards and queries work unchanged.
- ``kp_projects`` (``_id`` = name), ``kp_datasets`` (``_id`` = ``<project>/<dataset>``),
  ``kp_instances_v1`` (``_id`` = ``<SeriesInstanceUID>_<SOPInstanceUID>``: an instance is its
  series and its SOP, so a SOPInstanceUID reused in another series is another instance),
  ``kp_quarantine``. An older gateway's ``kp_instances`` (keyed by SOPInstanceUID alone) is
  copied into ``kp_instances_v1`` and deleted at :meth:`OpenSearchIndex.open`.
- ``kp_series`` (``_id`` = SeriesInstanceUID): the series row *and* its project and dataset
  mappings (``projects``, ``datasets`` = ``<project>/<dataset>``). Keeping the mappings on the
  series document makes ``query_series`` one search and lets one optimistic-concurrency write
  keep a series and its mappings consistent without transactions.

Consistency: OpenSearch has no transactions, so every write is idempotent (re-running a failed
batch gives the same result) and every read-modify-write (Kaapana's shallow merge, series
aggregates, completion) is conditional on ``_seq_no``/``_primary_term``; a conflict with another
gateway re-reads and merges again. Writes use ``refresh=wait_for``: when a call returns, its data
is visible to search, without forcing extra refreshes (segments) on the cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import opensearchpy
from opensearchpy import AsyncOpenSearch

from kp_gateway.backends.base import IndexedInstance, SeriesQuery
from kp_gateway.dicomweb.attributes import LEVEL_TAGS, Level, canonical_number, match_values
from kp_gateway.dicomweb.qido import UID_TAGS, Match, MatchKind, QidoQuery, QidoRow
from kp_gateway.errors import (
    BackendRejectedError,
    BackendUnavailableError,
    BadQueryError,
)
from kp_gateway.kaapana.completion import completion_fields
from kp_gateway.kaapana.keys import (
    ADMIN_PROJECT,
    KEY_THUMBNAIL,
    KEY_THUMBNAIL_ERROR,
    KEY_VALIDATION,
)
from kp_gateway.kaapana.routing_record import index_targets

logger = logging.getLogger(__name__)

T = TypeVar("T")

PROJECT_INDEX_PREFIX = "project_"
TEMPLATE_NAME = "kp-gateway-project"
PROJECTS = "kp_projects"
DATASETS = "kp_datasets"
SERIES = "kp_series"
INSTANCES = "kp_instances_v1"
STUDIES = "kp_studies"
LEGACY_INSTANCES = "kp_instances"
QUARANTINE = "kp_quarantine"

MAX_RESULT_WINDOW = 10_000  # OpenSearch's default index.max_result_window
SCAN_PAGE = 1000
TEXT_MATCH_CAP = 10_000  # most series a free-text match over documents contributes
REFRESH = "wait_for"


def _date(fmt: str) -> dict[str, Any]:
    return {"type": "date", "format": fmt}


# Kaapana's meta-init template, in Kaapana's order (kaapana-behaviour.md 3.3).
DYNAMIC_TEMPLATES: list[dict[str, Any]] = [
    {"integer": {"match": "*_integer", "mapping": {"type": "long"}}},
    {"float": {"match": "*_float", "mapping": {"type": "float"}}},
    {"double": {"match": "*_double", "mapping": {"type": "double"}}},
    {"datetime": {"match": "*_datetime", "mapping": _date("yyyy-MM-dd HH:mm:ss.SSSSSS")}},
    {"date": {"match": "*_date", "mapping": _date("yyyy-MM-dd")}},
    {"time": {"match": "*_time", "mapping": _date("HH:mm:ss.SSSSSS")}},
    {"timestamp": {"match": "*timestamp*", "mapping": _date("yyyy-MM-dd HH:mm:ss.SSSSSS")}},
    {"object": {"match": "*_object", "mapping": {"type": "object"}}},
    {"boolean": {"match": "*_boolean", "mapping": {"type": "boolean"}}},
]

INDEX_TEMPLATE: dict[str, Any] = {
    "index_patterns": [PROJECT_INDEX_PREFIX + "*"],
    "priority": 100,
    "template": {
        # Shards and replicas are left to the cluster defaults (Kaapana's 0 replicas only
        # suits its single-node deployment).
        "settings": {"index": {"mapping": {"total_fields": {"limit": 6000}}}},
        "mappings": {
            "dynamic": True,
            "numeric_detection": False,
            "date_detection": False,
            "dynamic_templates": DYNAMIC_TEMPLATES,
        },
    },
}


def _mapping(**fields_by_type: str) -> dict[str, Any]:
    """Explicit mappings from ``type="field field ..."``; strict: an unknown field is a bug."""
    properties = {f: {"type": t} for t, names in fields_by_type.items() for f in names.split()}
    return {"mappings": {"dynamic": "strict", "properties": properties}}


# DICOMweb: each level's attributes as DICOM JSON text (returned, never searched) and, per
# tag, their values in matching form (``q_<tag>``: dicomweb/attributes.py: match_values).
_STORED_ONLY = {"type": "keyword", "index": False, "doc_values": False}


def _dicomweb_fields(level: Level) -> dict[str, Any]:
    return {"attrs": _STORED_ONLY, **{f"q_{tag}": {"type": "keyword"} for tag in LEVEL_TAGS[level]}}


def _with(body: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    body["mappings"]["properties"].update(extra)
    return body


KP_INDICES: dict[str, dict[str, Any]] = {
    PROJECTS: _mapping(keyword="name description", double="created_at"),
    DATASETS: _mapping(keyword="project name", double="created_at"),
    SERIES: _with(
        _mapping(
            keyword="series_uid study_uid patient_id modality description series_date projects "
            "datasets",
            double="first_received_at last_received_at completed_at",
            boolean="complete",
        ),
        _dicomweb_fields(Level.SERIES),
    ),
    INSTANCES: _with(
        _mapping(
            keyword="sop_uid series_uid study_uid sop_class_uid transfer_syntax_uid storage_key",
            long="instance_number number_of_frames size",
            double="received_at",
        ),
        _dicomweb_fields(Level.INSTANCE),
    ),
    STUDIES: _with(
        _mapping(keyword="study_uid", double="created_at"), _dicomweb_fields(Level.STUDY)
    ),
    QUARANTINE: _mapping(keyword="stage path", text="reason", double="at"),
}

SERIES_FIELDS = (
    "series_uid", "study_uid", "patient_id", "modality", "description", "series_date",
    "first_received_at", "last_received_at", "complete", "completed_at",
)  # fmt: skip
INSTANCE_FIELDS = (
    "sop_uid", "sop_class_uid", "transfer_syntax_uid", "instance_number", "number_of_frames",
    "size", "storage_key", "received_at",
)  # fmt: skip

# query_string's reserved characters, escaped so user text is matched literally.
_QS_RESERVED = set('+-=&|><!(){}[]^"~*?:\\/ ')


def project_index(project: str) -> str:
    """Kaapana's index name of a project (``project_<name>``)."""
    return PROJECT_INDEX_PREFIX + project


@dataclass(slots=True)
class _Versioned:
    """A document as read, with what a conditional write needs."""

    source: dict[str, Any] | None
    seq_no: int | None = None
    primary_term: int | None = None


@dataclass(slots=True)
class _SeriesPlan:
    """What one batch wants to add to one series."""

    first: Any  # the InstanceRecord that introduced the series in this batch
    first_at: float
    last_at: float
    projects: set[str] = field(default_factory=set)
    datasets: set[str] = field(default_factory=set)
    docs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


Op = tuple[dict[str, Any], dict[str, Any] | None]  # bulk action line, source line


def _write_op(index: str, doc_id: str, source: dict[str, Any], prev: _Versioned) -> Op:
    """``create`` for a new document, else ``index`` conditional on what was read."""
    if prev.source is None:
        return {"create": {"_index": index, "_id": doc_id}}, source
    meta = {
        "_index": index,
        "_id": doc_id,
        "if_seq_no": prev.seq_no,
        "if_primary_term": prev.primary_term,
    }
    return {"index": meta}, source


_BY_SOP = [{"sop_uid": {"order": "asc"}}]


def _action(op: str, index: str, doc_id: str) -> dict[str, Any]:
    return {op: {"_index": index, "_id": doc_id}}


def _dicomweb_source(texts: tuple[str, str, str] | None, level: int) -> dict[str, Any]:
    """The ``attrs`` text and ``q_<tag>`` values of one level (0 study, 1 series, 2 instance)."""
    if texts is None:
        return {}
    text = texts[level]
    return {"attrs": text, **{f"q_{tag}": v for tag, v in match_values(text).items()}}


def instance_id(series_instance_uid: str, sop_instance_uid: str) -> str:
    """The ``_id`` of an instance: UIDs hold only digits and dots, so ``_`` cannot be in one."""
    return f"{series_instance_uid}_{sop_instance_uid}"


def _item_error(item: dict[str, Any]) -> str:
    error = item.get("error") or {}
    if isinstance(error, dict):
        return f"{error.get('type', 'error')}: {error.get('reason', '')}"
    return str(error)


class OpenSearchIndex:
    """The scale-out index (see module docstring). All methods run on the event loop."""

    def __init__(
        self,
        url: str,
        *,
        verify_tls: bool = True,
        timeout_s: float = 30.0,
        user: str = "",
        password: str = "",
        default_project: str = ADMIN_PROJECT,
        bulk_max_actions: int = 500,
        bulk_max_bytes: int = 5 << 20,
        max_attempts: int = 5,
        retry_backoff_s: float = 0.5,
    ) -> None:
        self._url = url
        self._verify_tls = verify_tls
        self._timeout_s = timeout_s
        self._auth = (user, password) if user else None
        self._default_project = default_project
        self._bulk_max_actions = bulk_max_actions
        self._bulk_max_bytes = bulk_max_bytes
        self._max_attempts = max_attempts
        self._retry_backoff_s = retry_backoff_s
        self._client: AsyncOpenSearch | None = None

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def client(self) -> AsyncOpenSearch:
        """The client, for tests and diagnostics; raises when the index is not open."""
        if self._client is None:
            raise BackendUnavailableError("index is not open")
        return self._client

    async def _call(self, what: str, call: Awaitable[T], *, missing_ok: bool = False) -> T | None:
        """Await one client call, translating opensearch-py's exceptions at this edge."""
        try:
            return await call
        except opensearchpy.NotFoundError as exc:
            if missing_ok:
                return None
            raise BackendRejectedError(f"OpenSearch {what}: {exc}") from exc
        except opensearchpy.ConnectionError as exc:  # includes ConnectionTimeout, SSLError
            raise BackendUnavailableError(f"OpenSearch {what}: {exc}") from exc
        except opensearchpy.TransportError as exc:
            status = exc.status_code if isinstance(exc.status_code, int) else 0
            if status == 429 or status >= 500:
                raise BackendUnavailableError(f"OpenSearch {what}: {exc}") from exc
            raise BackendRejectedError(f"OpenSearch {what}: {exc}") from exc
        except opensearchpy.OpenSearchException as exc:  # serialisation, bad configuration
            raise BackendRejectedError(f"OpenSearch {what}: {exc}") from exc

    async def _req(self, what: str, call: Awaitable[Any]) -> Any:
        return await self._call(what, call)

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(min(self._retry_backoff_s * 2**attempt, 10.0))

    def _chunks(self, ops: Sequence[Op]) -> list[list[Op]]:
        chunks: list[list[Op]] = [[]]
        size = 0
        for op in ops:
            op_size = len(json.dumps(op[0])) + (len(json.dumps(op[1])) if op[1] else 0) + 2
            if chunks[-1] and (
                len(chunks[-1]) >= self._bulk_max_actions or size + op_size > self._bulk_max_bytes
            ):
                chunks.append([])
                size = 0
            chunks[-1].append(op)
            size += op_size
        return [c for c in chunks if c]

    async def _bulk(self, ops: Sequence[Op]) -> list[dict[str, Any]]:
        """Send `ops` in bounded ``_bulk`` requests; returns one result item per op, in order.

        Requests failing with 429/5xx or a connection error, and items answered 429/5xx, are
        retried with exponential backoff; other item errors are returned to the caller.
        """
        results: list[dict[str, Any]] = []
        for chunk in self._chunks(ops):
            pending = list(range(len(chunk)))
            done: dict[int, dict[str, Any]] = {}
            for attempt in range(self._max_attempts):
                body: list[dict[str, Any]] = []
                for i in pending:
                    action, source = chunk[i]
                    body.append(action)
                    if source is not None:
                        body.append(source)
                try:
                    response = await self._req(
                        "bulk", self.client.bulk(body=body, params={"refresh": REFRESH})
                    )
                except BackendUnavailableError:
                    if attempt + 1 == self._max_attempts:
                        raise
                    await self._backoff(attempt)
                    continue
                retry = []
                for i, entry in zip(pending, response["items"], strict=True):
                    item = next(iter(entry.values()))
                    status = int(item.get("status", 500))
                    done[i] = item
                    if status == 429 or status >= 500:
                        retry.append(i)
                pending = retry
                if not pending:
                    break
                if attempt + 1 < self._max_attempts:
                    await self._backoff(attempt)
            if pending:
                raise BackendUnavailableError(
                    f"OpenSearch bulk: {len(pending)} items still failing after "
                    f"{self._max_attempts} attempts ({_item_error(done[pending[0]])})"
                )
            results.extend(done[i] for i in range(len(chunk)))
        return results

    @staticmethod
    def _check(items: Sequence[dict[str, Any]], *, conflicts_ok: bool = False) -> None:
        """Raise BackendRejectedError for the first item error (e.g. a mapping conflict)."""
        for item in items:
            status = int(item.get("status", 500))
            if status >= 300 and not (conflicts_ok and status == 409):
                raise BackendRejectedError(
                    f"OpenSearch rejected {item.get('_index')}/{item.get('_id')}: "
                    f"{_item_error(item)}"
                )

    async def _mget(self, keys: Sequence[tuple[str, str]]) -> list[_Versioned]:
        """Realtime reads of (index, id) pairs; a missing index reads as a missing document."""
        out: list[_Versioned] = []
        for start in range(0, len(keys), SCAN_PAGE):
            part = keys[start : start + SCAN_PAGE]
            docs = [{"_index": index, "_id": doc_id} for index, doc_id in part]
            response = await self._req("mget", self.client.mget(body={"docs": docs}))
            for doc in response["docs"]:
                error = doc.get("error")
                if error is not None:
                    kind = error.get("type") if isinstance(error, dict) else str(error)
                    if kind != "index_not_found_exception":
                        raise BackendUnavailableError(f"OpenSearch mget: {error}")
                    out.append(_Versioned(None))
                elif doc.get("found"):
                    out.append(_Versioned(doc["_source"], doc["_seq_no"], doc["_primary_term"]))
                else:
                    out.append(_Versioned(None))
        return out

    async def _get(self, index: str, doc_id: str) -> _Versioned:
        return (await self._mget([(index, doc_id)]))[0]

    async def _search(self, index: str, body: dict[str, Any], **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self._req(
            "search", self.client.search(index=index, body=body, params=params)
        )
        return result

    async def _scan(
        self, index: str, query: dict[str, Any], sort: list[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        """Every hit of `query`, paged with ``search_after`` (`sort` must end unique)."""
        after: list[Any] | None = None
        while True:
            body: dict[str, Any] = {
                "query": query,
                "sort": sort,
                "size": SCAN_PAGE,
                "track_total_hits": False,
                "seq_no_primary_term": True,
            }
            if after is not None:
                body["search_after"] = after
            hits = (await self._search(index, body))["hits"]["hits"]
            for hit in hits:
                yield hit
            if len(hits) < SCAN_PAGE:
                return
            after = hits[-1]["sort"]

    async def _ensure_index(self, index: str, body: dict[str, Any] | None = None) -> None:
        exists = await self._req("index exists", self.client.indices.exists(index=index))
        if exists:
            return
        try:
            await self._req("create index", self.client.indices.create(index=index, body=body))
        except BackendRejectedError as exc:
            # Another gateway created it between our check and our create.
            cause = exc.__cause__
            if not (
                isinstance(cause, opensearchpy.TransportError)
                and cause.error == "resource_already_exists_exception"
            ):
                raise

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        self._client = AsyncOpenSearch(
            hosts=[self._url],
            http_auth=self._auth,
            verify_certs=self._verify_tls,
            timeout=self._timeout_s,
            max_retries=0,  # retries with backoff happen here, where we know what is idempotent
        )
        await self._req(
            "put index template",
            self.client.indices.put_index_template(name=TEMPLATE_NAME, body=INDEX_TEMPLATE),
        )
        for index, body in KP_INDICES.items():
            await self._ensure_index(index, body)
        for index, level in ((SERIES, Level.SERIES), (INSTANCES, Level.INSTANCE)):
            # Indices of a gateway before DICOMweb: adding fields to a mapping is allowed.
            await self._req(
                "put mapping",
                self.client.indices.put_mapping(
                    index=index, body={"properties": _dicomweb_fields(level)}
                ),
            )
        await self._migrate_legacy_instances()
        now = time.time()
        ops: list[Op] = []
        for name in sorted({ADMIN_PROJECT, self._default_project}):
            await self._ensure_index(project_index(name))
            description = "Initial admin project" if name == ADMIN_PROJECT else ""
            source = {"name": name, "description": description, "created_at": now}
            ops.append(({"create": {"_index": PROJECTS, "_id": name}}, source))
        self._check(await self._bulk(ops), conflicts_ok=True)

    async def _migrate_legacy_instances(self) -> None:
        """Copy an older gateway's ``kp_instances`` into `INSTANCES`, then delete it.

        Idempotent, so gateways that start together may both run it: each copy is an
        ``index`` of the same ``_id`` and source, and a second delete finds nothing.
        """
        exists = await self._req("index exists", self.client.indices.exists(index=LEGACY_INSTANCES))
        if not exists:
            return
        copied = 0
        ops: list[Op] = []
        async for hit in self._scan(LEGACY_INSTANCES, {"match_all": {}}, _BY_SOP):
            source = hit["_source"]
            doc_id = instance_id(source["series_uid"], source["sop_uid"])
            ops.append(({"index": {"_index": INSTANCES, "_id": doc_id}}, source))
            if len(ops) >= SCAN_PAGE:
                self._check(await self._bulk(ops))
                copied, ops = copied + len(ops), []
        self._check(await self._bulk(ops))
        copied += len(ops)
        await self._call(
            "delete index", self.client.indices.delete(index=LEGACY_INSTANCES), missing_ok=True
        )
        logger.info("index: %d instances moved from %s to %s", copied, LEGACY_INSTANCES, INSTANCES)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def ping(self) -> None:
        health = await self._req("cluster health", self.client.cluster.health())
        if health.get("status") == "red":
            raise BackendUnavailableError("OpenSearch cluster health is red")

    # -- writes -----------------------------------------------------------------------------

    async def write_instances(self, batch: Sequence[IndexedInstance]) -> None:
        if not batch:
            return
        wanted = sorted({i.routing.project for i in batch} - {ADMIN_PROJECT})
        found = await self._mget([(PROJECTS, name) for name in wanted])
        projects = {name for name, doc in zip(wanted, found, strict=True) if doc.source}
        ops: list[Op] = []
        datasets: dict[str, Op] = {}
        plans: dict[str, _SeriesPlan] = {}
        studies: dict[str, list[Op]] = {}
        for item in batch:
            rec, routing, now = item.record, item.routing, item.received_at
            targets = index_targets(routing, projects)
            instance = {
                "sop_uid": rec.sop_instance_uid,
                "series_uid": rec.series_instance_uid,
                "study_uid": rec.study_instance_uid,
                "sop_class_uid": rec.sop_class_uid,
                "transfer_syntax_uid": rec.transfer_syntax_uid,
                "instance_number": rec.instance_number,
                "number_of_frames": rec.number_of_frames,
                "size": rec.size_bytes,
                "storage_key": rec.storage_key,
                "received_at": now,
                **_dicomweb_source(rec.dicomweb_json, 2),
            }
            if rec.dicomweb_json is not None:
                # The first writer sets created_at; every instance refreshes the attributes.
                study_uid = rec.study_instance_uid
                study = {"study_uid": study_uid, **_dicomweb_source(rec.dicomweb_json, 0)}
                studies[study_uid] = [
                    (_action("create", STUDIES, study_uid), {**study, "created_at": now}),
                    (_action("update", STUDIES, study_uid), {"doc": study}),
                ]
            doc_id = instance_id(rec.series_instance_uid, rec.sop_instance_uid)
            # The same instance again (same series, same SOP) replaces the earlier copy.
            ops.append(({"index": {"_index": INSTANCES, "_id": doc_id}}, instance))
            plan = plans.setdefault(rec.series_instance_uid, _SeriesPlan(rec, now, now))
            plan.last_at = max(plan.last_at, now)
            for project in targets:
                key = f"{project}/{routing.dataset}"
                plan.projects.add(project)
                plan.datasets.add(key)
                source = {"project": project, "name": routing.dataset, "created_at": now}
                datasets.setdefault(key, ({"create": {"_index": DATASETS, "_id": key}}, source))
                if rec.document is not None:
                    plan.docs.setdefault(project, []).append(rec.document)
        # Instances first: a series is never visible with instances that are not yet indexed.
        study_ops = [op for pair in studies.values() for op in pair]
        self._check(await self._bulk(ops + list(datasets.values()) + study_ops), conflicts_ok=True)
        await self._merge_series(plans)

    async def _merge_series(self, plans: dict[str, _SeriesPlan]) -> None:
        pending = plans
        for attempt in range(self._max_attempts):
            keys: list[tuple[str, str]] = []
            for uid, plan in pending.items():
                keys.append((SERIES, uid))
                keys += [(project_index(p), uid) for p in plan.docs]
            current = dict(zip(keys, await self._mget(keys), strict=True))
            ops: list[Op] = []
            owners: list[str] = []
            for uid, plan in pending.items():
                prev = current[(SERIES, uid)]
                ops.append(_write_op(SERIES, uid, self._series_source(uid, plan, prev), prev))
                owners.append(uid)
                for project, docs in plan.docs.items():
                    index = project_index(project)
                    old = current[(index, uid)]
                    # Kaapana's merge: new keys over old; completion, validation and tags survive.
                    merged = dict(old.source or {})
                    for doc in docs:
                        merged.update(doc)
                    ops.append(_write_op(index, uid, merged, old))
                    owners.append(uid)
            items = await self._bulk(ops)
            self._check(items, conflicts_ok=True)
            conflicted = {o for o, i in zip(owners, items, strict=True) if i.get("status") == 409}
            if not conflicted:
                return
            # Another writer (or our own earlier, half-acknowledged attempt) got there first.
            pending = {uid: pending[uid] for uid in conflicted}
            await self._backoff(attempt)
        raise BackendUnavailableError(f"series {sorted(pending)} kept changing under other writers")

    @staticmethod
    def _series_source(uid: str, plan: _SeriesPlan, prev: _Versioned) -> dict[str, Any]:
        if prev.source is None:
            rec = plan.first
            return {
                "series_uid": uid,
                "study_uid": rec.study_instance_uid,
                "patient_id": rec.patient_id,
                "modality": rec.modality,
                "description": rec.series_description,
                "series_date": rec.series_date,
                "first_received_at": plan.first_at,
                "last_received_at": plan.last_at,
                "complete": False,
                "completed_at": None,
                "projects": sorted(plan.projects),
                "datasets": sorted(plan.datasets),
                **_dicomweb_source(rec.dicomweb_json, 1),
            }
        source = dict(prev.source)
        if plan.first.dicomweb_json is not None:
            source.update(_dicomweb_source(plan.first.dicomweb_json, 1))
        source["last_received_at"] = max(source["last_received_at"], plan.last_at)
        # A late instance re-opens a completed series; completion runs again after it.
        source["complete"] = False
        source["projects"] = sorted(set(source.get("projects") or []) | plan.projects)
        source["datasets"] = sorted(set(source.get("datasets") or []) | plan.datasets)
        return source

    async def update_documents(self, series_instance_uid: str, fields: dict[str, Any]) -> None:
        """Merge `fields` into every project document of the series (thumbnail, validation)."""
        uid = series_instance_uid
        for attempt in range(self._max_attempts):
            series = await self._get(SERIES, uid)
            projects = (series.source or {}).get("projects") or []
            keys = [(project_index(p), uid) for p in projects]
            ops = [
                _write_op(index, uid, {**doc.source, **fields}, doc)
                for (index, _), doc in zip(keys, await self._mget(keys), strict=True)
                if doc.source is not None
            ]
            items = await self._bulk(ops)
            self._check(items, conflicts_ok=True)
            if not any(i.get("status") == 409 for i in items):
                return
            await self._backoff(attempt)
        raise BackendUnavailableError(f"documents of {uid} kept changing under other writers")

    async def complete_series(self, series_instance_uid: str) -> dict[str, Any]:
        uid = series_instance_uid
        for attempt in range(self._max_attempts):
            series = await self._get(SERIES, uid)
            numbers: list[int] = []
            count = 0
            async for hit in self._scan(
                INSTANCES, {"term": {"series_uid": uid}}, [{"sop_uid": {"order": "asc"}}]
            ):
                count += 1
                if hit["_source"].get("instance_number") is not None:
                    numbers.append(int(hit["_source"]["instance_number"]))
            fields = completion_fields(numbers, count)
            await self.update_documents(uid, fields)
            if series.source is None:
                return fields
            source = {**series.source, "complete": True, "completed_at": time.time()}
            items = await self._bulk([_write_op(SERIES, uid, source, series)])
            self._check(items, conflicts_ok=True)
            if items[0].get("status") != 409:
                return fields
            # A late instance arrived meanwhile: count again.
            await self._backoff(attempt)
        raise BackendUnavailableError(f"series {uid} kept changing during completion")

    async def record_quarantine(self, stage: str, path: str, reason: str) -> None:
        body = {"stage": stage, "path": path, "reason": reason, "at": time.time()}
        await self._req(
            "quarantine",
            self.client.index(index=QUARANTINE, body=body, params={"refresh": REFRESH}),
        )

    async def list_quarantine(self) -> list[dict[str, Any]]:
        body = {"query": {"match_all": {}}, "sort": [{"at": {"order": "desc"}}], "size": 1000}
        hits = (await self._search(QUARANTINE, body))["hits"]["hits"]
        return [{"id": h["_id"], **h["_source"]} for h in hits]

    # -- projects and datasets --------------------------------------------------------------

    async def list_projects(self) -> list[dict[str, Any]]:
        projects = [
            h["_source"]
            async for h in self._scan(PROJECTS, {"match_all": {}}, [{"name": {"order": "asc"}}])
        ]
        body = {
            "size": 0,
            "query": {"match_all": {}},
            "aggs": {"p": {"terms": {"field": "projects", "size": len(projects) + 1}}},
        }
        buckets = (await self._search(SERIES, body))["aggregations"]["p"]["buckets"]
        counts = {b["key"]: b["doc_count"] for b in buckets}
        return [{**p, "series_count": counts.get(p["name"], 0)} for p in projects]

    async def project_exists(self, name: str) -> bool:
        return bool(await self._req("get", self.client.exists(index=PROJECTS, id=name)))

    async def create_project(self, name: str, description: str = "") -> dict[str, Any]:
        now = time.time()
        source = {"name": name, "description": description, "created_at": now}
        # _create answers 409 when the project exists: BackendRejectedError.
        await self._req(
            "create project",
            self.client.create(index=PROJECTS, id=name, body=source, params={"refresh": REFRESH}),
        )
        await self._ensure_index(project_index(name))
        return {**source, "series_count": 0}

    async def delete_project(self, name: str) -> bool:
        # The project record goes last, so a failed delete can simply be repeated.
        prefix = name + "/"
        for attempt in range(self._max_attempts):
            ops: list[Op] = []
            async for hit in self._scan(
                SERIES, {"term": {"projects": name}}, [{"series_uid": {"order": "asc"}}]
            ):
                source = dict(hit["_source"])
                source["projects"] = [p for p in source["projects"] if p != name]
                source["datasets"] = [d for d in source["datasets"] if not d.startswith(prefix)]
                prev = _Versioned(hit["_source"], hit["_seq_no"], hit["_primary_term"])
                ops.append(_write_op(SERIES, hit["_id"], source, prev))
            items = await self._bulk(ops)
            self._check(items, conflicts_ok=True)
            if not any(i.get("status") == 409 for i in items):
                break
            await self._backoff(attempt)
        else:
            raise BackendUnavailableError(f"series of project {name} kept changing")
        await self._req(
            "delete datasets",
            self.client.delete_by_query(
                index=DATASETS,
                body={"query": {"term": {"project": name}}},
                params={"refresh": "true", "conflicts": "proceed"},
            ),
        )
        await self._call(
            "delete index", self.client.indices.delete(index=project_index(name)), missing_ok=True
        )
        deleted = await self._call(
            "delete project",
            self.client.delete(index=PROJECTS, id=name, params={"refresh": REFRESH}),
            missing_ok=True,
        )
        return deleted is not None

    async def list_datasets(self, project: str) -> list[dict[str, Any]]:
        out = []
        async for hit in self._scan(
            DATASETS, {"term": {"project": project}}, [{"name": {"order": "asc"}}]
        ):
            name = hit["_source"]["name"]
            uids = [
                h["_id"]
                async for h in self._scan(
                    SERIES,
                    {"term": {"datasets": f"{project}/{name}"}},
                    [{"series_uid": {"order": "asc"}}],
                )
            ]
            instances = 0
            for start in range(0, len(uids), SCAN_PAGE):
                query = {"terms": {"series_uid": uids[start : start + SCAN_PAGE]}}
                response = await self._req(
                    "count", self.client.count(index=INSTANCES, body={"query": query})
                )
                instances += int(response["count"])
            out.append(
                {
                    "name": name,
                    "created_at": hit["_source"]["created_at"],
                    "series_count": len(uids),
                    "instance_count": instances,
                }
            )
        return out

    # -- series and instances ---------------------------------------------------------------

    async def _text_matches(self, project: str, text: str) -> list[str]:
        """Series whose project document holds `text` in a string field (any case)."""
        literal = "".join("\\" + c if c in _QS_RESERVED else c for c in text)
        body = {
            "query": {
                "query_string": {
                    "query": f"*{literal}*",
                    # Only Kaapana's string keys: a "*" default field can expand to more
                    # than the 1024 fields a query may touch.
                    "fields": [
                        "*_keyword",
                        "*_keyword_alphabetic",
                        "*_keyword_ideographic",
                        "*_keyword_phonetic",
                    ],
                    "lenient": True,
                }
            },
            "size": TEXT_MATCH_CAP,
            "_source": False,
        }
        response = await self._search(project_index(project), body, ignore_unavailable="true")
        return [h["_id"] for h in response["hits"]["hits"]]

    async def query_series(self, query: SeriesQuery) -> tuple[int, list[dict[str, Any]]]:
        filters: list[dict[str, Any]] = [{"term": {"projects": query.project}}]
        if query.dataset:
            filters.append({"term": {"datasets": f"{query.project}/{query.dataset}"}})
        for name, value in (
            ("modality", query.modality),
            ("patient_id", query.patient_id),
            ("study_uid", query.study_uid),
        ):
            if value:
                filters.append({"term": {name: value}})
        if query.text:
            pattern = "*" + query.text.replace("\\", "\\\\").replace("*", "\\*") + "*"
            pattern = pattern.replace("?", "\\?")
            should: list[dict[str, Any]] = [
                {"wildcard": {f: {"value": pattern, "case_insensitive": True}}}
                for f in ("description", "patient_id")
            ]
            matched = await self._text_matches(query.project, query.text)
            if matched:
                should.append({"terms": {"series_uid": matched}})
            filters.append({"bool": {"should": should, "minimum_should_match": 1}})
        es_query = {"bool": {"filter": filters}}
        sort = [{"last_received_at": {"order": "desc"}}, {"series_uid": {"order": "asc"}}]
        if query.offset + query.limit <= MAX_RESULT_WINDOW:
            body = {
                "query": es_query,
                "sort": sort,
                "from": query.offset,
                "size": query.limit,
                "track_total_hits": True,
            }
            hits = (await self._search(SERIES, body))["hits"]
            total, page = int(hits["total"]["value"]), [h["_source"] for h in hits["hits"]]
        else:
            # Past OpenSearch's result window: walk with search_after (rare, deep pages).
            response = await self._req(
                "count", self.client.count(index=SERIES, body={"query": es_query})
            )
            total, page, seen = int(response["count"]), [], 0
            async for hit in self._scan(SERIES, es_query, sort):
                if seen >= query.offset:
                    page.append(hit["_source"])
                seen += 1
                if len(page) >= query.limit:
                    break
        return total, await self._summaries(page, query.project)

    async def _summaries(self, page: list[dict[str, Any]], project: str) -> list[dict[str, Any]]:
        if not page:
            return []
        uids = [s["series_uid"] for s in page]
        body = {
            "size": 0,
            "query": {"terms": {"series_uid": uids}},
            "aggs": {"n": {"terms": {"field": "series_uid", "size": len(uids)}}},
        }
        buckets = (await self._search(INSTANCES, body))["aggregations"]["n"]["buckets"]
        counts = {b["key"]: b["doc_count"] for b in buckets}
        docs = await self._mget([(project_index(project), uid) for uid in uids])
        prefix = project + "/"
        out = []
        for series, doc in zip(page, docs, strict=True):
            source = doc.source or {}
            out.append(
                {
                    "series_uid": series["series_uid"],
                    "study_uid": series["study_uid"],
                    "patient_id": series["patient_id"],
                    "modality": series["modality"],
                    "description": series["description"],
                    "series_date": series["series_date"],
                    "instance_count": counts.get(series["series_uid"], 0),
                    "datasets": sorted(
                        d[len(prefix) :] for d in series["datasets"] if d.startswith(prefix)
                    ),
                    "complete": bool(series["complete"]),
                    "first_received_at": series["first_received_at"],
                    "last_received_at": series["last_received_at"],
                    "validation": source.get(KEY_VALIDATION),
                    "has_thumbnail": KEY_THUMBNAIL in source,
                    "thumbnail_error": source.get(KEY_THUMBNAIL_ERROR),
                }
            )
        return out

    async def get_series(self, series_instance_uid: str) -> dict[str, Any] | None:
        uid = series_instance_uid
        series = (await self._get(SERIES, uid)).source
        if series is None:
            return None
        projects = sorted(series.get("projects") or [])
        datasets = [
            {"project": p, "dataset": d}
            for p, d in sorted(tuple(k.split("/", 1)) for k in series.get("datasets") or [])
        ]
        # admin's document first, as the SQLite index does
        order = sorted(projects, key=lambda p: (p != ADMIN_PROJECT, p))
        docs = await self._mget([(project_index(p), uid) for p in order])
        document = next((d.source for d in docs if d.source is not None), {})
        body = {
            "size": 0,
            "query": {"term": {"series_uid": uid}},
            "track_total_hits": True,
            "aggs": {"bytes": {"sum": {"field": "size"}}},
        }
        response = await self._search(INSTANCES, body)
        return {
            **{k: series.get(k) for k in SERIES_FIELDS},
            "complete": bool(series.get("complete")),
            "projects": projects,
            "datasets": datasets,
            "instance_count": int(response["hits"]["total"]["value"]),
            "size_bytes": int(response["aggregations"]["bytes"]["value"] or 0),
            "document": document,
        }

    async def list_instances(self, series_instance_uid: str) -> list[dict[str, Any]]:
        sort = [
            # SQLite sorts NULL first; so do we.
            {"instance_number": {"order": "asc", "missing": "_first"}},
            {"sop_uid": {"order": "asc"}},
        ]
        query = {"term": {"series_uid": series_instance_uid}}
        return [
            {k: hit["_source"].get(k) for k in INSTANCE_FIELDS}
            async for hit in self._scan(INSTANCES, query, sort)
        ]

    async def instance_key(self, series_instance_uid: str, sop_instance_uid: str) -> str | None:
        doc = await self._get(INSTANCES, instance_id(series_instance_uid, sop_instance_uid))
        return None if doc.source is None else str(doc.source["storage_key"])

    async def find_instance(self, sop_instance_uid: str) -> list[dict[str, Any]]:
        sort = [{"received_at": {"order": "desc"}}, {"series_uid": {"order": "asc"}}]
        fields = ("series_uid", "study_uid", "storage_key", "received_at")
        return [
            {k: hit["_source"].get(k) for k in fields}
            async for hit in self._scan(INSTANCES, {"term": {"sop_uid": sop_instance_uid}}, sort)
        ]

    # -- DICOMweb ---------------------------------------------------------------------------

    async def qido(self, query: QidoQuery) -> tuple[list[QidoRow], bool]:
        if query.offset + query.limit + 1 > MAX_RESULT_WINDOW:
            raise BadQueryError(
                f"offset + limit must stay under {MAX_RESULT_WINDOW} with the OpenSearch index"
            )
        if query.level is Level.STUDY:
            return await self._qido_studies(query)
        if query.level is Level.SERIES:
            return await self._qido_series(query)
        return await self._qido_instances(query)

    async def _uids(self, index: str, field_name: str, filters: list[dict[str, Any]]) -> set[str]:
        """Every `field_name` of the documents of `index` matching `filters`."""
        query = {"bool": {"filter": filters}} if filters else {"match_all": {}}
        sort_key = {SERIES: "series_uid", STUDIES: "study_uid"}[index]
        return {
            str(hit["_source"][field_name])
            async for hit in self._scan(index, query, [{sort_key: {"order": "asc"}}])
        }

    def _project_filter(self, query: QidoQuery) -> list[dict[str, Any]]:
        return [{"term": {"projects": query.project}}]

    async def _scoped(
        self, query: QidoQuery, level: Level, field_name: str
    ) -> tuple[list[dict[str, Any]], bool]:
        """Filters on `field_name` (``study_uid`` or ``series_uid``) narrowing to what the
        higher levels' matches, the project and ModalitiesInStudy allow; False when nothing
        can match."""
        filters: list[dict[str, Any]] = []
        study_matches = _os_matches(query, Level.STUDY, skip_uids=level is not Level.STUDY)
        if study_matches and level is not Level.STUDY:
            studies = await self._uids(STUDIES, "study_uid", study_matches)
            if not studies:
                return [], False
            filters.append({"terms": {"study_uid": sorted(studies)}})
        series_filters = self._project_filter(query) if level is Level.STUDY else []
        if query.modalities_in_study:
            series_filters = [
                *self._project_filter(query),
                {"terms": {"modality": list(query.modalities_in_study)}},
            ]
        if series_filters:
            studies = await self._uids(SERIES, "study_uid", series_filters)
            if not studies:
                return [], False
            filters.append({"terms": {"study_uid": sorted(studies)}})
        if level is Level.INSTANCE:
            wanted = [
                *self._project_filter(query),
                *_os_matches(query, Level.SERIES, skip_uids=True),
            ]
            series = await self._uids(SERIES, "series_uid", wanted)
            if not series:
                return [], False
            filters.append({"terms": {"series_uid": sorted(series)}})
        return filters, True

    async def _page(
        self, index: str, filters: list[dict[str, Any]], sort: list[dict[str, Any]],
        query: QidoQuery,
    ) -> tuple[list[dict[str, Any]], bool]:  # fmt: skip
        body = {
            "query": {"bool": {"filter": filters}},
            "sort": sort,
            "from": query.offset,
            "size": query.limit + 1,
            "track_total_hits": False,
        }
        hits = [h["_source"] for h in (await self._search(index, body))["hits"]["hits"]]
        return hits[: query.limit], len(hits) > query.limit

    async def _counts(
        self, index: str, field_name: str, filters: list[dict[str, Any]]
    ) -> dict[str, int]:
        body = {
            "size": 0,
            "query": {"bool": {"filter": filters}},
            "aggs": {"n": {"terms": {"field": field_name, "size": MAX_RESULT_WINDOW}}},
        }
        buckets = (await self._search(index, body))["aggregations"]["n"]["buckets"]
        return {str(b["key"]): int(b["doc_count"]) for b in buckets}

    async def _attrs(self, index: str, uids: set[str]) -> dict[str, str]:
        wanted = sorted(uids)
        docs = await self._mget([(index, uid) for uid in wanted])
        return {
            uid: str((d.source or {}).get("attrs") or "{}")
            for uid, d in zip(wanted, docs, strict=True)
        }

    async def _qido_studies(self, query: QidoQuery) -> tuple[list[QidoRow], bool]:
        filters, possible = await self._scoped(query, Level.STUDY, "study_uid")
        if not possible:
            return [], False
        filters += _os_matches(query, Level.STUDY, skip_uids=False)
        sort = [{"created_at": {"order": "asc"}}, {"study_uid": {"order": "asc"}}]
        page, more = await self._page(STUDIES, filters, sort, query)
        uids = [str(d["study_uid"]) for d in page]
        series_by_study: dict[str, list[dict[str, Any]]] = {uid: [] for uid in uids}
        if uids:
            scope = [*self._project_filter(query), {"terms": {"study_uid": uids}}]
            async for hit in self._scan(
                SERIES, {"bool": {"filter": scope}}, [{"series_uid": {"order": "asc"}}]
            ):
                series_by_study[str(hit["_source"]["study_uid"])].append(hit["_source"])
        all_series = [str(s["series_uid"]) for ss in series_by_study.values() for s in ss]
        per_series = (
            await self._counts(INSTANCES, "series_uid", [{"terms": {"series_uid": all_series}}])
            if all_series
            else {}
        )
        return [
            QidoRow(
                study_uid=uid,
                study_json=str(doc.get("attrs") or "{}"),
                modalities=sorted(
                    {str(s.get("modality") or "") for s in series_by_study[uid]} - {""}
                ),
                study_series=len(series_by_study[uid]),
                study_instances=sum(
                    per_series.get(str(s["series_uid"]), 0) for s in series_by_study[uid]
                ),
            )
            for uid, doc in zip(uids, page, strict=True)
        ], more

    async def _qido_series(self, query: QidoQuery) -> tuple[list[QidoRow], bool]:
        filters, possible = await self._scoped(query, Level.SERIES, "study_uid")
        if not possible:
            return [], False
        filters += self._project_filter(query)
        filters += _os_matches(query, Level.SERIES, skip_uids=False)
        filters += _uid_filters(query, Level.STUDY)
        sort = [{"first_received_at": {"order": "asc"}}, {"series_uid": {"order": "asc"}}]
        page, more = await self._page(SERIES, filters, sort, query)
        studies = await self._attrs(STUDIES, {str(d["study_uid"]) for d in page})
        uids = [str(d["series_uid"]) for d in page]
        counts = (
            await self._counts(INSTANCES, "series_uid", [{"terms": {"series_uid": uids}}])
            if uids
            else {}
        )
        return [
            QidoRow(
                study_uid=str(d["study_uid"]),
                series_uid=str(d["series_uid"]),
                study_json=studies.get(str(d["study_uid"]), "{}"),
                series_json=str(d.get("attrs") or "{}"),
                series_instances=counts.get(str(d["series_uid"]), 0),
            )
            for d in page
        ], more

    async def _qido_instances(self, query: QidoQuery) -> tuple[list[QidoRow], bool]:
        filters, possible = await self._scoped(query, Level.INSTANCE, "study_uid")
        if not possible:
            return [], False
        filters += _os_matches(query, Level.INSTANCE, skip_uids=False)
        filters += _uid_filters(query, Level.STUDY) + _uid_filters(query, Level.SERIES)
        sort = [
            {"series_uid": {"order": "asc"}},
            {"instance_number": {"order": "asc", "missing": "_first"}},
            {"sop_uid": {"order": "asc"}},
        ]
        page, more = await self._page(INSTANCES, filters, sort, query)
        studies = await self._attrs(STUDIES, {str(d["study_uid"]) for d in page})
        series = await self._attrs(SERIES, {str(d["series_uid"]) for d in page})
        return [
            QidoRow(
                study_uid=str(d["study_uid"]),
                series_uid=str(d["series_uid"]),
                sop_uid=str(d["sop_uid"]),
                study_json=studies.get(str(d["study_uid"]), "{}"),
                series_json=series.get(str(d["series_uid"]), "{}"),
                instance_json=str(d.get("attrs") or "{}"),
            )
            for d in page
        ], more

    async def dicomweb_instances(
        self, project: str, study_uid: str, series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        filters: list[dict[str, Any]] = [{"term": {"study_uid": study_uid}}]
        if series_uid is not None:
            filters.append({"term": {"series_uid": series_uid}})
        if sop_uid is not None:
            filters.append({"term": {"sop_uid": sop_uid}})
        sort = [
            {"series_uid": {"order": "asc"}},
            {"instance_number": {"order": "asc", "missing": "_first"}},
            {"sop_uid": {"order": "asc"}},
        ]
        fields = (
            "study_uid", "series_uid", "sop_uid", "sop_class_uid", "transfer_syntax_uid",
            "number_of_frames", "size", "storage_key", "received_at",
        )  # fmt: skip
        rows = [
            {k: hit["_source"].get(k) for k in fields}
            async for hit in self._scan(INSTANCES, {"bool": {"filter": filters}}, sort)
        ]
        series = sorted({str(r["series_uid"]) for r in rows})
        docs = await self._mget([(SERIES, uid) for uid in series])
        allowed = {
            uid
            for uid, d in zip(series, docs, strict=True)
            if d.source is not None and project in (d.source.get("projects") or [])
        }
        return [r for r in rows if r["series_uid"] in allowed]

    async def incomplete_series(self) -> list[str]:
        return [
            hit["_id"]
            async for hit in self._scan(
                SERIES, {"term": {"complete": False}}, [{"series_uid": {"order": "asc"}}]
            )
        ]


def _uid_filters(query: QidoQuery, level: Level) -> list[dict[str, Any]]:
    """The UID matches of `level` (path or query) as terms filters on its UID field."""
    field_name = {Level.STUDY: "study_uid", Level.SERIES: "series_uid", Level.INSTANCE: "sop_uid"}
    return [
        {"terms": {field_name[level]: list(m.values)}}
        for m in query.matches
        if m.level is level and m.tag in UID_TAGS and m.kind is not MatchKind.UNIVERSAL
    ]


def _os_match(m: Match) -> dict[str, Any] | None:
    """One non-UID matching key as an OpenSearch filter on its ``q_<tag>`` values."""
    name = f"q_{m.tag}"

    def form(value: str) -> str:
        if m.vr == "PN":
            return value.lower()
        if m.vr in ("IS", "US", "UL", "SS", "SL", "DS", "FL", "FD"):
            return canonical_number(value) or value
        return value

    if m.kind is MatchKind.UNIVERSAL:
        return None
    if m.kind is MatchKind.RANGE:
        low, high = m.values
        bounds: dict[str, str] = {}
        if low:
            bounds["gte"] = low
        if high:
            bounds["lte"] = high.ljust(6, "9") if m.vr == "TM" else high
        return {"range": {name: bounds}}
    if m.kind is MatchKind.WILDCARD:
        pattern = form(m.values[0]).replace("\\", "\\\\")
        return {"wildcard": {name: {"value": pattern}}}
    return {"terms": {name: [form(v) for v in m.values]}}


def _os_matches(query: QidoQuery, level: Level, *, skip_uids: bool) -> list[dict[str, Any]]:
    """Filters for `level`'s non-UID matches (its UID matches too unless `skip_uids`)."""
    out: list[dict[str, Any]] = []
    for m in query.matches:
        if m.level is not level:
            continue
        if m.tag in UID_TAGS:
            if not skip_uids and m.kind is not MatchKind.UNIVERSAL:
                out.append(
                    {"terms": {{Level.STUDY: "study_uid", Level.SERIES: "series_uid",
                                Level.INSTANCE: "sop_uid"}[level]: list(m.values)}}
                )  # fmt: skip
            continue
        if (condition := _os_match(m)) is not None:
            out.append(condition)
    return out
