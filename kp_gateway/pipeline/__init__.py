"""The staged ingest pipeline."""

from kp_gateway.pipeline.core import Pipeline, RetryPolicy, Stage
from kp_gateway.pipeline.ingest import IngestService

__all__ = ["IngestService", "Pipeline", "RetryPolicy", "Stage"]
