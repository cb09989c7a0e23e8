"""Configuration: frozen dataclasses per section; defaults < config.toml < environment < CLI.

Environment variables are ``KP_GATEWAY_<SECTION>_<KEY>`` (e.g. ``KP_GATEWAY_DICOM_PORT=11113``).
Secrets (``KP_GATEWAY_HTTP_TOKEN``) come from the environment only and are refused in the file.
Every problem raises :class:`~kp_gateway.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kp_gateway.errors import ConfigError

ENV_PREFIX = "KP_GATEWAY_"
MiB = 1 << 20
GiB = 1 << 30

# Kaapana's project-name rule, shortened so that "kp-" + name fits a 16-character AE title.
# Use with fullmatch: `$` would accept a trailing newline ("a\n").
PROJECT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,12}")


def _ck(default: Any, doc: str, **constraints: Any) -> Any:
    """A config field: its default, its one-line documentation and optional min/max/choices."""
    return field(default=default, metadata={"doc": doc, **constraints})


@dataclass(frozen=True, slots=True, kw_only=True)
class DicomConfig:
    """``[dicom]``: the C-STORE SCP."""

    host: str = _ck("0.0.0.0", "Address the DICOM listener binds to.")
    port: int = _ck(11112, "DICOM port.", min=0, max=65535)
    public_port: int = _ck(0, "Port senders use from outside (0 = same as port).", min=0, max=65535)
    ae_title: str = _ck("KP-GATEWAY", "Our own AE title (any called AE is accepted for routing).")
    default_project: str = _ck("admin", "Project for called AE titles without the kp- prefix.")
    max_associations: int = _ck(
        32, "Concurrent associations; more are rejected (transient).", min=1
    )
    max_associations_per_peer: int = _ck(
        0,
        "Concurrent connections from one IP address (0 = three quarters of max_associations), "
        "so one peer cannot take every slot.",
        min=0,
    )
    max_pdu_length_bytes: int = _ck(
        64 * MiB, "Largest PDU a peer may send; longer ones abort the association.", min=16384
    )
    receive_mode: str = _ck(
        "chunked",
        "chunked: pynetdicom spools each dataset to a file (flat memory); memory: in RAM.",
        choices=("chunked", "memory"),
    )
    poll_interval_s: float = _ck(
        0.05,
        "How often an idle association's threads check pynetdicom's timers; data, messages "
        "and responses wake them at once, so a longer interval costs no latency.",
        min=0.0001,
        max=10.0,
    )
    acse_timeout_s: float = _ck(
        10.0,
        "Wait for association messages (a silent new connection is closed after it).",
        min=1.0,
    )
    pdu_timeout_s: float = _ck(
        30.0,
        "A PDU (or a send) that makes no progress this long ends the connection.",
        min=1.0,
    )
    dimse_timeout_s: float = _ck(120.0, "Wait for DIMSE messages.", min=1.0)
    network_timeout_s: float = _ck(120.0, "Idle connection timeout.", min=1.0)
    admission_wait_s: float = _ck(
        20.0,
        "How long a C-STORE waits for pipeline space before answering 0xA700; keep it well "
        "under the sender's DIMSE timeout.",
        min=0.0,
    )
    min_free_bytes: int = _ck(
        256 * MiB,
        "Keep this much of the data filesystem free: checked while data arrives; C-STOREs "
        "get 0xA700 and uploads 507 below it.",
        min=0,
    )
    max_dataset_bytes: int = _ck(
        16 * GiB,
        "Largest dataset one C-STORE may send; larger ones abort the association.",
        min=1,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    """``[http]``: the aiohttp server."""

    host: str = _ck("0.0.0.0", "Address the HTTP server binds to.")
    port: int = _ck(8080, "HTTP port.", min=0, max=65535)
    auth: bool = _ck(
        True, "Require the admin or a project token (false only for loopback-only use)."
    )
    public_host: str = _ck("", "Host name senders use from outside (empty = the request's Host).")
    idle_timeout_s: float = _ck(
        60.0, "A connection without a whole request (headers) this long is closed.", min=1.0
    )
    body_timeout_s: float = _ck(
        60.0,
        "An upload body that sends nothing this long is cut off (tus keeps the offset).",
        min=1.0,
    )
    max_connections: int = _ck(
        1024, "Open HTTP connections at most; more are closed at once.", min=1
    )
    session_idle_s: float = _ck(
        12 * 3600.0, "A browser session unused this long ends (log in again).", min=1.0
    )
    session_max_s: float = _ck(
        7 * 24 * 3600.0, "A browser session ends this long after its login, used or not.", min=1.0
    )
    max_sessions: int = _ck(
        10_000, "Browser sessions kept at once; a new login ends the oldest beyond it.", min=1
    )
    max_tokens: int = _ck(
        1000, "Project tokens the gateway holds at most; creating more is refused (429).", min=1
    )
    token: str = field(default="", repr=False, metadata={"doc": "", "secret": True})


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    """``[storage]``: object storage and the data directory."""

    backend: str = _ck("fs", "Object storage backend.", choices=("fs", "s3"))
    path: str = _ck("./kp-data", "Data directory: objects, SQLite index, spool, token.")
    fsync: bool = _ck(True, "fsync files and directories before acknowledging (never turn off).")
    s3_endpoint_url: str = _ck("", "S3 endpoint, e.g. https://minio.lab:9000 (empty = AWS).")
    s3_region: str = _ck("us-east-1", "S3 region.")
    s3_bucket: str = _ck("kp-gateway", "Bucket holding every object (keys as on the filesystem).")
    s3_path_style: bool = _ck(True, "Path-style addressing (MinIO, Ceph RGW, SeaweedFS, Garage).")
    s3_verify_tls: bool = _ck(True, "Verify the endpoint's TLS certificate.")
    s3_create_bucket: bool = _ck(False, "Create the bucket at start when it is missing.")
    s3_multipart_threshold_bytes: int = _ck(
        64 * MiB, "Objects at least this large are uploaded in parts.", min=5 * MiB
    )
    s3_timeout_s: float = _ck(30.0, "Connect/read timeout per S3 request.", min=0.1)


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexConfig:
    """``[index]``: the metadata index."""

    backend: str = _ck("sqlite", "Index backend.", choices=("sqlite", "opensearch"))
    sqlite_path: str = _ck("", "SQLite file (empty = <storage.path>/index.sqlite3).")
    batch_max_items: int = _ck(512, "Most index writes committed in one transaction.", min=1)
    site_timezone: str = _ck("UTC", "Time zone of DICOM dates/times that carry no offset.")
    opensearch_url: str = _ck("https://localhost:9200", "OpenSearch endpoint.")
    opensearch_verify_tls: bool = _ck(True, "Verify the OpenSearch TLS certificate.")
    opensearch_timeout_s: float = _ck(30.0, "Timeout per OpenSearch request.", min=0.1)
    opensearch_user: str = field(default="", metadata={"doc": "", "secret": True})
    opensearch_password: str = field(default="", repr=False, metadata={"doc": "", "secret": True})


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig:
    """``[pipeline]``: the staged, bounded ingest pipeline."""

    queue_size: int = _ck(256, "Items each stage queue holds before senders wait.", min=1)
    store_workers: int = _ck(2, "Concurrent store-stage workers.", min=1)
    store_batch_max: int = _ck(
        32, "Most instances one store worker parses and stores per round trip.", min=1
    )
    batch_linger_s: float = _ck(
        0.5,
        "How long a stage waits for more items to share one round trip: fewer fsyncs and "
        "commits compete with the receive path's own fsyncs; adds at most twice this to the "
        "time until an instance is searchable.",
        min=0.0,
        max=5.0,
    )
    index_workers: int = _ck(1, "Concurrent index-stage workers (each commits batches).", min=1)
    process_pool_size: int = _ck(
        2, "Worker processes for CPU work (metadata, thumbnails), 0 = CPU count.", min=0
    )
    max_attempts: int = _ck(5, "Attempts per item and stage before quarantine.", min=1)
    retry_backoff_s: float = _ck(0.5, "First retry delay; doubles per attempt.", min=0.0)
    retry_backoff_max_s: float = _ck(30.0, "Longest retry delay.", min=0.0)
    series_idle_s: float = _ck(
        5.0, "A series is complete this long after its last instance and association end.", min=0
    )
    drain_timeout_s: float = _ck(60.0, "On shutdown, how long queued work may take.", min=0.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesConfig:
    """``[series]``: thumbnail and validation stages, run when a series completes."""

    enabled: bool = _ck(True, "Render thumbnails and validate completed series.")
    thumbnail_size_px: int = _ck(300, "Longer side of the thumbnail.", min=16, max=2048)
    process_pool_size: int = _ck(1, "Low-priority worker processes for rendering.", min=1)
    validation_timeout_s: float = _ck(30.0, "dciodvfy time limit per file.", min=0.1)
    validation_max_instances: int = _ck(
        50, "Larger series are validated on an even sample (first and last included).", min=1
    )
    validation_workers: int = _ck(
        1,
        "dciodvfy processes per series at once; more validate faster but take CPU from "
        "receiving on a small machine (bench/stages_impact.py measures it).",
        min=1,
    )
    concurrency: int = _ck(1, "Series processed at once.", min=1)
    queue_size: int = _ck(1024, "Distinct series waiting for the stages.", min=1)
    max_attempts: int = _ck(3, "Attempts per stage before the failure is recorded.", min=1)
    retry_backoff_s: float = _ck(2.0, "First retry delay; doubles per attempt.", min=0.0)
    retry_backoff_max_s: float = _ck(60.0, "Longest retry delay.", min=0.0)
    enqueue_wait_s: float = _ck(
        30.0, "How long a completion waits for queue space (else redone at next start).", min=0
    )
    rescan_on_start: bool = _ck(
        True, "At start, redo complete series that have no thumbnail or validation."
    )
    task_time_limit_s: float = _ck(
        120.0,
        "Longest one geometry or thumbnail task may run; its worker process is then killed "
        "and replaced, and the error is recorded on the series.",
        min=1.0,
    )
    max_frame_bytes: int = _ck(
        64 * MiB,
        "Largest decoded frame (rows x columns x samples x bytes per sample) a thumbnail "
        "decodes; a larger image gets a thumbnail error instead of the worker's memory.",
        min=1,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DicomWebConfig:
    """``[dicomweb]``: QIDO-RS and WADO-RS on the HTTP port (``/dicomweb``)."""

    enabled: bool = _ck(True, "Serve DICOMweb at /dicomweb and /projects/<p>/dicomweb.")
    process_pool_size: int = _ck(
        2, "Worker processes that read stored instances for metadata and frames.", min=1
    )
    pool_backlog: int = _ck(
        32, "Requests waiting for those workers at once; more wait for their turn.", min=1
    )
    cors_origins: str = _ck(
        "",
        "Other web origins (comma-separated, e.g. https://viewer.example.org) whose pages may "
        "call DICOMweb with a token; empty: none (the gateway's own viewer needs none).",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadConfig:
    """``[upload]``: HTTP uploads (all limits are enforced while streaming)."""

    max_upload_bytes: int = _ck(64 * GiB, "Largest upload accepted (413 beyond).", min=1)
    max_concurrent_imports: int = _ck(2, "Uploads imported at once; others wait.", min=1)
    admission_wait_s: float = _ck(
        20.0, "How long an import waits for pipeline space before retrying.", min=0.0
    )
    tus_expiry_s: float = _ck(
        7 * 24 * 3600.0, "Unfinished resumable uploads idle this long are removed.", min=1.0
    )
    tus_max_unfinished: int = _ck(
        64, "Unfinished resumable uploads kept at once; more are refused (429).", min=1
    )
    tus_max_unfinished_bytes: int = _ck(
        256 * GiB, "Total declared size of unfinished resumable uploads (429 beyond).", min=1
    )
    max_members: int = _ck(100_000, "Most members in one zip.", min=1)
    max_total_uncompressed_bytes: int = _ck(64 * GiB, "Most bytes one zip may expand to.", min=1)
    max_member_bytes: int = _ck(8 * GiB, "Largest single zip member.", min=1)
    max_compression_ratio: float = _ck(
        200.0, "Largest uncompressed/compressed ratio (zip bombs).", min=1.0
    )
    nifti_max_volume_bytes: int = _ck(
        2 * GiB,
        "Largest voxel array one NIfTI image may declare; larger ones fail before anything "
        "is allocated (declared sizes are also checked against the file's own size).",
        min=1,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingConfig:
    """``[logging]``."""

    level: str = _ck(
        "INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration."""

    dicom: DicomConfig = field(default_factory=DicomConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    dicomweb: DicomWebConfig = field(default_factory=DicomWebConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def data_dir(self) -> Path:
        """The data directory, absolute."""
        return Path(self.storage.path).expanduser().resolve()

    @property
    def sqlite_path(self) -> Path:
        """Where the SQLite index lives."""
        if self.index.sqlite_path:
            return Path(self.index.sqlite_path).expanduser().resolve()
        return self.data_dir / "index.sqlite3"


SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
}


def _field_type(section_cls: type[Any], name: str) -> type[Any]:
    hint = typing.get_type_hints(section_cls)[name]
    if isinstance(hint, types.UnionType):  # pragma: no cover - no optional fields today
        raise TypeError(hint)
    return typing.cast(type[Any], hint)


def _coerce(key: str, value: Any, want: type[Any], *, from_text: bool) -> Any:
    """Return `value` as `want`, parsing text when it came from the environment or the CLI."""
    if from_text and isinstance(value, str):
        text = value.strip()
        try:
            if want is bool:
                lowered = text.lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            if want is int:
                return int(text)
            if want is float:
                return float(text)
        except ValueError:
            raise ConfigError(
                f"Config '{key}' has value {value!r}: not a valid {want.__name__}."
            ) from None
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, bool):
        raise ConfigError(f"Config '{key}' has value {value!r}: not a valid int.")
    if not isinstance(value, want):
        raise ConfigError(
            f"Config '{key}' has value {value!r} of type {type(value).__name__}: "
            f"expected {want.__name__}."
        )
    return value


def _check_constraints(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"Config '{key}' has value {value!r}: must be >= {meta['min']}.")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"Config '{key}' has value {value!r}: must be <= {meta['max']}.")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(
            f"Config '{key}' has value {value!r}: must be one of {', '.join(meta['choices'])}."
        )


def _apply(
    layered: dict[str, dict[str, tuple[Any, bool]]],
    source: Mapping[str, Any],
    *,
    origin: Literal["file", "env", "cli"],
) -> None:
    """Merge dotted-key values from one source into `layered` (section -> key -> (value, text))."""
    for dotted, value in source.items():
        section, _, key = dotted.partition(".")
        section_cls = SECTIONS.get(section)
        if section_cls is None:
            raise ConfigError(f"Unknown config section '{section}' (in '{dotted}').")
        fields = {f.name: f for f in dataclasses.fields(section_cls)}
        fld = fields.get(key)
        if fld is None:
            raise ConfigError(f"Unknown config key '{dotted}'.")
        if fld.metadata.get("secret") and origin != "env":
            raise ConfigError(
                f"Config '{dotted}' is a secret: set it with the environment variable "
                f"{ENV_PREFIX}{section.upper()}_{key.upper()} only."
            )
        layered.setdefault(section, {})[key] = (value, origin != "file")


def _flatten_toml(doc: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"Config '{section}' must be a table like [{section}].")
        for key, value in table.items():
            if isinstance(value, dict):
                raise ConfigError(f"Unknown config key '{section}.{key}' (nested tables).")
            flat[f"{section}.{key}"] = value
    return flat


def _env_values(environ: Mapping[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        values[f"{section}.{key}"] = value
    return values


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load and validate the configuration.

    Blocking (reads one file); call at start-up.

    Parameters
    ----------
    path : path-like, optional
        A ``config.toml``; ``None`` means embedded defaults only.
    environ : mapping, optional
        Environment to read ``KP_GATEWAY_*`` from (default ``os.environ``).
    overrides : mapping, optional
        Dotted keys from the command line; they win over everything.

    Raises
    ------
    ConfigError
        For an unreadable file, an unknown key, a wrong type or an out-of-range value.
    """
    layered: dict[str, dict[str, tuple[Any, bool]]] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"Cannot read config file {os.fspath(path)!r}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {os.fspath(path)!r} is not valid TOML: {exc}") from exc
        _apply(layered, _flatten_toml(doc), origin="file")
    _apply(layered, _env_values(os.environ if environ is None else environ), origin="env")
    _apply(layered, dict(overrides or {}), origin="cli")

    sections: dict[str, Any] = {}
    for section, section_cls in SECTIONS.items():
        kwargs: dict[str, Any] = {}
        for fld in dataclasses.fields(section_cls):
            key = f"{section}.{fld.name}"
            if fld.name in layered.get(section, {}):
                raw, from_text = layered[section][fld.name]
                kwargs[fld.name] = _coerce(
                    key, raw, _field_type(section_cls, fld.name), from_text=from_text
                )
            value = kwargs.get(fld.name, fld.default)
            _check_constraints(key, value, fld.metadata)
        sections[section] = section_cls(**kwargs)
    cfg = Config(**sections)
    _validate_cross_fields(cfg)
    return cfg


def _validate_cross_fields(cfg: Config) -> None:
    if not PROJECT_NAME_RE.fullmatch(cfg.dicom.default_project):
        raise ConfigError(
            f"Config 'dicom.default_project' has value {cfg.dicom.default_project!r}: "
            "project names are [a-z0-9][a-z0-9-]{0,12}."
        )
    if not 1 <= len(cfg.dicom.ae_title.strip()) <= 16:
        raise ConfigError(
            f"Config 'dicom.ae_title' has value {cfg.dicom.ae_title!r}: 1 to 16 characters."
        )
    try:
        import zoneinfo

        zoneinfo.ZoneInfo(cfg.index.site_timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"Config 'index.site_timezone' has value {cfg.index.site_timezone!r}: "
            "not an IANA time zone."
        ) from None


def documented_keys() -> dict[str, str]:
    """Every file-settable dotted key with its documentation line (secrets excluded)."""
    docs: dict[str, str] = {}
    for section, section_cls in SECTIONS.items():
        for fld in dataclasses.fields(section_cls):
            if not fld.metadata.get("secret"):
                docs[f"{section}.{fld.name}"] = str(fld.metadata.get("doc", ""))
    return docs


def masked(cfg: Config) -> dict[str, dict[str, Any]]:
    """The effective configuration as nested dicts, secrets masked, for the start-up log."""
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        obj = getattr(cfg, section)
        values: dict[str, Any] = {}
        for fld in dataclasses.fields(obj):
            value = getattr(obj, fld.name)
            values[fld.name] = "***" if fld.metadata.get("secret") and value else value
        out[section] = values
    return out


def render_config_toml() -> str:
    """The documented ``config.toml``: every file-settable key with its default and doc line.

    ``python -m kp_gateway.config > config.toml`` regenerates the shipped file; a test checks
    that the file and this function agree.
    """

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return f'"{value}"'
        return repr(value)

    lines = [
        "# kp-gateway configuration. Every key is optional; the value shown is the default.",
        "# Precedence: defaults < this file < environment KP_GATEWAY_<SECTION>_<KEY> < CLI flags.",
        "# Secrets never go here: the API token comes from KP_GATEWAY_HTTP_TOKEN (or is generated",
        "# into <storage.path>/token at first start).",
        "",
    ]
    for section, section_cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for fld in dataclasses.fields(section_cls):
            meta = fld.metadata
            if meta.get("secret"):
                continue
            limits = []
            if "choices" in meta:
                limits.append("one of: " + ", ".join(meta["choices"]))
            if "min" in meta:
                limits.append(f"min {meta['min']}")
            if "max" in meta:
                limits.append(f"max {meta['max']}")
            suffix = f" ({'; '.join(limits)})" if limits else ""
            lines.append(f"# {meta.get('doc', '')}{suffix}")
            lines.append(f"{fld.name} = {literal(fld.default)}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_config_toml(), end="")
