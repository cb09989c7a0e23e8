"""Storage and index backends; ``make_storage`` / ``make_index`` pick one by config."""

from __future__ import annotations

from kp_gateway.backends.base import IndexBackend, StorageBackend
from kp_gateway.config import Config


def make_storage(cfg: Config) -> StorageBackend:
    """Build the configured object storage backend (not yet opened)."""
    if cfg.storage.backend == "fs":
        from kp_gateway.backends.fs import FsStorage

        return FsStorage(cfg.data_dir, fsync=cfg.storage.fsync)
    raise ValueError(f"unknown storage backend {cfg.storage.backend!r}")  # config prevents this


def make_index(cfg: Config) -> IndexBackend:
    """Build the configured index backend (not yet opened)."""
    if cfg.index.backend == "sqlite":
        from kp_gateway.backends.sqlite import SqliteIndex

        return SqliteIndex(cfg.sqlite_path, default_project=cfg.dicom.default_project)
    raise ValueError(f"unknown index backend {cfg.index.backend!r}")  # config prevents this


__all__ = ["IndexBackend", "StorageBackend", "make_index", "make_storage"]
