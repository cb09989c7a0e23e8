"""What the HTTP modules share through the aiohttp application: its AppKeys, and the readiness
flags (:class:`Health`) the composition root flips.

Set once by :func:`kp_gateway.http.app.make_app`; read by the handlers on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from kp_gateway.config import Config
from kp_gateway.pipeline.ingest import IngestService
from kp_gateway.pipeline.series_stages import SeriesPostProcessor


@dataclass
class Health:
    """Readiness flags the app flips during start-up and shutdown."""

    ready: bool = False
    draining: bool = False


INGEST_KEY = web.AppKey("ingest", IngestService)
CONFIG_KEY = web.AppKey("config", Config)
TOKEN_KEY = web.AppKey("token", str)
HEALTH_KEY = web.AppKey("health", Health)
SERIES_STAGES_KEY = web.AppKey("series_stages", SeriesPostProcessor)


__all__ = [
    "CONFIG_KEY",
    "HEALTH_KEY",
    "INGEST_KEY",
    "SERIES_STAGES_KEY",
    "TOKEN_KEY",
    "Health",
]
