"""Prometheus metrics on a per-app registry (never the global default one).

prometheus-client metrics are thread-safe, so association threads update them directly.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Stage latencies span sub-millisecond header reads to multi-second thumbnails.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# An import lasts from a fraction of a second (one file) to an hour (a 64 GiB zip).
_IMPORT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)


class Metrics:
    """Every metric the gateway exports; names follow kp_gateway_<subsystem>_<what>_<unit>."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.cstore_total = Counter(
            "kp_gateway_scp_cstore", "C-STORE requests answered, by status.", ["status"], registry=r
        )
        self.received_bytes = Counter(
            "kp_gateway_scp_received_bytes", "Bytes of datasets received by C-STORE.", registry=r
        )
        self.associations_total = Counter(
            "kp_gateway_scp_associations",
            "Association requests, by result.",
            ["result"],
            registry=r,
        )
        self.active_associations = Gauge(
            "kp_gateway_scp_active_associations", "Associations currently open.", registry=r
        )
        self.instances_total = Counter(
            "kp_gateway_instances_received",
            "Instances accepted into the pipeline, by source.",
            ["source"],
            registry=r,
        )
        self.stage_items = Counter(
            "kp_gateway_pipeline_items",
            "Items through each stage, by outcome.",
            ["stage", "outcome"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "kp_gateway_stage_seconds",
            "Time per stage batch.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "kp_gateway_pipeline_queue_depth", "Items waiting per stage.", ["stage"], registry=r
        )
        self.in_flight = Gauge(
            "kp_gateway_pipeline_in_flight", "Items admitted and not yet finished.", registry=r
        )
        self.series_completed = Counter(
            "kp_gateway_series_completed", "Series marked complete.", registry=r
        )
        self.backend_seconds = Histogram(
            "kp_gateway_backend_seconds",
            "Latency of storage and index calls made by the pipeline.",
            ["backend", "operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "kp_gateway_backend_errors",
            "Failed storage and index calls, by backend and operation.",
            ["backend", "operation"],
            registry=r,
        )
        self.uploads_total = Counter(
            "kp_gateway_uploads", "HTTP uploads, by final state.", ["state"], registry=r
        )
        self.upload_bytes = Counter(
            "kp_gateway_upload_received_bytes", "Bytes received by HTTP uploads.", registry=r
        )
        self.upload_import_seconds = Histogram(
            "kp_gateway_upload_import_seconds",
            "Time from an upload's last byte to the end of its import.",
            buckets=_IMPORT_BUCKETS,
            registry=r,
        )
        self._series_stage_metrics(r)

    # Series stages (pipeline/series_stages.py); the names are what dashboards know.
    def _series_stage_metrics(self, r: CollectorRegistry) -> None:
        self.series_stage_runs = Counter(
            "kp_gateway_series_stage_runs",
            "Series-stage runs, by stage and outcome (ok, retry, fail, unavailable).",
            ["stage", "outcome"],
            registry=r,
        )
        self.series_stage_seconds = Histogram(
            "kp_gateway_series_stage_seconds",
            "Time per series and stage.",
            ["stage"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.series_stage_queue_depth = Gauge(
            "kp_gateway_series_stage_queue_depth",
            "Series waiting for thumbnail and validation.",
            registry=r,
        )
        self.series_stage_dropped = Counter(
            "kp_gateway_series_stage_dropped",
            "Series not queued because the queue stayed full (redone at the next start).",
            registry=r,
        )
        self.validator_available = Gauge(
            "kp_gateway_validator_available", "1 when dciodvfy is on PATH.", registry=r
        )

    def bind_queue_depths(self, depths: Callable[[], dict[str, int]]) -> None:
        """Read queue depths at scrape time instead of on every put."""
        for stage in depths():
            self.queue_depth.labels(stage=stage).set_function(
                lambda stage=stage: float(depths().get(stage, 0))  # type: ignore[misc]
            )
