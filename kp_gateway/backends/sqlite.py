"""SQLite index: projects, datasets, mappings and one Kaapana document per series and project.

All SQL runs on one dedicated thread with one connection (SQLite connections are thread-bound);
WAL mode with ``synchronous=FULL`` so a committed batch survives a power cut, which the
pipeline relies on before it deletes the spool files of that batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from kp_gateway.backends.base import IndexedInstance, SeriesQuery
from kp_gateway.dicomweb.attributes import Level
from kp_gateway.dicomweb.qido import UID_TAGS, Match, MatchKind, QidoQuery, QidoRow
from kp_gateway.errors import BackendRejectedError, BackendUnavailableError
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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (
    project TEXT NOT NULL, name TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (project, name));
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, patient_id TEXT NOT NULL,
    modality TEXT NOT NULL, description TEXT NOT NULL, series_date TEXT NOT NULL,
    first_received_at REAL NOT NULL, last_received_at REAL NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0, completed_at REAL, attrs TEXT);
CREATE INDEX IF NOT EXISTS series_by_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, attrs TEXT NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS series_projects (
    series_uid TEXT NOT NULL, project TEXT NOT NULL, PRIMARY KEY (series_uid, project));
CREATE INDEX IF NOT EXISTS series_projects_by_project ON series_projects (project);
CREATE TABLE IF NOT EXISTS series_datasets (
    series_uid TEXT NOT NULL, project TEXT NOT NULL, dataset TEXT NOT NULL,
    PRIMARY KEY (series_uid, project, dataset));
CREATE INDEX IF NOT EXISTS series_datasets_by_dataset ON series_datasets (project, dataset);
CREATE TABLE IF NOT EXISTS documents (
    project TEXT NOT NULL, series_uid TEXT NOT NULL, doc TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (project, series_uid));
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT, stage TEXT NOT NULL, path TEXT NOT NULL,
    reason TEXT NOT NULL, at REAL NOT NULL);
"""

# An instance is identified by its series and its SOPInstanceUID, as its storage key is
# (``dicom/<study>/<series>/<sop>.dcm``): a SOPInstanceUID that a sender reuses in another
# series is another instance, and the first series keeps its own.
_INSTANCES_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS instances ("
    "series_uid TEXT NOT NULL, sop_uid TEXT NOT NULL, study_uid TEXT NOT NULL, "
    "sop_class_uid TEXT NOT NULL, transfer_syntax_uid TEXT NOT NULL, instance_number INTEGER, "
    "number_of_frames INTEGER, size INTEGER NOT NULL, storage_key TEXT NOT NULL, "
    "received_at REAL NOT NULL, attrs TEXT, PRIMARY KEY (series_uid, sop_uid))",
    "CREATE INDEX IF NOT EXISTS instances_by_sop ON instances (sop_uid)",
)
_INSTANCE_COLUMNS = (
    "series_uid, sop_uid, study_uid, sop_class_uid, transfer_syntax_uid, instance_number, "
    "number_of_frames, size, storage_key, received_at"
)
# PRAGMA user_version: 0 = instances keyed by SOPInstanceUID alone; 1 = by series and SOP;
# 2 = the DICOMweb attributes (``attrs``: DICOM JSON texts) of studies, series and instances.
SCHEMA_VERSION = 2


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error, which is raised as it was.

    SQLite ends a transaction itself on some errors (disk full, I/O): a ROLLBACK then fails
    with "cannot rollback - no transaction is active", which must not replace the real error.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.warning("index rollback failed after an error", exc_info=True)
        raise


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an index of an older gateway to `SCHEMA_VERSION`, in one transaction.

    Version 0 keyed instances by SOPInstanceUID alone: its rows are copied as they are (each
    was the one copy of its SOPInstanceUID) into the table keyed by series and SOP. Before
    version 2 there were no DICOMweb attributes: ``kp-gateway reindex`` fills them for
    instances stored earlier.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION:
        for statement in _INSTANCES_SCHEMA:
            conn.execute(statement)
        return
    with _transaction(conn):
        old = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'instances'"
        ).fetchone()
        if old is not None and version < 1:
            conn.execute("ALTER TABLE instances RENAME TO instances_v0")
            conn.execute("DROP INDEX IF EXISTS instances_by_series")
        for statement in _INSTANCES_SCHEMA:
            conn.execute(statement)
        if old is not None and version < 1:
            conn.execute(
                f"INSERT INTO instances ({_INSTANCE_COLUMNS}) "
                f"SELECT {_INSTANCE_COLUMNS} FROM instances_v0"
            )
            conn.execute("DROP TABLE instances_v0")
        for table in ("instances", "series"):
            if "attrs" not in _columns(conn, table):
                conn.execute(f"ALTER TABLE {table} ADD COLUMN attrs TEXT")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    if old is not None:
        logger.info("index: migrated from schema version %d to %d", version, SCHEMA_VERSION)


# -- DICOMweb (QIDO-RS) ------------------------------------------------------------------

# The UID columns each search joins, by the level whose UID they hold.
_UID_COLUMNS = {
    Level.STUDY: {Level.STUDY: "st.study_uid"},
    Level.SERIES: {Level.STUDY: "s.study_uid", Level.SERIES: "s.series_uid"},
    Level.INSTANCE: {
        Level.STUDY: "i.study_uid",
        Level.SERIES: "i.series_uid",
        Level.INSTANCE: "i.sop_uid",
    },
}
_ATTRS = {Level.STUDY: "st.attrs", Level.SERIES: "s.attrs", Level.INSTANCE: "i.attrs"}
_NUMERIC_VRS = {"IS", "US", "UL", "SS", "SL", "DS", "FL", "FD"}


def _glob(pattern: str) -> str:
    """A DICOM wildcard (``*``, ``?``) as a GLOB pattern: ``[`` and ``]`` are literal."""
    return "".join("[" + c + "]" if c in "[]" else c for c in pattern)


def _match_sql(search: Level, m: Match, args: list[Any]) -> str:
    """One matching key as an SQL condition (appending its parameters to `args`)."""
    if m.kind is MatchKind.UNIVERSAL:
        return ""
    uid_column = _UID_COLUMNS[search].get(m.level) if m.tag in UID_TAGS else None
    if uid_column is not None:
        args.extend(m.values)
        return f"{uid_column} IN ({', '.join('?' * len(m.values))})"
    # Every value of a multi-valued attribute matches (PS3.4 C.2.2.2: any value).
    path = f'$."{m.tag}".Value'
    value = "json_extract(v.value, '$.Alphabetic')" if m.vr == "PN" else "v.value"
    if m.vr == "PN":  # person names match case-insensitively, as viewers' searches expect
        value = f"lower({value})"
    if m.kind is MatchKind.RANGE:
        low, high = m.values
        conds = []
        if low:
            conds.append(f"{value} >= ?")
            args.append(low)
        if high:
            conds.append(f"{value} <= ?")
            # A time's upper bound "1030" includes 10:30:59.
            args.append(high.ljust(6, "9") if m.vr == "TM" else high)
        cond = " AND ".join(conds)
    elif m.kind is MatchKind.WILDCARD:
        cond = f"{value} GLOB ?"
        pattern = _glob(m.values[0])
        args.append(pattern.lower() if m.vr == "PN" else pattern)
    else:
        wanted = [v.lower() if m.vr == "PN" else v for v in m.values]
        if m.vr in _NUMERIC_VRS:
            cond = f"CAST({value} AS REAL) IN ({', '.join(['CAST(? AS REAL)'] * len(wanted))})"
        else:
            cond = f"{value} IN ({', '.join('?' * len(wanted))})"
        args.extend(wanted)
    return f"EXISTS (SELECT 1 FROM json_each({_ATTRS[m.level]}, '{path}') v WHERE {cond})"


def _where(query: QidoQuery, args: list[Any]) -> str:
    conds = [c for m in query.matches if (c := _match_sql(query.level, m, args))]
    if query.modalities_in_study:
        study = _UID_COLUMNS[query.level][Level.STUDY]
        conds.append(
            "EXISTS (SELECT 1 FROM series ms JOIN series_projects msp ON "
            f"msp.series_uid = ms.series_uid AND msp.project = ? WHERE ms.study_uid = {study} "
            f"AND ms.modality IN ({', '.join('?' * len(query.modalities_in_study))}))"
        )
        args.extend([query.project, *query.modalities_in_study])
    return " AND ".join(conds) or "1"


def _in(values: Sequence[str]) -> str:
    return ", ".join("?" * len(values))


class SqliteIndex:
    """The embedded index (see module docstring)."""

    def __init__(self, path: Path, *, default_project: str = ADMIN_PROJECT) -> None:
        self._path = path
        self._default_project = default_project
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-index")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()

        def call() -> T:
            if self._conn is None:
                raise BackendUnavailableError("index is not open")
            try:
                return fn(self._conn)
            except sqlite3.IntegrityError as exc:
                raise BackendRejectedError(f"index constraint: {exc}") from exc
            except sqlite3.Error as exc:
                # Locked, disk full, I/O error: worth retrying.
                raise BackendUnavailableError(f"index error: {exc}") from exc

        return await loop.run_in_executor(self._executor, call)

    async def open(self) -> None:
        def connect() -> None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SCHEMA)
            _migrate(conn)
            now = time.time()
            for name in {ADMIN_PROJECT, self._default_project}:
                conn.execute(
                    "INSERT OR IGNORE INTO projects (name, description, created_at) "
                    "VALUES (?, ?, ?)",
                    (name, "Initial admin project" if name == ADMIN_PROJECT else "", now),
                )
            self._conn = conn

        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, connect)
        except sqlite3.Error as exc:
            raise BackendUnavailableError(f"cannot open index {self._path}: {exc}") from exc

    async def aclose(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=True)

    async def ping(self) -> None:
        await self._run(lambda c: c.execute("SELECT 1").fetchone())

    # -- writes ---------------------------------------------------------------------------

    async def write_instances(self, batch: Sequence[IndexedInstance]) -> None:
        await self._run(lambda c: self._write_instances(c, batch))

    def _write_instances(self, conn: sqlite3.Connection, batch: Sequence[IndexedInstance]) -> None:
        projects = {row[0] for row in conn.execute("SELECT name FROM projects")}
        with _transaction(conn):
            for item in batch:
                self._write_one(conn, item, projects)

    def _write_one(
        self, conn: sqlite3.Connection, item: IndexedInstance, projects: set[str]
    ) -> None:
        rec, routing, now = item.record, item.routing, item.received_at
        targets = index_targets(routing, projects)
        study_attrs, series_attrs, instance_attrs = rec.dicomweb_json or (None, None, None)
        # The same instance again (same series, same SOP) replaces the earlier copy.
        conn.execute(
            f"INSERT INTO instances ({_INSTANCE_COLUMNS}, attrs) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (series_uid, sop_uid) DO UPDATE SET study_uid = excluded.study_uid, "
            "attrs = excluded.attrs, "
            "sop_class_uid = excluded.sop_class_uid, "
            "transfer_syntax_uid = excluded.transfer_syntax_uid, "
            "instance_number = excluded.instance_number, "
            "number_of_frames = excluded.number_of_frames, size = excluded.size, "
            "storage_key = excluded.storage_key, received_at = excluded.received_at",
            (
                rec.series_instance_uid,
                rec.sop_instance_uid,
                rec.study_instance_uid,
                rec.sop_class_uid,
                rec.transfer_syntax_uid,
                rec.instance_number,
                rec.number_of_frames,
                rec.size_bytes,
                rec.storage_key,
                now,
                instance_attrs,
            ),
        )
        # A late instance re-opens a completed series; completion runs again after it.
        conn.execute(
            "INSERT INTO series (series_uid, study_uid, patient_id, modality, description, "
            "series_date, first_received_at, last_received_at, attrs) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (series_uid) DO UPDATE SET last_received_at = "
            "max(series.last_received_at, excluded.last_received_at), complete = 0, "
            "attrs = coalesce(excluded.attrs, series.attrs)",
            (
                rec.series_instance_uid,
                rec.study_instance_uid,
                rec.patient_id,
                rec.modality,
                rec.series_description,
                rec.series_date,
                now,
                now,
                series_attrs,
            ),
        )
        if study_attrs is not None:
            # The study's attributes as its latest instance has them.
            conn.execute(
                "INSERT INTO studies (study_uid, attrs, created_at, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (study_uid) DO UPDATE SET "
                "attrs = excluded.attrs, updated_at = excluded.updated_at",
                (rec.study_instance_uid, study_attrs, now, now),
            )
        for project in targets:
            conn.execute(
                "INSERT OR IGNORE INTO series_projects (series_uid, project) VALUES (?, ?)",
                (rec.series_instance_uid, project),
            )
            conn.execute(
                "INSERT OR IGNORE INTO datasets (project, name, created_at) VALUES (?, ?, ?)",
                (project, routing.dataset, now),
            )
            conn.execute(
                "INSERT OR IGNORE INTO series_datasets (series_uid, project, dataset) "
                "VALUES (?, ?, ?)",
                (rec.series_instance_uid, project, routing.dataset),
            )
            if rec.document is not None:
                self._merge_document(conn, project, rec.series_instance_uid, rec.document, now)

    @staticmethod
    def _merge_document(
        conn: sqlite3.Connection, project: str, series_uid: str, new: dict[str, Any], now: float
    ) -> None:
        row = conn.execute(
            "SELECT doc FROM documents WHERE project = ? AND series_uid = ?", (project, series_uid)
        ).fetchone()
        # Kaapana's merge: new keys over old; completion, validation and tags survive.
        merged = {**json.loads(row[0]), **new} if row else dict(new)
        conn.execute(
            "INSERT INTO documents (project, series_uid, doc, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (project, series_uid) DO UPDATE SET doc = excluded.doc, "
            "updated_at = excluded.updated_at",
            (project, series_uid, json.dumps(merged, sort_keys=True), now),
        )

    async def update_documents(self, series_instance_uid: str, fields: dict[str, Any]) -> None:
        """Merge `fields` into every project document of the series (thumbnail, validation)."""

        def update(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                self._update_documents(conn, series_instance_uid, fields)

        await self._run(update)

    @staticmethod
    def _update_documents(
        conn: sqlite3.Connection, series_uid: str, fields: dict[str, Any]
    ) -> None:
        now = time.time()
        rows = conn.execute(
            "SELECT project, doc FROM documents WHERE series_uid = ?", (series_uid,)
        ).fetchall()
        for row in rows:
            doc = {**json.loads(row["doc"]), **fields}
            conn.execute(
                "UPDATE documents SET doc = ?, updated_at = ? WHERE project = ? AND series_uid = ?",
                (json.dumps(doc, sort_keys=True), now, row["project"], series_uid),
            )

    async def complete_series(self, series_instance_uid: str) -> dict[str, Any]:
        def complete(conn: sqlite3.Connection) -> dict[str, Any]:
            numbers = [
                r[0]
                for r in conn.execute(
                    "SELECT instance_number FROM instances WHERE series_uid = ? "
                    "AND instance_number IS NOT NULL",
                    (series_instance_uid,),
                )
            ]
            count = conn.execute(
                "SELECT count(*) FROM instances WHERE series_uid = ?", (series_instance_uid,)
            ).fetchone()[0]
            fields = completion_fields(numbers, count)
            with _transaction(conn):
                self._update_documents(conn, series_instance_uid, fields)
                conn.execute(
                    "UPDATE series SET complete = 1, completed_at = ? WHERE series_uid = ?",
                    (time.time(), series_instance_uid),
                )
            return fields

        return await self._run(complete)

    async def record_quarantine(self, stage: str, path: str, reason: str) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO quarantine (stage, path, reason, at) VALUES (?, ?, ?, ?)",
                (stage, path, reason, time.time()),
            )
        )

    async def list_quarantine(self) -> list[dict[str, Any]]:
        return await self._run(
            lambda c: [
                dict(r) for r in c.execute("SELECT * FROM quarantine ORDER BY id DESC LIMIT 1000")
            ]
        )

    # -- projects and datasets ------------------------------------------------------------

    async def list_projects(self) -> list[dict[str, Any]]:
        return await self._run(
            lambda c: [
                dict(r)
                for r in c.execute(
                    "SELECT p.name, p.description, p.created_at, "
                    "(SELECT count(*) FROM series_projects sp WHERE sp.project = p.name) "
                    "AS series_count FROM projects p ORDER BY p.name"
                )
            ]
        )

    async def project_exists(self, name: str) -> bool:
        return await self._run(
            lambda c: (
                c.execute("SELECT 1 FROM projects WHERE name = ?", (name,)).fetchone() is not None
            )
        )

    async def create_project(self, name: str, description: str = "") -> dict[str, Any]:
        now = time.time()
        await self._run(
            lambda c: c.execute(
                "INSERT INTO projects (name, description, created_at) VALUES (?, ?, ?)",
                (name, description, now),
            )
        )
        return {"name": name, "description": description, "created_at": now, "series_count": 0}

    async def delete_project(self, name: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                cur = conn.execute("DELETE FROM projects WHERE name = ?", (name,))
                for table in ("series_projects", "datasets", "series_datasets", "documents"):
                    conn.execute(f"DELETE FROM {table} WHERE project = ?", (name,))
            return cur.rowcount > 0

        return await self._run(delete)

    async def list_datasets(self, project: str) -> list[dict[str, Any]]:
        return await self._run(
            lambda c: [
                dict(r)
                for r in c.execute(
                    "SELECT d.name, d.created_at, "
                    "(SELECT count(*) FROM series_datasets sd WHERE sd.project = d.project "
                    " AND sd.dataset = d.name) AS series_count, "
                    "(SELECT count(*) FROM instances i JOIN series_datasets sd "
                    " ON sd.series_uid = i.series_uid WHERE sd.project = d.project "
                    " AND sd.dataset = d.name) AS instance_count "
                    "FROM datasets d WHERE d.project = ? ORDER BY d.name",
                    (project,),
                )
            ]
        )

    # -- series and instances -------------------------------------------------------------

    async def query_series(self, query: SeriesQuery) -> tuple[int, list[dict[str, Any]]]:
        def run(conn: sqlite3.Connection) -> tuple[int, list[dict[str, Any]]]:
            where = ["sp.project = ?"]
            args: list[Any] = [query.project]
            if query.dataset:
                where.append(
                    "EXISTS (SELECT 1 FROM series_datasets sd WHERE sd.series_uid = s.series_uid "
                    "AND sd.project = ? AND sd.dataset = ?)"
                )
                args += [query.project, query.dataset]
            for column, value in (
                ("s.modality", query.modality),
                ("s.patient_id", query.patient_id),
                ("s.study_uid", query.study_uid),
            ):
                if value:
                    where.append(f"{column} = ?")
                    args.append(value)
            if query.text:
                where.append(
                    "(s.description LIKE ? ESCAPE '\\' OR s.patient_id LIKE ? ESCAPE '\\' "
                    "OR EXISTS (SELECT 1 FROM documents d WHERE d.project = sp.project AND "
                    "d.series_uid = s.series_uid AND d.doc LIKE ? ESCAPE '\\'))"
                )
                pattern = "%" + _escape_like(query.text) + "%"
                args += [pattern, pattern, pattern]
            clause = " AND ".join(where)
            base = f"FROM series s JOIN series_projects sp ON sp.series_uid = s.series_uid WHERE {clause}"  # noqa: E501
            total = conn.execute(f"SELECT count(*) {base}", args).fetchone()[0]
            rows = conn.execute(
                f"SELECT s.* {base} ORDER BY s.last_received_at DESC, s.series_uid "
                "LIMIT ? OFFSET ?",
                [*args, query.limit, query.offset],
            ).fetchall()
            return total, [self._summary(conn, row, query.project) for row in rows]

        return await self._run(run)

    @staticmethod
    def _summary(conn: sqlite3.Connection, row: sqlite3.Row, project: str) -> dict[str, Any]:
        uid = row["series_uid"]
        count = conn.execute("SELECT count(*) FROM instances WHERE series_uid = ?", (uid,))
        datasets = conn.execute(
            "SELECT dataset FROM series_datasets WHERE series_uid = ? AND project = ? "
            "ORDER BY dataset",
            (uid, project),
        )
        doc_row = conn.execute(
            "SELECT doc FROM documents WHERE project = ? AND series_uid = ?", (project, uid)
        ).fetchone()
        doc = json.loads(doc_row[0]) if doc_row else {}
        validation = doc.get(KEY_VALIDATION)
        return {
            "series_uid": uid,
            "study_uid": row["study_uid"],
            "patient_id": row["patient_id"],
            "modality": row["modality"],
            "description": row["description"],
            "series_date": row["series_date"],
            "instance_count": count.fetchone()[0],
            "datasets": [r[0] for r in datasets],
            "complete": bool(row["complete"]),
            "first_received_at": row["first_received_at"],
            "last_received_at": row["last_received_at"],
            "validation": validation,
            "has_thumbnail": KEY_THUMBNAIL in doc,
            "thumbnail_error": doc.get(KEY_THUMBNAIL_ERROR),
        }

    async def get_series(self, series_instance_uid: str) -> dict[str, Any] | None:
        def run(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                "SELECT * FROM series WHERE series_uid = ?", (series_instance_uid,)
            ).fetchone()
            if row is None:
                return None
            projects = [
                r[0]
                for r in conn.execute(
                    "SELECT project FROM series_projects WHERE series_uid = ? ORDER BY project",
                    (series_instance_uid,),
                )
            ]
            datasets = [
                {"project": r[0], "dataset": r[1]}
                for r in conn.execute(
                    "SELECT project, dataset FROM series_datasets WHERE series_uid = ? "
                    "ORDER BY project, dataset",
                    (series_instance_uid,),
                )
            ]
            doc_row = conn.execute(
                "SELECT doc FROM documents WHERE series_uid = ? ORDER BY project = ? DESC LIMIT 1",
                (series_instance_uid, ADMIN_PROJECT),
            ).fetchone()
            count = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM instances WHERE series_uid = ?",
                (series_instance_uid,),
            ).fetchone()
            return {
                **dict(row),
                "complete": bool(row["complete"]),
                "projects": projects,
                "datasets": datasets,
                "instance_count": count[0],
                "size_bytes": count[1],
                "document": json.loads(doc_row[0]) if doc_row else {},
            }

        return await self._run(run)

    async def list_instances(self, series_instance_uid: str) -> list[dict[str, Any]]:
        return await self._run(
            lambda c: [
                dict(r)
                for r in c.execute(
                    "SELECT sop_uid, sop_class_uid, transfer_syntax_uid, instance_number, "
                    "number_of_frames, size, storage_key, received_at FROM instances "
                    "WHERE series_uid = ? ORDER BY instance_number, sop_uid",
                    (series_instance_uid,),
                )
            ]
        )

    async def instance_key(self, series_instance_uid: str, sop_instance_uid: str) -> str | None:
        def run(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT storage_key FROM instances WHERE series_uid = ? AND sop_uid = ?",
                (series_instance_uid, sop_instance_uid),
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._run(run)

    async def find_instance(self, sop_instance_uid: str) -> list[dict[str, Any]]:
        return await self._run(
            lambda c: [
                dict(r)
                for r in c.execute(
                    "SELECT series_uid, study_uid, storage_key, received_at FROM instances "
                    "WHERE sop_uid = ? ORDER BY received_at DESC, series_uid",
                    (sop_instance_uid,),
                )
            ]
        )

    async def qido(self, query: QidoQuery) -> tuple[list[QidoRow], bool]:
        return await self._run(lambda c: _QIDO[query.level](c, query))

    async def dicomweb_instances(
        self, project: str, study_uid: str, series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        where = ["i.study_uid = ?"]
        args: list[Any] = [project, study_uid]
        if series_uid is not None:
            where.append("i.series_uid = ?")
            args.append(series_uid)
        if sop_uid is not None:
            where.append("i.sop_uid = ?")
            args.append(sop_uid)
        sql = (
            "SELECT i.study_uid, i.series_uid, i.sop_uid, i.sop_class_uid, "
            "i.transfer_syntax_uid, i.number_of_frames, i.size, i.storage_key, i.received_at "
            "FROM instances i "
            "JOIN series_projects sp ON sp.series_uid = i.series_uid AND sp.project = ? "
            f"WHERE {' AND '.join(where)} ORDER BY i.series_uid, i.instance_number, i.sop_uid"
        )
        return await self._run(lambda c: [dict(r) for r in c.execute(sql, args)])

    async def incomplete_series(self) -> list[str]:
        return await self._run(
            lambda c: [r[0] for r in c.execute("SELECT series_uid FROM series WHERE complete = 0")]
        )


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _search_studies(conn: sqlite3.Connection, query: QidoQuery) -> tuple[list[QidoRow], bool]:
    args: list[Any] = [query.project]
    where = _where(query, args)
    rows = conn.execute(
        "SELECT st.study_uid, st.attrs FROM studies st WHERE EXISTS (SELECT 1 FROM series s "
        "JOIN series_projects sp ON sp.series_uid = s.series_uid AND sp.project = ? "
        f"WHERE s.study_uid = st.study_uid) AND {where} "
        "ORDER BY st.created_at, st.study_uid LIMIT ? OFFSET ?",
        [*args, query.limit + 1, query.offset],
    ).fetchall()
    more, rows = len(rows) > query.limit, rows[: query.limit]
    uids = [r[0] for r in rows]
    series: dict[str, tuple[int, list[str]]] = {}
    instances: dict[str, int] = {}
    if uids:
        for uid, count, modalities in conn.execute(
            "SELECT s.study_uid, count(*), group_concat(DISTINCT s.modality) FROM series s "
            "JOIN series_projects sp ON sp.series_uid = s.series_uid AND sp.project = ? "
            f"WHERE s.study_uid IN ({_in(uids)}) GROUP BY s.study_uid",
            [query.project, *uids],
        ):
            series[uid] = (count, [m for m in (modalities or "").split(",") if m])
        for uid, count in conn.execute(
            "SELECT s.study_uid, count(*) FROM series s JOIN series_projects sp "
            "ON sp.series_uid = s.series_uid AND sp.project = ? JOIN instances i "
            f"ON i.series_uid = s.series_uid WHERE s.study_uid IN ({_in(uids)}) "
            "GROUP BY s.study_uid",
            [query.project, *uids],
        ):
            instances[uid] = count
    return [
        QidoRow(
            study_uid=uid,
            study_json=attrs,
            modalities=series.get(uid, (0, []))[1],
            study_series=series.get(uid, (0, []))[0],
            study_instances=instances.get(uid, 0),
        )
        for uid, attrs in rows
    ], more


def _search_series(conn: sqlite3.Connection, query: QidoQuery) -> tuple[list[QidoRow], bool]:
    args: list[Any] = [query.project]
    where = _where(query, args)
    rows = conn.execute(
        "SELECT s.study_uid, s.series_uid, coalesce(st.attrs, '{}'), coalesce(s.attrs, '{}') "
        "FROM series s JOIN series_projects sp ON sp.series_uid = s.series_uid "
        "AND sp.project = ? LEFT JOIN studies st ON st.study_uid = s.study_uid "
        f"WHERE {where} ORDER BY s.first_received_at, s.series_uid LIMIT ? OFFSET ?",
        [*args, query.limit + 1, query.offset],
    ).fetchall()
    more, rows = len(rows) > query.limit, rows[: query.limit]
    uids = [r[1] for r in rows]
    counts: dict[str, int] = {}
    if uids:
        counts = dict(
            conn.execute(
                "SELECT series_uid, count(*) FROM instances "
                f"WHERE series_uid IN ({_in(uids)}) GROUP BY series_uid",
                uids,
            ).fetchall()
        )
    return [
        QidoRow(
            study_uid=study,
            series_uid=uid,
            study_json=study_attrs,
            series_json=series_attrs,
            series_instances=counts.get(uid, 0),
        )
        for study, uid, study_attrs, series_attrs in rows
    ], more


def _search_instances(conn: sqlite3.Connection, query: QidoQuery) -> tuple[list[QidoRow], bool]:
    args: list[Any] = [query.project]
    where = _where(query, args)
    rows = conn.execute(
        "SELECT i.study_uid, i.series_uid, i.sop_uid, coalesce(st.attrs, '{}'), "
        "coalesce(s.attrs, '{}'), coalesce(i.attrs, '{}') FROM instances i "
        "JOIN series_projects sp ON sp.series_uid = i.series_uid AND sp.project = ? "
        "JOIN series s ON s.series_uid = i.series_uid "
        "LEFT JOIN studies st ON st.study_uid = i.study_uid "
        f"WHERE {where} ORDER BY i.series_uid, i.instance_number, i.sop_uid LIMIT ? OFFSET ?",
        [*args, query.limit + 1, query.offset],
    ).fetchall()
    more, rows = len(rows) > query.limit, rows[: query.limit]
    return [
        QidoRow(
            study_uid=study,
            series_uid=series,
            sop_uid=sop,
            study_json=study_attrs,
            series_json=series_attrs,
            instance_json=instance_attrs,
        )
        for study, series, sop, study_attrs, series_attrs, instance_attrs in rows
    ], more


_QIDO = {
    Level.STUDY: _search_studies,
    Level.SERIES: _search_series,
    Level.INSTANCE: _search_instances,
}
