"""`opsbot dev`: the playground in a real browser (Debian's Chromium driven by Playwright), and the
command itself starting and stopping cleanly."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bot.sandbox import dev

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
needs_browser = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (scripts/bootstrap does it)")


@pytest_asyncio.fixture
async def playground(tmp_path: Path, pg_admin: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    from tests.conftest import fresh_db

    monkeypatch.setenv("DATABASE_URL", fresh_db(pg_admin))
    monkeypatch.setenv("REDIS_URL", redis_url)
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(dev.run(config_path=str(dev.DEFAULT_CONFIG), host="127.0.0.1", port=0, data_dir=tmp_path / "dev",
                                       ready=ready.set_result, stop=stop))
    done, _ = await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what went wrong
    yield ready.result()
    stop.set()
    await asyncio.wait_for(task, timeout=60)


@needs_browser
async def test_scale_approve_and_audit_in_the_browser(playground: str) -> None:
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                           args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                 "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = await browser.new_page(viewport={"width": 1500, "height": 900})
        await page.goto(playground)
        incident, audit = page.locator("#channel-C0INCIDENT"), page.locator("#channel-C0AUDIT")
        await expect(page.locator("#user option")).to_have_count(5)

        # alice, the engineer, asks.
        await page.select_option("#user", "U0ALICE")
        await page.fill("#composer", "/ops scale worker 6")
        await page.press("#composer", "Enter")
        await expect(incident).to_contain_text("nova-worker: 3 → 6 replicas", timeout=15000)
        await expect(incident).to_contain_text("waiting for approval")

        # She cannot approve her own request: the refusal is shown only to her.
        await incident.get_by_role("button", name="Approve").click()
        await expect(incident.locator(".msg.ephemeral")).to_contain_text("cannot approve your own request", timeout=10000)

        # carol, an approver, approves; the card updates and the thread has the result.
        await page.select_option("#user", "U0CAROL")
        await expect(incident.locator(".msg.ephemeral")).to_have_count(0)
        await incident.get_by_role("button", name="Approve").click()
        await expect(incident).to_contain_text("succeeded", timeout=20000)
        await expect(incident).to_contain_text("nova-worker scaled 3 → 6 replicas")
        await expect(incident.get_by_role("button", name="Approve")).to_have_count(0)

        # eve, the auditor, reads the story in the audit channel.
        await page.select_option("#user", "U0EVE")
        for step in ("requested", "approval given", "approved", "started", "succeeded"):
            await expect(audit).to_contain_text(step, timeout=15000)
        await expect(audit).to_contain_text("hash")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "playground.png"))
        await browser.close()
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000


def _processes_using(path: Path) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.mark.skipif(shutil.which("runuser") is None and os.geteuid() == 0, reason="needs runuser to run PostgreSQL as root")
def test_opsbot_dev_starts_and_stops_cleanly_and_reuses_its_data() -> None:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="opsbot-devtest-"))  # pytest's tmp_path is private to root; postgres must reach it
    root.chmod(0o755)
    data_dir = root / "devdata"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    for run in (1, 2):  # the second start reuses the data directory of the first
        proc = subprocess.Popen([sys.executable, "-m", "bot", "dev", "--port", "0", "--data-dir", str(data_dir)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = None
        deadline = time.monotonic() + 90
        lines = []
        assert proc.stdout is not None
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("opsbot playground: "):
                url = line.split()[2]
            if not line and proc.poll() is not None:
                break
        assert url, "".join(lines)
        import urllib.request

        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and b"opsbot playground" in resp.read()
        assert _processes_using(data_dir), "PostgreSQL and Redis run from the data directory"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, f"run {run}"
        assert _processes_using(data_dir) == [], "no process left behind"
        assert (data_dir / "postgres" / "data" / "PG_VERSION").exists()
        assert (data_dir / "cluster.json").exists(), "the sandbox cluster is kept for the next run"
    shutil.rmtree(root, ignore_errors=True)
