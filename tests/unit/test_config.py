"""Config errors name the file, the key and what is wrong; policy check warns about what will bite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import config_warnings, load_config, parse_config
from bot.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.parametrize(("yaml", "message"), [
    ("deployments: {w: {environment: prod, namespace: n, name: w}}",
     "x.yaml: deployments.w.environment: environment 'prod' is not defined under environments"),
    ("environments: {p: {}}\ndeployments: {w: {environment: p, namespace: n, name: w, replicas: {min: 5, max: 2}}}",
     "x.yaml: deployments.w.replicas: max (2) must be >= min (5)"),
    ("rules: [{commands: [deploy], allow: []}]", "x.yaml: rules[0].commands[0]: unknown command 'deploy'"),
    ("rules: [{commands: [scale], allow: [sre]}]", "x.yaml: rules[0]: role 'sre' is not defined under roles"),
    ("roles: {a: {users: [U1]}}\nrules: [{commands: [scale], allow: [a], approval: {from: [a], expires: soon}}]",
     "x.yaml: rules[0].approval.expires: 'soon' is not a duration"),
    ("environments: {p: {}}\ndatabases: {app: {url: '${NOPE_URL}', environment: p}}",
     "x.yaml: databases.app.url: environment variable NOPE_URL is not set"),
    ("environments: {p: {}}\ndatabases: {app: {url: x, environment: p}}\nproviders: {database: app, table: 'Provider; DROP'}",
     "is not a plain SQL identifier"),
    ("slack: {audit_chanel: C1}", "x.yaml: slack.audit_chanel: Extra inputs are not permitted"),
    ("- just\n- a list", "x.yaml: the top level must be a mapping"),
    ("roles: {a: [unclosed", "x.yaml: not valid YAML"),
])
def test_errors_name_file_key_and_problem(yaml: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml, source="x.yaml", env={})
    assert message in str(info.value)


@pytest.mark.parametrize("path", sorted((ROOT / "policies").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_policies_are_valid_and_every_rule_can_match(path: Path) -> None:
    config = load_config(path, env={}, missing_env=[])
    if path.parent.name == "examples":  # the examples are meant to be copied: they must be clean
        assert config_warnings(config) == []


def test_warnings_for_colon_queue_names_empty_roles_and_impossible_quorums() -> None:
    config = parse_config("""
environments: {p: {}}
deployments: {w: {environment: p, namespace: n, name: w}}
roles: {eng: {users: [U1]}, approver: {users: [U2]}, nobody: {users: []}}
queues: {billing: {redis_url: redis://x, name: "billing:webhooks", environment: p}}
rules:
  - {commands: [scale], allow: [eng], approval: {from: [approver], count: 2}}
""", env={})
    warnings = "\n".join(config_warnings(config))
    assert "queues.billing.name: 'billing:webhooks' contains ':'" in warnings and "'billing-webhooks'" in warnings
    assert "roles.nobody: has no members" in warnings
    assert "needs 2 approvals but only 1 user can approve" in warnings
    assert "command 'rollback': no rule allows anyone to run it" in warnings


def test_policy_check_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{commands: [scale], allow: [sre]}]\n")
    proc = subprocess.run([sys.executable, "-m", "bot", "policy", "check", "--config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and f"{bad}: rules[0]: role 'sre' is not defined" in proc.stderr
    good = tmp_path / "good.yaml"
    good.write_text("environments: {p: {}}\nqueues: {q: {redis_url: redis://x, name: 'a:b', environment: p}}\n")
    proc = subprocess.run([sys.executable, "-m", "bot", "policy", "check", "--config", str(good)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "contains ':'" in proc.stdout and "OK" in proc.stdout


def test_rules_that_can_never_match_are_reported() -> None:
    config = parse_config("""
slack: {allowed_channels: [C1]}
environments: {production: {}, staging: {}}
roles: {eng: {users: [U1]}, approver: {users: [U2, U3]}, ic: {users: []}}
deployments: {worker: {environment: production, namespace: n, name: w}}
rules:
  - {name: ok, commands: [scale], allow: [eng]}
  - {name: staging-only, commands: [scale], environments: [staging], allow: [eng]}
  - {name: wrong-condition, commands: [rollback], when: {replicas_above: 3}, approval: {from: [approver]}}
  - {name: elsewhere, commands: [scale], channels: [C9], allow: [eng]}
  - {name: no-webhooks, commands: [replay-webhook], allow: [eng]}
  - {name: glass, commands: [rollback], allow: [eng], break_glass: [ic]}
""", env={})
    warnings = "\n".join(config_warnings(config))
    assert "rules[0] (ok)" not in warnings
    assert "rules[1] (staging-only): can never match: scale: no configured target is in environments ['staging']" in warnings
    assert "rules[2] (wrong-condition): can never match: rollback: `when: replicas_above` applies to scale only" in warnings
    assert "rules[3] (elsewhere): can never match: scale: its channels are all outside slack.allowed_channels" in warnings
    assert "rules[4] (no-webhooks): can never match: replay-webhook: no target for `replay-webhook` is configured" in warnings
    assert "rules[5] (glass): break-glass role 'ic' has no members" in warnings


def test_policy_check_without_the_secrets_warns_instead_of_failing() -> None:
    proc = subprocess.run([sys.executable, "-m", "bot", "policy", "check", "--config", str(ROOT / "policies/examples/nova-rms.yaml")],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "databases.app.url: environment variable NOVA_DATABASE_URL is not set (needed when opsbot runs)" in proc.stdout


def test_queues_are_rule_targets_by_key_or_kind() -> None:
    base = """
environments: {p: {}}
roles: {eng: {users: [U1]}, approver: {users: [U2]}}
deployments: {worker: {environment: p, namespace: n, name: w}}
queues: {email: {redis_url: redis://x, name: email, environment: p}}
"""
    config = parse_config(base + "rules:\n  - {commands: [queue-stats, queue-failed], targets: [email], allow: [eng]}\n"
                          "  - {commands: [queue-retry, queue-retry-failed, queue-pause, queue-resume, queue-clean], targets: [queues],"
                          " allow: [eng], approval: {from: [approver]}}\n", env={})
    assert not [w for w in config_warnings(config) if "queue" in w]
    with pytest.raises(ConfigError) as info:
        parse_config(base + "rules: [{commands: [queue-pause], targets: [sms], allow: [eng]}]\n", source="x.yaml", env={})
    assert "rules[0].targets: 'sms' is not a deployment, cronjob or queue alias" in str(info.value)
    assert "(names: worker, email)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config(base.replace("queues: {email:", "queues: {worker:"), source="x.yaml", env={})
    assert "queues.worker: the key is also a deployment or cronjob alias" in str(info.value)
    warnings = "\n".join(config_warnings(parse_config(base, env={})))
    assert "command 'queue-stats': no rule allows anyone to run it" in warnings
    assert "command 'queue-clean': no rule allows anyone to run it" in warnings


EXAMPLE_ENV = {"NOVA_DATABASE_URL": "postgresql://nova@db/nova", "NOVA_REDIS_URL": "redis://cache:6379/0",
               "NEXUS_DATABASE_URL": "postgresql://nexus@db/nexus", "NEXUS_REDIS_URL": "redis://redis:6379/0",
               "NEPXY_DATABASE_URL": "postgresql://nepxy@db/nepxy", "NEXNUM_DATABASE_URL": "postgresql://nexnum@db/nexnum",
               "NEXNUM_REDIS_URL": "redis://redis:6379/0", "NB_REDIS_URL": "redis://redis:6379/0",
               "NEPXY_ADMIN_TOKEN": "not-a-real-token"}


@pytest.mark.parametrize("path", sorted((ROOT / "policies" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_policy_check_of_each_example_with_its_secrets_set_is_clean(path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bot", "policy", "check", "--config", str(path)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **EXAMPLE_ENV})
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stdout, proc.stdout
