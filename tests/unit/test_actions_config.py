"""`actions:`: what the config accepts, what it refuses (with the key and the reason), and how the
typed parameters of an action refuse hostile values before anything is read."""

from __future__ import annotations

import re
import shlex
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.action_config import RESERVED_WORDS, render_json, render_text, template_parts
from bot.config import Config, config_warnings, parse_config
from bot.errors import ConfigError, UsageError, UserError
from commands.registry import COMMANDS, META_USAGE, command, commands_of, parse
from tests.actions_support import config_with_actions

BASE = """
environments: {prod: {}}
roles: {eng: {users: [U1]}, approver: {users: [U2]}}
databases: {app: {url: "postgresql://x@127.0.0.1:1/x", environment: prod}}
queues: {hooks: {redis_url: "redis://127.0.0.1:1/0", name: hooks, environment: prod}}
redis: {cache: {url: "redis://127.0.0.1:1/0", environment: prod}}
"""
RULE = "\nrules: [{commands: [%s], allow: [eng], approval: {from: [approver]}}]\n"

SQL = """
actions:
  retry-outbox:
    kind: sql
    words: outbox retry
    summary: Put a failed outbox event back to pending
    database: app
    params:
      event_id: {type: uuid}
      attempts: {type: int, min: 1, max: 5, default: "1"}
    plan: {query: "SELECT id, status FROM outbox WHERE id = {event_id}"}
    statement: "UPDATE outbox SET status = 'pending', attempts = {attempts} WHERE id = {event_id} AND status LIKE 'fail%'"
"""


def load(actions: str, rule_for: str = "retry-outbox") -> Config:
    return parse_config(BASE + actions + RULE % rule_for, source="x.yaml", env={})


def test_a_valid_sql_action_loads_and_becomes_a_command() -> None:
    config = load(SQL)
    cmd = command("retry-outbox", config)
    assert cmd.usage == "/ops outbox retry <event_id> [<attempts>]"
    assert cmd.mutating and cmd in commands_of(config) and cmd not in COMMANDS
    assert not [w for w in config_warnings(config) if "retry-outbox" in w]


@pytest.mark.parametrize(("actions", "message"), [
    (SQL.replace("database: app", "database: nope"), "actions.retry-outbox.database: 'nope' is not defined under databases"),
    (SQL.replace("{event_id}\"}", "{evnt_id}\"}"), "actions.retry-outbox.plan.query: {evnt_id} is not a parameter"),
    (SQL.replace("words: outbox retry", "words: scale outbox"), "starts with 'scale', a built-in command's word"),
    (SQL.replace("words: outbox retry", "words: 'Outbox Retry!'"), "one to three lowercase words"),
    (SQL.replace("retry-outbox:", "status:"), "'status' is the name of a built-in command"),
    (SQL.replace("{type: uuid}", "{type: string}"), "a string parameter needs a `pattern`"),
    (SQL.replace("{type: uuid}", "{type: string, pattern: '[a-z'}"), "is not a regular expression"),
    (SQL.replace("{type: uuid}", "{type: enum}"), "an enum parameter needs `values"),
    (SQL.replace("event_id: {type: uuid}", "request_id: {type: uuid}"), "parameter name 'request_id' is reserved"),
    (SQL.replace('default: "1"', "min: 9"), "max (5) must be >= min (9)"),
    (SQL.replace("kind: sql", "kind: shell"), "actions.retry-outbox: Input tag 'shell' found using 'kind' does not match"),
    (SQL.replace("    summary: Put a failed outbox event back to pending\n", ""), "actions.retry-outbox.summary: Field required"),
    (SQL.replace("WHERE id = {event_id} AND", "WHERE id = {event_id AND"), "lone '{'"),
    (SQL.replace("{event_id}\"}", "{request_id}\"}"), "plan.query: {request_id} is not a parameter"),
    (SQL + "  retry-outbox-2:\n    kind: sql\n    words: outbox\n    summary: s\n    database: app\n    statement: 'SELECT 1'\n",
     "start with the same words"),
])
def test_bad_actions_are_refused_with_the_key_and_the_reason(actions: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(actions)
    assert message in str(info.value)


def test_a_rule_may_name_an_action_and_an_unknown_name_is_still_refused() -> None:
    assert load(SQL).rules[0].commands == ("retry-outbox",)
    with pytest.raises(ConfigError, match=r"rules\[0\].commands\[0\]: unknown command 'retry-outbx'"):
        load(SQL, rule_for="retry-outbx")


def test_an_action_no_rule_allows_is_a_warning() -> None:
    config = parse_config(BASE + SQL, env={})
    assert "command 'retry-outbox': no rule allows anyone to run it" in config_warnings(config)


HTTP = """
actions:
  retry-payout:
    kind: http
    words: payout retry
    summary: Retry a payout
    environment: prod
    params: {transaction_id: {type: uuid}}
    method: POST
    url: "https://admin.example/v1/payouts/{transaction_id}/retry"
    headers: {Authorization: "Bearer s3cr3t"}
"""


@pytest.mark.parametrize(("change", "message"), [
    (("https://admin.example", "https://user:pw@admin.example"), "may not carry credentials"),
    (("https://admin.example", "https://{transaction_id}.example"), "may not be in the host"),
    (("https://admin.example", "ftp://admin.example"), "is not an http:// or https:// URL"),
    (("/retry\"", "/retry#x\""), "#fragment"),
    (("Bearer s3cr3t", "Bearer {nope}"), "headers: {nope} is not a parameter"),
    (("method: POST", "method: GET"), "method"),
    (("headers: {Authorization", "headers: {Idempotency-Key: x, Authorization"), "is set by opsbot from the request id"),
])
def test_http_actions_are_checked(change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(HTTP.replace(*change), rule_for="retry-payout")
    assert message in str(info.value)


def test_flag_and_queue_actions_are_checked() -> None:
    flag = """
actions:
  maintenance:
    kind: flag
    summary: Maintenance mode
    database: app
    table: feature_flags
    key: support.maintenance_mode
    values: {on: true, off: false}
    revert_after: 2h
"""
    assert load(flag, "maintenance").actions["maintenance"].revert_after == 7200  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="give either `database:`"):
        load(flag.replace("    database: app\n", ""), "maintenance")
    with pytest.raises(ConfigError, match="not a plain SQL identifier"):
        load(flag.replace("feature_flags", "flags; DROP TABLE x"), "maintenance")
    with pytest.raises(ConfigError, match="a Redis flag stores strings"):
        load(flag.replace("database: app\n    table: feature_flags", "redis: cache"), "maintenance")
    queue = """
actions:
  resend-receipt:
    kind: queue
    summary: Send a receipt again
    params: {order: {type: int, min: 1}}
    job: {queue: hooks, name: receipt, data: {orderId: "{order}"}, job_id: "receipt-{order}", attempts: 3,
          backoff: {type: exponential, delay: 5s}}
"""
    assert load(queue, "resend-receipt").actions["resend-receipt"].job.backoff.delay == 5  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"job\.queue: 'nope' is not defined under queues"):
        load(queue.replace("queue: hooks", "queue: nope"), "resend-receipt")
    with pytest.raises(ConfigError, match="may not be empty or contain ':'"):
        load(queue.replace("receipt-{order}", "receipt:{order}"), "resend-receipt")


def test_every_builtin_first_word_is_reserved_for_builtins() -> None:
    assert {c.words[0] for c in COMMANDS} | set(META_USAGE) <= set(RESERVED_WORDS)


def test_templates() -> None:
    assert list(template_parts("a/{id}/{{x}}")) == [("a/", None), ("", "id"), ("/", None), ("{", None), ("x", None), ("}", None)]
    assert render_text("/p/{id}/r", {"id": "a b"}, encode=lambda v: str(v).replace(" ", "%20")) == "/p/a%20b/r"
    assert render_json({"n": "{n}", "s": "id {n}", "l": ["{n}"]}, {"n": 7}) == {"n": 7, "s": "id 7", "l": [7]}


# ---------------------------------------------------------------------------------------------- parameters


TWO_ACTIONS = """
retry-outbox:
  kind: sql
  words: outbox retry
  summary: Retry an outbox event
  database: app
  params:
    event_id: {type: uuid}
    tries: {type: int, min: 1, max: 5, default: "1"}
  statement: "UPDATE billing_webhook_events SET status = 'pending' WHERE id = {event_id}"
tag-order:
  kind: sql
  words: order tag
  summary: Tag an order
  database: app
  params:
    order: {type: string, pattern: '[A-Z]{2}-[0-9]{1,8}', max_length: 11}
    tag: {type: enum, values: [fraud, vip]}
  statement: "UPDATE orders SET tag = {tag} WHERE ref = {order}"
"""


@pytest.fixture
def cfg() -> Config:
    return config_with_actions("postgresql://x@127.0.0.1:1/x", "redis://127.0.0.1:1/0", "bull", TWO_ACTIONS)


UUID = "8f2c1b9e-5d4a-4c3b-9a1e-0f6d2c8b7a51"


@pytest.mark.parametrize(("text", "params"), [
    (f"outbox retry {UUID}", {"event_id": UUID, "tries": 1}),
    (f"outbox retry {UUID.upper()} 3", {"event_id": UUID, "tries": 3}),
    (f"outbox retry {UUID.replace('-', '')}", {"event_id": UUID, "tries": 1}),
    ("order tag AB-123 VIP", {"order": "AB-123", "tag": "vip"}),
])
def test_typed_values(cfg: Config, text: str, params: dict[str, Any]) -> None:
    assert parse(text, cfg).params == params


@pytest.mark.parametrize(("text", "message"), [
    ("outbox retry", "needs the event_id (a UUID)"),
    (f"outbox retry {UUID} 3 4", "unexpected argument `4`"),
    ("outbox retry 8f2c", "`8f2c` is not a UUID"),
    (f"outbox retry {UUID} 9", "9 is outside 1–5"),
    (f"outbox retry {UUID} ６", "must be written with the digits 0-9"),
    (f"outbox retry {UUID} -1", "must be a whole number"),
    (f"outbox retry {UUID.replace('a', 'а')}", "U+0430 CYRILLIC SMALL LETTER A"),
    ("order tag AB-123 vіp", "is not one of `fraud`, `vip`"),
    ("order tag АB-123 vip", "U+0410 CYRILLIC CAPITAL LETTER A"),
    ("order tag \"AB-1'; DROP TABLE orders;--\" vip", "at most 11 characters, got 27"),
    ("order tag \"AB-1';--\" vip", "is not text matching `[A-Z]{2}-[0-9]{1,8}`"),
    ("order tag ../etc vip", "is not text matching"),
    ("order tag AB-%2F vip", "is not text matching"),
    ("order tag " + "A" * 1500 + " vip", "characters long"),
])
def test_hostile_values_are_refused_with_what_to_type(cfg: Config, text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(text, cfg)
    assert message in str(info.value)
    assert "/ops" in str(info.value)  # the usage line comes with it


def test_a_200_kb_value_is_refused_without_being_echoed(cfg: Config) -> None:
    from commands.actions.base import check_value

    p = cfg.actions["tag-order"].params["order"]
    with pytest.raises(UsageError) as info:
        check_value("order", p, "A" * 200_000, "/ops order tag <order> <tag>")
    assert "200,000 characters" in str(info.value) and len(str(info.value)) < 400


def test_control_characters_inside_a_quoted_value_are_refused(cfg: Config) -> None:
    from commands.actions.base import check_value

    p = cfg.actions["tag-order"].params["order"]
    for bad in ("AB-1\x00", "AB-1\n2", "AB\u202e-1"):
        with pytest.raises(UsageError, match="retype it without that character"):
            check_value("order", p, bad, "usage")


# ---------------------------------------------------------------------------------------------- fuzzing


FUZZ_CFG = config_with_actions("postgresql://x@127.0.0.1:1/x", "redis://127.0.0.1:1/0", "bull", TWO_ACTIONS)
VALUES = st.one_of(st.text(max_size=40), st.sampled_from(["AB-1", "vip", "VIP", "3", "٣", "AB-１", "8f2c1b9e-5d4a-4c3b-9a1e-0f6d2c8b7a51",
                                                          "../x", "%2F", "'; --", "\x00", "\u202e", "vіp"]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(words=st.sampled_from(["outbox retry", "order tag"]), values=st.lists(VALUES, max_size=4))
def test_an_action_answers_any_value_with_typed_params_or_a_usage_error(words: str, values: list[str]) -> None:
    text = " ".join([words, *(shlex.quote(v) for v in values)])
    try:
        inv = parse(text, FUZZ_CFG)
    except UserError as exc:
        assert str(exc).strip()
        return
    params = inv.params
    if inv.command == "tag-order":
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{1,8}", params["order"]) and params["tag"] in ("fraud", "vip")
    else:
        assert str(uuid.UUID(params["event_id"])) == params["event_id"] and 1 <= params["tries"] <= 5


def test_an_enum_word_no_url_could_take_is_refused_when_the_config_loads() -> None:
    bad = HTTP.replace("params: {transaction_id: {type: uuid}}", "params: {transaction_id: {type: enum, values: [ok, a..b]}}")
    with pytest.raises(ConfigError, match=r"params\.transaction_id: 'a\.\.b' contains '\.\.'"):
        load(bad, rule_for="retry-payout")


def test_a_secret_with_braces_is_literal_text_in_an_action_and_still_scrubbed() -> None:
    from commands.actions.http import header_secrets

    yaml_text = BASE + HTTP.replace("Bearer s3cr3t", "Bearer ${ADMIN_TOKEN}") + RULE % "retry-payout"
    config = parse_config(yaml_text, env={"ADMIN_TOKEN": "ab{c}d-{transaction_id}"})
    action = config.actions["retry-payout"]
    assert render_text(action.headers["Authorization"], {"transaction_id": "X"}) == "Bearer ab{c}d-{transaction_id}"  # type: ignore[union-attr]
    assert "ab{c}d-{transaction_id}" in header_secrets(action)  # type: ignore[arg-type]
    # Outside `actions:` a value is used as it is.
    assert parse_config(BASE.replace("postgresql://x@127.0.0.1:1/x", "${DB}"), env={"DB": "postgresql://{x}"}).databases["app"].url \
        == "postgresql://{x}"


@pytest.mark.parametrize(("text", "problem"), [
    ("UPDATE t SET a = 1 WHERE id = {id}", None),
    ("UPDATE t SET a = 1 WHERE id = {id};  ", None),
    ("UPDATE t SET note = 'a; b' WHERE id = {id}", None),
    ("UPDATE t SET note = $x$a; b$x$ WHERE id = {id} -- a; comment", None),
    ("SELECT 1 /* ; */ FROM t", None),
    ("SELECT 1; COMMIT; UPDATE t SET a = 99", "more than one statement"),
    ("UPDATE t SET a = 1; DELETE FROM t", "more than one statement"),
    ("UPDATE t SET note = 'open", "quote is not closed"),
])
def test_a_template_is_one_statement(text: str, problem: str | None) -> None:
    from bot.action_config import statements_problem

    found = statements_problem(text)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_a_second_statement_is_refused_when_the_config_loads() -> None:
    # psycopg uses the simple protocol when nothing is bound: `SELECT 1; COMMIT; UPDATE …` would write
    # from a "READ ONLY" plan query, before anyone approved.
    bad = SQL.replace('query: "SELECT id, status FROM outbox WHERE id = {event_id}"', 'query: "SELECT 1; COMMIT; UPDATE outbox SET a = 99"')
    with pytest.raises(ConfigError, match=r"plan\.query: it holds more than one statement"):
        load(bad)


def test_a_secret_may_not_be_in_an_http_actions_url_or_body() -> None:
    url = HTTP.replace("https://admin.example/v1", "https://hooks.example/${HOOK_SECRET}")
    with pytest.raises(ConfigError, match=r"url: \$\{HOOK_SECRET\} has no default.*put a secret in `headers:`"):
        parse_config(BASE + url + RULE % "retry-payout", env={"HOOK_SECRET": "abc"})
    body = HTTP + '    body: {token: "${HOOK_SECRET}"}\n'
    with pytest.raises(ConfigError, match=r"body\.token: \$\{HOOK_SECRET\} has no default"):
        parse_config(BASE + body + RULE % "retry-payout", env={"HOOK_SECRET": "abc"})
    ok = HTTP.replace("https://admin.example", "${ADMIN_URL:-https://admin.example}")
    assert parse_config(BASE + ok + RULE % "retry-payout", env={}).actions["retry-payout"].url.startswith("https://admin")  # type: ignore[union-attr]
    base = HTTP.replace("https://admin.example", "${ADMIN_URL}")  # the base of the URL: a location
    assert parse_config(BASE + base + RULE % "retry-payout", env={"ADMIN_URL": "https://a.example"}).actions


def test_url_checks_also_run_in_policy_check_without_the_variables() -> None:
    host = HTTP.replace("https://admin.example/v1/payouts", "${ADMIN_URL:-https://admin.example}/v1/{transaction_id}.x/payouts")
    assert parse_config(BASE + host + RULE % "retry-payout", env={}, missing_env=[]).actions  # a default is filled in
    bad = HTTP.replace("https://admin.example/v1/payouts", "${ADMIN_URL:-https://admin.example}#x/payouts")
    with pytest.raises(ConfigError, match="#fragment"):
        parse_config(BASE + bad + RULE % "retry-payout", env={}, missing_env=[])


def test_a_job_id_may_not_be_one_of_the_queues_own_keys() -> None:
    from bot.action_config import QueueJob
    from bot.errors import Refused
    from commands.actions.jobs import render_job

    job = QueueJob(queue="q", name="n", job_id="{ref}")
    for reserved in ("marker", "meta", "Delayed", "pc", "events"):
        with pytest.raises(Refused, match="queue's own key names"):
            render_job(job, {"ref": reserved})
    assert render_job(job, {"ref": "order-7"})["jobId"] == "order-7"
