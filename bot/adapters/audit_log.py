"""The audit trail in PostgreSQL: an append-only, hash-chained table, its outbox to the audit
channel, retention checkpoints, search and export.

The chain
---------
Each row's ``hash`` is ``sha256(prev_hash || canonical_json(record))`` in lowercase hex, where
``record`` is the row without its hashes::

    {"seq", "at", "event", "actor_id", "actor_name", "channel_id", "request_id", "command_text", "plan", "result"}

and ``canonical_json`` is JSON with sorted keys, ``","``/``":"`` separators, no ASCII escaping
(UTF-8), and ``at`` written as ISO-8601 in UTC with microseconds (``2026-11-22T12:13:46.123456+00:00``).
``plan`` and ``result`` are first put in the form jsonb gives back (``jsonb_form``: 1e16 is the
integer 10000000000000000, -0.0 is 0.0, NaN/Infinity are strings), so that the hash can always be
re-derived from the stored row. Since migration 009 each row also keeps that exact text in
``canon`` (a CHECK constraint ties it to the columns), which ``audit verify`` hashes as stored.
The first row's ``prev_hash`` is 64 zeros (or, after ``prune``, the last pruned row's hash, kept in
``audit_checkpoints``). Anyone can recompute it from an export with ``sha256sum`` and ``jq -cS``.

Appends take a transaction-scoped advisory lock, read the last row and insert the next, all in one
server-side call (``audit_append``, migration 008, one round trip): two bot
replicas appending at once still produce one chain with no gaps. The table refuses UPDATE, DELETE
and TRUNCATE with a trigger, and the bot's own role is granted only SELECT and INSERT on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import logging
import math
import select
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import IO, Any

import psycopg
from psycopg import pq, sql
from psycopg.abc import RV, PQGen
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import Jsonb

from bot.adapters.store import STATE_DATABASE, Store
from bot.domain import canonical_json
from bot.errors import BackendUnavailable

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_AUDIT_LOCK = 0x0A0D17  # advisory lock: audit appends
_OUTBOX_LOCK = 0x0A0D18  # advisory lock: one poster at a time across replicas
BATCH = 5000  # rows per write of the exports, and per FETCH of stored_hashes' cursor: memory is bounded by this, not by the table
SEARCH_COUNT_CAP = 1000  # `/ops audit` counts matches up to this, then says "more than 1,000"
# --target's count reads the trigram bitmaps (search_queries): on a small or mis-estimated table the
# planner would rather scan it all, so that count's transaction says not to (for that count only).
COUNT_BY_BITMAP = "SET LOCAL enable_seqscan = off"
FIELDS = ("seq", "at", "event", "actor_id", "actor_name", "channel_id", "request_id", "command_text", "plan", "result")


def _iso(at: datetime | str) -> str:
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _jsonb_number(value: float) -> float | int | str:
    """A float as jsonb gives it back. jsonb keeps numbers as ``numeric`` and writes them without an
    exponent: Python's ``1e+16`` comes back as ``10000000000000000`` (an int to json.loads) and
    ``-0.0`` as ``0.0``; ``1e-07`` comes back as ``0.0000001``, the same float. NaN and Infinity are
    not JSON (jsonb refuses them): they become the strings Python writes for them."""
    if not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if value == 0:
        return 0.0  # -0.0 too
    text = repr(value)
    if "e+" in text:  # an integral value written with an exponent: the exact decimal integer jsonb stores
        return int(Decimal(text))
    return value


def jsonb_form(value: Any) -> Any:
    """``value`` as it comes back from a jsonb column (through json.loads), so that what is hashed at
    append time is exactly what can be re-derived from the stored row. Identity on every value that
    already round-trips (so existing rows hash as before); otherwise: floats as ``_jsonb_number``
    says, keys as json writes them (``1`` → ``"1"``, ``True`` → ``"true"``), tuples as lists, and
    what json only knows through ``default=str`` as that string."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _jsonb_number(value)
    if isinstance(value, dict):
        return {_jsonb_key(k): jsonb_form(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonb_form(v) for v in value]
    return str(value)


def _jsonb_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key) if not isinstance(key, float) or math.isfinite(key) else str(_jsonb_number(key))
    return str(key)


def audit_record(row: dict[str, Any]) -> dict[str, Any]:
    """The hashed content of one audit row (everything but the hashes), from a DB row or an export."""
    record = {k: row.get(k) for k in FIELDS}
    record["at"] = _iso(row["at"])
    return record


def audit_hash(prev_hash: str, record: dict[str, Any]) -> str:
    return hashlib.sha256((prev_hash + canonical_json(record)).encode()).hexdigest()


def _hash_parts(record: dict[str, Any]) -> tuple[str, str]:
    """``canonical_json`` of a record without ``at`` and ``seq``, cut where those two go:
    ``canonical_json(record) == head + canonical_json(at) + mid + str(seq) + "}"``. Keys sort so
    that ``at`` is the third and ``seq`` the last; each value is encoded on its own exactly as
    json.dumps encodes it inside the object (same separators, same options)."""
    def item(key: str) -> str:
        return canonical_json(key) + ":" + canonical_json(record.get(key))

    keys = sorted(FIELDS)
    at, seq = keys.index("at"), keys.index("seq")
    assert at < seq == len(keys) - 1, "the SQL side appends seq last"
    head = "{" + "".join(item(k) + "," for k in keys[:at]) + '"at":'
    mid = "," + "".join(item(k) + "," for k in keys[at + 1:seq]) + '"seq":'
    return head, mid


def _joined_hash(prev_hash: str, head: str, mid: str, row: dict[str, Any]) -> str:
    text = head + canonical_json(_iso(row["at"])) + mid + str(int(row["seq"])) + "}"
    return hashlib.sha256((prev_hash + text).encode()).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    checked: int
    first_seq: int | None
    last_seq: int | None
    broken_at: int | None = None
    problem: str = ""
    last_hash: str | None = None  # the hash of row ``last_seq`` (what an incremental verify resumes from)
    resumed_after: int | None = None  # the row verified last time, when only the rows after it were walked

    def summary(self) -> str:
        since = f" (the rows after seq {self.resumed_after}, verified last time)" if self.resumed_after is not None else ""
        if self.ok:
            if not self.checked:
                return f"OK: no new rows after seq {self.resumed_after}" if self.resumed_after is not None else "OK: no rows to check"
            return f"OK: {self.checked} row{'' if self.checked == 1 else 's'}, seq {self.first_seq}..{self.last_seq}, chain intact{since}"
        return f"BROKEN at seq {self.broken_at}: {self.problem}"


def verify_rows(rows: Iterable[dict[str, Any]], *, prev_hash: str | None = GENESIS, start_seq: int | None = 1) -> ChainReport:
    """Walk ``rows`` (ordered by seq). ``prev_hash``/``start_seq`` anchor the first row (the genesis,
    or a pruning checkpoint); None takes the first row's own ``prev_hash``/``seq`` (an export of a
    range, verified on its own)."""
    checked, first, last = 0, None, None
    prev, expected = prev_hash, start_seq
    for row in rows:
        seq = int(row["seq"])
        first = seq if first is None else first
        if expected is not None and seq != expected:
            if seq > expected:
                missing = f"row {expected}" if seq == expected + 1 else f"rows {expected}..{seq - 1}"
                return ChainReport(False, checked, first, last, expected, f"{missing} missing (deleted?): the chain goes from "
                                                                         f"{expected - 1} to {seq}")
            return ChainReport(False, checked, first, last, seq, f"row {seq} is out of order (expected {expected})")
        if prev is not None and row["prev_hash"] != prev:
            return ChainReport(False, checked, first, last, seq,
                               f"row {seq} does not link to row {seq - 1} (that row was rewritten, or rows were reordered)")
        if audit_hash(row["prev_hash"], audit_record(row)) != row["hash"]:
            return ChainReport(False, checked, first, last, seq, f"row {seq}'s content does not match its hash (edited)")
        prev, expected, last = row["hash"], seq + 1, seq
        checked += 1
    return ChainReport(True, checked, first, last)


def checkpoint_hash(prev_hash: str, checkpoint: dict[str, Any]) -> str:
    body = {"upto_seq": checkpoint["upto_seq"], "last_hash": checkpoint["last_hash"],
            "rows_pruned": checkpoint["rows_pruned"], "pruned_at": _iso(checkpoint["pruned_at"])}
    return hashlib.sha256((prev_hash + canonical_json(body)).encode()).hexdigest()


# (oldest first; in the order of the partial index of those behind, which the planner then walks:
# it cannot know how few rows compare posted_seq > headline_seq, and without the order it scans)
STALE_HEADLINES = ("SELECT request_id, channel, ts, posted_seq AS seq FROM audit_threads WHERE posted_seq > headline_seq "
                   "ORDER BY posted_seq LIMIT 50")
# A thread saved after some of its request's rows were posted starts from the newest of them
# (``s.request_id``: the request being saved; the index of posted rows answers it).
_POSTED_SEQ = "coalesce((SELECT max(o.seq) FROM audit_outbox o WHERE o.request_id = s.request_id AND o.posted_ts IS NOT NULL), 0)"


class AuditLog:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def append(self, *, event: str, actor_id: str, actor_name: str, channel_id: str, request_id: str | None,
                     command_text: str, plan: dict[str, Any] | None, result: dict[str, Any] | None, post: bool = True,
                     unless_spooled_id: str | None = None) -> dict[str, Any]:
        """Append one row (and, when ``post``, its outbox entry) in one transaction. With
        ``unless_spooled_id``, nothing is appended (and ``{}`` returned) if a row with that spool id
        is already in the trail.

        One statement, one round trip (``audit_append``, migration 008): the chain's lock is held
        only while the server reads the head, hashes and inserts, never while Python works.

        ``plan`` and ``result`` are taken in ``jsonb_form``: what is hashed is exactly what jsonb
        stores and gives back (a float such as 1e16 or -0.0 would otherwise make a row that never
        verifies, and NaN one that PostgreSQL refuses)."""
        plan, result = jsonb_form(plan), jsonb_form(result)
        row: dict[str, Any] = {"event": event, "actor_id": actor_id, "actor_name": actor_name, "channel_id": channel_id,
                               "request_id": request_id, "command_text": command_text, "plan": plan, "result": result}
        head, mid = _hash_parts(row)
        async with self.store.connection() as conn:
            got = await (await conn.execute(
                "SELECT o_seq, o_at, o_prev_hash, o_hash FROM audit_append(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (event, actor_id, actor_name, channel_id, request_id, command_text,
                 Jsonb(plan) if plan is not None else None, Jsonb(result) if result is not None else None,
                 head.encode(), mid.encode(), post, unless_spooled_id or None))).fetchone()
        if got is None:
            return {}
        row = {"seq": got["o_seq"], "at": got["o_at"], **row, "prev_hash": got["o_prev_hash"], "hash": got["o_hash"]}
        # A tripwire, not a second opinion: the server hashed the bytes Python gave it (plus ASCII);
        # if Python's own hash ever differed, verify would report this row, so say so now, loudly.
        if _joined_hash(row["prev_hash"], head, mid, row) != row["hash"]:
            log.error("audit row %s: PostgreSQL's hash %s differs from Python's; `opsbot audit verify` will report it",
                      row["seq"], row["hash"])
        return row

    async def append_once(self, **entry: Any) -> bool:
        """Append a spooled entry unless it is already in the trail; True if it was appended."""
        spooled = (entry.get("result") or {}).get("spooled") or {}
        return bool(await self.append(**entry, unless_spooled_id=str(spooled.get("id") or "") or None))

    async def rows(self, request_id: str | None = None, *, since: datetime | None = None,
                   until: datetime | None = None) -> list[dict[str, Any]]:
        where: list[str] = []
        args: list[Any] = []
        if request_id:
            where.append("request_id = %s")
            args.append(request_id)
        if since:
            where.append("at >= %s")
            args.append(since)
        if until:
            where.append("at < %s")
            args.append(until)
        q = "SELECT * FROM audit_events" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
        async with self.store.connection() as conn:
            return await (await conn.execute(q, args)).fetchall()

    async def search(self, *, user: str | None = None, command: str | None = None, target: str | None = None,
                     since: datetime | None = None, outcome: str | None = None, limit: int = 20,
                     offset: int = 0, before_seq: int | None = None) -> tuple[list[dict[str, Any]], int]:
        """Rows matching all the filters, newest first, and how many match, counted up to
        ``SEARCH_COUNT_CAP`` + 1 at most (more than the cap: "more than SEARCH_COUNT_CAP").

        Keyset paging: ``before_seq`` starts below that seq (each filter has an index ending in seq,
        migration 007, so a page reads about ``limit`` index entries however deep it is). ``offset``
        still works for the UI's ``--page N`` and is bounded by the caller (``SEARCH_MAX_OFFSET``)."""
        (page, page_args), (count, args) = search_queries(user=user, command=command, target=target, since=since, outcome=outcome,
                                                          limit=limit, offset=offset, before_seq=before_seq)
        async with self.store.connection() as conn:
            rows = await (await conn.execute(page, page_args)).fetchall()
            # A bounded count: an index scan of at most SEARCH_COUNT_CAP + 1 entries, never the whole filtered set.
            async with conn.transaction():
                if target:
                    await conn.execute(COUNT_BY_BITMAP)
                total = await (await conn.execute(count, args)).fetchone()
        return rows, int(total["n"]) if total else 0

    async def window(self, *, since: datetime, until: datetime, channel_id: str | None, limit: int,
                     events: tuple[str, ...] = (), channels: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Rows written in ``[since, until)`` (one channel, or ``channels``, or all when neither),
        oldest first, ``limit`` at most (the timeline asks for one more to know it is cut).
        ``events``: only these events. Read by `/ops timeline` and the Home tab (issue 14)."""
        where, args = ["at >= %s", "at < %s"], list[Any]([since, until])
        if channel_id is not None:
            where.append("channel_id = %s")
            args.append(channel_id)
        elif channels:
            where.append("channel_id = ANY(%s)")
            args.append(list(channels))
        if events:
            where.append("event = ANY(%s)")
            args.append(list(events))
        # ORDER BY at, seq is seq order (``at`` is taken under the chain's lock, migration 008, so it never
        # goes back as seq goes up) and lets the (channel_id, at) index of migration 012 stop at ``limit``.
        q = f"SELECT * FROM audit_events WHERE {' AND '.join(where)} ORDER BY at, seq LIMIT %s"
        async with self.store.connection() as conn:
            return await (await conn.execute(q, [*args, limit])).fetchall()

    async def recent(self, *, events: tuple[str, ...], limit: int) -> list[dict[str, Any]]:
        """The newest rows of ``events``, newest first (the Home tab's last actions; the event index
        of migration 007 serves it)."""
        async with self.store.connection() as conn:
            return await (await conn.execute(
                "SELECT * FROM audit_events WHERE event = ANY(%s) ORDER BY seq DESC LIMIT %s", (list(events), limit))).fetchall()

    async def hashes_of(self, seqs: list[int]) -> dict[int, str]:
        """seq → hash of those rows that are in the trail (a timeline checked against the database)."""
        async with self.store.connection() as conn:
            rows = await (await conn.execute("SELECT seq, hash FROM audit_events WHERE seq = ANY(%s)", (seqs,))).fetchall()
        return {int(r["seq"]): str(r["hash"]) for r in rows}

    async def verify(self, *, resume: tuple[int, str] | None = None) -> ChainReport:
        """The whole chain in the database, from the genesis or the latest pruning checkpoint (or,
        with ``resume``, after the row a verify found intact last time), one row at a time
        (constant memory): ``verify_chain``, in a thread."""
        trusted, why = await canon_trusted(self.store)
        if not trusted:
            logging.getLogger(__name__).warning("audit verify: every row is re-derived from its columns (slower): %s", why)
        return await asyncio.to_thread(verify_chain, self.store.url, trusted=trusted, resume=resume)

    async def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest pruning checkpoint (rows up to its ``upto_seq`` were deleted on purpose), or None."""
        async with self.store.connection() as conn:
            return await (await conn.execute("SELECT * FROM audit_checkpoints ORDER BY upto_seq DESC LIMIT 1")).fetchone()

    # -------------------------------------------------------------- the outbox

    async def due_posts(self, limit: int = 50) -> list[dict[str, Any]]:
        """The oldest unposted rows, in seq order, each with ``due`` (its retry time has come). The
        poster stops at the first row that is not due, so the channel never shows rows out of order."""
        async with self.store.connection() as conn:
            return await (await conn.execute(
                """SELECT e.*, o.uncertain, o.attempts, o.next_attempt_at <= now() AS due FROM audit_outbox o
                   JOIN audit_events e USING (seq)
                   WHERE o.posted_ts IS NULL AND NOT o.gave_up ORDER BY o.seq LIMIT %s""", (limit,))).fetchall()

    async def unposted(self) -> int:
        async with self.store.connection() as conn:
            row = await (await conn.execute("SELECT count(*) AS n FROM audit_outbox WHERE posted_ts IS NULL AND NOT gave_up")).fetchone()
        return int(row["n"]) if row else 0

    async def mark_posted(self, seq: int, ts: str) -> None:
        await self.mark_posted_many([seq], ts)

    async def mark_posted_many(self, seqs: list[int], ts: str) -> None:
        """Rows posted together in one message (its ts). Each request's thread learns its newest
        posted row from the statement's trigger (``posted_seq``, migration 013): its headline is
        behind until it shows that row."""
        async with self.store.connection() as conn:
            await conn.execute("UPDATE audit_outbox SET posted_ts = %s, uncertain = false, last_error = NULL WHERE seq = ANY(%s)",
                               (ts, seqs))

    async def next_due_in(self) -> float:
        """Seconds until the oldest unposted row may be tried (0 when it may now; 3600 when none waits)."""
        async with self.store.connection() as conn:
            row = await (await conn.execute(
                """SELECT greatest(0, extract(epoch FROM next_attempt_at - now()))::float8 AS s FROM audit_outbox
                   WHERE posted_ts IS NULL AND NOT gave_up ORDER BY seq LIMIT 1""")).fetchone()
        return float(row["s"]) if row else 3600.0

    async def mark_failed_many(self, seqs: list[int], error: str, *, uncertain: bool, delay: float, give_up: bool = False) -> None:
        """The rows of one message Slack did not take: one more attempt, the error, when to try again
        (or given up on), in one statement (one per row was 500 round trips for a 429 on 500 rows)."""
        async with self.store.connection() as conn:
            await conn.execute(
                """UPDATE audit_outbox SET attempts = attempts + 1, last_error = %s, uncertain = uncertain OR %s, gave_up = %s,
                       next_attempt_at = now() + make_interval(secs => %s) WHERE seq = ANY(%s)""",
                (error[:500], uncertain, give_up, delay, seqs))

    async def stale_headlines(self) -> list[dict[str, Any]]:
        """Request threads whose headline does not show their last posted row yet (read from the
        partial index of those behind: however many threads there are, a round reads these)."""
        async with self.store.connection() as conn:
            return await (await conn.execute(STALE_HEADLINES)).fetchall()

    async def members_of(self, messages: list[tuple[str, str]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """The requests whose headline is each of the messages ``(channel, ts)`` (several when a
        backlog shared one), in the order they were posted, each with the seq its headline is to show
        and that row (``row``, None when it is gone): one query for all the messages."""
        if not messages:
            return {}
        async with self.store.connection() as conn:
            found = await (await conn.execute(
                """SELECT m.channel, m.ts, m.request_id, m.seq, to_jsonb(e) AS row FROM (
                       SELECT t.channel, t.ts, t.request_id, greatest(t.headline_seq, t.posted_seq) AS seq,
                              (SELECT min(e.seq) FROM audit_events e WHERE e.request_id = t.request_id) AS first_seq
                       FROM audit_threads t JOIN unnest(%s::text[], %s::text[]) AS want (channel, ts)
                            ON t.channel = want.channel AND t.ts = want.ts) m
                   LEFT JOIN audit_events e ON e.seq = m.seq
                   ORDER BY m.channel, m.ts, m.first_seq, m.request_id""",
                ([c for c, _ in messages], [t for _, t in messages]))).fetchall()
        members: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for member in found:
            members.setdefault((member["channel"], member["ts"]), []).append(member)
        return members

    async def headlines_shown(self, shown: list[tuple[str, int]]) -> None:
        """The headlines of ``shown`` (request id, seq) now show that row (never an older one), in one statement."""
        if not shown:
            return
        async with self.store.connection() as conn:
            await conn.execute(
                """UPDATE audit_threads t SET headline_seq = greatest(t.headline_seq, s.seq)
                   FROM unnest(%s::text[], %s::bigint[]) AS s (request_id, seq) WHERE t.request_id = s.request_id""",
                ([r for r, _ in shown], [q for _, q in shown]))

    async def row(self, seq: int) -> dict[str, Any] | None:
        async with self.store.connection() as conn:
            return await (await conn.execute("SELECT * FROM audit_events WHERE seq = %s", (seq,))).fetchone()

    async def poster_lock(self) -> Any:
        """Session advisory lock held while one replica posts (keeps a request's thread in order)."""
        return self.store.target_lock(f"audit-outbox-{_OUTBOX_LOCK}", wait=0)

    async def thread(self, request_id: str) -> dict[str, Any] | None:
        async with self.store.connection() as conn:
            return await (await conn.execute("SELECT * FROM audit_threads WHERE request_id = %s", (request_id,))).fetchone()

    async def threads_of(self, request_ids: list[str]) -> dict[str, str]:
        """Request id → the ts of its thread's headline, for those that have one (one query)."""
        if not request_ids:
            return {}
        async with self.store.connection() as conn:
            rows = await (await conn.execute("SELECT request_id, ts FROM audit_threads WHERE request_id = ANY(%s)",
                                             (request_ids,))).fetchall()
        return {r["request_id"]: str(r["ts"]) for r in rows}

    async def save_threads(self, channel: str, ts: str, permalink: str | None, shown: list[tuple[str, int]]) -> None:
        """The requests of ``shown`` (request id, the seq its headline shows) got their headline in
        message ``ts``: their threads saved with the seq each headline shows, in one statement."""
        async with self.store.connection() as conn:
            await conn.execute(
                """INSERT INTO audit_threads (request_id, channel, ts, permalink, headline_seq, posted_seq)
                   SELECT s.request_id, %s, %s, %s, s.seq, """ + _POSTED_SEQ + """
                   FROM unnest(%s::text[], %s::bigint[]) AS s (request_id, seq)
                   ON CONFLICT (request_id) DO UPDATE SET headline_seq = greatest(audit_threads.headline_seq, EXCLUDED.headline_seq),
                       posted_seq = greatest(audit_threads.posted_seq, EXCLUDED.posted_seq)
                   WHERE audit_threads.channel = EXCLUDED.channel AND audit_threads.ts = EXCLUDED.ts""",
                (channel, ts, permalink, [r for r, _ in shown], [q for _, q in shown]))

    async def save_thread(self, request_id: str, channel: str, ts: str, permalink: str | None) -> None:
        async with self.store.connection() as conn:
            await conn.execute("INSERT INTO audit_threads (request_id, channel, ts, permalink, posted_seq) "
                               "SELECT s.request_id, %s, %s, %s, " + _POSTED_SEQ + " FROM (SELECT %s::text AS request_id) s "
                               "ON CONFLICT (request_id) DO NOTHING", (channel, ts, permalink, request_id))

    # -------------------------------------------------------------- retention

    async def prune(self, before: datetime) -> dict[str, Any] | None:
        """Delete rows older than ``before``, keeping a chained checkpoint of what was removed, so
        that what remains still verifies. Run as the database owner (the bot's role cannot delete)."""
        async with self.store.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_AUDIT_LOCK,))
            last = await (await conn.execute(
                "SELECT seq, hash FROM audit_events WHERE at < %s ORDER BY seq DESC LIMIT 1", (before,))).fetchone()
            if last is None:
                return None
            newest = await (await conn.execute("SELECT max(seq) AS m FROM audit_events")).fetchone()
            if newest and newest["m"] == last["seq"]:
                # Keep at least the newest row, so the next append still finds the chain's head here.
                last = await (await conn.execute(
                    "SELECT seq, hash FROM audit_events WHERE seq < %s ORDER BY seq DESC LIMIT 1", (last["seq"],))).fetchone()
                if last is None:
                    return None
            prev_cp = await (await conn.execute("SELECT hash FROM audit_checkpoints ORDER BY upto_seq DESC LIMIT 1")).fetchone()
            count = await (await conn.execute("SELECT count(*) AS n FROM audit_events WHERE seq <= %s", (last["seq"],))).fetchone()
            cp = {"upto_seq": last["seq"], "last_hash": last["hash"], "rows_pruned": int(count["n"]) if count else 0,
                  "pruned_at": datetime.now(UTC)}
            prev_hash = prev_cp["hash"] if prev_cp else GENESIS
            cp["prev_hash"], cp["hash"] = prev_hash, checkpoint_hash(prev_hash, cp)
            await conn.execute("INSERT INTO audit_checkpoints (upto_seq, last_hash, rows_pruned, pruned_at, prev_hash, hash) "
                               "VALUES (%(upto_seq)s, %(last_hash)s, %(rows_pruned)s, %(pruned_at)s, %(prev_hash)s, %(hash)s)", cp)
            await conn.execute("SELECT set_config('opsbot.prune_upto', %s, true)", (str(last["seq"]),))
            await conn.execute("DELETE FROM audit_outbox WHERE seq <= %s", (last["seq"],))
            # A headline behind by rows now pruned has nothing left to show (before migration 013 the
            # newest posted row was looked for, and there was none): not behind any more.
            await conn.execute("UPDATE audit_threads SET headline_seq = posted_seq WHERE posted_seq > headline_seq AND posted_seq <= %s",
                               (last["seq"],))
            await conn.execute("DELETE FROM audit_events WHERE seq <= %s", (last["seq"],))
        return cp


def search_queries(*, user: str | None = None, command: str | None = None, target: str | None = None,
                   since: datetime | None = None, outcome: str | None = None, limit: int = 20, offset: int = 0,
                   before_seq: int | None = None) -> tuple[tuple[sql.Composed, list[Any]], tuple[sql.Composed, list[Any]]]:
    """``AuditLog.search``'s two statements (the page, the bounded count) with their arguments."""
    where: list[sql.Composable] = []
    args: list[Any] = []
    if command:
        where.append(sql.SQL("(plan->>'command' = %s OR split_part(command_text, ' ', 1) = %s)"))
        args += [command, command]
    if target:
        where.append(sql.SQL("(plan->>'target_name' = %s OR plan->>'target_label' ILIKE %s OR plan->>'target' ILIKE %s)"))
        like = "%" + target.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        args += [target, like, like]
    if since:
        where.append(sql.SQL("at >= %s"))
        args.append(since)
    if outcome:
        where.append(sql.SQL("event = %s"))
        args.append(outcome)
    # --user is a user id, or @name as Slack sends it when mentions are not escaped: the seqs of two
    # branches, each read newest first from its own (column, seq) index, cut at what the page or the
    # count needs, and merged by UNION (a row matching both counts once; the top N of the OR are
    # among the top N of each branch). One OR the planner served with a bitmap of every row of that
    # user (no order: all fetched to count 1,001, 412 ms at 10M rows), or a walk of the whole table
    # newest first. (Leaving the first branch's rows out of the second instead made a user whose
    # id is its name, opsbot's own rows, walk the whole table in the second branch.)
    branches: list[tuple[sql.Composable, Any]] = []
    if user:
        branches = [(sql.SQL("actor_id = %s"), user), (sql.SQL("actor_name = %s"), user.removeprefix("@"))]
    keyset: list[sql.Composable] = [sql.SQL("seq < %s")] if before_seq is not None else []
    keyset_args = [before_seq] if before_seq is not None else []

    # The count needs no order. Its ORDER BY lets a btree (column, seq) index be read newest first,
    # cap + 1 entries; but --target is served by trigram (GIN) bitmaps, which have no order: with an
    # ORDER BY the planner walked the whole table newest first instead, dropping every row that did
    # not match (151 ms at 1M rows). Without it, the bitmap heap scan stops at cap + 1 matches.
    count_order = sql.SQL("") if target else sql.SQL(" ORDER BY seq DESC")

    def cond(parts: list[sql.Composable]) -> sql.Composable:
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(parts) if parts else sql.SQL("")

    if not branches:
        page = (sql.SQL("SELECT * FROM audit_events") + cond([*where, *keyset]) + sql.SQL(" ORDER BY seq DESC LIMIT %s OFFSET %s"),
                [*args, *keyset_args, limit, max(0, offset)])
        count = (sql.SQL("SELECT count(*) AS n FROM (SELECT 1 FROM audit_events") + cond(where)
                 + count_order + sql.SQL(" LIMIT %s) capped"), [*args, SEARCH_COUNT_CAP + 1])
        return page, count

    def seqs(extra: list[sql.Composable], extra_args: list[Any], order: sql.Composable, n: int) -> tuple[sql.Composable, list[Any]]:
        parts, parts_args = [], list[Any]()
        for branch, value in branches:
            parts.append(sql.SQL("(SELECT seq FROM audit_events") + cond([branch, *where, *extra]) + order + sql.SQL(" LIMIT %s)"))
            parts_args += [value, *args, *extra_args, n]
        return sql.SQL(" UNION ").join(parts), parts_args

    inner, inner_args = seqs(keyset, keyset_args, sql.SQL(" ORDER BY seq DESC"), limit + max(0, offset))
    page = (sql.SQL("SELECT * FROM audit_events WHERE seq IN (") + inner + sql.SQL(") ORDER BY seq DESC LIMIT %s OFFSET %s"),
            [*inner_args, limit, max(0, offset)])
    inner, inner_args = seqs([], [], count_order, SEARCH_COUNT_CAP + 1)
    count = (sql.SQL("SELECT least(count(*), %s) AS n FROM (") + inner + sql.SQL(") capped"), [SEARCH_COUNT_CAP + 1, *inner_args])
    return page, count


def export_line(row: dict[str, Any]) -> str:
    """One JSON line of an export: both hashes, then the hashed record exactly as hashed
    (``canonical_json``), so that the line verifies on its own, and fast: sha256(prev_hash + the
    line's text after the hashes) is the hash (``verify_lines``)."""
    return _line_head(row["hash"], row["prev_hash"]) + canonical_json(audit_record(row))[1:]


# ------------------------------------------------------------------ streaming reads (issue 13)
#
# `audit verify`, `audit export` (see "the fast walk" below) and the csv export read the trail
# streamed, so memory does not grow with the table. Where a row has no canon (migration 009), or
# canon may not stand for its columns, they skip the decode → re-encode of the row where they can:
# PostgreSQL writes the JSON of the scalar columns (its escaping of strings is the same as Python's
# json with ensure_ascii=False: \" \\ \b \f \n \r \t, \u00XX for other control characters) and
# `at` in the canonical form (``_VERIFY_PARTS``), and only plan/result are re-encoded in Python
# (their keys must be sorted as Python sorts them), memoised by their stored text: the steps of one
# request carry the same plan.
#
# A hash computed this way that matches the stored hash is proof enough: every piece is a faithful
# JSON encoding of the stored value, so equal bytes mean equal content. When it does not match, the
# row is checked again the original way (`audit_record` → `audit_hash`) before it is called broken,
# so an odd value (a float PostgreSQL writes differently, a year before 1000) is never a false alarm.

_COMPACT = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)  # == canonical_json


def _js(column: str) -> str:
    return f"to_json({column})::text"


_AT = "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'"
# The canonical record around plan and result: {"actor_id":…,…,"plan":<plan>,"request_id":…,"result":<result>,"seq":N}
_VERIFY_PARTS = (
    "'{\"actor_id\":' || " + _js("actor_id") + " || ',\"actor_name\":' || " + _js("actor_name")
    + " || ',\"at\":\"' || " + _AT + " || '\",\"channel_id\":' || " + _js("channel_id") + " || ',\"command_text\":' || "
    + _js("command_text") + " || ',\"event\":' || " + _js("event") + " || ',\"plan\":'",
    "plan::text",
    "',\"request_id\":' || coalesce(" + _js("request_id") + ", 'null') || ',\"result\":'",
    "result::text",
    "',\"seq\":' || seq || '}'")
# The definition of migration 009's constraint, as written there (``canon_trusted`` compares the
# live constraint with this one, deparsed by the same server).
CANON_CHECK = ("""canon IS NULL OR (canon::jsonb)::text = jsonb_build_object(
    'actor_id', actor_id, 'actor_name', actor_name, 'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00',
    'channel_id', channel_id, 'command_text', command_text, 'event', event, 'plan', plan, 'request_id', request_id,
    'result', result, 'seq', seq)::text""")
CANON_CONSTRAINT = "audit_events_canon_matches"
# the csv export's columns, as PostgreSQL writes them: plan and result in jsonb's own text (keys
# ordered as jsonb orders them: by length, then bytes), null as null
_CSV_SELECT = ("SELECT seq, " + _AT + " AS at, event, actor_id, actor_name, channel_id, coalesce(request_id, '') AS request_id, "
               "command_text, coalesce(plan::text, 'null') AS plan, coalesce(result::text, 'null') AS result, prev_hash, hash "
               "FROM audit_events")
CSV_HEADER = ("seq", "at", "event", "actor_id", "actor_name", "channel_id", "request_id", "command_text", "plan", "result",
              "prev_hash", "hash")


class _Reencode:
    """Stored JSON text (jsonb's own form) → ``encoder``'s form, memoised (bounded) by the text."""

    def __init__(self, encoder: json.JSONEncoder, size: int = 4096) -> None:
        self.encode, self.size, self.memo = encoder.encode, size, dict[str, str]()

    def __call__(self, text: str | None) -> str:
        if text is None:
            return "null"
        done = self.memo.get(text)
        if done is None:
            done = self.encode(json.loads(text))
            if len(self.memo) >= self.size:
                self.memo.clear()
            self.memo[text] = done
        return done


async def _batches(store: Store, query: str, args: list[Any], *, name: str, batch: int = BATCH) -> AsyncIterator[list[tuple[Any, ...]]]:
    """``query``'s rows, ``batch`` at a time, through a server-side cursor (one transaction)."""
    async with store.connection() as conn, conn.transaction():
        cur = conn.cursor(name, row_factory=tuple_row)
        try:
            await cur.execute(query, args)
            while rows := await cur.fetchmany(batch):
                yield rows
        finally:
            await cur.close()


class ChainWalk:
    """The chain checks of ``verify_rows``, one row at a time, for streams of any length."""

    def __init__(self, *, prev_hash: str | None, start_seq: int | None) -> None:
        self.prev, self.expected = prev_hash, start_seq
        self.checked, self.first, self.last = 0, None, None  # type: tuple[int, int | None, int | None]
        self.broken: ChainReport | None = None

    def link(self, seq: int, prev_hash: str) -> bool:
        """False (and ``broken`` set) when row ``seq`` is not where the chain expects it."""
        self.first = seq if self.first is None else self.first
        expected = self.expected
        if expected is not None and seq != expected:
            if seq > expected:
                missing = f"row {expected}" if seq == expected + 1 else f"rows {expected}..{seq - 1}"
                return self._break(expected, f"{missing} missing (deleted?): the chain goes from {expected - 1} to {seq}")
            return self._break(seq, f"row {seq} is out of order (expected {expected})")
        if self.prev is not None and prev_hash != self.prev:
            return self._break(seq, f"row {seq} does not link to row {seq - 1} (that row was rewritten, or rows were reordered)")
        return True

    def content_differs(self, seq: int) -> bool:
        return self._break(seq, f"row {seq}'s content does not match its hash (edited)")

    def done(self, seq: int, digest: str) -> None:
        self.prev, self.expected, self.last = digest, seq + 1, seq
        self.checked += 1

    def unreadable(self, line: int) -> bool:
        """Line ``line`` of an export is not one (broken at the seq expected there, if any)."""
        return self._break(self.expected, f"line {line} is not an export line (a JSON object with seq, prev_hash and hash)")

    def _break(self, seq: int | None, problem: str) -> bool:
        self.broken = ChainReport(False, self.checked, self.first, self.last, seq, problem)
        return False

    def report(self) -> ChainReport:
        return self.broken or ChainReport(True, self.checked, self.first, self.last, last_hash=self.prev if self.checked else None)


async def canon_trusted(store: Store) -> tuple[bool, str]:
    """Whether ``canon`` may stand for the columns: migration 009's CHECK constraint is on
    audit_events, validated, and defined exactly as ``CANON_CHECK`` (compared with the same text
    deparsed by this server on a throw-away temporary table). (False, why) otherwise."""
    try:
        async with store.connection() as conn, conn.transaction():
            live = await (await conn.execute(
                "SELECT convalidated AS ok, pg_get_constraintdef(oid) AS def FROM pg_constraint "
                "WHERE conrelid = 'audit_events'::regclass AND conname = %s", (CANON_CONSTRAINT,))).fetchone()
            if live is None:
                return False, f"the constraint {CANON_CONSTRAINT} is missing"
            if not live["ok"]:
                return False, f"the constraint {CANON_CONSTRAINT} is not validated"
            await conn.execute("CREATE TEMP TABLE opsbot_canon_probe (LIKE audit_events) ON COMMIT DROP")
            await conn.execute(sql.SQL("ALTER TABLE opsbot_canon_probe ADD CONSTRAINT probe CHECK ({})").format(sql.SQL(CANON_CHECK)))
            want = await (await conn.execute("SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint "
                                             "WHERE conrelid = 'opsbot_canon_probe'::regclass AND conname = 'probe'")).fetchone()
            await conn.execute("DROP TABLE opsbot_canon_probe")
    except Exception as exc:  # any doubt means: re-derive every row from its columns
        return False, f"could not check the constraint {CANON_CONSTRAINT}: {exc}"
    if want is None or want["def"] != live["def"]:
        return False, f"the constraint {CANON_CONSTRAINT} was changed"
    return True, ""


# ------------------------------------------------------------------ the fast walk (issue 13)
#
# ``audit verify`` and ``audit export`` (jsonl) read the trail with one ``COPY … TO STDOUT (FORMAT
# BINARY)`` on a libpq connection of their own, in a thread: PostgreSQL sends one message per row
# while Python checks the previous one, and each message is read with one C call (psycopg's Copy
# object costs a generator round trip per row, which was half the time). A well-formed row (hash
# and prev_hash of 64 bytes, canon present) has a fixed layout, so it is checked with a few byte
# comparisons and one sha256 over the bytes PostgreSQL sent (the UTF-8 of prev_hash || canon); the
# field lengths come from the protocol, never from parsing the text, so no stored value can make
# one row look like another. Any other row (canon NULL, an odd length, a hash that misses, a row
# out of place) is parsed field by field and checked as before: through ``ChainWalk``, re-derived
# from its columns, and read again whole (the original way) before it is called broken.
#
# The whole walk is one REPEATABLE READ transaction: rows appended meanwhile are not seen, and the
# checkpoints and the rows are read in the same snapshot (a prune between the two cannot look like
# deleted rows). Rows read again come from a second connection on the same (exported) snapshot.

# A well-formed row (both hashes 64 bytes, canon present) comes as its hash, prev_hash and canon in
# one field, then its seq, then eight NULLs; any other as its fields (the hashed bytes where canon
# is, PostgreSQL's pieces of the record where it is not).
_WELL_FORMED = "(octet_length(hash) = 64 AND octet_length(prev_hash) = 64 AND canon IS NOT NULL)"
_ODD = ("hash", "prev_hash", "convert_to(prev_hash || canon, 'UTF8')")
_WALK_SELECT = (f"SELECT CASE WHEN {_WELL_FORMED} IS TRUE THEN convert_to(hash || prev_hash || canon, 'UTF8') END, seq, "
                + ", ".join(f"CASE WHEN {_WELL_FORMED} IS NOT TRUE THEN {c} END" for c in _ODD) + ", "
                + ", ".join(f"CASE WHEN canon IS NULL THEN {p} END" for p in _VERIFY_PARTS) + " FROM audit_events")
# when canon may not stand for the columns (``canon_trusted``): every row re-derived from its columns
_WALK_COLUMNS = "SELECT NULL::bytea, seq, hash, prev_hash, NULL::bytea, " + ", ".join(_VERIFY_PARTS) + " FROM audit_events"
_FIELDS = b"\x00\x0a"  # ten fields
_TAIL = b"\xff\xff\xff\xff" * 8  # the eight NULLs after a well-formed row's seq
_L8 = b"\x00\x00\x00\x08"  # seq's length
STALL_TIMEOUT = 120.0  # seconds after which verify/export give up (fail closed): without a byte in a COPY, or a statement's answer
_COPY_HEADER = 19  # PGCOPY\n\377\r\n\0, flags, header extension length (0): before the first row


def _fields(data: bytes) -> list[bytes | None]:
    """One row of a binary COPY, field by field (lengths from the protocol)."""
    n, at, out = int.from_bytes(data[:2], "big"), 2, list[bytes | None]()
    for _ in range(n):
        size = int.from_bytes(data[at:at + 4], "big", signed=True)
        at += 4
        if size < 0:
            out.append(None)
        else:
            out.append(data[at:at + size])
            at += size
    if at != len(data):
        raise BackendUnavailable(STATE_DATABASE, "a COPY row did not parse (protocol error)")
    return out


_WAIT_TIMEOUT: type[Exception] = psycopg.errors._WaitTimeout  # (psycopg's wait past its timeout; pinned in constraints.txt)


class _Bounded(psycopg.Connection[dict[str, Any]]):
    """A connection on which every statement gives up after ``STALL_TIMEOUT`` s without its answer:
    psycopg's own wait has no limit unless asked, so a database that stopped answering would hang
    a verify or an export for good. (It waits in ``select``, the GIL released.)"""

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        limit = STALL_TIMEOUT if timeout is None else timeout
        try:
            return super().wait(gen, interval, limit)
        except _WAIT_TIMEOUT as exc:
            raise BackendUnavailable(STATE_DATABASE, f"it did not answer within {limit:.0f} s while the trail was read") from exc


class _Snapshot:
    """A read-only REPEATABLE READ transaction on a connection of its own, its rows streamed by
    ``copy``; ``row`` reads one row again whole on a second connection on the same snapshot (opened
    when first needed). Every statement is bounded (``_Bounded``; ``copy`` waits in ``select``).
    Sync: it runs in a thread (``asyncio.to_thread``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.other: _Bounded | None = None
        self.snapshot: str | None = None
        try:
            self.conn = _Bounded.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=5)
            self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            self.encoding = self.conn.info.encoding
            try:  # (not in a savepoint: PostgreSQL exports no snapshot from a subtransaction)
                snap = self.conn.execute("SELECT pg_export_snapshot() AS s").fetchone()
                self.snapshot = snap["s"] if snap else None
            except psycopg.Error:  # a server that cannot export one: rows read again come from the newest data
                self.conn.execute("ROLLBACK")
                self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        except BackendUnavailable:  # (a statement that did not answer in time)
            self.close()  # (its callers close a snapshot only once they have one)
            raise
        except psycopg.Error as exc:
            self.close()
            raise _unavailable(exc) from exc

    def query(self, q: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        try:
            return self.conn.execute(q, args).fetchall()  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc

    def copy(self, select: str, *, options: str = "FORMAT BINARY") -> Iterable[bytes]:
        """The rows of ``select`` as binary COPY tuples (or, with other ``options``, as what COPY
        writes for them, a header first if asked for), one bytes per row. libpq stays non-blocking
        and waits happen in ``select`` (psycopg's libpq calls hold the GIL: a blocking one would
        stop every other thread, the event loop among them, for as long as the server takes)."""
        pg = self.conn.pgconn
        try:
            binary = options == "FORMAT BINARY"
            pg.send_query(f"COPY ({select}) TO STDOUT ({options})".encode())
            while pg.flush():
                self._wait(pg, write=True)
            res = self._result(pg)
            if res is None or res.status != pq.ExecStatus.COPY_OUT:
                raise BackendUnavailable(STATE_DATABASE, (res.error_message if res else b"no result").decode(errors="replace").strip())
            get, first = pg.get_copy_data, True
            while True:
                size, data = get(1)
                if size == 0:  # nothing buffered yet
                    self._wait(pg)
                    pg.consume_input()
                    continue
                if size < 0:
                    break
                row = bytes(data)
                if first and binary:
                    row = row[_COPY_HEADER:]
                first = False
                if row != b"\xff\xff" or not binary:  # (the binary trailer)
                    yield row
            while (res := self._result(pg)) is not None:  # the COPY's end (or its error)
                if res.status != pq.ExecStatus.COMMAND_OK:
                    raise BackendUnavailable(STATE_DATABASE, res.error_message.decode(errors="replace").strip())
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc

    def _result(self, pg: pq.abc.PGconn) -> pq.abc.PGresult | None:
        while pg.is_busy():
            self._wait(pg)
            pg.consume_input()
        return pg.get_result()

    @staticmethod
    def _wait(pg: pq.abc.PGconn, *, write: bool = False) -> None:
        fd = pg.socket
        ready = select.select([fd], [fd] if write else [], [], STALL_TIMEOUT)
        if not ready[0] and not ready[1]:
            raise BackendUnavailable(STATE_DATABASE, f"it sent nothing for {STALL_TIMEOUT:.0f} s while the trail was read")

    def parallel(self) -> None:
        """Let this transaction's statements be run by PostgreSQL's parallel workers, however small:
        for the csv export, whose cost is the server's projection (jsonb → text of plan and result,
        ``at``'s to_char), which two workers compute while this backend only merges their rows in seq
        order (Gather Merge) and writes the CSV. Where the server has no worker free (or allows none),
        the backend runs the plan itself, as without this (and on a server before PostgreSQL 11,
        which lacks parallel_leader_participation, nothing is asked)."""
        if self.conn.info.server_version < 110000:
            return
        try:
            for name, value in (("max_parallel_workers_per_gather", "2"), ("parallel_leader_participation", "off"),
                                ("parallel_setup_cost", "0"), ("parallel_tuple_cost", "0"),
                                ("min_parallel_table_scan_size", "0"), ("min_parallel_index_scan_size", "0")):
                self.conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc

    def where(self, since: datetime | None, until: datetime | None) -> str:
        """`` WHERE at >= since AND at < until`` (those given), as SQL text for a COPY (no parameters there)."""
        where = [sql.SQL(c).format(sql.Literal(v)) for c, v in (("at >= {}", since), ("at < {}", until)) if v is not None]
        return (sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)).as_string(self.conn) if where else ""

    def row(self, seq: int) -> dict[str, Any] | None:
        try:
            if self.other is None:
                self.other = _Bounded.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=5)
                if self.snapshot:
                    self.other.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    self.other.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot)))
            return self.other.execute("SELECT * FROM audit_events WHERE seq = %s", (seq,)).fetchone()
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc

    def close(self) -> None:
        for conn in (self.other, getattr(self, "conn", None)):
            if conn is not None:
                conn.close()  # (a COPY cut short is abandoned with its connection)


def _unavailable(exc: psycopg.Error) -> BackendUnavailable:
    return BackendUnavailable(STATE_DATABASE, str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__)


def verify_chain(url: str, *, trusted: bool, resume: tuple[int, str] | None = None) -> ChainReport:
    """The whole chain in the database (``AuditLog.verify``): the pruning checkpoints, then every
    row from the genesis or the latest checkpoint, in one snapshot. With ``resume`` (the seq and
    hash of the last row a verify found intact), only the rows after it, once that row is found
    unchanged; if it was pruned since, the rows after the latest checkpoint. Sync (run it in a thread)."""
    snap = _Snapshot(url)
    try:
        prev_cp = GENESIS
        cps = snap.query("SELECT * FROM audit_checkpoints ORDER BY upto_seq")
        for cp in cps:
            if cp["prev_hash"] != prev_cp or checkpoint_hash(prev_cp, cp) != cp["hash"]:
                return ChainReport(False, 0, None, None, int(cp["upto_seq"]), f"checkpoint up to {cp['upto_seq']} was altered")
            prev_cp = cp["hash"]
        prev_hash, start_seq = (cps[-1]["last_hash"], cps[-1]["upto_seq"] + 1) if cps else (GENESIS, 1)
        resumed: int | None = None
        if resume is not None and resume[0] >= start_seq - 1:
            seq, digest = resume
            if seq == start_seq - 1:  # the row it ended at is the latest checkpoint's (or the genesis)
                if digest != prev_hash:
                    return ChainReport(False, 0, None, None, seq, f"seq {seq}, verified last time, had hash {digest[:12]}…; "
                                                                  "the checkpoint there says otherwise")
            else:
                found = snap.query("SELECT hash FROM audit_events WHERE seq = %s", (seq,))
                if not found:
                    return ChainReport(False, 0, None, None, seq, f"row {seq}, verified last time, is missing (deleted?)")
                if found[0]["hash"] != digest:
                    return ChainReport(False, 0, None, None, seq, f"row {seq}'s hash is not the one verified last time (rewritten)")
            prev_hash, start_seq, resumed = digest, seq + 1, seq
        report = _walk_chain(snap, prev_hash=prev_hash, start_seq=start_seq, trusted=trusted, after=resumed)
        if report.ok and not report.checked:  # nothing new: it still ends where it did
            report = dataclasses.replace(report, last_seq=start_seq - 1, last_hash=prev_hash)
        return dataclasses.replace(report, resumed_after=resumed)
    finally:
        snap.close()


def _walk_chain(snap: _Snapshot, *, prev_hash: str, start_seq: int, trusted: bool, after: int | None = None) -> ChainReport:
    """The rows (all of them, so that a stray row before ``start_seq`` is found; or those after
    ``after``), walked from ``prev_hash`` expecting ``start_seq`` first."""
    walk = ChainWalk(prev_hash=prev_hash, start_seq=start_seq)
    linked, expected, checked, first = prev_hash.encode(), start_seq, 0, None  # type: tuple[bytes, int, int, int | None]
    sha256, canon, enc = hashlib.sha256, _Reencode(_COMPACT), snap.encoding
    where = f" WHERE seq > {int(after)}" if after is not None else ""
    for data in snap.copy((_WALK_SELECT if trusted else _WALK_COLUMNS) + where + " ORDER BY seq"):
        # the common case, inline: well-formed, in its place, linked, canon hashes to the stored hash
        size = len(data) - 50
        if (data.endswith(_L8 + expected.to_bytes(8, "big", signed=True) + _TAIL) and data.startswith(linked, 70)
                and data.startswith(_FIELDS + size.to_bytes(4, "big", signed=True))
                and sha256(data[70:6 + size]).hexdigest().encode() == data[6:70]):
            first = expected if first is None else first
            linked, expected, checked = data[6:70], expected + 1, checked + 1
            continue
        # anything else, field by field, through ChainWalk (which says what is wrong)
        seq, sdigest, prev, hashed, (head, plan, mid, result, tail) = _odd_row(_fields(data), enc)
        walk.prev, walk.expected, walk.checked, walk.first = linked.decode(), expected, checked, first
        walk.last = expected - 1 if first is not None else None
        if not walk.link(seq, prev):
            return walk.report()
        if hashed is not None:
            same = sha256(hashed).hexdigest() == sdigest
        else:
            same = (head is not None and mid is not None and tail is not None
                    and sha256((prev + head + canon(plan) + mid + canon(result) + tail).encode()).hexdigest() == sdigest)
        if not same:
            row = snap.row(seq)  # the original way, before calling it broken
            if row is None or audit_hash(row["prev_hash"], audit_record(row)) != row["hash"] or row["hash"] != sdigest:
                walk.content_differs(seq)
                return walk.report()
        walk.done(seq, sdigest)  # (sdigest is a sha256 hex digest: it equals one)
        linked, expected, checked, first = sdigest.encode(), seq + 1, walk.checked, walk.first
    walk.prev, walk.expected, walk.checked, walk.first = linked.decode(), expected, checked, first
    walk.last = expected - 1 if first is not None else None
    return walk.report()


def _odd_row(f: list[bytes | None], enc: str) -> tuple[int, str, str, bytes | None, Iterable[str | None]]:
    """seq, hash, prev_hash, the hashed bytes (None without canon) and PostgreSQL's five pieces of
    the record (None with canon) of a row as ``_WALK_SELECT`` sends it."""
    seq, blob = int.from_bytes(f[1] or b"", "big", signed=True), f[0]
    if blob is not None:  # well-formed, but not as expected (out of place, not linked, a hash that misses)
        return seq, blob[:64].decode(errors="replace"), blob[64:128].decode(errors="replace"), blob[64:], (None,) * 5
    return (seq, (f[2] or b"").decode(enc), (f[3] or b"").decode(enc), f[4],
            [None if v is None else v.decode(enc) for v in f[5:10]])


def export_chain(url: str, out: IO[bytes], *, trusted: bool, since: datetime | None = None, until: datetime | None = None,
                 batch: int = BATCH) -> int:
    """``export_line`` of each row in the range, as UTF-8, written ``batch`` lines at a time; the
    number of rows. A row whose canon hashes to its hash is written from canon (the exact text the
    hash covers); any other from its columns (PostgreSQL's pieces when they hash right, else the row
    read again and ``export_line``), so the file says what the columns say. Sync (run it in a thread)."""
    snap = _Snapshot(url)
    try:
        cond = snap.where(since, until)
        sha256, canon = hashlib.sha256, _Reencode(_COMPACT)
        lines, n, write = list[bytes](), 0, out.write
        # (written in this thread: a writer thread of its own was slower, 4.9 s against 4.5 s for
        # 1M rows, and took more CPU: the two threads' GIL hand-offs cost more than they overlapped)
        for data in snap.copy((_WALK_SELECT if trusted else _WALK_COLUMNS) + cond + " ORDER BY seq"):
            size = len(data) - 50
            # (prev_hash is 64 letters or digits: nothing in it needs escaping in JSON)
            if (data.endswith(_TAIL) and data.startswith(_FIELDS + size.to_bytes(4, "big", signed=True))
                    and data.startswith(b"{", 134) and data[70:134].isalnum()
                    and sha256(data[70:6 + size]).hexdigest().encode() == data[6:70]):
                lines.append(b'{"hash":"%s","prev_hash":"%s",%s\n' % (data[6:70], data[70:134], data[135:6 + size]))
            else:
                lines.append(_export_odd(snap, _fields(data), canon).encode() + b"\n")
            n += 1
            if len(lines) >= batch:
                write(b"".join(lines))
                lines.clear()
        write(b"".join(lines))
        return n
    finally:
        snap.close()


def _export_odd(snap: _Snapshot, f: list[bytes | None], canon: _Reencode) -> str:
    seq, digest, prev, hashed, pieces = _odd_row(f, snap.encoding)
    text: str | None = None
    if hashed is not None:  # canon, when it hashes right
        if hashlib.sha256(hashed).hexdigest() == digest:
            text = hashed.decode()[len(prev):]
    else:  # the columns' pieces, when they hash right
        head, plan, mid, result, tail = pieces
        if head is not None and mid is not None and tail is not None:
            text = f"{head}{canon(plan)}{mid}{canon(result)}{tail}"
            if hashlib.sha256((prev + text).encode()).hexdigest() != digest:
                text = None
    if text is not None and text.startswith("{"):
        return _line_head(digest, prev) + text[1:]
    row = snap.row(seq)
    if row is None:  # (not in this snapshot: cannot happen)
        raise BackendUnavailable(STATE_DATABASE, f"row {seq} could not be read again")
    return export_line(row)


def _line_head(digest: str, prev: str) -> str:
    return '{"hash":' + json.dumps(digest, ensure_ascii=False) + ',"prev_hash":' + json.dumps(prev, ensure_ascii=False) + ","


_FAST_LINE = b'{"hash":"'  # an export line written by export_chain/export_line: both hashes, then canon


def verify_lines(lines: Iterable[str | bytes]) -> tuple[ChainReport, str | None]:
    """An export (JSON lines) on its own, line by line, anchored at its first row's ``prev_hash``
    (returned with the report). A line in ``export_line``'s form (both hashes first, then the
    record as hashed) is checked on its bytes: sha256(prev_hash + the record's text) must be its
    hash, without decoding it. Any other line (an export from before that form, or edited) is
    decoded and its record re-encoded, as before."""
    walk = ChainWalk(prev_hash=None, start_seq=None)
    anchor: str | None = None
    linked, expected, checked, first = b"", 0, 0, None  # type: tuple[bytes, int, int, int | None]
    loads, encode, sha256 = json.loads, _COMPACT.encode, hashlib.sha256
    for number, line in enumerate(lines, 1):
        raw = line.encode() if isinstance(line, str) else line
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if first is not None and raw[:9] == _FAST_LINE and raw[73:88] == b'","prev_hash":"' and raw[88:152] == linked \
                and raw[152:154] == b'",' and raw[-1:] == b"}":
            record = b"{" + raw[154:]
            at = record.rfind(b',"seq":')
            digits = record[at + 7:-1]
            # (and no "hash" or "prev_hash" member in the record: a reader of the line would take
            # the last of two, and the line would not say what was checked)
            if at > 0 and digits.isdigit() and int(digits) == expected and b'hash":' not in record \
                    and sha256(linked + record).hexdigest().encode() == raw[9:73]:
                linked, expected, checked = raw[9:73], expected + 1, checked + 1
                continue
        if not raw.strip():
            continue
        walk.prev, walk.expected, walk.checked, walk.first, walk.last = \
            (linked.decode(), expected, checked, first, expected - 1) if first is not None else (None, None, 0, None, None)
        try:
            row = loads(raw)
            seq, prev, digest = int(row["seq"]), row["prev_hash"], row["hash"]
            if not isinstance(prev, str) or not isinstance(digest, str):
                raise TypeError("hashes are not strings")
        except (ValueError, KeyError, TypeError):  # (not JSON, not UTF-8, not an object, a field missing)
            walk.unreadable(number)
            return walk.report(), anchor
        anchor = prev if anchor is None else anchor
        if not walk.link(seq, prev):
            return walk.report(), anchor
        record_ = {k: row.get(k) for k in FIELDS}
        if sha256((prev + encode(record_)).encode()).hexdigest() != digest and audit_hash(prev, audit_record(row)) != digest:
            walk.content_differs(seq)
            return walk.report(), anchor
        walk.done(seq, digest)  # (digest is a sha256 hex digest: it equals one)
        linked, expected, checked, first = digest.encode(), seq + 1, walk.checked, walk.first
    if first is None:
        return walk.report(), anchor
    walk.prev, walk.expected, walk.checked, walk.first, walk.last = linked.decode(), expected, checked, first, expected - 1
    return walk.report(), anchor


async def export_jsonl(log: AuditLog, out: IO[str], *, since: datetime | None = None, until: datetime | None = None,
                       batch: int = BATCH) -> int:
    """Write ``export_line`` for each row in the range, streamed (``export_chain``, in a thread); the
    number of rows. A text file is written through its binary buffer (no decode and encode of the
    lines; the file's encoding must then be UTF-8); any other ``out`` gets the lines decoded."""
    trusted, why = await canon_trusted(log.store)
    if not trusted:
        logging.getLogger(__name__).warning("audit export: every row is exported from its columns (slower): %s", why)
    return await _to_text(out, lambda binary: export_chain(log.store.url, binary, trusted=trusted, since=since, until=until,
                                                           batch=batch))


def csv_chain(url: str, out: IO[bytes], *, since: datetime | None = None, until: datetime | None = None,
              batch: int = BATCH) -> int:
    """The csv export (``CSV_HEADER``), written by PostgreSQL's COPY as UTF-8 CSV, ``batch`` lines
    at a time; the number of rows. Sync (run it in a thread)."""
    snap = _Snapshot(url)
    try:
        snap.parallel()
        cond = snap.where(since, until)
        lines, n = list[bytes](), -1  # (the header)
        for line in snap.copy(_CSV_SELECT + cond + " ORDER BY seq", options="FORMAT CSV, HEADER, ENCODING 'UTF8'"):
            lines.append(line)
            n += 1
            if len(lines) >= batch:
                out.write(b"".join(lines))
                lines.clear()
        out.write(b"".join(lines))
        return max(n, 0)
    finally:
        snap.close()


async def export_csv(log: AuditLog, out: IO[str], *, since: datetime | None = None, until: datetime | None = None,
                     batch: int = BATCH) -> int:
    """The csv export (``csv_chain``, in a thread); the number of rows. ``out`` as for ``export_jsonl``."""
    return await _to_text(out, lambda binary: csv_chain(log.store.url, binary, since=since, until=until, batch=batch))


async def _to_text(out: IO[str], export: Callable[[IO[bytes]], int]) -> int:
    """Run ``export`` (which writes UTF-8 bytes) in a thread into ``out``: a UTF-8 text file through
    its binary buffer (no decode and encode of the lines), anything else decoded."""
    buffer = getattr(out, "buffer", None)
    if buffer is not None and (getattr(out, "encoding", "") or "").lower().replace("-", "").replace("_", "") == "utf8":
        out.flush()
        n = await asyncio.to_thread(export, buffer)
        buffer.flush()
        return n

    class _Decoding(io.RawIOBase):
        def write(self, data: Any) -> int:
            out.write(bytes(data).decode())
            return len(data)

    return await asyncio.to_thread(export, _Decoding())  # type: ignore[arg-type]


async def stored_hashes(log: AuditLog, *, batch: int = BATCH) -> AsyncIterator[tuple[int, str]]:
    """(seq, hash) of every row, in order, streamed."""
    async for rows in _batches(log.store, "SELECT seq, hash FROM audit_events ORDER BY seq", [], name="audit_hashes", batch=batch):
        for seq, digest in rows:
            yield seq, digest
