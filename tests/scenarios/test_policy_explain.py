"""`opsbot policy explain`: the decision and the rule, with a real plan (emulator, platform DB) or
without touching anything (--no-plan)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import EXAMPLE


def explain(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot", "policy", "explain", "--config", str(EXAMPLE), *args],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=60)


def test_explain_with_a_real_plan(kubeconfig: str, platform_db: str, redis_url: str) -> None:
    env = {"KUBECONFIG": kubeconfig, "NOVA_DATABASE_URL": platform_db, "NOVA_REDIS_URL": redis_url}
    proc = explain("--as", "U0ALICE", "/ops rollback api", env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "plan:     nova-api: revision 3 (nova-api=ghcr.io/nova/api:1.4.2) → 2 (nova-api=ghcr.io/nova/api:1.4.1) [production]" in out
    assert "decision: NEEDS APPROVAL — 1 approval from approver" in out
    assert "rule:     production-changes" in out and "  read-only: other commands" not in out

    proc = explain("--as", "U0EVE", "disable provider twilio", env=env)
    assert proc.returncode == 3
    assert "plan:     disable provider twilio: isActive true → false [production]" in proc.stdout
    assert "decision: DENY" in proc.stdout and "your roles: auditor" in proc.stdout

    proc = explain("--as", "U0ALICE", "scale worker 99", env=env)
    assert proc.returncode == 2 and "1 to 20 replicas" in proc.stdout


def test_explain_without_touching_anything() -> None:
    # No KUBECONFIG, no databases: --no-plan decides from the config alone.
    proc = explain("--as", "U0ALICE", "replay webhook 8f2c", "--no-plan", env={"KUBECONFIG": "/nonexistent"})
    assert proc.returncode == 0, proc.stderr
    assert "not read (--no-plan): webhook event 8f2c [production]" in proc.stdout
    assert "→ needs approval" in proc.stdout
