"""What the HTTP modules share through the aiohttp application: its AppKeys, and the readiness
flags (:class:`Health`) the composition root flips.

Each key holds exactly what handlers use (the index, the storage, the metrics registry, the
``[http]`` section), never a service to pick parts out of. Set once by
:func:`kp_gateway.http.app.make_app`; read by the handlers on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from kp_gateway.backends.base import IndexBackend, StorageBackend
from kp_gateway.config import HttpConfig
from kp_gateway.pipeline.series_stages import SeriesPostProcessor


@dataclass
class Health:
    """Readiness flags the app flips during start-up and shutdown."""

    ready: bool = False
    draining: bool = False


HTTP_CONFIG_KEY = web.AppKey("http_config", HttpConfig)
INDEX_KEY = web.AppKey("index", IndexBackend)
STORAGE_KEY = web.AppKey("storage", StorageBackend)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
# Projects the API refuses to delete: admin and the DICOM default project.
PROTECTED_PROJECTS_KEY = web.AppKey("protected_projects", frozenset)


class PipelineHealth(Protocol):
    """What ``/health/ready`` asks the pipeline (IngestService.readiness)."""

    def readiness(self) -> dict[str, Any]: ...


PIPELINE_KEY = web.AppKey("pipeline", PipelineHealth)
# Below this much free storage the gateway refuses C-STOREs, so it is not ready either.
MIN_FREE_BYTES_KEY = web.AppKey("min_free_bytes", int)
TOKEN_KEY = web.AppKey("token", str)
HEALTH_KEY = web.AppKey("health", Health)
SERIES_STAGES_KEY = web.AppKey("series_stages", SeriesPostProcessor)


__all__ = [
    "HEALTH_KEY",
    "HTTP_CONFIG_KEY",
    "INDEX_KEY",
    "MIN_FREE_BYTES_KEY",
    "PIPELINE_KEY",
    "PROTECTED_PROJECTS_KEY",
    "REGISTRY_KEY",
    "SERIES_STAGES_KEY",
    "STORAGE_KEY",
    "TOKEN_KEY",
    "Health",
    "PipelineHealth",
]
