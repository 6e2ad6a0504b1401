"""The web UI in a real headless Chromium (Playwright, the system's browser) against
``hpo-sync run`` as a real process, syncing from the simulator: sign-in, filters and paging,
an experiment's timeline, the live feed, escaping, workspace limits, sign-out — and
screenshots of every page (light and dark, desktop and phone) for people to look at.

Never downloads a browser: without /usr/bin/chromium (or Playwright) the test is skipped,
saying why — unless ``CI`` is set, where it fails instead.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from daemon_harness import Daemons, config_text, sim_post, sim_truth, wait_db

from hpo_sync.sim.server import SimOptions, Simulator

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WS1, WS2 = "100001", "100002"
TOKEN_ALL = "e2e-token-all-0123456789abcdef"
TOKEN_WS1 = "e2e-token-ws1-0123456789abcdef"
XSS = "<script>alert(1)</script>"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _why_not() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


_REASON = _why_not()
if _REASON is not None:
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run in CI: {_REASON}", pytrace=False)
    pytest.skip(f"browser tests skipped: {_REASON}", allow_module_level=True)

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Daemons]:
    ds = Daemons(tmp_path)
    try:
        yield ds
    finally:
        await ds.cleanup()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


def _tokens(tmp_path: Path) -> str:
    (tmp_path / "token-all").write_text(TOKEN_ALL, encoding="utf-8")
    (tmp_path / "token-ws1").write_text(TOKEN_WS1, encoding="utf-8")
    return f"""
[[api.tokens]]
name = "everyone"
token_file = "{tmp_path / "token-all"}"

[[api.tokens]]
name = "team-one"
token_file = "{tmp_path / "token-ws1"}"
workspaces = ["{WS1}"]
"""


async def _sign_in(page: Page, base: str, token: str) -> None:
    await page.goto(f"{base}/ui/login")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{base}/ui/")


class Shots:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def take(self, page: Page, name: str) -> None:
        await page.screenshot(path=str(self.folder / f"{name}.png"), full_page=True)


async def test_the_web_ui_in_a_browser(
    tmp_path: Path, daemons: Daemons, browser: Browser, screenshot_dir: Path
) -> None:
    shots = Shots(screenshot_dir)
    async with Simulator(SimOptions(experiments=160, workspaces=2, seed=11, speed=0)) as sim:
        await sim_post(
            sim.base_url,
            "/_sim/mutate",
            {"create": {"WorkspaceId": WS1, "Name": XSS, "Status": "RUNNING"}},
        )
        db = tmp_path / "mirror.db"
        cfg = tmp_path / "config.toml"
        cfg.write_text(
            config_text(sim_url=sim.base_url, db=db, workspaces=[WS1, WS2], hot_interval_s=1)
            + _tokens(tmp_path),
            encoding="utf-8",
        )
        d = await daemons.start(cfg)
        base = await d.api_url()
        for ws in (WS1, WS2):
            await wait_db(
                db,
                "SELECT 1 FROM sync_runs WHERE workspace_id = ? AND status = 'ok'",
                [ws],
                daemon=d,
            )
        truth = await sim_truth(sim.base_url)
        assert any(e["Name"] == XSS for e in truth["experiments"])

        dialogs: list[str] = []
        desktop = await browser.new_context(viewport=DESKTOP, color_scheme="light")
        page = await desktop.new_page()
        page.on(
            "dialog",
            lambda dlg: (dialogs.append(dlg.message), asyncio.ensure_future(dlg.dismiss())),
        )
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)

        # Nothing without a session: every page sends the browser to the sign-in form.
        for path in ("/ui/", "/ui/experiments", "/ui/changes", "/ui/outbox"):
            await page.goto(base + path)
            assert "/ui/login" in page.url, path
        await shots.take(page, "login-desktop-light")
        await page.get_by_label("API token").fill("not-a-token")
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("alert")).to_have_text("That token is not valid.")

        # Sign in; the overview shows both workspaces with their charts.
        await _sign_in(page, base, TOKEN_ALL)
        await expect(page.locator("section.card")).to_have_count(2)
        await expect(page.locator("svg.chart[role=img]")).to_have_count(2)
        await shots.take(page, "overview-desktop-light")

        # Filter the list through the form: one workspace, 25 a page.
        await page.goto(base + "/ui/experiments")
        await page.get_by_label(WS1, exact=True).check()
        await page.get_by_label("Per page").select_option("25")
        await page.get_by_role("button", name="Apply").click()
        await page.wait_for_url("**/ui/experiments?workspace=100001*")
        assert "limit=25" in page.url and "name=" not in page.url  # blank fields dropped
        workspaces = await page.locator("#experiments td[data-label=Workspace]").all_inner_texts()
        assert len(workspaces) == 25 and set(workspaces) == {WS1}
        first_page = await page.locator("#experiments a.exp-link").all_inner_texts()
        await shots.take(page, "experiments-desktop-light")
        # Page through it with the cursor; the URL can be shared.
        await page.get_by_role("link", name="Next page").click()
        await page.wait_for_url("**cursor=*")
        second_page = await page.locator("#experiments a.exp-link").all_inner_texts()
        assert second_page and not set(second_page) & set(first_page)
        shared = page.url
        other = await desktop.new_page()
        await other.goto(shared)
        assert await other.locator("#experiments a.exp-link").all_inner_texts() == second_page
        await other.close()

        # A bad filter: the API's message, on a 400 page.
        resp = await page.goto(base + "/ui/experiments?status=running")
        assert resp is not None and resp.status == 400
        await expect(page.get_by_role("alert")).to_contain_text("status:")

        # The experiment named <script>…: shown as text, and nothing runs.
        await page.goto(base + "/ui/experiments?name=script")
        await expect(page.locator("#experiments a.exp-link")).to_have_text([XSS])
        await page.locator("#experiments a.exp-link").click()
        await expect(page.locator("h1#exp-name")).to_have_text(XSS)
        assert dialogs == []

        # An experiment with history: its timeline, fields and collapsed config texts.
        await page.goto(base + f"/ui/experiments?workspace={WS1}&status=RUNNING")
        await page.locator("#experiments a.exp-link").first.click()
        await expect(page.locator("svg#timeline")).to_be_visible()
        await expect(page.locator("svg#timeline rect.band")).not_to_have_count(0)
        assert not await page.locator("details.config").first.get_attribute("open")
        await shots.take(page, "experiment-desktop-light")

        # The feed: a status change upstream appears without a reload.
        await page.goto(base + "/ui/changes")
        await page.evaluate("window.__noReload = 42")
        await shots.take(page, "changes-desktop-light")
        victim = next(
            e
            for e in truth["experiments"]
            if e["WorkspaceId"] == WS2 and e["Status"] == "RUNNING" and e["Name"] != XSS
        )
        await sim_post(
            sim.base_url,
            "/_sim/mutate",
            {"experiment_id": victim["ExperimentId"], "status": "FAILED"},
        )
        row = page.locator("#feed-rows tr.fresh-row", has_text=victim["Name"])
        await expect(row.first).to_be_visible(timeout=20_000)
        await expect(row.first).to_contain_text("FAILED")
        assert await page.evaluate("window.__noReload") == 42
        await expect(page.locator("#feed-status")).to_contain_text("new change")

        await page.goto(base + "/ui/outbox")
        await expect(page.get_by_role("heading", name="Alert outbox")).to_be_visible()
        await shots.take(page, "outbox-desktop-light")

        # Dark mode and a phone: the same pages, for people to look at.
        state = await desktop.storage_state()
        victim_url = f"{base}/ui/experiments/{victim['ExperimentId']}"
        for label, kwargs in (
            ("desktop-dark", {"viewport": DESKTOP, "color_scheme": "dark"}),
            ("phone-light", {"viewport": PHONE, "color_scheme": "light", "is_mobile": True}),
            ("phone-dark", {"viewport": PHONE, "color_scheme": "dark", "is_mobile": True}),
        ):
            ctx = await browser.new_context(storage_state=state, **kwargs)  # type: ignore[arg-type]
            p2 = await ctx.new_page()
            for name, path in (
                ("overview", "/ui/"),
                ("experiments", f"/ui/experiments?workspace={WS1}"),
                ("experiment", victim_url.removeprefix(base)),
                ("changes", "/ui/changes"),
                ("outbox", "/ui/outbox"),
            ):
                await p2.goto(base + path)
                await shots.take(p2, f"{name}-{label}")
            if label.startswith("phone"):
                # Nothing wider than the screen: tables become cards.
                width = await p2.evaluate("document.documentElement.scrollWidth")
                assert width <= PHONE["width"], width
            await ctx.close()

        # Sign out: the session is gone, the pages are closed again.
        await page.get_by_role("button", name="Sign out").click()
        await page.wait_for_url("**/ui/login")
        await page.goto(base + "/ui/")
        assert "/ui/login" in page.url
        await desktop.close()

        # A token limited to one workspace sees only that one, everywhere.
        limited = await browser.new_context(viewport=DESKTOP)
        lp = await limited.new_page()
        await _sign_in(lp, base, TOKEN_WS1)
        await expect(lp.locator("section.card")).to_have_count(1)
        await expect(lp.locator("section.card h2")).to_contain_text(WS1)
        await lp.goto(base + "/ui/experiments?limit=500")
        assert set(await lp.locator("#experiments td[data-label=Workspace]").all_inner_texts()) == {
            WS1
        }
        resp = await lp.goto(victim_url)
        assert resp is not None and resp.status == 404
        await lp.goto(base + "/ui/changes")
        assert WS2 not in await lp.locator("#feed-rows").inner_text()
        resp = await lp.goto(base + f"/ui/experiments?workspace={WS2}")
        assert resp is not None and resp.status == 403
        await limited.close()

        assert dialogs == []
        assert not [e for e in errors if "Content Security Policy" in e], errors
        started = time.monotonic()
        code, _ = await d.stop()
        assert code == 0 and time.monotonic() - started < 10
