"""The playground's world from a config (bot/sandbox/world.py): environment, people, tour; and the
CLI on a closed pipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import Config, load_config
from bot.sandbox import world
from bot.sandbox.kube_apiserver import Cluster

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "policies" / "examples"


def example(name: str) -> Config:
    env = {var: ("postgresql://x@127.0.0.1/db" if "DATABASE" in var else "redis://127.0.0.1/0" if "REDIS" in var else
                 "http://127.0.0.1:1") for var in world.env_refs((EXAMPLES / f"{name}.yaml").read_text())}
    return load_config(EXAMPLES / f"{name}.yaml", env=env)


def test_every_variable_of_the_examples_gets_a_demo_value() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        values, meaning, notes = world.demo_env(path.read_text(), environ={}, database=lambda var: f"postgresql://db/{var}",
                                                redis_url="redis://r", http_url="http://h")
        assert notes == [], path.name
        assert set(values) == set(world.env_refs(path.read_text())), path.name
    values, meaning, _ = world.demo_env((EXAMPLES / "nexus.yaml").read_text(), environ={"NEXUS_REDIS_URL": "redis://mine"},
                                        database=lambda var: f"postgresql://db/{world.demo_database_name(var)}",
                                        redis_url="redis://r", http_url="http://h")
    assert values == {"NEXUS_DATABASE_URL": "postgresql://db/opsbot_demo_nexus", "NEXUS_GATEWAY_URL": "http://h"}
    assert meaning["NEXUS_REDIS_URL"].startswith("yours")
    assert world.demo_database_name("NOVA_DATABASE_URL") == "opsbot_demo_platform"


def test_a_variable_the_playground_cannot_place_is_named_in_a_note() -> None:
    text = "slack: {audit_channel: C0A}\nenvironments: {prod: {}}\nrules: []\nlimits: {max_open_requests_per_user: 3}\n" \
           "# ${NOT_HERE}\n"
    assert world.demo_env(text, environ={}, database=str, redis_url="", http_url="")[2] == []  # a comment is not a use
    weird = "slack: {audit_channel: '${AUDIT_CHANNEL}'}\n"
    _, _, notes = world.demo_env(weird, environ={}, database=str, redis_url="", http_url="")
    assert len(notes) == 1 and "AUDIT_CHANNEL (used at slack.audit_channel)" in notes[0]


def test_people_include_made_up_members_of_each_user_group() -> None:
    people, groups = world.cast(example("nexus"))
    assert groups == {"S0NXSENG": ["U0NXSENG1", "U0NXSENG2"]}
    assert [p.label for p in people.values()] == [
        "sre-1 (sre)", "sre-2 (sre)", "sre-3 (sre)", "incident-commander-1 (incident-commander)",
        "incident-commander-2 (incident-commander)", "auditor-1 (auditor)",
        "engineer-1 (engineer via S0NXSENG)", "engineer-2 (engineer via S0NXSENG)"]
    nexnum, groups = world.cast(example("nexnum"))
    assert nexnum["U0NEXONCALL1"].label == "engineer-3 (engineer via S0NEXONCALL)"
    nova, _ = world.cast(example("nova-rms"))
    assert nova["U0BOTH"].label == "bo (engineer, approver)" and nova["U0ALICE"].label == "alice (engineer)"


@pytest.mark.parametrize("name", ["nova-rms", "nexus", "nexnum", "nearbybazaar", "nepxy"])
def test_the_tour_is_one_the_policy_allows(name: str) -> None:
    config = example(name)
    people, _ = world.cast(config)
    channel = config.slack.allowed_channels[0] if config.slack.allowed_channels else "C0INCIDENT"
    tour = world.make_tour(config, people, channel=channel)
    assert tour is not None and tour.requester is not None and tour.approvers and tour.auditor is not None
    alias = next(iter(config.deployments))
    assert tour.command.startswith(f"/ops scale {alias} ")
    lo, hi = config.deployments[alias].replicas.min, config.deployments[alias].replicas.max
    assert lo <= int(tour.command.split()[-1]) <= hi
    assert tour.requester not in tour.approvers
    assert not set(tour.requester.roles) & set(tour.approvers[0].roles), "one role asks, another approves"


def test_the_nova_tour_and_the_nexus_tour() -> None:
    config = example("nova-rms")
    cluster = Cluster()
    world.seed_targets(cluster, config)
    tour = world.make_tour(config, world.cast(config)[0], channel="C0INCIDENT", cluster=cluster)
    assert tour is not None and tour.requester and tour.auditor
    assert (tour.command, tour.requester.name, [a.name for a in tour.approvers], tour.auditor.name, tour.rule) == (
        "/ops scale api 5", "alice", ["carol"], "eve", "production-changes")
    assert tour.steps()[0] == "as alice (engineer), type   /ops scale api 5"
    config = example("nexus")
    tour = world.make_tour(config, world.cast(config)[0], channel="C0NXSINCIDENT")
    assert tour is not None and tour.requester and tour.auditor
    assert (tour.requester.label, [a.name for a in tour.approvers], tour.auditor.name) == (
        "engineer-1 (engineer via S0NXSENG)", ["sre-1"], "auditor-1")


def test_seeding_the_cluster_adds_what_the_config_names_once() -> None:
    config = example("nexus")
    cluster = Cluster()
    added = world.seed_targets(cluster, config)
    assert added == ["deployment user-service (nexus-production/user-service)",
                     "deployment api-gateway (nexus-production/api-gateway)",
                     "deployment user-service-stg (nexus-staging/user-service)", "cronjob db-backup (nexus-production/postgres-backup)"]
    assert world.seed_targets(cluster, config) == []
    d = cluster.get("apps/deployments", "nexus-production", "api-gateway")
    assert d["spec"]["replicas"] == 3 and d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"


def test_a_closed_stdout_ends_quietly() -> None:
    """`opsbot … | head`: no BrokenPipeError traceback, the exit status of a process killed by SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "bot", "policy", "check", "--config", str(EXAMPLES / "nova-rms.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# ---------------------------------------------------------------------------------------------- the examples' actions


def test_the_actions_variables_get_the_demo_http_server_and_a_made_up_token() -> None:
    text = (EXAMPLES / "nepxy.yaml").read_text()
    values, meaning, notes = world.demo_env(text, environ={}, database=lambda var: f"postgresql://db/{var}",
                                            redis_url="redis://r", http_url="http://h")
    assert notes == []
    assert values["NEPXY_ADMIN_URL"] == "http://h" and values["NEPXY_ADMIN_TOKEN"] == world.DEMO_TOKEN
    assert "made-up" in meaning["NEPXY_ADMIN_TOKEN"]
    assert world.env_kind("actions.payout-retry.headers.Authorization") == "token"
    assert world.env_kind("actions.payout-retry.body.note") is None  # only a header is taken for a token
    # A token already in the environment is the user's and is kept.
    values, meaning, _ = world.demo_env(text, environ={"NEPXY_ADMIN_TOKEN": "mine"}, database=str, redis_url="", http_url="")
    assert "NEPXY_ADMIN_TOKEN" not in values and meaning["NEPXY_ADMIN_TOKEN"].startswith("yours")


def _seeded_example(name: str, pg_admin: str, redis_url: str) -> Config:
    """The example with each database variable on a fresh database and Redis on the tests' Redis, as
    `opsbot dev` points them at its own."""
    from tests.conftest import fresh_db

    env = {}
    for var, path in world.env_refs((EXAMPLES / f"{name}.yaml").read_text()).items():
        kind = world.env_kind(path)
        env[var] = (fresh_db(pg_admin) if kind == "database" else redis_url if kind == "redis" else
                    world.DEMO_TOKEN if kind == "token" else "http://127.0.0.1:1")
    return load_config(EXAMPLES / f"{name}.yaml", env=env)


def _rows(url: str, query: str) -> list[tuple[object, ...]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return list(conn.execute(query).fetchall())


def test_the_dev_world_seeds_the_nova_maintenance_flag_once(pg_admin: str, redis_url: str) -> None:
    config = _seeded_example("nova-rms", pg_admin, redis_url)
    db = config.databases["app"].url
    seeded = world.seed_platform(config)
    assert "flag table feature_flags for maintenance (support.maintenance_mode)" in seeded
    assert _rows(db, "SELECT key, enabled FROM feature_flags") == [("support.maintenance_mode", False)]
    # The flag as the playground left it survives a restart (seeding never resets it).
    assert _rows(db, "UPDATE feature_flags SET enabled = true RETURNING key") == [("support.maintenance_mode",)]
    world.seed_platform(config)
    assert _rows(db, "SELECT key, enabled FROM feature_flags") == [("support.maintenance_mode", True)]


async def test_the_dev_world_seeds_what_the_nepxy_payout_retry_plans_on(pg_admin: str, redis_url: str) -> None:
    from bot.adapters.platform_db import PlatformDbAdapter

    config = _seeded_example("nepxy", pg_admin, redis_url)
    assert "demo rows in app.mobile_money_payouts" in world.seed_platform(config)
    assert world.seed_platform(config) and len(_rows(config.databases["payouts"].url,
                                                       "SELECT 1 FROM app.mobile_money_payouts")) == 2  # not twice
    # The example's own plan query runs on the demo table: the columns the seed names exist.
    spec = config.actions["payout-retry"]
    assert spec.kind == "http" and spec.plan is not None and spec.plan.database is not None
    rows = await PlatformDbAdapter(config).action_rows(spec.plan.database, spec.plan.query,
                                                       {"transaction_id": "tx-20260301-0042"}, max_rows=5, timeout=5)
    assert [(r["status"], r["attempt_count"], r["next_retry_at"] is not None) for r in rows] == [("SENT", 3, True)]
    # Hostile text stays a bound value: it matches nothing and breaks nothing.
    assert await PlatformDbAdapter(config).action_rows(spec.plan.database, spec.plan.query,
                                                       {"transaction_id": "x' OR '1'='1"}, max_rows=5, timeout=5) == []


async def test_the_dev_world_seeds_the_nexnum_provider_rows_the_override_switches(pg_admin: str, redis_url: str) -> None:
    from bot.adapters.platform_db import PlatformDbAdapter

    config = _seeded_example("nexnum", pg_admin, redis_url)
    seeded = world.seed_platform(config)
    assert "flag table Provider for provider-override" in seeded
    spec = config.actions["provider-override"]
    assert spec.kind == "flag" and world.flag_keys(spec) == []  # `{provider}`: the table's own rows
    names = [r[0] for r in _rows(config.databases["app"].url, 'SELECT name FROM "Provider" ORDER BY 1')]
    assert names == ["provider-a", "provider-b", "provider-c"]
    assert await PlatformDbAdapter(config).read_flag("app", (spec.schema_, str(spec.table)), spec.key_column, spec.value_column,
                                                     "provider-b") == (True, True)


def test_the_dev_world_seeds_the_nearbybazaar_feature_flags_in_redis(pg_admin: str, redis_url: str) -> None:
    import redis

    config = _seeded_example("nearbybazaar", pg_admin, redis_url)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = ["flags:erp-sync", "flags:supplier-sync", "flags:captcha"]
    try:
        client.delete(*keys)
        client.set("flags:captcha", "0")  # one someone switched off in an earlier run stays off
        assert world.seed_platform(config) == [f"flags for feature in Redis ({', '.join(keys)})"]
        assert [client.get(k) for k in keys] == ["1", "1", "0"]
    finally:
        client.delete(*keys)


async def test_the_demo_platform_answers_and_records_the_admin_calls() -> None:
    import aiohttp
    from aiohttp import web

    from bot.sandbox.demo import ADMIN_KEY, health_app

    app = health_app()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/v1/admin/mobile-money/payouts/tx-1/retry",
                                 headers={"Authorization": f"Bearer {world.DEMO_TOKEN}", "Idempotency-Key": "opsbot-r-1"},
                                 json={"why": "stuck"}) as r:
                assert r.status == 200 and (await r.json())["ok"] is True
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:  # the health endpoints are as before
                assert r.status == 200 and await r.json() == {"ok": True}
        [call] = app[ADMIN_KEY]
        assert (call["method"], call["path"], call["body"]) == ("POST", "/v1/admin/mobile-money/payouts/tx-1/retry",
                                                                '{"why": "stuck"}')
        assert call["headers"]["Authorization"] == "<set>" and call["headers"]["Idempotency-Key"] == "opsbot-r-1"
    finally:
        await runner.cleanup()
