"""Command line: ``kp-gateway serve|reindex|check-config [--config config.toml] ...``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from kp_gateway import __version__
from kp_gateway.config import load
from kp_gateway.errors import ConfigError, DataDirLockedError, IncompatibleDependencyError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kp-gateway", description="DICOM ingestion gateway for small imaging labs."
    )
    parser.add_argument("--version", action="version", version=f"kp-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the DICOM listener and the HTTP server")
    _config_options(serve)
    serve.add_argument("--dicom-port", type=int, help="shortcut for dicom.port")
    serve.add_argument("--http-port", type=int, help="shortcut for http.port")
    sub.add_parser("check-config", help="validate the configuration and print it").add_argument(
        "-c", "--config"
    )
    reindex = sub.add_parser(
        "reindex",
        help="rebuild the configured index from the configured object store",
        description="Rebuild the configured index from the stored objects and routing records. "
        "Resumes after the last committed object of an interrupted run. The gateway must not "
        "run on the same data directory or index meanwhile (the data directory is locked).",
    )
    _config_options(reindex)
    reindex.add_argument(
        "--restart", action="store_true", help="ignore the checkpoint of an interrupted run"
    )
    reindex.add_argument(
        "--skip-series-stages",
        action="store_true",
        help="do not render thumbnails and validate (the gateway's start-up rescan does it)",
    )
    return parser


def _config_options(command: argparse.ArgumentParser) -> None:
    """The options every command that loads the configuration takes."""
    command.add_argument("-c", "--config", help="a config.toml (every key is optional)")
    command.add_argument("--data-dir", help="shortcut for storage.path")
    command.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config key (repeatable)",
    )
    command.add_argument("--log-level", help="shortcut for logging.level")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in getattr(args, "set", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value
    for flag, key in (
        ("data_dir", "storage.path"),
        ("dicom_port", "dicom.port"),
        ("http_port", "http.port"),
        ("log_level", "logging.level"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = str(value).upper() if flag == "log_level" else str(value)
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kp-gateway`` console script."""
    args = _parser().parse_args(argv)
    try:
        cfg = load(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"kp-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.logging.level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom logs every PDU at INFO; its warnings are what an operator needs.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.command == "check-config":
        from kp_gateway.config import masked

        print(masked(cfg))
        return 0
    if args.command == "reindex":
        from kp_gateway import reindex

        os.umask(0o077)  # what it writes is as private as what serve writes (app.running)
        try:
            return reindex.main(
                cfg, restart=args.restart, series_stages=not args.skip_series_stages
            )
        except DataDirLockedError as exc:
            print(f"kp-gateway: {exc}", file=sys.stderr)
            return 2
    from kp_gateway.app import serve

    try:
        return asyncio.run(serve(cfg))
    except (DataDirLockedError, IncompatibleDependencyError) as exc:
        print(f"kp-gateway: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
