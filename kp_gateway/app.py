"""The composition root: builds backends, pipeline, SCP and HTTP from Config, and runs them.

Start order: storage, index, process pool, ingest (recovering the spool), SCP, HTTP.
Stop order (after uvicorn's Server.shutdown): not ready, stop intake (HTTP site, DICOM
listener, then wait for open associations), drain the pipeline, close backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from kp_gateway import config as config_mod
from kp_gateway.backends import make_index, make_storage
from kp_gateway.config import Config
from kp_gateway.http import Health, load_or_create_token, make_app
from kp_gateway.metrics import Metrics
from kp_gateway.pipeline.ingest import IngestService
from kp_gateway.pipeline.spool import Spool
from kp_gateway.scp import Scp
from kp_gateway.worker import forget_documented_series

logger = logging.getLogger(__name__)


@dataclass
class RunningGateway:
    """Handles to a started gateway (tests use these)."""

    cfg: Config
    ingest: IngestService
    scp: Scp
    http_port: int
    token: str
    health: Health


def _pool_size(cfg: Config) -> int:
    return cfg.pipeline.process_pool_size or os.cpu_count() or 2


@contextlib.asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[RunningGateway]:
    """Start every component, yield, then stop them in order. Runs on the loop."""
    metrics = Metrics()
    health = Health()
    storage = make_storage(cfg)
    index = make_index(cfg)
    # spawn: workers never inherit the SCP's threads or locks, and need no socket in the
    # temp directory (which the SCP points at its spool).
    pool = ProcessPoolExecutor(
        max_workers=_pool_size(cfg), mp_context=multiprocessing.get_context("spawn")
    )
    spool = Spool(cfg.data_dir, fsync=cfg.storage.fsync)
    token, generated = await asyncio.to_thread(load_or_create_token, cfg)
    await storage.open()
    await index.open()
    ingest = IngestService(
        cfg, storage=storage, index=index, process_pool=pool, metrics=metrics, spool=spool
    )
    scp = Scp(cfg.dicom, ingest, metrics)
    runner: web.AppRunner | None = None
    try:
        await _warm_up(pool, _pool_size(cfg))
        await ingest.start()
        await asyncio.to_thread(scp.start)
        app = make_app(cfg, ingest, token, health)
        runner = web.AppRunner(app, access_log=logging.getLogger("aiohttp.access"))
        await runner.setup()
        site = web.TCPSite(runner, cfg.http.host, cfg.http.port)
        await site.start()
        http_port = _bound_port(runner, cfg.http.port)
        health.ready = True
        host = cfg.http.public_host or (
            "localhost" if cfg.http.host == "0.0.0.0" else cfg.http.host
        )
        if cfg.http.auth:
            where = "generated and stored in the data directory" if generated else "in use"
            logger.info("API token %s: %s", where, token)
            logger.info("upload page: http://%s:%d/?token=%s", host, http_port, token)
        else:
            logger.info("upload page: http://%s:%d/ (authentication off)", host, http_port)
        yield RunningGateway(cfg, ingest, scp, http_port, token, health)
    finally:
        health.ready = False
        health.draining = True
        if runner is not None:
            # Stop taking uploads and API calls first; the DICOM side still finishes its work.
            await runner.cleanup()
        await scp.stop(grace_s=cfg.pipeline.drain_timeout_s)
        drained = await ingest.drain()
        logger.info("pipeline %s", "drained" if drained else "stopped with work left in the spool")
        await index.aclose()
        await storage.aclose()
        pool.shutdown(wait=True, cancel_futures=True)


async def _warm_up(pool: ProcessPoolExecutor, workers: int) -> None:
    """Start every worker process now, so the first C-STORE does not pay for imports."""
    loop = asyncio.get_running_loop()
    await asyncio.gather(
        *(loop.run_in_executor(pool, forget_documented_series) for _ in range(workers))
    )


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    if configured:
        return configured
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return configured


async def serve(cfg: Config) -> int:
    """Run until SIGINT/SIGTERM, then drain gracefully; returns the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logger.info("effective configuration: %s", config_mod.masked(cfg))
    async with running(cfg):
        await stop.wait()
        logger.info("shutting down")
    return 0
