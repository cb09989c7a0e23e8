"""The data directory: its exclusive lock and the generated API token."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kp_gateway.config import load
from kp_gateway.datadir import DataDir, load_or_create_token, lock_data_dir
from kp_gateway.errors import ConfigError, DataDirLockedError


def test_lock_held_twice_raises_data_dir_locked(tmp_path: Path) -> None:
    """A second lock on the same folder fails with the message the CLI prints; never ConfigError."""
    data_dir = tmp_path / "data"
    first = lock_data_dir(data_dir)
    try:
        with pytest.raises(
            DataDirLockedError, match="in use by another kp-gateway process"
        ) as info:
            lock_data_dir(data_dir)
        assert not isinstance(info.value, ConfigError)
        assert f"Config 'storage.path' has value {str(data_dir)!r}" in str(info.value)
    finally:
        first.close()
    lock_data_dir(data_dir).close()  # released with the first handle


def test_lock_creates_the_data_dir_and_its_lock_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    lock_data_dir(data_dir).close()
    assert DataDir.at(data_dir).lock_file.is_file()


def test_token_generated_once_with_mode_0600_then_reused(tmp_path: Path) -> None:
    token, generated = load_or_create_token(tmp_path)
    assert generated and len(token) >= 32
    path = DataDir.at(tmp_path).token_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text(encoding="utf-8") == token + "\n"
    assert load_or_create_token(tmp_path) == (token, False)


def test_env_token_wins_and_writes_nothing(tmp_path: Path) -> None:
    """KP_GATEWAY_HTTP_TOKEN beats a stored token and never creates one."""
    environ = {"KP_GATEWAY_STORAGE_PATH": str(tmp_path), "KP_GATEWAY_HTTP_TOKEN": "from-env"}
    cfg = load(environ=environ)
    assert load_or_create_token(cfg.data_dir, cfg.http.token) == ("from-env", False)
    assert not DataDir.at(cfg.data_dir).token_file.exists()
    stored, _ = load_or_create_token(cfg.data_dir)
    assert load_or_create_token(cfg.data_dir, cfg.http.token) == ("from-env", False)
    assert load_or_create_token(cfg.data_dir) == (stored, False)


def test_layout_paths(tmp_path: Path) -> None:
    layout = DataDir.at(tmp_path)
    assert layout.spool == tmp_path / "spool"
    assert layout.scratch == tmp_path / "spool" / "tmp"
    assert layout.quarantine == tmp_path / "quarantine"
    assert layout.uploads_state == tmp_path / "uploads-state"
    assert layout.token_file == tmp_path / "token"
    assert layout.lock_file == tmp_path / ".lock"
