"""The upload page's dcmsend command, run exactly as shown, on the layouts labs send from."""

from __future__ import annotations

import asyncio
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kp_gateway.config import Config
from tests.conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    dcmtk_env,
    free_port,
    make_ct_series,
    requires_dcmtk,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    requires_dcmtk,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian chromium is not installed"),
]

PLACEHOLDER = "<data-dir-of-DICOM-images>"


def _dcm_folder(root: Path) -> tuple[Path, int]:
    """A folder of ``*.dcm`` files, nested one level (the seed documentation's case)."""
    make_ct_series(root / "series-a", 3)
    make_ct_series(root / "series-b", 2)
    return root, 5


def _extensionless(root: Path) -> tuple[Path, int]:
    """Files named like a PACS export's, with no extension, and a stray text file."""
    for i, path in enumerate(make_ct_series(root / "tmp", 4)):
        path.rename(root / f"IM{i + 1:06d}")
    (root / "tmp").rmdir()
    (root / "README.TXT").write_text("exported by a PACS\n")
    return root, 4


def _dicomdir_export(root: Path) -> tuple[Path, int]:
    """A CD/DVD export: DICOM/ST000001/SE00000n/IM00000n and a DICOMDIR made by dcmmkdir."""
    count = 0
    for series in (1, 2):
        folder = root / "DICOM" / "ST000001" / f"SE{series:06d}"
        for i, path in enumerate(make_ct_series(root / "tmp" / str(series), 3)):
            folder.mkdir(parents=True, exist_ok=True)
            path.rename(folder / f"IM{i + 1:06d}")
            count += 1
    shutil.rmtree(root / "tmp")
    # +I invents the StudyID/SeriesNumber our synthetic slices lack, as export tools do.
    subprocess.run(
        ["dcmmkdir", "+r", "+I", "+id", str(root), "--output-file", str(root / "DICOMDIR")],
        check=True,
        capture_output=True,
        cwd=root,
    )
    assert (root / "DICOMDIR").is_file()
    return root, count


@pytest.mark.parametrize(
    "layout", [_dcm_folder, _extensionless, _dicomdir_export], ids=["dcm", "no-extension", "cd"]
)
async def test_page_dcmsend_command_sends_every_common_layout(
    make_config: Callable[..., Config],
    make_gateway: Callable[[Config], Any],
    tmp_path: Path,
    layout: Callable[[Path], tuple[Path, int]],
) -> None:
    """Copied from the page and run as is: every image of the export arrives, dcmsend exits 0."""
    from playwright.async_api import async_playwright

    folder, expected = layout(tmp_path / "export")
    dicom_port = free_port()
    cfg = make_config(
        dicom__port=dicom_port, dicom__public_port=dicom_port, http__public_host="127.0.0.1"
    )
    gw = await make_gateway(cfg)
    base = f"http://127.0.0.1:{gw.http_port}"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"{base}/")
            await page.wait_for_selector("body[data-ready=true]")
            await page.fill("#dataset", "cd-export")
            command = await page.locator("#dcmsend-command").inner_text()
        finally:
            await browser.close()
    assert command.count(PLACEHOLDER) == 1, command
    argv = shlex.split(command.replace(PLACEHOLDER, shlex.quote(str(folder))))
    run = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, env=dcmtk_env(), timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr

    import aiohttp

    counts: dict[str, int] = {}
    async with aiohttp.ClientSession() as http:
        for _ in range(400):  # indexing follows the acknowledgement; up to 20 s
            async with http.get(f"{base}/api/projects/admin/datasets") as response:
                items = (await response.json())["items"]
            counts = {item["name"]: item["instance_count"] for item in items}
            if counts.get("cd-export", 0) >= expected:
                break
            await asyncio.sleep(0.05)
    assert counts.get("cd-export") == expected, (counts, run.stdout + run.stderr)
