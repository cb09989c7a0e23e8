"""The gallery page in headless Chromium (Playwright), over a gateway that received real series.

The gateway runs in-process with the SeriesPostProcessor attached; since app.py does not add
the gallery routes yet, a second aiohttp app is built around the same ingest service with
``make_app`` + ``setup_gallery`` and served on 127.0.0.1 (as app.py will serve the real one).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from tests.integration.test_series_stages import (
    Harness,
    Series,
    dcmsend,
    make_ct_series,
    make_seg,
    wait_document,
)
from tests.integration.test_series_stages import harness as harness

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed"),
    pytest.mark.skipif(shutil.which("dcmsend") is None, reason="dcmsend is not installed"),
    pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed"),
]
playwright_api = pytest.importorskip("playwright.async_api")


@dataclass
class Site:
    base: str
    ct: Series
    seg: Series


def _done(doc: dict[str, object]) -> bool:
    validation = doc.get("00111001 ValidationResults_object")
    return "00000000 ThumbnailInstanceUID_keyword" in doc and isinstance(validation, dict)


@pytest.fixture
async def site(harness: Harness, tmp_path: Path) -> AsyncIterator[Site]:
    """A CT and a SEG over it, processed, and the gallery served beside the gateway's API."""
    ct = make_ct_series(tmp_path / "ct", description="gallery chest")
    seg = make_seg(tmp_path / "seg", ct)
    await asyncio.to_thread(dcmsend, harness.gw.scp.port, ct.paths + seg.paths, dataset="cohort")
    for series in (ct, seg):
        await wait_document(harness.http, series.uid, _done, what=f"{series.uid} processed")
    yield Site(f"http://127.0.0.1:{harness.gw.http_port}", ct, seg)


async def test_gallery_cards_filters_badge_and_single_series(site: Site) -> None:
    """Cards show loaded thumbnails; the modality filter narrows them; the badge opens a report."""
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 900})
            failed: list[str] = []
            page.on("pageerror", lambda exc: failed.append(str(exc)))
            await page.goto(f"{site.base}/gallery")
            await page.wait_for_selector("body[data-loaded]")
            cards = page.locator("li.card")
            assert await cards.count() == 2
            await page.wait_for_function(
                "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)"
            )
            widths = await page.eval_on_selector_all(
                "li.card img", "imgs => imgs.map(i => i.naturalWidth)"
            )
            assert widths == [300, 300]
            assert await page.locator("#pager").is_hidden()  # one page only
            ct_card = page.locator(f'li.card[data-series-uid="{site.ct.uid}"]')
            assert await ct_card.locator(".modality").inner_text() == "CT"
            assert await ct_card.locator(".description").inner_text() == "gallery chest"
            assert await ct_card.locator(".count").inner_text() == "10"
            assert await ct_card.locator(".datasets").inner_text() == "cohort"
            assert await ct_card.locator(".date").inner_text() == "2024-01-02"
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "gallery.png"), full_page=True)

            # The badge carries the stored counts and links to the report.
            badge = ct_card.locator("a.badge")
            href = await badge.get_attribute("href")
            assert href == f"/api/series/{site.ct.uid}/validation"
            errors = await badge.get_attribute("data-errors")
            async with (
                aiohttp.ClientSession(site.base) as http,
                http.get(f"/api/series/{site.ct.uid}") as response,
            ):
                validation = (await response.json())["validation"]
            assert errors == str(validation["00111002 ValidationErrors_integer"])
            async with page.expect_popup() as popup_info:
                await badge.click()
            report = await popup_info.value
            await report.wait_for_load_state()
            assert await report.locator("#summary").get_attribute("data-error-count") == errors
            await report.close()

            # Modality filter: only the SEG is left, and the URL remembers it.
            await page.select_option("#modality", "SEG")
            await page.wait_for_function(
                "() => document.querySelectorAll('li.card').length === 1"
                " && document.querySelector('li.card').dataset.modality === 'SEG'"
            )
            assert "modality=SEG" in page.url
            await page.select_option("#modality", "")
            await page.wait_for_function("() => document.querySelectorAll('li.card').length === 2")

            # ?series= shows that one series, highlighted.
            await page.goto(f"{site.base}/gallery?series={site.seg.uid}")
            await page.wait_for_selector("li.card.highlight")
            assert await cards.count() == 1
            assert await cards.first.get_attribute("data-series-uid") == site.seg.uid
            assert failed == []
        finally:
            await browser.close()


async def test_gallery_card_shows_processing_then_refreshes_in_place(
    harness: Harness, tmp_path: Path
) -> None:
    """A series still arriving shows as processing, not as a missing thumbnail; once its sender
    releases and the stages finish, the card gets its picture and badge without a reload."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    ct = make_ct_series(tmp_path / "arriving", count=4, description="arriving")
    ae = AE(ae_title="kp-live")
    ae.add_requested_context(CTImageStorage)
    # pynetdicom as the sender holds its association open: the series cannot complete yet.
    assoc = await asyncio.to_thread(
        ae.associate, "127.0.0.1", harness.gw.scp.port, ae_title="kp-admin"
    )
    assert assoc.is_established
    base = f"http://127.0.0.1:{harness.gw.http_port}"
    try:
        for path in ct.paths:
            status = await asyncio.to_thread(assoc.send_c_store, dcmread(path))
            assert status.Status == 0x0000
        await wait_document(harness.http, ct.uid, lambda d: True, what="series indexed")
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                failed: list[str] = []
                page.on("pageerror", lambda exc: failed.append(str(exc)))
                await page.goto(f"{base}/gallery")
                await page.wait_for_selector("body[data-loaded]")
                card = page.locator(f'li.card[data-series-uid="{ct.uid}"]')
                assert await card.get_attribute("data-thumbnail") == "pending"
                assert await card.get_attribute("data-state") == "processing"
                assert "still arriving" in await card.locator(".thumb").inner_text()
                assert await card.locator("img").count() == 0  # no 404, no "unavailable"

                await asyncio.to_thread(assoc.release)
                await page.wait_for_selector(
                    f'li.card[data-series-uid="{ct.uid}"][data-state="done"] img',
                    timeout=60_000,
                )
                await page.wait_for_function(
                    "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)"
                )
                assert await card.get_attribute("data-thumbnail") == "ready"
                assert await card.locator("a.badge").get_attribute("data-errors") is not None
                assert failed == []
            finally:
                await browser.close()
    finally:
        if assoc.is_established:
            await asyncio.to_thread(assoc.release)
        ae.shutdown()
