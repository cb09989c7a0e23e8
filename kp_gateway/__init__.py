"""kp-gateway: a single-process DICOM ingestion gateway (C-STORE and HTTP upload into a PACS)."""

import logging

__version__ = "0.1.0"
__all__ = ["__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
