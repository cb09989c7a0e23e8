"""The token page and logout in headless Chromium: the admin creates a project token (its secret
shown once), a second browser logs in with it and sees only that project, logs out, and the
admin revokes the token from the page."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import CHROMIUM, CHROMIUM_ARGS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian chromium is not installed"),
]


async def test_tokens_page_creates_revokes_and_logout_ends_the_session(
    make_config: Callable[..., Any], make_gateway: Any
) -> None:
    from playwright.async_api import async_playwright

    gw = await make_gateway(make_config(http__auth=True, series__enabled=False))
    base = f"http://127.0.0.1:{gw.http_port}"
    admin = {"Authorization": f"Bearer {gw.token}"}
    async with aiohttp.ClientSession(base, headers=admin) as http:
        for name in ("lung", "brain"):
            async with http.post("/api/projects", json={"name": name}) as r:
                assert r.status == 201
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            failed: list[str] = []
            page = await (await browser.new_context()).new_page()
            page.on("pageerror", lambda exc: failed.append(str(exc)))
            page.on("dialog", lambda dialog: dialog.accept())
            await page.goto(f"{base}/tokens?project=lung&token={gw.token}")
            await page.wait_for_selector("body[data-loaded]")
            assert "token=" not in page.url  # traded for a session
            options = await page.locator("#project option").all_inner_texts()
            assert options == ["brain", "lung"]
            assert await page.locator("#project").input_value() == "lung"
            await page.select_option("#scope", "read")
            await page.fill("#label", "alice")
            await page.click("#create-button")
            await page.wait_for_selector("#secret-block:not([hidden])")
            secret = (await page.locator("#secret").inner_text()).strip()
            assert secret.startswith("kpt_")
            await page.wait_for_selector("#tokens tr")
            assert "alice" in await page.locator("#tokens tr").first.inner_text()

            # Another browser with the project token: lung only, then log out.
            other = await (await browser.new_context()).new_page()
            other.on("pageerror", lambda exc: failed.append(str(exc)))
            await other.goto(f"{base}/gallery?token={secret}")
            await other.wait_for_selector("body[data-loaded]")
            assert await other.locator("#project option").all_inner_texts() == ["lung"]
            cookies = await other.context.cookies()
            session = next(c for c in cookies if c["name"] == "kp_gateway_session")
            assert session["value"] != secret and session["httpOnly"]
            assert session["sameSite"] == "Strict"
            await other.click("form.logout button")
            await other.wait_for_url(f"{base}/login")
            answer = await other.evaluate(
                "fetch('/api/projects', {credentials: 'same-origin'}).then(r => r.status)"
            )
            assert answer == 401
            await other.goto(f"{base}/tokens?token={secret}")
            await other.wait_for_selector("#not-admin:not([hidden])")
            assert await other.locator("#my-project").inner_text() == "lung"

            # The admin revokes it: the other browser's new session ends at once.
            await page.click("#tokens tr button")
            await page.wait_for_selector("#empty:not([hidden])")
            status = await other.evaluate(
                "fetch('/api/projects', {credentials: 'same-origin'}).then(r => r.status)"
            )
            assert status == 401
            assert failed == []
        finally:
            await browser.close()
