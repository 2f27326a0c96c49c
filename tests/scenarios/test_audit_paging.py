"""`/ops audit --before #N` (issue 13): keyset paging through signed slash commands. "Next:" offers
`--before <the last row shown>`, which shows exactly the next 15 rows (the same as `--page 2`),
`--page` keeps working, hostile values get a usage error that says what to type, two auditors
paging at once see the same pages while rows are appended, and a database that is down is named."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bot.config import Config
from bot.sandbox.slack_api import FakeSlack
from tests.conftest import EVE
from tests.faults.proxy import TcpProxy
from tests.harness import Harness

ROWS = 40


async def fill(bot: Harness, n: int = ROWS, command: str = "scale") -> list[int]:
    seqs = []
    for i in range(n):
        row = await bot.runtime.audit.log.append(
            event="requested", actor_id="U0ALICE", actor_name="alice", channel_id="C0INCIDENT", request_id=f"r-page-{i}",
            command_text=f"{command} worker {i}", plan={"command": command, "summary": f"paging row {i}", "target_name": "worker"},
            result=None, post=False)
        seqs.append(int(row["seq"]))
    return seqs


def shown(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"`#(\d+)`", text)]


def next_command(text: str) -> str | None:
    m = re.search(r"Next: `(/ops [^`]+)`", text)
    return m.group(1) if m else None


async def ask(bot: Harness, text: str, containing: str = "newest first", user: str = EVE) -> str:
    await bot.slash(user, text)
    return str((await bot.response(containing=containing))["text"])


async def test_next_gives_before_the_last_row_shown_and_that_is_exactly_the_next_page(bot: Harness) -> None:
    seqs = await fill(bot)
    newest_first = sorted(seqs, reverse=True)
    first = await ask(bot, "/ops audit --command scale")
    assert shown(first) == newest_first[:15]
    assert next_command(first) == f"/ops audit --command scale --before {newest_first[14]}"
    second = await ask(bot, next_command(first) or "")
    assert shown(second) == newest_first[15:30], "exactly the next 15 rows"
    assert f"older than #{newest_first[14]}" in second
    assert shown(await ask(bot, "/ops audit --command scale --page 2")) == newest_first[15:30], "--page still works, same rows"
    third = await ask(bot, next_command(second) or "")
    assert shown(third) == newest_first[30:] and next_command(third) is None, "the last page offers no next one"
    # `#N` as the rows are shown works too, and so does --before=N; the filter stays in Next
    assert shown(await ask(bot, f"/ops audit --command scale --before #{newest_first[14]}")) == newest_first[15:30]
    assert shown(await ask(bot, f"/ops audit --before={newest_first[0]} --command scale")) == newest_first[1:16]
    # every search is itself on record, with the --before it was given
    rows = await bot.runtime.audit.log.rows()
    queries = [r["result"]["audit_query"] for r in rows if r["event"] == "read" and r["result"]]
    assert {"command": "scale", "page": 1, "before": newest_first[14]} in queries


async def test_before_deeper_than_the_pages_opsbot_counts_still_answers(bot: Harness) -> None:
    """--page stops at 66 pages (the count's cap); --before seeks, however deep."""
    seqs = await fill(bot, 20)
    text = await ask(bot, f"/ops audit --before {seqs[3]}")
    assert shown(text)[:3] == sorted(seqs[:3], reverse=True)
    assert "deeper than opsbot pages" in await ask(bot, "/ops audit --page 67", containing="deeper")


@pytest.mark.parametrize(("value", "said"), [
    ("-5", "must be a whole number written with the digits 0-9, got `-5`"),
    ("abc", "must be a whole number written with the digits 0-9, got `abc`"),
    ("0", "1 or more; got `0`"),
    ("99999999999999999999", "is too large"),
    ("9223372036854775808", "is too large"),  # one past PostgreSQL's bigint
    ("１２３", "must be written with the digits 0-9; `１２３` uses U+FF11 FULLWIDTH DIGIT ONE. Type `123`."),
    ("#", "must be a whole number"),
    ("1e3", "must be a whole number"),
    ("12\u200b3", "invisible character"),
])
async def test_hostile_before_values_get_a_usage_error(bot: Harness, value: str, said: str) -> None:
    await fill(bot, 3)
    status, ack = await bot.slash(EVE, f"/ops audit --before {value}")
    assert status == 200 and said in ack, ack
    assert "Usage" in ack or "invisible" in ack, ack


async def test_before_with_nul_or_twice_or_with_page_is_refused(bot: Harness) -> None:
    await fill(bot, 3)
    for text, said in [("/ops audit --before 1\x002", "invisible character"), ("/ops audit --before 3 --before 2", "given twice"),
                       ("/ops audit --before 3 --page 2", "not both"), ("/ops audit --before", "needs a value")]:
        status, ack = await bot.slash(EVE, text)
        assert status == 200 and said in ack, (text, ack)


async def test_two_auditors_paging_while_rows_are_appended_see_stable_pages(bot: Harness) -> None:
    """Keyset pages do not shift when new rows arrive (an OFFSET page would)."""
    seqs = await fill(bot)
    newest_first = sorted(seqs, reverse=True)
    first = await ask(bot, "/ops audit --command scale")
    nxt = next_command(first) or ""
    await fill(bot, 5)  # another replica records meanwhile
    texts = await asyncio.gather(ask(bot, nxt), ask(bot, nxt))  # two fast clicks / two auditors
    for text in texts:
        assert shown(text) == newest_first[15:30]


@pytest_asyncio.fixture
async def proxied(config: Config, slack: FakeSlack, state_db: str, redis_url: str, kubeconfig: str, queue_prefix: str,
                  tmp_path: Path) -> AsyncIterator[tuple[Harness, TcpProxy]]:
    db, db_url = await TcpProxy.for_url(state_db)
    bot = await Harness.start(config=config, slack=slack, database_url=db_url, redis_url=redis_url, kubeconfig=kubeconfig,
                              queue_prefix=queue_prefix, spool_dir=str(tmp_path / "spool"))
    yield bot, db
    db.up()
    await asyncio.wait_for(bot.stop(), timeout=60)
    await db.stop()


async def test_before_with_the_database_down_names_it(proxied: tuple[Harness, TcpProxy]) -> None:
    bot, db = proxied
    seqs = await fill(bot, 20)
    db.down()
    status, _ = await bot.slash(EVE, f"/ops audit --before {seqs[-1]}")
    assert status == 200
    reply = await bot.response(containing="unavailable", timeout=45)
    assert "database" in reply["text"], reply["text"]
    assert not any("newest first" in r.get("text", "") for r in bot.slack.responses), "no page was shown"
    db.up()
