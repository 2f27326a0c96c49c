"""Each command's inverse (commands/base.py ``Command.inverse``), without I/O: the ``/ops`` text it gives
parses back through the grammar to the opposite change, and the commands that cannot be taken back
say why. The scenario tests (tests/scenarios/test_undo.py) run them end to end."""

from __future__ import annotations

from typing import Any

import pytest

from bot.config import Config
from bot.domain import Plan
from commands.base import NO_SAFE_INVERSE
from commands.registry import command, commands_of, parse
from tests.conftest import example_config


@pytest.fixture
def cfg() -> Config:
    return example_config("postgresql://x@127.0.0.1/x", "redis://127.0.0.1:1/0", "bull")


def stored(cfg: Config, text: str, before: dict[str, Any], after: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The plan as a request stores it (``Plan.to_json``), for the command ``text`` parses to."""
    inv = parse(text, cfg)
    return Plan(command=inv.command, target="t", target_label="t", environment="production", params=inv.params,
                summary=text, before=before, after=after, target_name=str(inv.params.get("deployment", "")), **extra).to_json()


@pytest.mark.parametrize(("text", "before", "after", "inverse", "params"), [
    ("scale worker 6", {"replicas": 3}, {"replicas": 6}, "scale worker 3", {"deployment": "worker", "replicas": 3}),
    ("rollback api", {"revision": 3, "images": ["nova-api=a:1.4.2"]}, {"revision": 2, "images": ["nova-api=a:1.4.1"]},
     "rollback api --to-revision 3", {"deployment": "api", "to_revision": 3}),
    ("hpa worker --max 12", {"min": 2, "max": 8}, {"min": 2, "max": 12}, "hpa worker --min 2 --max 8",
     {"deployment": "worker", "min": 2, "max": 8}),
    ("disable provider twilio", {"isActive": True}, {"isActive": False}, "enable provider twilio", {"provider": "twilio"}),
    ("enable provider twilio", {"isActive": False}, {"isActive": True}, "disable provider twilio", {"provider": "twilio"}),
    ("queue pause billing-webhooks", {"paused": False}, {"paused": True}, "queue resume billing-webhooks",
     {"queue": "billing-webhooks"}),
    ("queue resume billing-webhooks", {"paused": True}, {"paused": False}, "queue pause billing-webhooks",
     {"queue": "billing-webhooks"}),
    ("maintenance on", {"value": False}, {"value": True}, "maintenance off", {"value": "off"}),
])
def test_the_inverse_parses_back_to_the_opposite_change(cfg: Config, text: str, before: dict[str, Any], after: dict[str, Any],
                                                        inverse: str, params: dict[str, Any]) -> None:
    plan = stored(cfg, text, before, after)
    cmd = command(plan["command"], cfg)
    found = cmd.inverse(plan, {})
    assert found.possible and found.text == inverse and found.why
    assert parse(found.text, cfg).params == params
    assert cmd.undo_offer(plan, {}) == {"offered": True, "why": found.why}


@pytest.mark.parametrize("name", ["restart", "backup", "replay-webhook", "queue-retry", "queue-retry-failed", "queue-clean",
                                  "db-cancel", "db-terminate", "outbox-retry", "webhook-reset", "webhook-requeue"])
def test_commands_that_cannot_be_taken_back_say_why(cfg: Config, name: str) -> None:
    cmd = command(name, cfg)
    found = cmd.inverse({"params": {}, "before": {}, "after": {}}, {})
    assert not found.possible and found.why
    assert name == "restart" or NO_SAFE_INVERSE in found.why
    assert cmd.undo_offer({"params": {}, "before": {}, "after": {}}, {}) == {"offered": False, "why": found.why}


def test_every_mutating_command_is_accounted_for(cfg: Config) -> None:
    """A new mutating command gets no Undo until it declares an inverse (the default says it has none)."""
    with_inverse = {"scale", "rollback", "hpa", "disable-provider", "enable-provider", "queue-pause", "queue-resume", "maintenance"}
    for cmd in commands_of(cfg):
        if cmd.mutating and cmd.name not in with_inverse:
            assert not cmd.inverse({"params": {}, "before": {}, "after": {}}, {}).possible, cmd.name


def test_a_flag_value_that_is_none_of_its_words_has_no_inverse(cfg: Config) -> None:
    plan = stored(cfg, "maintenance on", {"value": None}, {"value": True})
    found = command("maintenance", cfg).inverse(plan, {})
    assert not found.possible and "none of its values" in found.why


def test_moved_on_names_what_changed(cfg: Config) -> None:
    plan = stored(cfg, "scale worker 6", {"replicas": 3}, {"replicas": 6})
    fresh = Plan(command="scale", target="t", target_label="t", environment="production",
                 params={"deployment": "worker", "replicas": 3}, summary="", before={"replicas": 4}, after={"replicas": 3})
    assert command("scale", cfg).moved_on(plan, fresh, "r-abcdefgh") == "worker is at 4 replicas now, not the 6 that `r-abcdefgh` set"
    same = Plan(command="scale", target="t", target_label="t", environment="production",
                params={"deployment": "worker", "replicas": 3}, summary="", before={"replicas": 6}, after={"replicas": 3})
    assert command("scale", cfg).moved_on(plan, same, "r-abcdefgh") is None
