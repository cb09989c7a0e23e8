"""One association cannot fill the disk (issue 14, finding 9, DICOM side).

Before: ``dicom.min_free_bytes`` was checked only after a dataset's last fragment, and no
dataset size was bounded, so one association sending an endless dataset filled the disk.
Now the spool file checks both while the bytes arrive. A pynetdicom SCU sends.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from kp_gateway.app import RunningGateway
from kp_gateway.errors import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS
from tests.conftest import make_ct_series
from tests.integration.test_scp import _associate, _store_all

MiB = 1 << 20


def _big_ct(folder: Path, rows: int, columns: int) -> Path:
    path = make_ct_series(folder, 1)[0]
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = np.random.default_rng(7).integers(0, 4096, (rows, columns), np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _spooled(gw: RunningGateway) -> list[Path]:
    """Received data in the spool (the empty files created ahead of need do not count)."""
    return [
        p
        for p in gw.spool.root.rglob("*")
        if p.is_file() and p.name != "routing.json" and p.stat().st_size
    ]


def _send_one(gw: RunningGateway, path: Path) -> tuple[bool, int | None]:
    """(whether the association was aborted, the status if one came). Blocking."""
    assoc = _associate(gw)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(pydicom.dcmread(path))
        status = int(rsp.Status) if "Status" in rsp else None
    finally:
        if assoc.is_established:
            assoc.release()
    return assoc.is_aborted, status


async def test_dataset_over_the_cap_aborts_the_association_and_keeps_nothing(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path
) -> None:
    gw = await make_gateway(make_config(dicom__max_dataset_bytes=MiB))
    big = _big_ct(tmp_path / "big", 1024, 1024)  # 2 MiB of Pixel Data
    aborted, status = await asyncio.to_thread(_send_one, gw, big)
    assert aborted and status is None
    async with asyncio.timeout(10):
        while _spooled(gw):
            await asyncio.sleep(0.05)
    small = make_ct_series(tmp_path / "small", 1)
    assert await asyncio.to_thread(_store_all, gw, small) == [STATUS_SUCCESS]


async def test_dataset_crossing_the_reserve_gets_0xa700_and_keeps_nothing(
    make_config: Callable[..., Any], make_gateway: Any, tmp_path: Path, small_disk: Path
) -> None:
    """16 MiB reserve on a 32 MiB disk of its own: a 24 MiB dataset stops being written when
    the reserve is reached, is answered 0xA700 at its end, and leaves the disk as it was."""
    gw = await make_gateway(
        make_config(storage__path=str(small_disk / "data"), dicom__min_free_bytes=16 * MiB)
    )
    free_before = shutil.disk_usage(small_disk).free
    big = _big_ct(tmp_path / "big", 3072, 4096)  # 24 MiB of Pixel Data
    aborted, status = await asyncio.to_thread(_send_one, gw, big)
    assert (aborted, status) == (False, STATUS_OUT_OF_RESOURCES)
    assert _spooled(gw) == []
    assert shutil.disk_usage(small_disk).free >= free_before - MiB
    small = make_ct_series(tmp_path / "small", 1)
    assert await asyncio.to_thread(_store_all, gw, small) == [STATUS_SUCCESS]
