"""Configuration: precedence, validation messages, and the documented config.toml."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from kp_gateway.config import Config, documented_keys, load, masked, render_config_toml
from kp_gateway.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_load_defaults_match_contract() -> None:
    """The embedded defaults are the contract's."""
    cfg = load(None, environ={})
    assert (cfg.dicom.host, cfg.dicom.port) == ("0.0.0.0", 11112)
    assert (cfg.http.host, cfg.http.port, cfg.http.auth) == ("0.0.0.0", 8080, True)
    assert cfg.storage.path == "./kp-data"
    assert cfg.pipeline.series_idle_s == 5.0
    assert cfg.dicom.default_project == "admin"


def test_load_repository_config_toml_equals_defaults() -> None:
    """The shipped config.toml loads and states every default exactly."""
    assert load(REPO / "config.toml", environ={}) == Config()


def test_config_toml_is_the_rendered_documentation() -> None:
    """config.toml is exactly what render_config_toml() produces (regenerate, never hand-edit)."""
    assert (REPO / "config.toml").read_text() == render_config_toml()


def test_config_toml_documents_every_key() -> None:
    """Every settable key appears in config.toml with a comment line above it."""
    text = (REPO / "config.toml").read_text()
    doc = tomllib.loads(text)
    flat = {f"{s}.{k}" for s, table in doc.items() for k in table}
    assert flat == set(documented_keys())
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[index - 1].startswith("# "), f"undocumented: {line}"


def test_load_precedence_file_env_cli(tmp_path: Path) -> None:
    """File < environment < CLI, key by key."""
    path = tmp_path / "c.toml"
    path.write_text("[dicom]\nport = 1000\nae_title = 'FILE'\n[http]\nport = 2000\n")
    cfg = load(
        path,
        environ={"KP_GATEWAY_DICOM_PORT": "3000", "KP_GATEWAY_HTTP_PORT": "4000"},
        overrides={"http.port": "5000"},
    )
    assert (cfg.dicom.port, cfg.dicom.ae_title, cfg.http.port) == (3000, "FILE", 5000)


def test_load_env_parses_booleans_and_floats() -> None:
    """Environment text becomes the field's type."""
    cfg = load(
        None,
        environ={"KP_GATEWAY_HTTP_AUTH": "false", "KP_GATEWAY_PIPELINE_SERIES_IDLE_S": "2.5"},
    )
    assert cfg.http.auth is False
    assert cfg.pipeline.series_idle_s == 2.5


@pytest.mark.parametrize(
    ("toml", "environ", "fragment"),
    [
        ("[dicom]\nprot = 1\n", {}, "Unknown config key 'dicom.prot'"),
        ("[dicomm]\nport = 1\n", {}, "Unknown config section 'dicomm'"),
        ("[dicom]\nport = 'x'\n", {}, "'dicom.port'"),
        ("[dicom]\nport = 70000\n", {}, "must be <= 65535"),
        ("[http]\nauth = 1\n", {}, "'http.auth'"),
        ("[http]\ntoken = 'secret'\n", {}, "KP_GATEWAY_HTTP_TOKEN"),
        ("", {"KP_GATEWAY_DICOM_PORT": "eleven"}, "'dicom.port' has value 'eleven'"),
        ("", {"KP_GATEWAY_DICOM_RECEIVE_MODE": "fast"}, "must be one of"),
        ("", {"KP_GATEWAY_INDEX_SITE_TIMEZONE": "Mars/Olympus"}, "index.site_timezone"),
        ("", {"KP_GATEWAY_DICOM_DEFAULT_PROJECT": "Bad_Name"}, "dicom.default_project"),
        ("not toml [", {}, "not valid TOML"),
    ],
)
def test_load_rejects_bad_config_naming_the_key(
    tmp_path: Path, toml: str, environ: dict[str, str], fragment: str
) -> None:
    """Unknown keys and bad values stop start-up with the dotted key in the message."""
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=None) as info:
        load(path, environ=environ)
    assert fragment in str(info.value)


def test_token_from_environment_is_masked_in_log_view() -> None:
    """The token comes from the environment only and never shows in the logged config."""
    cfg = load(None, environ={"KP_GATEWAY_HTTP_TOKEN": "s3cret"})
    assert cfg.http.token == "s3cret"
    assert masked(cfg)["http"]["token"] == "***"
    assert "s3cret" not in repr(cfg)


def test_config_sections_are_frozen() -> None:
    """Config objects cannot be mutated after load."""
    cfg = load(None, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dicom.port = 1  # type: ignore[misc]
