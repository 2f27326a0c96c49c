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
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.sandbox import dev

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
EXAMPLES = Path(__file__).resolve().parents[2] / "policies" / "examples"
NOVA_EVENT = "8f2c1b9e-5d4a-4c3b-9a1e-0f6d2c8b7a51"  # the demo platform's failed invoice.paid event
BROWSER_BUDGET = 240  # seconds for one browser session, whatever hangs
needs_browser = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (scripts/bootstrap does it)")


@asynccontextmanager
async def dev_world(config_path: str, data_dir: Path, pg_admin: str, redis_url: str,
                    monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dev.World]:
    """`opsbot dev --config …` in this process, on the tests' PostgreSQL and Redis."""
    from tests.conftest import fresh_db

    monkeypatch.setenv("DATABASE_URL", fresh_db(pg_admin))
    monkeypatch.setenv("REDIS_URL", redis_url)
    ready: asyncio.Future[dev.World] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(dev.run(config_path=config_path, host="127.0.0.1", port=0, data_dir=data_dir,
                                       ready=ready.set_result, stop=stop))
    done, _ = await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what went wrong
    assert ready.done(), "opsbot dev did not start within 60 s"
    try:
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


@pytest_asyncio.fixture
async def playground(tmp_path: Path, pg_admin: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dev.World]:
    async with dev_world(str(dev.DEFAULT_CONFIG), tmp_path / "dev", pg_admin, redis_url, monkeypatch) as world:
        yield world


@asynccontextmanager
async def browser_page(width: int = 1500, height: int = 900) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                           args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                 "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            context = await browser.new_context(viewport={"width": width, "height": height})
            await context.grant_permissions(["clipboard-read", "clipboard-write"])
            yield await context.new_page()
        finally:
            await browser.close()


async def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000
    return path


@needs_browser
async def test_scale_approve_and_audit_in_the_browser(playground: dev.World) -> None:
    await asyncio.wait_for(nova_in_the_browser(playground), timeout=BROWSER_BUDGET)


async def nova_in_the_browser(world: dev.World) -> None:
    from playwright.async_api import expect

    async with browser_page() as page:
        await page.goto(world.url)
        incident, audit = page.locator("#channel-C0INCIDENT"), page.locator("#channel-C0AUDIT")
        await expect(page.locator("#user option")).to_have_count(5)
        # The tour comes from the config: a requester, the rule's approver, the auditor.
        tour = page.locator("#tour")
        assert world.tour is not None and world.tour.requester is not None
        await expect(tour).to_contain_text(f"As {world.tour.requester.name}")
        await expect(tour).to_contain_text(world.tour.command)
        await expect(tour).to_contain_text("eve")

        # alice, the engineer, asks.
        await page.select_option("#user", "U0ALICE")
        await page.fill("#composer", "/ops scale worker 6")
        await page.press("#composer", "Enter")
        await expect(incident).to_contain_text("nova-worker: 3 → 6 replicas", timeout=15000)
        await expect(incident).to_contain_text("waiting for approval")

        # She cannot approve her own request: the refusal is shown only to her.
        await incident.get_by_role("button", name="Approve").click()
        await expect(incident.locator(".msg.ephemeral")).to_contain_text("cannot approve your own request", timeout=10000)

        # carol, an approver, approves; the card updates; the thread is collapsed under it, with its reply count.
        await page.select_option("#user", "U0CAROL")
        await expect(incident.locator(".msg.ephemeral")).to_have_count(0)
        await incident.get_by_role("button", name="Approve").click()
        await expect(incident).to_contain_text("succeeded", timeout=20000)
        await expect(incident.get_by_role("button", name="Approve")).to_have_count(0)
        replies = incident.locator("button.replies")
        await expect(replies).to_have_count(1)
        await expect(replies).to_contain_text("2 replies", timeout=20000)  # the result, then the rollout
        await expect(incident.locator(".thread")).to_have_count(0)
        await replies.click()
        await expect(incident.locator(".thread")).to_contain_text("nova-worker scaled 3 → 6 replicas")
        await expect(incident.locator(".thread")).to_contain_text("Rollout of nova-worker")  # (one pod was OOM-killed: 5 of 6)

        # eve, the auditor, reads the story in the audit channel.
        await page.select_option("#user", "U0EVE")
        await expect(audit.locator("button.replies")).to_contain_text("replies", timeout=15000)
        await audit.locator("button.replies").click()
        for step in ("requested", "approval given", "approved", "started", "succeeded"):
            await expect(audit).to_contain_text(step, timeout=15000)
        await expect(audit).to_contain_text("hash")

        # The side panel: the demo platform's data, read live; a copy button fills the composer.
        panel = page.locator("#panel")
        event = panel.locator(".item", has_text=NOVA_EVENT)
        await expect(event).to_contain_text("invoice.paid · failed", timeout=10000)
        await expect(panel).to_contain_text("twilio")
        await expect(panel).to_contain_text("billing-webhooks")
        await expect(panel.locator(".item", has_text="nova/nova-worker")).to_contain_text("6 replicas", timeout=10000)
        await event.get_by_role("button", name="replay").click()
        await expect(page.locator("#composer")).to_have_value(f"/ops replay webhook {NOVA_EVENT}")
        assert await page.evaluate("navigator.clipboard.readText()") == f"/ops replay webhook {NOVA_EVENT}"
        await page.select_option("#user", "U0ALICE")
        await expect(incident.locator(".thread")).to_have_count(1)  # the open thread stays open
        await shot(page, "playground.png")

        # 30 messages later the newest is on screen, in its pane; the composer and the picker too.
        await page.fill("#composer", "")
        for i in range(1, 31):
            await page.fill("#composer", f"message {i} of 30")
            await page.press("#composer", "Enter")
            await expect(incident).to_contain_text(f"message {i} of 30")
        newest = incident.locator(".msg", has_text="message 30 of 30")
        await expect(newest).to_be_in_viewport()
        await expect(incident.locator(".msg").first).not_to_be_in_viewport()
        await expect(page.locator("#composer")).to_be_in_viewport()
        await expect(page.locator("#user")).to_be_in_viewport()
        assert await page.evaluate("document.scrollingElement.scrollHeight <= window.innerHeight + 1"), "the page itself scrolls"
        await shot(page, "playground-30-messages.png")

        # Scrolled up to read, the pane stays where it is when a message comes in; "New messages" brings you back.
        await incident.evaluate("el => { el.scrollTop = 0; }")
        await page.evaluate("""fetch('/playground/command', {method: 'POST', headers: {'Content-Type': 'application/json'},
                               body: JSON.stringify({user: 'U0DAN', channel: 'C0INCIDENT', text: 'message 31, from dan'})})""")
        await expect(incident).to_contain_text("message 31, from dan")
        await expect(page.locator("#incident .jump")).to_be_visible()
        assert await incident.evaluate("el => el.scrollTop") < 50
        await expect(incident.locator(".msg", has_text="message 31, from dan")).not_to_be_in_viewport()
        await page.locator("#incident .jump").click()
        await expect(incident.locator(".msg", has_text="message 31, from dan")).to_be_in_viewport()


@needs_browser
async def test_nexus_example_in_the_browser_for_a_user_group_member(tmp_path: Path, pg_admin: str, redis_url: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """policies/examples/nexus.yaml: engineers are only a Slack user group (S0NXSENG). The
    playground makes up its members; one of them asks and gets the answer."""
    async with dev_world(str(EXAMPLES / "nexus.yaml"), tmp_path / "dev", pg_admin, redis_url, monkeypatch) as world:
        members = [p for p in world.people.values() if "S0NXSENG" in p.groups]
        assert len(members) == 2 and all(p.roles == ["engineer"] for p in members)
        assert {"U0NXSSRE1", "U0NXSSRE2", "U0NXSSRE3", "U0NXSIC1", "U0NXSIC2", "U0NXSAUDIT"} <= set(world.people)
        assert world.tour is not None and world.tour.requester in members, "an engineer asks, an SRE approves"
        assert [a.roles for a in world.tour.approvers] == [["sre"]]
        await asyncio.wait_for(nexus_in_the_browser(world, members[0]), timeout=BROWSER_BUDGET)


async def nexus_in_the_browser(world: dev.World, engineer: Any) -> None:
    from playwright.async_api import expect

    async with browser_page() as page:
        await page.goto(world.url)
        await expect(page.locator("#user option")).to_have_count(len(world.people))
        await expect(page.locator("#user")).to_contain_text("engineer-1 (engineer via S0NXSENG)")
        await expect(page.locator("#user")).to_contain_text("sre-1 (sre)")
        assert world.tour is not None
        await expect(page.locator("#tour")).to_contain_text(world.tour.command)
        await page.select_option("#user", engineer.id)
        incident = page.locator("#channel-C0NXSINCIDENT")
        await page.fill("#composer", "/ops status api-gateway")
        await page.press("#composer", "Enter")
        await expect(incident).to_contain_text("api-gateway in nexus-production (production)", timeout=15000)
        await expect(incident).to_contain_text("replicas: 3 desired")
        await expect(incident).not_to_contain_text("usergroups.users.list")
        await expect(page.locator("#panel")).to_contain_text("nexus-production/api-gateway")
        await shot(page, "playground-nexus.png")


async def test_every_example_works_in_the_playground(tmp_path: Path, pg_admin: str, redis_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each policies/examples/*.yaml in `opsbot dev`: its tour's requester gets an answer to a
    read-only command, and its example command opens a request (no browser: the page's endpoints)."""
    import aiohttp

    for example in sorted(EXAMPLES.glob("*.yaml")):
        async with dev_world(str(example), tmp_path / example.stem, pg_admin, redis_url, monkeypatch) as world, \
                aiohttp.ClientSession() as http:
            assert world.tour is not None and world.tour.requester is not None and world.tour.approvers, example.name
            assert not world.notes, world.notes
            user, channel = world.tour.requester.id, world.incident_channel
            alias = next(iter(world.config.deployments))

            async def say(text: str, expect: str, *, user: str = user, channel: str = channel, name: str = example.name) -> None:
                async with http.post(world.url + "playground/command", json={"user": user, "channel": channel, "text": text}) as r:
                    assert r.status == 200, await r.text()
                deadline = time.monotonic() + 15
                while True:
                    async with http.get(world.url + f"playground/state?user={user}") as r:
                        texts = [m["text"] for m in (await r.json())["messages"][channel]]
                    if any(expect in t for t in texts):
                        return
                    assert time.monotonic() < deadline, f"{name}: {text}: {texts[-3:]}"
                    await asyncio.sleep(0.2)

            await say(f"/ops status {alias}", f"{world.config.deployments[alias].name} in {world.config.deployments[alias].namespace}")
            await say(world.tour.command, "waiting for approval")
            async with http.get(world.url + "playground/panel") as r:
                sections = (await r.json())["sections"]
            assert sections and not [s for s in sections if s.get("error")], sections
            env = (tmp_path / example.stem / "env").read_text()
            assert f"export DATABASE_URL={world.env['DATABASE_URL']}" in env and "export KUBECONFIG=" in env
            if example.stem in ("nexus", "nova-rms"):  # the CLI against the playground, with `eval "$(opsbot dev env)"`
                script = (f'eval "$({sys.executable} -m bot dev env --data-dir {tmp_path / example.stem})" && '
                          f"{sys.executable} -m bot audit verify --against-channel")
                verify = await asyncio.create_subprocess_shell(script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                               env={k: v for k, v in os.environ.items() if k not in world.env})
                out = (await asyncio.wait_for(verify.communicate(), timeout=60))[0].decode()
                assert verify.returncode == 0, out
                assert "chain intact" in out and "0 differ, 0 missing" in out and "compared" in out, out
        assert not (tmp_path / example.stem / "env").exists(), "the env file goes with the world"


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
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("opsbot playground: "):
                url = line.split()[2]
            if (url and line.startswith("  export DATABASE_URL=")) or (not line and proc.poll() is not None):
                break
        assert url, "".join(lines)
        import urllib.request

        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and b"opsbot playground" in resp.read()
        assert any(line.startswith("  export DATABASE_URL=") for line in lines), "the banner gives the environment"
        shown = subprocess.run([sys.executable, "-m", "bot", "dev", "env", "--data-dir", str(data_dir)], env=env,
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and f"export KUBECONFIG={data_dir / 'kubeconfig'}" in shown.stdout, shown
        assert _processes_using(data_dir), "PostgreSQL and Redis run from the data directory"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, f"run {run}"
        assert _processes_using(data_dir) == [], "no process left behind"
        assert (data_dir / "postgres" / "data" / "PG_VERSION").exists()
        assert (data_dir / "cluster.json").exists(), "the sandbox cluster is kept for the next run"
        gone = subprocess.run([sys.executable, "-m", "bot", "dev", "env", "--data-dir", str(data_dir)], env=env,
                              capture_output=True, text=True, timeout=60)
        assert gone.returncode == 1 and "no running dev world" in gone.stderr, gone
    shutil.rmtree(root, ignore_errors=True)
