"""The upload page in headless Chromium: pick a zip, watch both progress bars, read results."""

from __future__ import annotations

import io
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from kp_gateway.config import Config
from tests.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, make_ct_series
from tests.integration.test_upload import upload_gateway

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian chromium is not installed"),
]


async def test_upload_page_zip_progress_results_and_dcmsend_command(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """Pick a zip: the progress bar reaches 100 %, per-file results and series links appear,
    and the dcmsend command names this deployment and the chosen project and dataset."""
    from playwright.async_api import async_playwright

    paths = make_ct_series(tmp_path / "ct" / "series", 5)
    archive = tmp_path / "study.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in paths:
            zf.write(path, f"study/{path.name}")
        zf.writestr("study/notes.txt", "not an image")
    archive.write_bytes(buf.getvalue())
    cfg = make_config(http__public_host="pacs.example.org", dicom__public_port=104)
    async with upload_gateway(cfg) as ug, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 1300})
            await page.goto(f"{ug.base}/")
            await page.wait_for_selector("body[data-ready=true]")
            assert await page.locator("#project").input_value() == "admin"
            # First load: no dataset typed yet, so no AE-title warning about the default name.
            first = await page.locator("#dcmsend-command").inner_text()
            assert "--aetitle kp-<dataset> --call kp-admin" in first
            assert await page.locator("#ae-warning").is_hidden()
            # The rate after a resume counts only the bytes this page sent.
            assert await page.evaluate("transferRate(5000, 4000, 2)") == 500
            assert await page.evaluate("transferRate(5000, 0, 0.2)") is None
            await page.fill("#dataset", "browser-study")
            await page.select_option("#kind", "dicom")
            command = await page.locator("#dcmsend-command").inner_text()
            assert command.startswith("dcmsend -v pacs.example.org 104 ")
            assert "--aetitle kp-browser-study --call kp-admin" in command
            assert await page.locator("#ae-warning").is_hidden()

            await page.set_input_files("#file-input", str(archive))
            await page.click("#upload-button")
            await page.wait_for_selector("#results:not([hidden])", timeout=30_000)
            assert await page.locator("#upload-progress").get_attribute("value") == "100"
            assert await page.locator("#import-progress").get_attribute("value") == "100"
            summary = await page.locator("#result-summary").inner_text()
            assert "5 instances imported into 1 series" in summary
            rows = page.locator("#file-results tr")
            assert await rows.count() == 1
            assert "study/notes.txt" in await rows.first.inner_text()
            link = page.locator("#series-links a")
            assert (await link.get_attribute("href") or "").startswith("/gallery?series=1.2.")
            # Described, not a bare UID: modality, description, instance count.
            await page.wait_for_function(
                "() => document.querySelector('#series-links a').textContent.includes('instances')"
            )
            assert await link.inner_text() == "CT · Synthetic CT · 5 instances"
            assert (await link.get_attribute("title") or "").startswith("1.2.")

            # A long dataset name: the AE title would not fit, so the page warns.
            await page.fill("#dataset", "a-much-too-long-dataset")
            assert await page.locator("#ae-warning").is_visible()
            ARTIFACTS.mkdir(exist_ok=True)
            # The login page wears the same stylesheet as the other pages.
            login = await browser.new_page()
            await login.goto(f"{ug.base}/login")
            assert await login.locator("section.card form input[type=password]").count() == 1
            background = await login.evaluate(
                "getComputedStyle(document.documentElement).backgroundColor"
            )
            assert background == "rgb(246, 247, 249)"  # style.css's --bg
            await login.close()
            await page.fill("#dataset", "browser-study")
            await page.screenshot(path=str(ARTIFACTS / "upload-page.png"), full_page=True)
        finally:
            await browser.close()
