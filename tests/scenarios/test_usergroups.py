"""A Slack user group the policy names but Slack does not know is a configuration error, not an
outage: the person is told what is wrong and who fixes it, the group grants nothing, other roles
still work, it is logged once and counted. Slack that cannot answer (5xx) still fails closed.
`opsbot policy check` asks Slack (the fake here) about the groups when it has a token."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import pytest

from bot.config import Config, parse_config
from bot.sandbox.kube_apiserver import KubeApiServer
from bot.sandbox.slack_api import FakeSlack
from tests.conftest import ALICE, CAROL
from tests.harness import Harness

GROUPIE, NEXUS_ENGINEER = "U0GROUPIE", "U0NXSDEV"

POLICY = """
slack: {audit_channel: C0AUDIT, usergroup_cache: 1s}
roles:
  engineer: {users: [U0ALICE], usergroups: [S0ONCALL, S0NXSENG]}
  approver: {users: [U0CAROL]}
environments:
  production: {kube_context: nova-prod}
deployments:
  worker: {environment: production, namespace: nova, name: nova-worker, replicas: {min: 1, max: 20}}
rules:
  - {name: read-only, commands: [status], allow: [engineer, approver]}
  - name: production-changes
    commands: [scale]
    allow: [engineer]
    approval: {from: [approver], count: 1}
"""

CONFIG_MESSAGE = ("The policy names Slack user group S0NXSENG, which does not exist in this workspace; roles from it are not "
                  "granted. Ask the platform team to fix `roles.engineer.usergroups` in the opsbot config.")


@pytest.fixture
def config() -> Config:
    return parse_config(POLICY, env={})


@pytest.fixture(autouse=True)
def usergroups(slack: FakeSlack) -> None:
    slack.usergroups = {"S0ONCALL": [GROUPIE]}  # S0NXSENG is not there: the fake answers no_such_subteam, as Slack does


def replicas(kube: KubeApiServer) -> int:
    return int(kube.cluster.get("apps/deployments", "nova", "nova-worker")["spec"]["replicas"])


def counted(bot: Harness, group: str, error: str) -> float:
    return float(bot.runtime.metrics.usergroup_config_errors.labels(group, error)._value.get())


async def test_an_unknown_user_group_is_a_config_error_and_other_groups_still_grant(
        bot: Harness, kube: KubeApiServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="bot.adapters.directory")
    await bot.slash(NEXUS_ENGINEER, "/ops scale worker 4")
    reply = (await bot.response(containing="Not allowed"))["text"]
    assert CONFIG_MESSAGE in reply
    assert "unavailable" not in reply and "try again" not in reply and "no_such_subteam" not in reply
    row = next(r for r in await bot.runtime.audit.log.rows() if r["event"] == "policy_denied")
    assert row["result"]["usergroup_problems"] == {"S0NXSENG": "no_such_subteam"}
    # Someone in the group Slack knows still gets the role; nothing asks Slack again within the cache period.
    await bot.slash(GROUPIE, "/ops scale worker 4")
    request = await bot.requested()
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed")
    assert done.state.value == "succeeded" and replicas(kube) == 4
    assert [c["usergroup"] for c in bot.slack.calls_to("usergroups.users.list")] == ["S0NXSENG", "S0ONCALL"]
    # `/ops help` says it too; the roles someone has by user id are unaffected.
    await bot.slash(ALICE, "/ops help")
    assert CONFIG_MESSAGE in (await bot.response(containing="opsbot commands"))["text"]
    # Asked again once the cache runs out: counted again, but logged once.
    await asyncio.sleep(1.1)
    await bot.slash(NEXUS_ENGINEER, "/ops status worker")
    await bot.eventually(lambda: _asked(bot, "S0NXSENG", 2), what="a second lookup")
    await bot.response(containing="Not allowed")
    asked = [c["usergroup"] for c in bot.slack.calls_to("usergroups.users.list")].count("S0NXSENG")
    assert counted(bot, "S0NXSENG", "no_such_subteam") == asked >= 2  # each answer of Slack's is counted
    logged = [r for r in caplog.records if "S0NXSENG" in r.getMessage()]
    assert len(logged) == 1 and "no_such_subteam" in logged[0].getMessage()


async def test_slack_that_cannot_answer_still_fails_closed(bot: Harness, kube: KubeApiServer) -> None:
    bot.slack.down = True  # every Web API call gets HTTP 503
    await bot.slash(GROUPIE, "/ops scale worker 5")
    reply = (await bot.response(containing="Refused"))["text"]
    assert "Slack user groups is unavailable: usergroups.users.list(S0NXSENG) failed: HTTP 503" in reply
    assert "try again when it is back" in reply and "does not exist" not in reply
    assert "\n" not in reply  # not slack_sdk's multi-line message
    bot.slack.down = False
    await bot.slash(GROUPIE, "/ops scale worker 5")
    assert (await bot.requested()).summary == "nova-worker: 3 → 5 replicas"
    assert replicas(kube) == 3


async def test_a_missing_scope_is_a_config_error_of_its_own(bot: Harness) -> None:
    bot.slack.fail_methods["usergroups.users.list"] = "missing_scope"
    await bot.slash(GROUPIE, "/ops scale worker 4")
    reply = (await bot.response(containing="Not allowed"))["text"]
    assert ("opsbot's Slack app lacks the `usergroups:read` scope, so it cannot see who is in the Slack user groups "
            "S0NXSENG, S0ONCALL; roles from them are not granted.") in reply
    assert "try again" not in reply
    assert len(bot.slack.calls_to("usergroups.users.list")) == 1  # the same for every group: asked once
    await bot.slash(ALICE, "/ops scale worker 4")  # an engineer by user id is unaffected
    assert (await bot.requested()).requester.user_id == ALICE
    assert counted(bot, "S0ONCALL", "missing_scope") == 1


async def _asked(bot: Harness, group: str, times: int) -> bool | None:
    return True if [c["usergroup"] for c in bot.slack.calls_to("usergroups.users.list")].count(group) >= times else None


async def _policy_check(path: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "policy", "check", "--config", str(path),
                                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_policy_check_asks_slack_about_the_user_groups(slack: FakeSlack, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    code, out = await _policy_check(path, {})
    assert code == 0, out
    assert "slack: the 2 user groups the policy names were not checked against Slack (SLACK_BOT_TOKEN is not set" in out
    before = out.count("warning: ")
    assert "S0NXSENG" not in out
    code, out = await _policy_check(path, {"SLACK_BOT_TOKEN": slack.token, "SLACK_API_URL": slack.api_url})
    assert code == 0, out
    assert (f"warning: {path}: roles.engineer.usergroups: Slack user group S0NXSENG does not exist in this Slack workspace "
            "(usergroups.users.list: no_such_subteam); nobody gets a role from it") in out
    assert "S0ONCALL" not in out and "slack: 1 of the 2 user groups the policy names can be used" in out
    assert out.count("warning: ") == before + 1
    slack.down = True
    code, out = await _policy_check(path, {"SLACK_BOT_TOKEN": slack.token, "SLACK_API_URL": slack.api_url})
    assert code == 0, out
    assert "slack: the 2 user groups the policy names could not be checked: Slack is unavailable" in out and "HTTP 503" in out
