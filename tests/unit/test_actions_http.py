"""The http kind's pieces without Slack: what may go into a URL, how it is encoded, the size caps,
the secrets the runtime scrubs, and the adapter's one-send promise against the fake admin API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import yaml

from bot.action_config import HttpAction
from bot.adapters.http_probe import HttpProbeAdapter
from bot.errors import BackendUnavailable, OutcomeUnknown, UsageError
from commands.actions.http import MAX_BODY, MAX_URL, HttpCommand, header_secrets, segment, url_value_problem
from commands.actions.make import make_command
from tests.admin_api import AdminApi


def action(**extra: object) -> HttpAction:
    spec = {"kind": "http", "summary": "Retry a payout", "environment": "production", "method": "POST",
            "url": "https://admin.example/v1/payouts/{tx}/retry", "headers": {"Authorization": "Bearer s3cr3t-t0ken"},
            "params": {"tx": {"type": "string", "pattern": "[ -~]{1,200}", "max_length": 200}}, **extra}
    return HttpAction.model_validate(spec)


@pytest.mark.parametrize(("value", "problem"), [
    ("TX42", None), ("TX:42@mm+1", None), ("a.b", None),
    ("..", "is `..`, which names another path"), (".", "is `.`, which names another path"),
    ("../etc", "holds `/`"), ("a..b", "holds `..`"), ("a%2Fb", "holds `%`"), ("a\\b", "holds `\\`"),
    ("a?b", "holds `?`"), ("a#b", "holds `#`"), ("a\x00b", "holds \\x00 (not printable ASCII)"),
    ("ТХ42", "holds \\u0422 (not printable ASCII)"), ("４２", "holds \\uff14 (not printable ASCII)"),
])
def test_what_may_go_into_a_url(value: str, problem: str | None) -> None:
    assert url_value_problem(value) == problem


def test_each_value_is_one_encoded_segment() -> None:
    assert segment("TX:42@mm+1") == "TX%3A42%40mm%2B1"
    assert segment("a b&c=d") == "a%20b%26c%3Dd"
    assert segment("..") == "%2E%2E" and segment("x.y") == "x.y"  # a run-time value (reason) of dots only
    assert segment(5000) == "5000"


def test_parse_refuses_a_slash_and_says_what_is_accepted() -> None:
    cmd = make_command("retry-payout", action())
    with pytest.raises(UsageError) as exc:
        cmd.parse(["a/b"], {}, None)  # type: ignore[arg-type]
    assert "may not hold `/`, `\\`, `..`, `%`, `?` or `#`" in str(exc.value) and "Usage: `/ops retry payout <tx>`" in str(exc.value)
    assert cmd.parse(["TX42"], {}, None) == {"tx": "TX42"}  # type: ignore[arg-type]


def test_a_url_or_body_over_the_caps_is_refused() -> None:
    many = {f"p{i}": {"type": "string", "pattern": "[a-z]{1,200}", "max_length": 200} for i in range(12)}
    url = "https://admin.example/v1/" + "/".join(f"{{p{i}}}" for i in range(12))
    cmd = make_command("bulk-thing", action(params=many, url=url))
    assert isinstance(cmd, HttpCommand)
    values = {f"p{i}": "a" * 200 for i in range(12)}
    assert "opsbot sends at most 2,048" in (cmd.too_big(cmd.render_url(values, running=True), None) or "")
    assert len(cmd.render_url(values, running=True)) > MAX_URL
    big = make_command("bulk-body", action(params=many, url="https://admin.example/v1/x",
                                           body={f"k{i}": [f"{{p{j}}}" for j in range(12)] * 3 for i in range(10)}))
    assert isinstance(big, HttpCommand)
    body = big.render_body(values)
    assert body is not None and len(body) > MAX_BODY
    assert "the JSON body would be" in (big.too_big("https://admin.example/v1/x", body) or "")


def test_header_secrets_hold_the_value_and_the_bare_credential() -> None:
    secrets = header_secrets(action(headers={"Authorization": "Bearer s3cr3t-t0ken", "X-Tenant": "{tx}"}))
    assert secrets == ["Bearer s3cr3t-t0ken", "s3cr3t-t0ken"]  # `{tx}` is a parameter, not a secret


def test_the_config_model_refuses_a_hand_set_idempotency_header() -> None:
    from bot.config import parse_config
    from tests.conftest import EXAMPLE

    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["actions"] = {"retry-payout": {**action().model_dump(exclude_defaults=True), "kind": "http",
                                       "headers": {"Idempotency-Key": "x"}}}
    from bot.errors import ConfigError
    with pytest.raises(ConfigError, match="set by opsbot from the request id"):
        parse_config(yaml.safe_dump(raw), source="t.yaml", env={"NOVA_DATABASE_URL": "postgresql://x@y/z",
                                                                 "NOVA_REDIS_URL": "redis://r:6379/0"})


# ---------------------------------------------------------------------------------------------- the adapter


@pytest_asyncio.fixture
async def admin() -> AsyncIterator[AdminApi]:
    api = await AdminApi().start()
    yield api
    await api.stop()


@pytest_asyncio.fixture
async def probes() -> AsyncIterator[HttpProbeAdapter]:
    adapter = HttpProbeAdapter()
    yield adapter
    await adapter.close()


async def test_the_path_is_sent_as_rendered(admin: AdminApi, probes: HttpProbeAdapter) -> None:
    answer = await probes.send("POST", admin.url + "/v1/a%2Fb/%2E%2E/x?c=d%26e", headers={}, body=b"{}", timeout=2,
                               max_bytes=100)
    assert answer.status == 200
    assert admin.requests[0].raw_path == "/v1/a%2Fb/%2E%2E/x?c=d%26e"  # yarl neither decodes nor resolves it


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST"])
async def test_a_connection_dropped_after_sending_is_unknown_and_not_sent_again(admin: AdminApi, probes: HttpProbeAdapter,
                                                                                 method: str) -> None:
    # aiohttp resends PUT and DELETE on a broken connection by itself; an action is never sent twice.
    admin.drop()
    with pytest.raises(OutcomeUnknown, match="may have been acted on"):
        await probes.send(method, admin.url + "/v1/x", headers={}, body=b"{}", timeout=2, max_bytes=100)
    assert len(admin.requests) == 1


async def test_down_is_unavailable_with_nothing_sent(admin: AdminApi, probes: HttpProbeAdapter) -> None:
    url = admin.url
    await admin.down()
    with pytest.raises(BackendUnavailable, match="nothing was sent"):
        await probes.send("POST", url + "/v1/x", headers={}, body=b"{}", timeout=2, max_bytes=100)


async def test_the_answer_is_read_at_most_max_bytes(admin: AdminApi, probes: HttpProbeAdapter) -> None:
    admin.answer(200, "x" * 100_000, content_type="text/plain")
    answer = await probes.send("POST", admin.url + "/v1/x", headers={}, body=None, timeout=2, max_bytes=16 * 1024)
    assert answer.status == 200 and len(answer.body) == 16 * 1024 and answer.truncated
