"""Property-based fuzzing of Slack payload decoding, through signed HTTP into the running bot.

Hypothesis generates slash-command bodies and interactivity payloads (valid-looking, truncated,
wrongly typed, hostile strings, forged ids); each is signed like Slack signs and POSTed to
``/slack/events``. Properties: never a 5xx, a slash command always gets HTTP 200 with an answer,
and every slash command leaves at least one audit row. The hash chain still verifies afterwards.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.sandbox.kube_apiserver import KubeApiServer
from tests.conftest import ALICE, CAROL, EVE, MALLORY
from tests.harness import Harness

HOSTILE = st.one_of(st.sampled_from(["", "\x00", "U0ALICE\x00", "C0INCIDENT'--", "r-zzzzzzzz", "r-\u0430bcdefgh", "\u202e",
                                     "<@U0CAROL|carol>", "1700000000.000100", "not.a.ts", "-1", "６"]),
                    st.integers(2000, 6000).map(lambda n: "A" * n))
TEXTS = st.one_of(st.sampled_from(["help", "status worker", "scale worker 6", "scale worker ６", "rollback api --to-revision --1",
                                   "pending", "cancel r-zzzzzzzz", "audit --page 99999999999999999999", "scale worker 3 --dry-run",
                                   "replay webhook \x00", "disable provider twilio --reason a --reason b"]),
                  st.text(max_size=60), HOSTILE)
USERS = st.one_of(st.sampled_from([ALICE, CAROL, EVE, MALLORY]), HOSTILE)
CHANNELS = st.one_of(st.just(Harness.INCIDENT), HOSTILE)
SCALAR = st.one_of(st.none(), st.integers(), st.booleans(), HOSTILE)


def slash_body(user: Any, channel: Any, text: Any, url: str) -> str:
    return urlencode({"command": "/ops", "text": text, "user_id": user, "channel_id": channel, "user_name": "x",
                      "team_id": "T0FAKE", "response_url": url, "trigger_id": "t"})


ACTION = st.fixed_dictionaries({"action_id": st.sampled_from(["opsbot_approve", "opsbot_deny", "opsbot_acknowledge", "other"]),
                                "value": st.one_of(HOSTILE, SCALAR), "type": st.just("button")})
BLOCK_ACTIONS = st.fixed_dictionaries({
    "type": st.just("block_actions"),
    "user": st.one_of(st.fixed_dictionaries({"id": USERS, "username": st.text(max_size=10)}), SCALAR),
    "channel": st.one_of(st.fixed_dictionaries({"id": CHANNELS}), SCALAR),
    "container": st.one_of(st.fixed_dictionaries({"message_ts": HOSTILE, "channel_id": CHANNELS}), SCALAR),
    "actions": st.one_of(st.lists(ACTION, min_size=1, max_size=2), SCALAR),
    "team": st.just({"id": "T0FAKE"}),
})


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def _fuzz(data: st.DataObject, bot: Harness, loop: asyncio.AbstractEventLoop, sent: list[str]) -> None:
    def call(body: str) -> tuple[int, str]:
        return asyncio.run_coroutine_threadsafe(bot.post_signed(body), loop).result(timeout=30)

    if data.draw(st.booleans(), label="slash?"):
        user, channel, text = data.draw(USERS), data.draw(CHANNELS), data.draw(TEXTS)
        status, answer = call(slash_body(user, channel, text, bot.slack.response_url("fuzz")))
        assert status == 200, (user, channel, text, status, answer)
        sent.append(text)
    else:
        payload = data.draw(st.one_of(BLOCK_ACTIONS, st.dictionaries(st.text(max_size=8), SCALAR, max_size=3)))
        raw = data.draw(st.one_of(st.just(json.dumps(payload)), st.text(max_size=30)), label="payload text")
        status, answer = call(urlencode({"payload": raw}))
        assert status < 500, (raw, status, answer)


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")  # the bot's loop uses `random` meanwhile
async def test_signed_fuzzed_payloads_never_crash_and_every_command_is_recorded(bot: Harness, kube: KubeApiServer) -> None:
    loop = asyncio.get_running_loop()
    sent: list[str] = []
    await asyncio.to_thread(_fuzz, bot=bot, loop=loop, sent=sent)
    assert len(sent) >= 20, "enough slash commands were tried"

    async def recorded() -> int | None:
        n = len(await bot.runtime.audit.log.rows())
        return n if n >= len(sent) else None

    await bot.eventually(recorded, timeout=30, what=f"at least {len(sent)} audit rows")
    report = await bot.runtime.audit.log.verify()
    assert report.ok, report.summary()
