"""Storage and index backends; ``make_storage`` / ``make_index`` pick one by config."""

from __future__ import annotations

from kp_gateway.backends.base import IndexBackend, StorageBackend
from kp_gateway.config import Config


def make_storage(cfg: Config) -> StorageBackend:
    """Build the configured object storage backend (not yet opened)."""
    if cfg.storage.backend == "fs":
        from kp_gateway.backends.fs import FsStorage

        return FsStorage(cfg.data_dir, fsync=cfg.storage.fsync)
    if cfg.storage.backend == "s3":
        from kp_gateway.backends.s3 import S3Storage

        s = cfg.storage
        return S3Storage(
            bucket=s.s3_bucket,
            endpoint_url=s.s3_endpoint_url,
            region=s.s3_region,
            path_style=s.s3_path_style,
            verify_tls=s.s3_verify_tls,
            create_bucket=s.s3_create_bucket,
            multipart_threshold_bytes=s.s3_multipart_threshold_bytes,
            timeout_s=s.s3_timeout_s,
            # Store workers upload while HTTP downloads and series stages fetch.
            max_connections=max(16, 4 * cfg.pipeline.store_workers),
        )
    raise ValueError(f"unknown storage backend {cfg.storage.backend!r}")  # config prevents this


def make_index(cfg: Config) -> IndexBackend:
    """Build the configured index backend (not yet opened)."""
    if cfg.index.backend == "sqlite":
        from kp_gateway.backends.sqlite import SqliteIndex

        return SqliteIndex(cfg.sqlite_path, default_project=cfg.dicom.default_project)
    if cfg.index.backend == "opensearch":
        from kp_gateway.backends.opensearch import OpenSearchIndex

        return OpenSearchIndex(
            cfg.index.opensearch_url,
            verify_tls=cfg.index.opensearch_verify_tls,
            timeout_s=cfg.index.opensearch_timeout_s,
            user=cfg.index.opensearch_user,
            password=cfg.index.opensearch_password,
            default_project=cfg.dicom.default_project,
        )
    raise ValueError(f"unknown index backend {cfg.index.backend!r}")  # config prevents this


__all__ = ["IndexBackend", "StorageBackend", "make_index", "make_storage"]
