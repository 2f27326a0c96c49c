"""What the audit poster keeps in memory between rounds is bounded, and keeps the most recent:
the thread of each request it posted into (``AuditPoster._threads``) and, on a workspace whose
links cannot be built (``Permalinks``), the links it asked Slack for. Both were a dict that grew to
50,000 entries before being cleared, and one that stopped learning at 10,000."""

from __future__ import annotations

from typing import Any, cast

from bot.audit import PERMALINKS_KEPT, THREADS_KEPT, AuditPoster, Permalinks
from bot.lru import LRU


class FakeChat:
    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []
        self.posted = 0

    async def permalink(self, *, channel_id: str, ts: str) -> str:
        self.asked.append((channel_id, ts))
        return f"https://grid.example/link?c={channel_id}&t={ts}"  # not the /archives/ form: nothing to learn

    async def post_message(self, *, channel_id: str, text: str, thread_ts: str | None = None) -> str:
        self.posted += 1
        return f"1700000000.{self.posted:06d}"


class FakeLog:
    def __init__(self) -> None:
        self.asked_threads = 0

    async def threads_of(self, request_ids: list[str]) -> dict[str, str]:
        self.asked_threads += len(request_ids)
        return {r: f"1600000000.{int(r[2:]):06d}" for r in request_ids}  # every request's thread is saved

    async def mark_posted_many(self, seqs: list[int], ts: str) -> None:
        pass


class FakeStore:
    async def get_many(self, request_ids: list[str]) -> list[tuple[str, None]]:
        return [(r, None) for r in request_ids]


class FakeAudit:
    def __init__(self) -> None:
        self.log = FakeLog()
        self.audit_channel = "C0AUDIT"


def _row(seq: int, request_id: str) -> dict[str, Any]:
    return {"seq": seq, "hash": f"{seq % 256:02x}" * 32, "request_id": request_id, "event": "approved", "actor_id": "U0CAROL",
            "channel_id": "C0INCIDENT", "command_text": "scale worker 6", "plan": {"summary": "x"}, "result": None,
            "uncertain": False}


async def test_the_poster_remembers_the_threads_of_the_latest_requests_only() -> None:
    audit, chat = FakeAudit(), FakeChat()
    poster = AuditPoster(audit=cast(Any, audit), store=cast(Any, FakeStore()), chat=cast(Any, chat))
    n = THREADS_KEPT + 1_000
    for start in range(0, n, 500):  # rounds of 500 rows, one per request, each request's thread saved already
        done, failed = await poster._post_batch("C0AUDIT", [_row(seq, f"r-{seq}") for seq in range(start, start + 500)])
        assert (done, failed) == (500, False)
    assert len(poster._threads) == THREADS_KEPT  # was n: kept until 50,000, then all dropped at once
    assert audit.log.asked_threads == n
    # the latest are still known (no read for their next rows); the oldest are read again, once
    await poster._post_batch("C0AUDIT", [_row(n + i, f"r-{r}") for i, r in enumerate([n - 1, n - 2, 0])])
    assert audit.log.asked_threads == n + 1


async def test_links_that_cannot_be_built_are_remembered_most_recent_first() -> None:
    chat = FakeChat()
    links = Permalinks(cast(Any, chat), remember=3)
    for ts in ("1.000001", "1.000002", "1.000003", "1.000004"):
        assert await links.get("C0AUDIT", ts) == f"https://grid.example/link?c=C0AUDIT&t={ts}"
    assert len(chat.asked) == 4
    await links.get("C0AUDIT", "1.000004")  # the newest: remembered (it was not, past the limit)
    assert len(chat.asked) == 4
    assert links.built("C0AUDIT", "1.000002") is not None and links.built("C0AUDIT", "1.000001") is None  # the oldest went
    await links.get("C0AUDIT", "1.000001")
    assert len(chat.asked) == 5


def test_the_bounds_are_deliberate() -> None:
    assert 1_000 <= THREADS_KEPT <= 10_000 and 1_000 <= PERMALINKS_KEPT <= 10_000  # ~0.3 KiB each: a few MiB at most


def test_an_lru_drops_the_least_recently_used() -> None:
    lru: LRU[str, int] = LRU(2)
    lru["a"], lru["b"] = 1, 2
    assert lru.get("a") == 1  # a is now the most recent
    lru["c"] = 3
    assert "b" not in lru and lru.get("a") == 1 and lru["c"] == 3 and len(lru) == 2
    assert lru.get("zz", 0) == 0
