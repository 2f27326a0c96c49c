"""An action goes every way a built-in goes: `/ops help` and `/ops help <action>`, `--dry-run`,
`opsbot policy check` and `opsbot policy explain` (with a real plan and with --no-plan), rules that
name it or `actions` in `targets:`, and `/ops audit --command <action>`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import yaml

from bot.config import Config
from tests.actions_support import config_with_actions, example_with_actions
from tests.conftest import ALICE, CAROL, EVE, FAILED_EVENT
from tests.harness import Harness

ACTIONS = """
retry-event:
  kind: sql
  words: event retry
  summary: Put a failed webhook event back to pending
  database: app
  params: {event_id: {type: uuid}}
  plan: {query: "SELECT id, status FROM billing_webhook_events WHERE id = {event_id}"}
  statement: "UPDATE billing_webhook_events SET status = 'pending' WHERE id = {event_id} AND status = 'failed'"
"""
RULES = """
- {name: auditors-see-actions, commands: [audit], allow: [auditor]}
- name: platform-actions
  commands: [retry-event]
  targets: [actions]
  allow: [engineer]
  approval: {from: [approver], count: 1, expires: 10m}
"""


@pytest.fixture
def config(platform_db: str, redis_url: str, queue_prefix: str) -> Config:
    return config_with_actions(platform_db, redis_url, queue_prefix, ACTIONS, rules=RULES)


def status(platform_db: str) -> str:
    with psycopg.connect(platform_db) as conn:
        row = conn.execute("SELECT status FROM billing_webhook_events WHERE id = %s", (FAILED_EVENT,)).fetchone()
    assert row is not None
    return str(row[0])


async def test_help_lists_the_action_for_those_who_may_run_it(bot: Harness) -> None:
    _, body = await bot.slash(ALICE, "/ops help")
    reply = await bot.response(containing="opsbot commands") if "opsbot commands" not in body else {"text": body}
    assert "`/ops event retry <event_id>` — Put a failed webhook event back to pending _(needs 1 approval from approver)_" \
        in reply["text"]
    _, body = await bot.slash(ALICE, "/ops help event retry")
    detail = body if "event retry" in body else (await bot.response(containing="event retry"))["text"]
    assert "*`/ops event retry <event_id>`*" in detail and "You may run it; needs 1 approval from approver." in detail
    _, body = await bot.slash(EVE, "/ops help")
    listing = body if "opsbot commands" in body else (await bot.response(containing="opsbot commands"))["text"]
    assert "event retry" not in listing  # the auditor may not run it


async def test_dry_run_shows_the_plan_and_changes_nothing(bot: Harness, platform_db: str) -> None:
    await bot.slash(ALICE, f"/ops event retry {FAILED_EVENT} --dry-run")
    reply = await bot.response(containing="Dry run")
    assert "now: id=" in reply["text"] and "status=failed" in reply["text"]
    assert "policy: allowed by platform-actions; 1 approval from approver required" in reply["text"]
    assert await bot.last_request() is None and status(platform_db) == "failed"
    assert "dry_run" in await bot.audit_events()


async def test_the_audit_search_takes_an_action_name(bot: Harness) -> None:
    await bot.slash(ALICE, f"/ops event retry {FAILED_EVENT}")
    request = await bot.requested()
    await bot.click(CAROL, request.id)
    await bot.state_of(request.id, "succeeded", "failed")
    await bot.slash(EVE, "/ops audit --command retry-event")
    reply = await bot.response(containing=request.id)
    assert "succeeded" in reply["text"]
    _, body = await bot.slash(EVE, "/ops audit --command retry-evnt")
    assert "no command `retry-evnt`" in body and "retry-event" in body


def config_file(tmp_path: Path) -> Path:
    raw = example_with_actions(ACTIONS)
    raw["rules"] += yaml.safe_load(RULES)
    path = tmp_path / "with-actions.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot", *args], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=60)


def test_policy_check_and_explain(tmp_path: Path, platform_db: str, redis_url: str) -> None:
    path = config_file(tmp_path)
    env = {"NOVA_DATABASE_URL": platform_db, "NOVA_REDIS_URL": redis_url, "KUBECONFIG": "/nonexistent"}
    proc = cli("policy", "check", "--config", str(path), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "1 action (retry-event)" in proc.stdout and "warning" not in proc.stdout

    proc = cli("policy", "explain", "--config", str(path), "--as", ALICE, f"/ops event retry {FAILED_EVENT}", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"plan:     event retry {FAILED_EVENT}: Put a failed webhook event back to pending [production]" in proc.stdout
    assert "rule:     platform-actions" in proc.stdout and "NEEDS APPROVAL" in proc.stdout

    proc = cli("policy", "explain", "--config", str(path), "--as", EVE, f"/ops event retry {FAILED_EVENT}", "--no-plan", env={})
    assert proc.returncode == 3 and "DENY" in proc.stdout
    assert status(platform_db) == "failed"

    broken = path.read_text().replace("words: event retry", "words: scale event")
    path.write_text(broken)
    proc = cli("policy", "check", "--config", str(path), env={})
    assert proc.returncode == 1 and "actions.retry-event: what is typed starts with 'scale'" in proc.stderr
