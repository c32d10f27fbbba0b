"""The live pool page in a real browser: Debian's chromium, headless, driven by Selenium
through Debian's chromedriver, against a real uvicorn server.

Without the token the page is a token form and its data are refused; after the form is
submitted the page shows every number moving while queries run in the background; the
session cookie is `HttpOnly` and `SameSite=Strict`; no script breaks the page's CSP; and a
screenshot of the page under load is taken (the README shows one: `PGLAYER_SCREENSHOT=
benchmarks/results/live-page.png` writes it there; otherwise it goes to the test's temporary
directory, so a test run leaves the checkout as it was). Skipped where chromium or
chromedriver is missing; in CI (PGLAYER_REQUIRE_EXTERNAL=1) that is a failure: `.ci/run`
installs both.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from pglayer import Database, PglayerError
from pglayer.fastapi._live import SESSION_COOKIE, fingerprint
from tests.conftest import LiveServer, require_external, settings_for
from tests.test_live_admin import TOKEN, page_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PRIMARY = '[data-pool="primary"]'
NONE = "\u2013"  # what the page shows before it has a value

T = TypeVar("T")


def start_browser() -> webdriver.Chrome:
    assert CHROMIUM is not None
    assert CHROMEDRIVER is not None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--force-device-scale-factor=1",
        "--window-size=1280,1000",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Selenium blocks: run it off the event loop that serves the page."""
    return await asyncio.to_thread(fn, *args)


def wait_until(
    driver: webdriver.Chrome, condition: Callable[[Any], Any], timeout: float = 10
) -> Any:
    # While the browser goes from one page to the next, a lookup or a script can meet the old
    # document: the element is missing, stale, or "does not belong to the document" (Chrome's
    # unknown error), or the script's document unloads. Every one is a WebDriverException;
    # look again until the timeout, which reports the last one.
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=(WebDriverException,)
    )
    return wait.until(condition)


def text_of(driver: webdriver.Chrome, css: str) -> str | None:
    # One script reads the text in one turn of the page, so no element handle outlives it.
    text: str | None = driver.execute_script(
        "const el = document.querySelector(arguments[0]); return el && el.textContent;", css
    )
    return text


def primary_fields(driver: webdriver.Chrome) -> dict[str, str]:
    fields: dict[str, str] = driver.execute_script(
        """
        const out = {};
        for (const el of document.querySelectorAll('[data-pool="primary"] [data-field]')) {
          out[el.dataset.field] = el.textContent;
        }
        return out;
        """
    )
    return fields


def number(text: str) -> int:
    return int(text.replace(",", ""))


def table_text(driver: webdriver.Chrome, name: str) -> str:
    text: str = driver.find_element(By.CSS_SELECTOR, f'{PRIMARY} [data-table="{name}"]').text
    return text


def sign_in(driver: webdriver.Chrome, token: str) -> None:
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "open").click()


def load_app(db: Database) -> FastAPI:
    """The admin router, and routes for the load: quick reads, slow reports, a failing one."""
    app = page_app(db, TOKEN)

    @app.get("/orders/{order_id}")
    async def order(order_id: int) -> dict[str, int]:
        await db.run(lambda c: c.execute("SELECT pg_sleep(0.01)"))
        return {"id": order_id}

    @app.get("/reports/{report_id}")
    async def report(report_id: int) -> dict[str, int]:
        seconds = 0.05 + (report_id % 5) / 50
        await db.run(lambda c: c.execute(REPORT_SQL, seconds))
        return {"id": report_id}

    @app.get("/broken")
    async def broken() -> dict[str, int]:
        await db.run(lambda c: c.fetchval("SELECT 1 / 0"))
        return {}

    return app


REPORT_SQL = "SELECT count(*) FROM pg_sleep($1::float8), generate_series(1, 1000)"


async def drive_load(url: str, db: Database, stop: asyncio.Event) -> None:
    """More clients than connections (so some wait), some slow reports, some errors."""

    async def burst() -> None:
        # Some refusals: more quick acquires than the pool can serve within their timeout.
        with contextlib.suppress(PglayerError):
            await db.run(lambda c: c.execute("SELECT pg_sleep(0.3)"), timeout=0.05, retry=False)

    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            i = 0
            while not stop.is_set():
                i += 1
                if n == 0 and i % 25 == 0:
                    await http.get("/broken")
                elif i % 8 == n % 8:
                    await http.get(f"/reports/{i}")
                else:
                    await http.get(f"/orders/{i}")

    await asyncio.gather(*(burst() for _ in range(12)))
    await asyncio.gather(*(client(n) for n in range(6)))


def page_errors(driver: webdriver.Chrome) -> list[str]:
    """Console errors other than the 401 of the token form itself."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [
        e["message"]
        for e in entries
        if (e["level"] == "SEVERE" or "Content Security Policy" in e["message"])
        and "401" not in e["message"]
    ]


def save_whole_page(driver: webdriver.Chrome, path: Path) -> None:
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


async def test_the_page_refuses_then_shows_numbers_that_move(db_url: str, tmp_path: Path) -> None:
    require_external(
        CHROMIUM is not None and CHROMEDRIVER is not None,
        "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
    )
    settings = settings_for(db_url, min_size=2, max_size=4, slow_query_threshold=0.05)
    async with Database(settings) as db, LiveServer(load_app(db)) as live:
        driver = await in_thread(start_browser)
        stop = asyncio.Event()
        load: asyncio.Task[None] | None = None
        try:
            # Without the token: the token form, no data, and the data refused.
            await in_thread(driver.get, f"{live.url}/admin/pool")
            assert await in_thread(driver.find_elements, By.ID, "login")
            assert not await in_thread(driver.find_elements, By.CSS_SELECTOR, "[data-pool]")
            status = await in_thread(
                driver.execute_script, "return fetch('pool.json').then(r => r.status)"
            )
            assert status == 401

            # A wrong token: still the form, with a message, and no cookie.
            # The form posts and the server answers with a new page: wait for it, because a
            # lookup while the browser is between the two pages finds no element.
            await in_thread(sign_in, driver, "not-the-token")
            await in_thread(
                wait_until,
                driver,
                lambda d: text_of(d, "#message") == "That is not the admin token.",
            )
            assert await in_thread(driver.get_cookie, SESSION_COOKIE) is None

            # The token: the page, and a cookie the page's scripts cannot read.
            await in_thread(sign_in, driver, TOKEN)
            await in_thread(
                wait_until, driver, lambda d: primary_fields(d).get("acquisitions", NONE) != NONE
            )
            assert driver.current_url == f"{live.url}/admin/pool"
            cookie = await in_thread(driver.get_cookie, SESSION_COOKIE)
            assert cookie is not None
            assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (
                True, "Strict", "/admin",
            )  # fmt: skip
            assert await in_thread(driver.execute_script, "return document.cookie") == ""

            # Load: the numbers move.
            load = asyncio.create_task(drive_load(live.url, db, stop))
            reads = []
            for _ in range(6):
                await asyncio.sleep(1.0)
                reads.append(await in_thread(primary_fields, driver))
            acquisitions = [number(r["acquisitions"]) for r in reads]
            assert acquisitions == sorted(acquisitions)
            assert acquisitions[-1] > acquisitions[0] + 20, acquisitions
            assert max(number(r["in_use"]) for r in reads) >= 1, reads
            assert max(number(r["waiting"]) for r in reads) >= 1, reads
            assert max(number(r["rate"]) for r in reads[1:]) > 0, reads
            assert any(r["wait_p99"] != NONE for r in reads), reads
            assert reads[-1]["size"] == "4 / 4"

            shown = fingerprint(REPORT_SQL)  # the text itself is only in the log
            await in_thread(wait_until, driver, lambda d: shown in table_text(d, "slow"))
            await in_thread(wait_until, driver, lambda d: table_text(d, "errors") != "none")
            refused = await in_thread(table_text, driver, "refused")
            assert "acquire timeouts" in refused
            charts = await in_thread(
                driver.find_elements, By.CSS_SELECTOR, f"{PRIMARY} .chart canvas"
            )
            assert len(charts) == 2

            # A few more seconds of history on the charts, then the picture for the README.
            await asyncio.sleep(6)
            screenshot = Path(os.environ.get("PGLAYER_SCREENSHOT") or tmp_path / "live-page.png")
            await in_thread(save_whole_page, driver, screenshot)
            assert (await in_thread(screenshot.stat)).st_size > 10_000
            stop.set()
            await load

            # The session gone, the page stops and says so.
            await in_thread(driver.delete_all_cookies)
            await in_thread(
                wait_until,
                driver,
                lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "stopped",
            )
            assert await in_thread(page_errors, driver) == []
        finally:
            stop.set()
            if load is not None:
                await asyncio.gather(load, return_exceptions=True)
            await in_thread(driver.quit)
