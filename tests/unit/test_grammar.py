"""The command grammar is part of the product: these are the exact forms people type."""

from __future__ import annotations

import pytest

from bot.config import Config
from bot.errors import NotFound, Refused, UsageError
from commands.registry import parse
from tests.conftest import example_config


@pytest.fixture
def cfg() -> Config:
    return example_config("postgresql://x@127.0.0.1/x", "redis://127.0.0.1:1/0", "bull")


@pytest.mark.parametrize(("text", "command", "params"), [
    ("help", "help", {"topic": ""}),
    ("", "help", {"topic": ""}),
    ("status api", "status", {"deployment": "api"}),
    ("scale worker 6", "scale", {"deployment": "worker", "replicas": 6}),
    ("SCALE worker 6", "scale", {"deployment": "worker", "replicas": 6}),
    ("rollback api", "rollback", {"deployment": "api", "to_revision": None}),
    ("rollback api --to-revision 13", "rollback", {"deployment": "api", "to_revision": 13}),
    ("rollback api --to-revision=13", "rollback", {"deployment": "api", "to_revision": 13}),
    ("replay webhook 8f2c1b9e", "replay-webhook", {"event_id": "8f2c1b9e"}),
    ("disable provider twilio", "disable-provider", {"provider": "twilio"}),
    ("enable provider twilio", "enable-provider", {"provider": "twilio"}),
])
def test_commands(cfg: Config, text: str, command: str, params: dict[str, object]) -> None:
    inv = parse(text, cfg)
    assert (inv.command, inv.params) == (command, params)


def test_reason_and_dry_run_with_curly_quotes(cfg: Config) -> None:
    inv = parse("scale worker 6 --reason “INC-142 backlog” --dry-run", cfg)
    assert inv.flags.reason == "INC-142 backlog" and inv.flags.dry_run is True
    inv = parse("scale worker 6 —reason 'em dash from a phone'", cfg)
    assert inv.flags.reason == "em dash from a phone"


@pytest.mark.parametrize(("text", "error", "message"), [
    ("scale worker 0", Refused, "may run 1 to 20 replicas"),
    ("scale worker 21", Refused, "Try `/ops scale worker 20`"),
    ("scale worker -1", UsageError, "replicas must be a whole number written with the digits 0-9, got `-1`"),
    ("scale api 1", Refused, "may run 2 to 12 replicas"),
    ("scale nope 3", NotFound, "Known deployments: api, worker"),
    ("rollback api --to-revision 0", UsageError, "--to-revision takes a revision number"),
    ("rollback api --to-revision", UsageError, "`--to-revision` needs a value"),
    ("scale worker 3 --reason", UsageError, "`--reason` needs a value"),
    ('scale worker 3 --reason ""', UsageError, "`--reason` needs some text"),
    ("replay webhook", UsageError, "needs an event id"),
    ("disable provider", UsageError, "needs a provider name"),
    ("enable", UsageError, "Did you mean: `/ops enable provider <name>`"),
    ("frobnicate", UsageError, "Type `/ops help`"),
])
def test_errors_say_what_to_type(cfg: Config, text: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        parse(text, cfg)
    assert message in str(info.value)


def test_usage_errors_carry_the_usage_line(cfg: Config) -> None:
    with pytest.raises(UsageError) as info:
        parse("scale worker", cfg)
    assert str(info.value).endswith("Usage: `/ops scale <deployment> <replicas>`")
