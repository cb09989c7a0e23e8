"""The composition root: builds backends, pipeline, SCP and HTTP from Config, and runs them.

Start order: storage, index, process pool, ingest (recovering the spool), SCP, HTTP.
Stop order (after uvicorn's Server.shutdown): not ready, stop intake (HTTP site, DICOM
listener, then wait for open associations), drain the pipeline, close backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from kp_gateway import config as config_mod
from kp_gateway.backends import make_index, make_storage
from kp_gateway.backends.base import IndexBackend, StorageBackend
from kp_gateway.config import Config
from kp_gateway.datadir import DataDir, load_or_create_token, lock_data_dir
from kp_gateway.dicom.scp import Scp
from kp_gateway.dicomweb.reader import DicomWebReader
from kp_gateway.dicomweb.stow import StowLimits, StowReceiver
from kp_gateway.http.app import limit_connections, make_app
from kp_gateway.http.appkeys import Health
from kp_gateway.http.dicomweb import setup_dicomweb
from kp_gateway.http.security import RedactingAccessLogger
from kp_gateway.http.uploads import DicomEndpoint
from kp_gateway.metrics import Metrics
from kp_gateway.pipeline.ingest import IngestService
from kp_gateway.pipeline.process_pool import make_process_pool, worker_pid
from kp_gateway.pipeline.series_stages import SeriesPostProcessor
from kp_gateway.pipeline.series_stages import make_process_pool as make_series_pool
from kp_gateway.pipeline.spool import Spool
from kp_gateway.tokens import TokenStore
from kp_gateway.upload.importer import UploadImporter
from kp_gateway.upload.nifti import NiftiUploadImporter
from kp_gateway.upload.service import UploadService

logger = logging.getLogger(__name__)


@dataclass
class RunningGateway:
    """Handles to a started gateway (tests use these)."""

    cfg: Config
    ingest: IngestService
    storage: StorageBackend
    index: IndexBackend
    spool: Spool
    metrics: Metrics
    scp: Scp
    http_port: int
    token: str
    health: Health
    tokens: TokenStore
    series_stages: SeriesPostProcessor | None


def _pool_size(cfg: Config) -> int:
    return cfg.pipeline.process_pool_size or os.cpu_count() or 2


@contextlib.asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[RunningGateway]:
    """Lock the data directory, start every component, yield, then stop them in order.

    Runs on the loop. Raises DataDirLockedError when another process holds the data directory.
    Files and folders are created private (umask 077: 0600/0700), as the DICOM files always
    were: the index, thumbnails, reports and uploads hold patient data too. Worker processes
    inherit the mask.
    """
    previous_umask = os.umask(0o077)
    lock = await asyncio.to_thread(lock_data_dir, cfg.data_dir)
    try:
        async with _running(cfg) as gateway:
            yield gateway
    finally:
        lock.close()
        os.umask(previous_umask)


@contextlib.asynccontextmanager
async def _running(cfg: Config) -> AsyncIterator[RunningGateway]:
    metrics = Metrics()
    health = Health()
    storage = make_storage(cfg)
    index = make_index(cfg)
    pool = make_process_pool(_pool_size(cfg))
    # Rendering gets its own low-priority pool: it must never queue ahead of header parsing.
    series_pool = make_series_pool(cfg.series.process_pool_size) if cfg.series.enabled else None
    # DICOMweb reads (metadata, frames) get theirs too, below the receive path's priority.
    dicomweb_pool = (
        make_process_pool(cfg.dicomweb.process_pool_size, nice=5) if cfg.dicomweb.enabled else None
    )
    spool = Spool(cfg.data_dir, fsync=cfg.storage.fsync)
    token, generated = await asyncio.to_thread(load_or_create_token, cfg.data_dir, cfg.http.token)
    tokens = await asyncio.to_thread(
        TokenStore.load,
        DataDir.at(cfg.data_dir).project_tokens_file,
        max_tokens=cfg.http.max_tokens,
        fsync=cfg.storage.fsync,
    )
    await storage.open()
    await index.open()
    ingest = IngestService(
        cfg.pipeline,
        index_cfg=cfg.index,
        storage_backend=cfg.storage.backend,
        storage=storage,
        index=index,
        process_pool=pool,
        metrics=metrics,
        spool=spool,
    )
    # Built before ingest starts: its hook counts recovered instances to their uploads.
    # NIfTI conversion gets its own process: it must never queue ahead of header parsing.
    nifti = NiftiUploadImporter(max_volume_bytes=cfg.upload.nifti_max_volume_bytes)
    uploads = _uploads(cfg, ingest, spool, storage, index, metrics, nifti)
    scp = Scp(cfg.dicom, intake=ingest, spool=spool, metrics=metrics)
    series_stages = _series_stages(cfg, series_pool, storage, index, spool, metrics)
    if series_stages is not None:
        ingest.add_series_complete_hook(series_stages.on_series_complete)
    runner: web.AppRunner | None = None
    try:
        await _warm_up(pool, _pool_size(cfg))
        if series_stages is not None:
            # Before ingest starts, so completions of recovered series are picked up.
            await series_stages.start()
        await ingest.start()
        await asyncio.to_thread(scp.start)
        app = make_app(
            cfg.http,
            index=index,
            storage=storage,
            pipeline=ingest,
            metrics=metrics,
            token=token,
            tokens=tokens,
            health=health,
            default_project=cfg.dicom.default_project,
            dicom_endpoint=DicomEndpoint(
                cfg.http.public_host, cfg.dicom.public_port or cfg.dicom.port
            ),
            min_free_bytes=cfg.dicom.min_free_bytes,
            uploads=uploads,
            series_stages=series_stages,
        )
        if dicomweb_pool is not None:
            dicomweb_reader = DicomWebReader(
                pool=dicomweb_pool,
                storage=storage,
                index=index,
                scratch_dir=spool.tmp,
                backlog=cfg.dicomweb.pool_backlog,
                max_frame_bytes=cfg.series.max_frame_bytes,
            )
            ingest.add_series_complete_hook(dicomweb_reader.on_series_complete)
            setup_dicomweb(
                app,
                index=index,
                reader=dicomweb_reader,
                stow=StowReceiver(
                    spool=spool,
                    intake=ingest,
                    limits=StowLimits(
                        max_instance_bytes=cfg.dicom.max_dataset_bytes,
                        reserve_bytes=cfg.dicom.min_free_bytes,
                        admission_wait_s=cfg.dicom.admission_wait_s,
                    ),
                ),
                cors_origins=cfg.dicomweb.cors_origins,
            )
        runner = web.AppRunner(
            app,
            access_log=logging.getLogger("aiohttp.access"),
            access_log_class=RedactingAccessLogger,
            # Also closes a connection that never completes its request headers.
            keepalive_timeout=cfg.http.idle_timeout_s,
        )
        await runner.setup()
        assert runner.server is not None
        limit_connections(runner.server, cfg.http.max_connections)
        site = web.TCPSite(runner, cfg.http.host, cfg.http.port)
        await site.start()
        http_port = _bound_port(runner, cfg.http.port)
        health.ready = True
        host = cfg.http.public_host or (
            "localhost" if cfg.http.host == "0.0.0.0" else cfg.http.host
        )
        # Never the token itself: logs are shipped and kept (docker logs, journald).
        if not cfg.http.auth:
            logger.info("upload page: http://%s:%d/ (authentication off)", host, http_port)
        elif cfg.http.token:
            logger.info("API token: from the configuration (KP_GATEWAY_HTTP_TOKEN)")
        else:
            token_file = DataDir.at(cfg.data_dir).token_file
            verb = "generated into" if generated else "read from"
            logger.info("API token %s %s (mode 0600)", verb, token_file)
        if cfg.http.auth:
            logger.info(
                "upload page: http://%s:%d/ (log in with the API token, or open it with "
                "?token=<token>)",
                host,
                http_port,
            )
        yield RunningGateway(
            cfg,
            ingest,
            storage,
            index,
            spool,
            metrics,
            scp,
            http_port,
            token,
            health,
            tokens,
            series_stages,
        )
    finally:
        health.ready = False
        health.draining = True
        if runner is not None:
            # Stop taking uploads and API calls first; the DICOM side still finishes its work.
            await runner.cleanup()
        await scp.stop(grace_s=cfg.pipeline.drain_timeout_s)
        drained = await ingest.drain()
        logger.info("pipeline %s", "drained" if drained else "stopped with work left in the spool")
        if series_stages is not None:
            # Unfinished thumbnails/validation are redone at the next start (rescan_on_start).
            await series_stages.aclose(timeout_s=min(10.0, cfg.pipeline.drain_timeout_s))
        await index.aclose()
        await storage.aclose()
        pool.shutdown(wait=True, cancel_futures=True)
        await nifti.aclose()
        if series_pool is not None:
            series_pool.shutdown(wait=True, cancel_futures=True)
        if dicomweb_pool is not None:
            dicomweb_pool.shutdown(wait=True, cancel_futures=True)


def _uploads(
    cfg: Config,
    intake: IngestService,
    spool: Spool,
    storage: StorageBackend,
    index: IndexBackend,
    metrics: Metrics,
    nifti: NiftiUploadImporter,
) -> UploadService:
    importer = UploadImporter(
        intake=intake,
        spool=spool,
        storage=storage,
        metrics=metrics,
        limits=cfg.upload,
        admission_wait_s=cfg.upload.admission_wait_s,
        nifti_importer=nifti,
    )
    return UploadService(
        cfg.upload,
        state_dir=DataDir.at(cfg.data_dir).uploads_state,
        fsync=cfg.storage.fsync,
        importer=importer,
        project_exists=index.project_exists,
        metrics=metrics,
        nifti_available=True,
        min_free_bytes=cfg.dicom.min_free_bytes,
    )


def _series_stages(
    cfg: Config,
    executor: ProcessPoolExecutor | None,
    storage: StorageBackend,
    index: IndexBackend,
    spool: Spool,
    metrics: Metrics,
) -> SeriesPostProcessor | None:
    if not cfg.series.enabled:
        return None
    return SeriesPostProcessor(
        cfg.series,
        storage=storage,
        index=index,
        scratch_dir=spool.tmp,
        metrics=metrics,
        executor=executor,
        site_timezone=cfg.index.site_timezone,
    )


async def _warm_up(pool: ProcessPoolExecutor, workers: int) -> None:
    """Start every worker process now, so the first C-STORE does not pay for imports."""
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(pool, worker_pid) for _ in range(workers)))


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
