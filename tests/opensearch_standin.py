"""A small, strict in-process stand-in for the OpenSearch REST calls ``OpenSearchIndex`` makes.

Written from the OpenSearch REST API reference. It implements exactly: ``_cluster/health``,
``_index_template`` (PUT/GET), index create/exists/delete/``_mapping``, ``_bulk``
(index/create/update/delete with ``if_seq_no``/``if_primary_term``), ``_mget``, single-document
get/head/index/create/delete, ``_search`` (bool/term/terms/wildcard/ids/match_all/query_string
``*literal*``; from/size, sort with ``missing``, ``search_after``, ``track_total_hits``,
``terms``/``sum`` aggregations), ``_count``, ``_delete_by_query`` and ``_refresh``.

Strict on purpose, so it cannot hide bugs a real cluster would show: unknown URL parameters,
unknown body keys and query clauses, malformed bulk bodies and result windows past 10,000 are
400 errors in OpenSearch's error shape; dynamic mapping follows the index template (a string
under a ``*_integer`` key is a ``mapper_parsing_exception``); ``dynamic: strict`` is enforced;
search sees only refreshed data (refresh on ``refresh=true|wait_for``, ``_refresh``, or 1 s
after the last refresh, as a real index's refresh interval does), while gets are realtime.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import re
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


class OsError(Exception):
    """An OpenSearch error response."""

    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.kind, self.reason = status, kind, reason

    def body(self) -> dict[str, Any]:
        cause = {"type": self.kind, "reason": self.reason}
        return {"error": {"root_cause": [cause], **cause}, "status": self.status}


def bad(reason: str, kind: str = "illegal_argument_exception") -> OsError:
    return OsError(400, kind, reason)


DATE_FORMATS = {
    "yyyy-MM-dd HH:mm:ss.SSSSSS": r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}",
    "yyyy-MM-dd": r"\d{4}-\d\d-\d\d",
    "HH:mm:ss.SSSSSS": r"\d\d:\d\d:\d\d\.\d{6}",
}
STRFTIME = {"yyyy": "%Y", "MM": "%m", "dd": "%d", "HH": "%H", "mm": "%M", "ss": "%S"}
LEAF_TYPES = {"keyword", "text", "long", "integer", "float", "double", "boolean", "date"}


def simple_match(pattern: str, name: str) -> bool:
    """OpenSearch's simple match: only ``*`` is special."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), name) is not None


def flat_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = prefix + key
        out.update(flat_settings(value, name + ".") if isinstance(value, dict) else {name: value})
    return {k if k.startswith("index.") else "index." + k: v for k, v in out.items()}


def check_keys(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise bad(f"[{where}] must be an object", "parsing_exception")
    for key in obj:
        if key not in allowed:
            raise bad(f"[{where}] does not support [{key}]", "parsing_exception")
    return obj


@dataclass
class Doc:
    source: dict[str, Any]
    seq_no: int
    version: int = 1


@dataclass
class Index:
    name: str
    dynamic: Any = True
    templates: list[dict[str, Any]] = field(default_factory=list)
    props: dict[str, dict[str, Any]] = field(default_factory=dict)  # dotted path -> mapping
    settings: dict[str, Any] = field(default_factory=dict)
    docs: dict[str, Doc] = field(default_factory=dict)
    searchable: dict[str, Doc] = field(default_factory=dict)
    seq: int = -1
    refreshed_at: float = field(default_factory=time.monotonic)

    def configure(self, mappings: dict[str, Any]) -> None:
        allowed = {"dynamic", "numeric_detection", "date_detection", "dynamic_templates"}
        check_keys(mappings, allowed | {"properties"}, "mappings")
        if mappings.get("numeric_detection") or mappings.get("date_detection"):
            raise bad("stand-in implements only numeric/date detection off")
        self.dynamic = mappings.get("dynamic", self.dynamic)
        for entry in mappings.get("dynamic_templates", []):
            ((_, tpl),) = entry.items()
            check_keys(tpl, {"match", "mapping"}, "dynamic_templates")
        self.templates += mappings.get("dynamic_templates", [])
        for name, mapping in mappings.get("properties", {}).items():
            if mapping.get("type") not in LEAF_TYPES:
                raise bad(f"No handler for type [{mapping.get('type')}] declared on [{name}]")
            self.props[name] = mapping

    def refresh(self) -> None:
        self.searchable = dict(self.docs)
        self.refreshed_at = time.monotonic()

    def mapping_of(self, path: str) -> dict[str, Any] | None:
        if path.endswith(".keyword") and (self.props.get(path[:-8]) or {}).get("type") == "text":
            return {"type": "keyword"}
        return self.props.get(path)

    def new_mapping(self, name: str, value: Any) -> dict[str, Any]:
        for entry in self.templates:
            ((_, tpl),) = entry.items()
            if simple_match(tpl["match"], name):
                return dict(tpl["mapping"])
        if isinstance(value, bool):
            return {"type": "boolean"}
        if isinstance(value, int):
            return {"type": "long"}
        if isinstance(value, float):
            return {"type": "float"}
        if isinstance(value, dict):
            return {"type": "object"}
        return {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}}

    def parse(self, doc_id: str, source: Any) -> dict[str, dict[str, Any]]:
        """Map `source` like a real cluster; returns the new fields (committed by the caller)."""
        if not isinstance(source, dict):
            raise bad("failed to parse, document is empty", "mapper_parsing_exception")
        new: dict[str, dict[str, Any]] = {}
        for key, value in source.items():
            self._parse(doc_id, key, key, value, new)
        limit = int(self.settings.get("index.mapping.total_fields.limit", 1000))
        if len(self.props) + len(new) > limit:
            raise bad(f"Limit of total fields [{limit}] has been exceeded")
        return new

    def _parse(self, doc_id: str, path: str, name: str, value: Any, new: dict[str, Any]) -> None:
        if value is None:
            return
        if isinstance(value, list):
            for item in value:
                self._parse(doc_id, path, name, item, new)
            return
        mapping = self.props.get(path) or new.get(path)
        if mapping is None:
            if self.dynamic == "strict":
                raise bad(
                    f"mapping set to strict, dynamic introduction of [{name}] within [_doc] "
                    "is not allowed",
                    "strict_dynamic_mapping_exception",
                )
            mapping = new[path] = self.new_mapping(name, value)
        kind = mapping.get("type", "object")
        if kind == "object":
            if not isinstance(value, dict):
                raise bad(
                    f"object mapping for [{path}] tried to parse field [{name}] as object, "
                    "but found a concrete value",
                    "mapper_parsing_exception",
                )
            for key, sub in value.items():
                self._parse(doc_id, f"{path}.{key}", key, sub, new)
        elif not _fits(kind, mapping, value):
            raise bad(
                f"failed to parse field [{path}] of type [{kind}] in document with id "
                f"'{doc_id}'. Preview of field's value: '{value}'",
                "mapper_parsing_exception",
            )


def _fits(kind: str, mapping: dict[str, Any], value: Any) -> bool:
    if isinstance(value, dict):
        return False
    if kind in ("long", "integer", "float", "double"):
        if isinstance(value, bool):
            return False
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False
        return math.isfinite(number) and (kind in ("float", "double") or abs(number) < 2**63)
    if kind == "boolean":
        return isinstance(value, bool) or value in ("true", "false")
    if kind == "date":
        fmt = mapping.get("format", "")
        if fmt not in DATE_FORMATS:
            raise bad(f"stand-in does not implement date format [{fmt}]")
        if not isinstance(value, str) or not re.fullmatch(DATE_FORMATS[fmt], value):
            return False
        py = fmt.replace(".SSSSSS", ".%f")
        for java, c in STRFTIME.items():
            py = py.replace(java, c)
        try:
            datetime.datetime.strptime(value, py)
        except ValueError:
            return False
    return True


def values_at(source: dict[str, Any], path: str) -> list[Any]:
    current: list[Any] = [source]
    for part in path.removesuffix(".keyword").split("."):
        current = [c.get(part) for c in current if isinstance(c, dict)]
        current = list(
            itertools.chain.from_iterable(c if isinstance(c, list) else [c] for c in current)
        )
    return [c for c in current if c is not None]


def wildcard_regex(pattern: str) -> str:
    out, escaped = "", False
    for c in pattern:
        if escaped:
            out, escaped = out + re.escape(c), False
        elif c == "\\":
            escaped = True
        else:
            out += {"*": ".*", "?": "."}.get(c, re.escape(c))
    return out


class Standin:
    """The server; ``await start()`` binds 127.0.0.1 on an OS-assigned port and sets `url`."""

    def __init__(self) -> None:
        self.indices: dict[str, Index] = {}
        self.templates: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_bulk: list[int] = []  # statuses for the next _bulk requests (fault injection)
        self.fail_items: list[int] = []  # statuses for the next bulk items
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application(client_max_size=100 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- dispatch ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.raw_path.split("?", 1)[0]
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/") if p]
        self.requests.append((request.method, "/" + "/".join(parts)))
        try:
            raw = await request.read()
            status, body = self._route(request.method, parts, dict(request.query), raw)
        except OsError as exc:
            status, body = exc.status, exc.body()
        if request.method == "HEAD":
            return web.Response(status=status)
        return web.json_response(body, status=status)

    def _route(self, method: str, p: list[str], q: dict[str, str], raw: bytes) -> tuple[int, Any]:
        def params(*allowed: str) -> None:
            for key in q:
                if key not in allowed:
                    raise bad(f"request [/{'/'.join(p)}] contains unrecognized parameter: [{key}]")
            if q.get("refresh", "true") not in ("true", "false", "wait_for", ""):
                raise bad(f"Unknown value for refresh: [{q['refresh']}].")

        def body() -> Any:
            try:
                return json.loads(raw) if raw else {}
            except ValueError as exc:
                raise bad(f"Failed to parse content: {exc}", "x_content_parse_exception") from exc

        route = (method, len(p), p[0] if p else "", p[1] if len(p) > 1 else "")
        match route:
            case ("GET", 2, "_cluster", "health"):
                params()
                return 200, {"cluster_name": "standin", "status": "green", "number_of_nodes": 1}
            case ("PUT", 2, "_index_template", _):
                params()
                return self._put_template(p[1], body())
            case ("GET", 2, "_index_template", _):
                params()
                if p[1] not in self.templates:
                    raise OsError(404, "resource_not_found_exception", f"[{p[1]}] not found")
                return 200, {
                    "index_templates": [{"name": p[1], "index_template": self.templates[p[1]]}]
                }
            case ("POST" | "PUT", 1, "_bulk", _):
                params("refresh")
                return self._bulk(raw, q.get("refresh", "false"))
            case ("GET" | "POST", 1, "_mget", _):
                params()
                return 200, self._mget(body())
            case ("HEAD", 1, _, _):
                params()
                return (200 if p[0] in self.indices else 404), None
            case ("PUT", 1, _, _):
                params()
                return self._create_index(p[0], body())
            case ("DELETE", 1, _, _):
                params()
                self._index(p[0])
                del self.indices[p[0]]
                return 200, {"acknowledged": True}
            case ("PUT" | "POST", 2, _, "_mapping"):
                params()
                index = self._index(p[0])
                spec = check_keys(body(), {"properties", "dynamic"}, "put mapping")
                for field_name, mapping in spec.get("properties", {}).items():
                    old = index.props.get(field_name)
                    if old is not None and old.get("type") != mapping.get("type"):
                        raise bad(
                            f"mapper [{field_name}] cannot be changed from type "
                            f"[{old.get('type')}] to [{mapping.get('type')}]"
                        )
                index.configure({"properties": spec.get("properties", {})})
                return 200, {"acknowledged": True}
            case ("GET", 2, _, "_mapping"):
                params()
                return 200, {p[0]: {"mappings": self._mapping_body(self._index(p[0]))}}
            case ("GET" | "POST", 2, _, "_search"):
                params("ignore_unavailable")
                if p[0] not in self.indices and q.get("ignore_unavailable") == "true":
                    return 200, {"hits": {"total": {"value": 0, "relation": "eq"}, "hits": []}}
                return 200, self._search(self._index(p[0]), body())
            case ("GET" | "POST", 2, _, "_count"):
                params()
                query = check_keys(body(), {"query"}, "count").get("query", {"match_all": {}})
                index = self._visible(self._index(p[0]))
                hits = self._select(index, query)
                return 200, {"count": len(hits), "_shards": {"total": 1, "successful": 1}}
            case ("POST", 2, _, "_delete_by_query"):
                params("refresh", "conflicts")
                return 200, self._delete_by_query(p[0], body(), q)
            case ("POST", 2, _, "_refresh"):
                params()
                self._index(p[0]).refresh()
                return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}
            case ("GET" | "HEAD", 3, _, "_doc"):
                params()
                doc = self._index(p[0]).docs.get(p[2])
                return (200 if doc else 404), self._get_body(p[0], p[2], doc)
            case ("PUT" | "POST", 3, _, "_doc" | "_create") | ("POST", 2, _, "_doc"):
                params("refresh")
                op = "create" if p[1] == "_create" else "index"
                meta = {"_index": p[0], "_id": p[2] if len(p) == 3 else uuid.uuid4().hex[:20]}
                item = self._write(op, meta, body())
                self._maybe_refresh(p[0], q.get("refresh", "false"))
                if "error" in item:
                    raise OsError(item["status"], item["error"]["type"], item["error"]["reason"])
                return item["status"], item
            case ("DELETE", 3, _, "_doc"):
                params("refresh")
                item = self._write("delete", {"_index": p[0], "_id": p[2]}, None)
                self._maybe_refresh(p[0], q.get("refresh", "false"))
                return item["status"], item
        raise bad(f"no handler found for uri [/{'/'.join(p)}] and method [{method}]")

    # -- indices -----------------------------------------------------------------------------

    def _index(self, name: str) -> Index:
        if name not in self.indices:
            raise OsError(404, "index_not_found_exception", f"no such index [{name}]")
        return self.indices[name]

    def _put_template(self, name: str, tpl: Any) -> tuple[int, Any]:
        check_keys(tpl, {"index_patterns", "template", "priority", "version", "_meta"}, "template")
        check_keys(tpl.get("template", {}), {"settings", "mappings"}, "template.template")
        Index("validate").configure(tpl.get("template", {}).get("mappings", {}))
        self.templates[name] = tpl
        return 200, {"acknowledged": True}

    def _create_index(self, name: str, spec: Any) -> tuple[int, Any]:
        if name in self.indices:
            raise bad(f"index [{name}] already exists", "resource_already_exists_exception")
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.+-]*", name) or len(name) > 255:
            raise bad(f"Invalid index name [{name}]", "invalid_index_name_exception")
        check_keys(spec, {"settings", "mappings"}, "create index")
        index = Index(name)
        matching = [
            t
            for t in self.templates.values()
            if any(simple_match(pat, name) for pat in t["index_patterns"])
        ]
        for tpl in sorted(matching, key=lambda t: t.get("priority", 0))[-1:]:
            index.settings.update(flat_settings(tpl["template"].get("settings", {})))
            index.configure(tpl["template"].get("mappings", {}))
        index.settings.update(flat_settings(spec.get("settings", {})))
        index.configure(spec.get("mappings", {}))
        self.indices[name] = index
        return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}

    def _mapping_body(self, index: Index) -> dict[str, Any]:
        props: dict[str, Any] = {}
        for path, mapping in sorted(index.props.items()):
            node = props
            *parents, leaf = path.split(".")
            for part in parents:
                node = node.setdefault(part, {}).setdefault("properties", {})
            node.setdefault(leaf, {}).update(
                {k: v for k, v in mapping.items() if k != "type" or v != "object"}
            )
        return {
            "dynamic": str(index.dynamic).lower(),
            "dynamic_templates": index.templates,
            "properties": props,
        }

    def _visible(self, index: Index) -> Index:
        if time.monotonic() - index.refreshed_at >= 1.0:  # the default refresh_interval
            index.refresh()
        return index

    def _maybe_refresh(self, name: str, refresh: str) -> None:
        if refresh in ("true", "wait_for", "") and name in self.indices:
            self.indices[name].refresh()

    # -- documents ---------------------------------------------------------------------------

    @staticmethod
    def _get_body(index: str, doc_id: str, doc: Doc | None) -> dict[str, Any]:
        if doc is None:
            return {"_index": index, "_id": doc_id, "found": False}
        return {
            "_index": index, "_id": doc_id, "_version": doc.version, "_seq_no": doc.seq_no,
            "_primary_term": 1, "found": True, "_source": doc.source,
        }  # fmt: skip

    def _write(self, op: str, meta: dict[str, Any], source: Any) -> dict[str, Any]:
        name, doc_id = meta["_index"], meta["_id"]
        item: dict[str, Any] = {"_index": name, "_id": doc_id}
        conflict = "version_conflict_engine_exception"
        try:
            if not isinstance(doc_id, str) or not doc_id or len(doc_id.encode()) > 512:
                raise bad(f"id [{doc_id}] is invalid", "action_request_validation_exception")
            if name not in self.indices and op in ("delete", "update"):
                raise OsError(404, "index_not_found_exception", f"no such index [{name}]")
            if name not in self.indices:
                self._create_index(name, {})
            index = self.indices[name]
            old = index.docs.get(doc_id)
            if op == "create" and old is not None:
                raise OsError(409, conflict, f"[{doc_id}]: version conflict, document exists")
            wanted = (meta.get("if_seq_no"), meta.get("if_primary_term"))
            if "if_seq_no" in meta and (old is None or wanted != (old.seq_no, 1)):
                now = "document does not exist" if old is None else f"current seqNo [{old.seq_no}]"
                raise OsError(409, conflict, f"[{doc_id}]: required seqNo [{wanted[0]}], {now}")
            if op == "delete" and old is None:
                return {**item, "result": "not_found", "status": 404}
            if op == "update" and old is None:
                raise OsError(404, "document_missing_exception", f"[{doc_id}]: document missing")
            if op == "update":
                source = {**old.source, **check_keys(source, {"doc"}, "update")["doc"]}
            if op != "delete":
                index.props.update(index.parse(doc_id, source))
            index.seq += 1
            if op == "delete":
                del index.docs[doc_id]
            else:
                version = old.version + 1 if old else 1
                index.docs[doc_id] = Doc(json.loads(json.dumps(source)), index.seq, version)
            result = "deleted" if op == "delete" else "updated" if old else "created"
            status = 201 if result == "created" else 200
            return {**item, "result": result, "status": status, "_seq_no": index.seq}
        except OsError as exc:
            return {**item, "status": exc.status, "error": {"type": exc.kind, "reason": exc.reason}}

    def _bulk(self, raw: bytes, refresh: str) -> tuple[int, Any]:
        if self.fail_bulk:
            raise OsError(
                self.fail_bulk.pop(0), "es_rejected_execution_exception", "injected failure"
            )
        text = raw.decode()
        if not text:
            raise bad(
                "Validation Failed: 1: no requests added;", "action_request_validation_exception"
            )
        if not text.endswith("\n"):
            raise bad("The bulk request must be terminated by a newline [\\n]")
        lines, items, touched = text[:-1].split("\n"), [], set()
        n = 0
        while n < len(lines):
            try:
                action = json.loads(lines[n])
            except ValueError as exc:
                raise bad(
                    f"Malformed action/metadata line [{n + 1}]: {exc}", "json_parse_exception"
                ) from exc
            if (
                not isinstance(action, dict)
                or len(action) != 1
                or next(iter(action)) not in ("index", "create", "update", "delete")
            ):
                found = next(iter(action), None) if isinstance(action, dict) else action
                raise bad(
                    f"Malformed action/metadata line [{n + 1}], expected one of "
                    f"[create, delete, index, update] but found [{found}]"
                )
            ((op, meta),) = action.items()
            for key in meta:
                if key not in ("_index", "_id", "if_seq_no", "if_primary_term"):
                    raise bad(
                        f"Action/metadata line [{n + 1}] contains an unknown parameter [{key}]"
                    )
            if "_index" not in meta:
                raise bad(
                    "Validation Failed: 1: index is missing;", "action_request_validation_exception"
                )
            source = None
            if op != "delete":
                if n + 1 >= len(lines):
                    raise bad(
                        f"The bulk request must have a source line after action line [{n + 1}]"
                    )
                try:
                    source = json.loads(lines[n + 1])
                except ValueError as exc:
                    raise bad(
                        f"Failed to parse source line [{n + 2}]: {exc}", "json_parse_exception"
                    ) from exc
                n += 1
            n += 1
            meta = {"_id": uuid.uuid4().hex[:20], **meta}
            if self.fail_items:
                status = self.fail_items.pop(0)
                items.append(
                    {
                        op: {
                            "_index": meta["_index"],
                            "_id": meta["_id"],
                            "status": status,
                            "error": {
                                "type": "es_rejected_execution_exception",
                                "reason": "injected",
                            },
                        }
                    }
                )
                continue
            items.append({op: self._write(op, meta, source)})
            touched.add(meta["_index"])
        for name in touched:
            self._maybe_refresh(name, refresh)
        errors = any("error" in next(iter(i.values())) for i in items)
        return 200, {"took": 1, "errors": errors, "items": items}

    def _mget(self, spec: Any) -> dict[str, Any]:
        docs = []
        for entry in check_keys(spec, {"docs"}, "mget")["docs"]:
            check_keys(entry, {"_index", "_id"}, "mget.docs")
            name, doc_id = entry["_index"], entry["_id"]
            if name not in self.indices:
                error = OsError(404, "index_not_found_exception", f"no such index [{name}]")
                docs.append({"_index": name, "_id": doc_id, "error": error.body()["error"]})
            else:
                docs.append(self._get_body(name, doc_id, self.indices[name].docs.get(doc_id)))
        return {"docs": docs}

    def _delete_by_query(self, name: str, spec: Any, q: dict[str, str]) -> dict[str, Any]:
        index = self._visible(self._index(name))
        query = check_keys(spec, {"query"}, "delete_by_query").get("query", {"match_all": {}})
        ids = [i for i, _ in self._select(index, query)]
        for doc_id in ids:
            index.docs.pop(doc_id, None)
        self._maybe_refresh(name, q.get("refresh", "false"))
        return {
            "took": 1,
            "timed_out": False,
            "total": len(ids),
            "deleted": len(ids),
            "failures": [],
        }

    # -- search ------------------------------------------------------------------------------

    def _search(self, index: Index, spec: Any) -> dict[str, Any]:
        allowed = {
            "query",
            "from",
            "size",
            "sort",
            "track_total_hits",
            "search_after",
            "aggs",
            "_source",
            "seq_no_primary_term",
        }
        check_keys(spec, allowed, "search")
        index = self._visible(index)
        start, size = int(spec.get("from", 0)), int(spec.get("size", 10))
        if start + size > 10_000:
            raise bad(
                f"Result window is too large, from + size must be less than or equal "
                f"to: [10000] but was [{start + size}]."
            )
        query = spec.get("query", {"match_all": {}})
        hits = self._select(index, query)
        sort = [({s: {}} if isinstance(s, str) else s) for s in spec.get("sort", [])]
        keys = [self._sort_key(index, s) for s in sort]
        rows = [([k(d) for k in keys], i, d) for i, d in hits]
        descs = [next(iter(s.values())).get("order", "asc") == "desc" for s in sort]
        for n in reversed(range(len(sort))):
            rows.sort(key=lambda r, n=n: r[0][n], reverse=descs[n])
        if "search_after" in spec:
            marker = spec["search_after"]
            if not sort or len(marker) != len(sort):
                raise bad("search_after has to have as many values as the sort has fields")
            rows = [r for r in rows if _after(r[0], marker, descs)]
        out: dict[str, Any] = {
            "took": 1,
            "timed_out": False,
            "hits": {"max_score": None, "hits": []},
        }
        for values, doc_id, doc in rows[start : start + size]:
            hit: dict[str, Any] = {"_index": index.name, "_id": doc_id, "_score": None}
            if spec.get("_source", True) is not False:
                hit["_source"] = doc.source
            if spec.get("seq_no_primary_term"):
                hit.update(_seq_no=doc.seq_no, _primary_term=1)
            if sort:
                hit["sort"] = values
            out["hits"]["hits"].append(hit)
        track = spec.get("track_total_hits", 10_000)
        if track is not False:
            cap = math.inf if track is True else int(track)
            out["hits"]["total"] = {
                "value": min(len(hits), cap),
                "relation": "eq" if len(hits) <= cap else "gte",
            }
        if "aggs" in spec:
            out["aggregations"] = {
                name: self._agg(index, agg, [d for _, d in hits])
                for name, agg in spec["aggs"].items()
            }
        return out

    def _field(self, index: Index, name: str, what: str) -> str:
        mapping = index.mapping_of(name)
        if mapping is None:
            raise bad(f"No mapping found for [{name}] in order to {what}", "query_shard_exception")
        if mapping.get("type") == "text":
            raise bad(
                "Text fields are not optimised for operations that require per-document "
                f"field data like aggregations and sorting [{name}]"
            )
        return str(mapping.get("type"))

    def _sort_key(self, index: Index, spec: dict[str, Any]) -> Any:
        ((name, opts),) = spec.items()
        check_keys(opts, {"order", "missing"}, f"sort.{name}")
        numeric = self._field(index, name, "sort on") in (
            "long",
            "integer",
            "float",
            "double",
            "date",
        )
        first = (opts.get("missing", "_last") == "_first") != (opts.get("order") == "desc")
        fill: Any = (-(2**63) if first else 2**63 - 1) if numeric else ("" if first else "\uffff")

        def key(doc: Doc) -> Any:
            found = values_at(doc.source, name)
            return found[0] if found else fill

        return key

    def _agg(self, index: Index, agg: Any, docs: list[Doc]) -> dict[str, Any]:
        ((kind, opts),) = check_keys(agg, {"terms", "sum"}, "aggs").items()
        check_keys(opts, {"field", "size"} if kind == "terms" else {"field"}, kind)
        self._field(index, opts["field"], "aggregate")
        values = [v for d in docs for v in set(map(json.dumps, values_at(d.source, opts["field"])))]
        if kind == "sum":
            return {"value": float(sum(json.loads(v) for v in values))}
        counts: dict[str, int] = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: int(opts.get("size", 10))]
        return {
            "doc_count_error_upper_bound": 0,
            "sum_other_doc_count": 0,
            "buckets": [{"key": json.loads(k), "doc_count": c} for k, c in ranked],
        }

    def _select(self, index: Index, query: Any) -> list[tuple[str, Doc]]:
        """Searchable documents matching `query`, parsed first as a real cluster does."""
        self._matches(index, query, "", Doc({}, 0))
        return [
            (i, d) for i, d in sorted(index.searchable.items()) if self._matches(index, query, i, d)
        ]

    def _matches(self, index: Index, query: Any, doc_id: str, doc: Doc) -> bool:
        if not isinstance(query, dict) or len(query) != 1:
            raise bad("query malformed, must start with start_object", "parsing_exception")
        ((kind, body),) = query.items()
        if kind == "match_all":
            return True
        if kind == "ids":
            return doc_id in check_keys(body, {"values"}, "ids")["values"]
        if kind == "bool":
            check_keys(
                body, {"filter", "must", "should", "must_not", "minimum_should_match"}, "bool"
            )

            def each(key: str) -> list[bool]:
                clauses = body.get(key, [])
                return [
                    self._matches(index, c, doc_id, doc)
                    for c in (clauses if isinstance(clauses, list) else [clauses])
                ]

            musts, shoulds = each("filter") + each("must"), each("should")
            need = body.get("minimum_should_match", 0 if musts or "must_not" in body else 1)
            return (
                all(musts)
                and not any(each("must_not"))
                and (not shoulds or sum(shoulds) >= int(need))
            )
        if kind == "query_string":
            return self._query_string(
                index, check_keys(body, {"query", "fields", "lenient"}, kind), doc
            )
        if kind not in ("term", "terms", "wildcard", "range"):
            raise bad(f"unknown query [{kind}]", "parsing_exception")
        ((name, arg),) = body.items()
        mapping = index.mapping_of(name) or {"type": "keyword"}
        if mapping.get("index") is False:
            raise bad(f"Cannot search on field [{name}] since it is not indexed.")
        if kind == "range":
            bounds = check_keys(arg, {"gte", "lte", "gt", "lt"}, kind)
            numeric = mapping.get("type") in ("long", "integer", "float", "double")

            def within(v: Any) -> bool:
                value = float(v) if numeric else str(v)
                for op, bound in bounds.items():
                    b = float(bound) if numeric else str(bound)
                    if not {"gte": value >= b, "lte": value <= b, "gt": value > b,
                            "lt": value < b}[op]:  # fmt: skip
                        return False
                return True

            return any(within(v) for v in values_at(doc.source, name))
        found = values_at(doc.source, name)
        if mapping.get("type") == "text":
            found = [t for v in found for t in re.findall(r"\w+", str(v).lower())]
        if kind == "wildcard":
            check_keys(arg, {"value", "case_insensitive"}, kind)
            flags = re.IGNORECASE if arg.get("case_insensitive") else 0
            return any(re.fullmatch(wildcard_regex(arg["value"]), str(v), flags) for v in found)
        if kind == "term" and isinstance(arg, dict):
            arg = check_keys(arg, {"value"}, kind)["value"]
        wanted = arg if kind == "terms" else [arg]
        if not isinstance(wanted, list):
            raise bad("[terms] query requires an array of values", "parsing_exception")
        return any(_same(mapping.get("type"), v, w) for v in found for w in wanted)

    def _query_string(self, index: Index, body: dict[str, Any], doc: Doc) -> bool:
        text = body["query"]
        literal = re.fullmatch(r"\*((?:\\.|[^*?\\])+)\*", text)
        if literal is None:
            raise bad(f"stand-in implements only '*literal*' query_string, not [{text}]")
        needle = re.sub(r"\\(.)", r"\1", literal.group(1)).lower()
        for path, mapping in index.props.items():
            if mapping.get("type") == "text" and any(
                simple_match(f, path) for f in body.get("fields", ["*"])
            ):
                tokens = [
                    t
                    for v in values_at(doc.source, path)
                    for t in re.findall(r"\w+", str(v).lower())
                ]
                if any(needle in t for t in tokens):
                    return True
        return False


def _after(values: list[Any], marker: list[Any], descs: list[bool]) -> bool:
    for value, mark, desc in zip(values, marker, descs, strict=True):
        if value != mark:
            return (value < mark) if desc else (value > mark)
    return False


def _same(kind: Any, value: Any, wanted: Any) -> bool:
    if kind == "boolean":
        return str(value).lower() == str(wanted).lower()
    if kind in ("long", "integer", "float", "double"):
        return float(value) == float(wanted)
    return str(value) == str(wanted)
