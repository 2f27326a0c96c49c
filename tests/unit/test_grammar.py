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
    ("restart worker", "restart", {"deployment": "worker"}),
    ("history api", "history", {"deployment": "api"}),
    ("pods worker", "pods", {"deployment": "worker"}),
    ("events worker", "events", {"deployment": "worker"}),
    ("logs worker", "logs", {"deployment": "worker", "since_seconds": None, "tail": 200, "previous": False, "grep": "",
                             "container": None}),
    ('logs worker --since 15m --tail 50 --previous --grep "ledger timeout" --container worker', "logs",
     {"deployment": "worker", "since_seconds": 900, "tail": 50, "previous": True, "grep": "ledger timeout", "container": "worker"}),
    ("hpa worker --max 12", "hpa", {"deployment": "worker", "min": None, "max": 12}),
    ("hpa worker --min 2 --max 12", "hpa", {"deployment": "worker", "min": 2, "max": 12}),
    ("backup db-backup", "backup", {"cronjob": "db-backup"}),
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
    ("restart", UsageError, "needs a deployment"),
    ("restart worker api", UsageError, "unexpected argument `api`"),
    ("logs worker --tail 0", UsageError, "1 to 1000 lines"),
    ("logs worker --since 10", UsageError, "duration such as 10m"),
    ("logs worker --grep ''", UsageError, "needs the text"),
    ("logs worker --grep " + "x" * 201, UsageError, "at most 200 characters"),
    ("logs worker --container Worker_1", UsageError, "container name"),
    ("hpa worker --min 0", Refused, "must be 1 to 20"),
    ("hpa worker --max 3 --min 4", UsageError, "above `--max`"),
    ("hpa worker --max ٦", UsageError, "digits 0-9"),
    ("backup nope", NotFound, "Known cronjobs: db-backup"),
    ("backup worker", NotFound, "unknown cronjob `worker`"),
    ("backup ԁb-backup", NotFound, "CYRILLIC SMALL LETTER KOMI DE: type it with plain ASCII letters"),
])
def test_errors_say_what_to_type(cfg: Config, text: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        parse(text, cfg)
    assert message in str(info.value)


def test_usage_errors_carry_the_usage_line(cfg: Config) -> None:
    with pytest.raises(UsageError) as info:
        parse("scale worker", cfg)
    assert str(info.value).endswith("Usage: `/ops scale <deployment> <replicas>`")
