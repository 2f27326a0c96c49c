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

import csv
import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import IO, Any

from psycopg import sql
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from bot.adapters.store import Store
from bot.domain import canonical_json

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_AUDIT_LOCK = 0x0A0D17  # advisory lock: audit appends
_OUTBOX_LOCK = 0x0A0D18  # advisory lock: one poster at a time across replicas
BATCH = 5000  # rows per FETCH of the server-side cursors of verify/export: memory is bounded by this, not by the table
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

    def summary(self) -> str:
        if self.ok:
            if not self.checked:
                return "OK: no rows to check"
            return f"OK: {self.checked} row{'' if self.checked == 1 else 's'}, seq {self.first_seq}..{self.last_seq}, chain intact"
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

    async def verify(self, *, batch: int = BATCH) -> ChainReport:
        """The whole chain in the database, from the genesis or the latest pruning checkpoint,
        streamed in batches of ``batch`` rows (constant memory)."""
        async with self.store.connection() as conn:
            cps = await (await conn.execute("SELECT * FROM audit_checkpoints ORDER BY upto_seq")).fetchall()
        prev_cp = GENESIS
        for cp in cps:
            if cp["prev_hash"] != prev_cp or checkpoint_hash(prev_cp, cp) != cp["hash"]:
                return ChainReport(False, 0, None, None, int(cp["upto_seq"]), f"checkpoint up to {cp['upto_seq']} was altered")
            prev_cp = cp["hash"]
        start_prev, start_seq = (cps[-1]["last_hash"], cps[-1]["upto_seq"] + 1) if cps else (GENESIS, 1)
        return await verify_stored(self, prev_hash=start_prev, start_seq=start_seq, batch=batch)

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
        async with self.store.connection() as conn:
            await conn.execute("UPDATE audit_outbox SET posted_ts = %s, uncertain = false, last_error = NULL WHERE seq = %s",
                               (ts, seq))

    async def mark_posted_many(self, seqs: list[int], ts: str) -> None:
        """Rows posted together in one message (its ts)."""
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
        """Request threads whose headline does not show their last posted row yet."""
        async with self.store.connection() as conn:
            return await (await conn.execute(
                """SELECT t.request_id, t.channel, t.ts, last.seq FROM audit_threads t
                   CROSS JOIN LATERAL (SELECT max(o.seq) AS seq FROM audit_outbox o
                                       WHERE o.request_id = t.request_id AND o.posted_ts IS NOT NULL) last
                   WHERE last.seq > t.headline_seq LIMIT 50""")).fetchall()

    async def members_of(self, messages: list[tuple[str, str]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """The requests whose headline is each of the messages ``(channel, ts)`` (several when a
        backlog shared one), in the order they were posted, each with the seq its headline is to show
        and that row (``row``, None when it is gone): one query for all the messages."""
        if not messages:
            return {}
        async with self.store.connection() as conn:
            found = await (await conn.execute(
                """SELECT m.channel, m.ts, m.request_id, m.seq, to_jsonb(e) AS row FROM (
                       SELECT t.channel, t.ts, t.request_id, greatest(t.headline_seq, (SELECT max(o.seq) FROM audit_outbox o
                              WHERE o.request_id = t.request_id AND o.posted_ts IS NOT NULL)) AS seq,
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
                """INSERT INTO audit_threads (request_id, channel, ts, permalink, headline_seq)
                   SELECT s.request_id, %s, %s, %s, s.seq FROM unnest(%s::text[], %s::bigint[]) AS s (request_id, seq)
                   ON CONFLICT (request_id) DO UPDATE SET headline_seq = greatest(audit_threads.headline_seq, EXCLUDED.headline_seq)
                   WHERE audit_threads.channel = EXCLUDED.channel AND audit_threads.ts = EXCLUDED.ts""",
                (channel, ts, permalink, [r for r, _ in shown], [q for _, q in shown]))

    async def save_thread(self, request_id: str, channel: str, ts: str, permalink: str | None) -> None:
        async with self.store.connection() as conn:
            await conn.execute("INSERT INTO audit_threads (request_id, channel, ts, permalink) VALUES (%s, %s, %s, %s) "
                               "ON CONFLICT (request_id) DO NOTHING", (request_id, channel, ts, permalink))

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
            await conn.execute("DELETE FROM audit_events WHERE seq <= %s", (last["seq"],))
        return cp


def search_queries(*, user: str | None = None, command: str | None = None, target: str | None = None,
                   since: datetime | None = None, outcome: str | None = None, limit: int = 20, offset: int = 0,
                   before_seq: int | None = None) -> tuple[tuple[sql.Composed, list[Any]], tuple[sql.Composed, list[Any]]]:
    """``AuditLog.search``'s two statements (the page, the bounded count) with their arguments."""
    where: list[sql.Composable] = []
    args: list[Any] = []
    if user:
        # a user id, or @name as Slack sends it when mentions are not escaped
        where.append(sql.SQL("(actor_id = %s OR actor_name = %s)"))
        args += [user, user.removeprefix("@")]
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
    page_where = [*where, sql.SQL("seq < %s")] if before_seq is not None else where
    page_args = [*args, before_seq] if before_seq is not None else args

    # The count needs no order. Its ORDER BY lets a btree (column, seq) index be read newest first,
    # cap + 1 entries; but --target is served by trigram (GIN) bitmaps, which have no order: with an
    # ORDER BY the planner walked the whole table newest first instead, dropping every row that did
    # not match (151 ms at 1M rows). Without it, the bitmap heap scan stops at cap + 1 matches.
    count_order = sql.SQL("") if target else sql.SQL(" ORDER BY seq DESC")

    def cond(parts: list[sql.Composable]) -> sql.Composable:
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(parts) if parts else sql.SQL("")

    return ((sql.SQL("SELECT * FROM audit_events") + cond(page_where) + sql.SQL(" ORDER BY seq DESC LIMIT %s OFFSET %s"),
             [*page_args, limit, max(0, offset)]),
            (sql.SQL("SELECT count(*) AS n FROM (SELECT 1 FROM audit_events") + cond(where)
             + count_order + sql.SQL(" LIMIT %s) capped"), [*args, SEARCH_COUNT_CAP + 1]))


def export_line(row: dict[str, Any]) -> str:
    """One JSON line of an export: the hashed record plus both hashes, enough to verify on its own."""
    return json.dumps({**audit_record(row), "prev_hash": row["prev_hash"], "hash": row["hash"]}, ensure_ascii=False, sort_keys=True)


# ------------------------------------------------------------------ streaming reads (issue 13)
#
# `audit verify` and `audit export` read the trail in bounded batches through a server-side cursor,
# so memory does not grow with the table. They also skip the decode → re-encode of each row where
# they can: PostgreSQL writes the JSON of the scalar columns (its escaping of strings is the same
# as Python's json with ensure_ascii=False: \" \\ \b \f \n \r \t, \u00XX for other control
# characters) and `at` in the canonical form, and only plan/result are re-encoded in Python (their
# keys must be sorted as Python sorts them), memoised by their stored text: the steps of one request
# carry the same plan.
#
# A hash computed this way that matches the stored hash is proof enough: every piece is a faithful
# JSON encoding of the stored value, so equal bytes mean equal content. When it does not match, the
# row is checked again the original way (`audit_record` → `audit_hash`) before it is called broken,
# so an odd value (a float PostgreSQL writes differently, a year before 1000) is never a false alarm.

_COMPACT = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)  # == canonical_json
_EXPORT = json.JSONEncoder(sort_keys=True, ensure_ascii=False)  # == export_line's nested values
_CSV = json.JSONEncoder(sort_keys=True)  # == the csv export's plan/result columns (json.dumps(v, sort_keys=True))


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
_VERIFY_SELECT = "SELECT seq, prev_hash, hash, NULL, " + ", ".join(_VERIFY_PARTS) + " FROM audit_events"
# Rows with ``canon`` (migration 009: the exact text the hash covers) need none of that: the pieces
# are computed only where ``canon`` is NULL (rows from before 009, or a database not in UTF8).
_CANON_SELECT = ("SELECT seq, prev_hash, hash, convert_to(prev_hash || canon, 'UTF8'), "
                 + ", ".join(f"CASE WHEN canon IS NULL THEN {p} END" for p in _VERIFY_PARTS)
                 + " FROM audit_events")
_VERIFY_TYPES = ("int8", "text", "text", "bytea", "text", "text", "text", "text", "text")
# The definition of migration 009's constraint, as written there (``canon_trusted`` compares the
# live constraint with this one, deparsed by the same server).
CANON_CHECK = ("""canon IS NULL OR (canon::jsonb)::text = jsonb_build_object(
    'actor_id', actor_id, 'actor_name', actor_name, 'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00',
    'channel_id', channel_id, 'command_text', command_text, 'event', event, 'plan', plan, 'request_id', request_id,
    'result', result, 'seq', seq)::text""")
CANON_CONSTRAINT = "audit_events_canon_matches"
# export_line's form: sorted keys, ", " and ": ", the hashes among the fields
_EXPORT_SELECT = (
    "SELECT seq, '{\"actor_id\": ' || " + _js("actor_id") + " || ', \"actor_name\": ' || " + _js("actor_name")
    + " || ', \"at\": \"' || " + _AT + " || '\", \"channel_id\": ' || " + _js("channel_id") + " || ', \"command_text\": ' || "
    + _js("command_text") + " || ', \"event\": ' || " + _js("event") + " || ', \"hash\": ' || " + _js("hash")
    + " || ', \"plan\": ', plan::text, ', \"prev_hash\": ' || " + _js("prev_hash") + " || ', \"request_id\": ' || coalesce("
    + _js("request_id") + ", 'null') || ', \"result\": ', result::text, ', \"seq\": ' || seq || '}' FROM audit_events")
_CSV_SELECT = ("SELECT seq, " + _AT + ", event, actor_id, actor_name, channel_id, coalesce(request_id, ''), command_text, "
               "plan::text, result::text, prev_hash, hash FROM audit_events")
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


def _range(since: datetime | None, until: datetime | None, from_seq: int | None) -> tuple[str, list[Any]]:
    where, args = [], list[Any]()
    for cond, value in (("seq >= %s", from_seq), ("at >= %s", since), ("at < %s", until)):
        if value is not None:
            where.append(cond)
            args.append(value)
    return (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq", args


async def _batches(store: Store, query: str, args: list[Any], *, name: str, batch: int = BATCH,
                   types: tuple[str, ...] | None = None) -> AsyncIterator[list[tuple[Any, ...]]]:
    """``query``'s rows, ``batch`` at a time, through a server-side cursor (one transaction). With
    ``types`` (PostgreSQL type names of the columns), through ``COPY (query) TO STDOUT`` in the
    binary format instead: the server streams while Python works (a cursor's FETCH waits for each
    batch), bytea comes as bytes; memory is still bounded by ``batch`` rows and the socket's buffers."""
    if types is None:
        async with store.connection() as conn, conn.transaction():
            cur = conn.cursor(name, row_factory=tuple_row)
            try:
                await cur.execute(query, args)
                while rows := await cur.fetchmany(batch):
                    yield rows
            finally:
                await cur.close()
        return
    async with store.connection() as conn:
        async with conn.cursor().copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(sql.SQL(query)), args or None) as copy:  # type: ignore[arg-type]
            copy.set_types(list(types))
            chunk: list[tuple[Any, ...]] = []
            async for row in copy.rows():
                chunk.append(row)
                if len(chunk) >= batch:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk


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

    def _break(self, seq: int, problem: str) -> bool:
        self.broken = ChainReport(False, self.checked, self.first, self.last, seq, problem)
        return False

    def report(self) -> ChainReport:
        return self.broken or ChainReport(True, self.checked, self.first, self.last)


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


async def verify_stored(log: AuditLog, *, prev_hash: str, start_seq: int, batch: int = BATCH) -> ChainReport:
    """The chain in the database from ``start_seq``, streamed (see the note above ``BATCH``). A row
    with ``canon`` (migration 009) is hashed as stored, when ``canon_trusted``; the others are
    re-derived from their columns."""
    walk = ChainWalk(prev_hash=prev_hash, start_seq=start_seq)
    linked: str | None = prev_hash
    expected: int | None = start_seq
    checked, first, last = 0, None, None  # type: tuple[int, int | None, int | None]
    canon = _Reencode(_COMPACT)
    sha256 = hashlib.sha256
    trusted, why = await canon_trusted(log.store)
    if not trusted:
        logging.getLogger(__name__).warning("audit verify: every row is re-derived from its columns (slower): %s", why)
    query, args = _range(None, None, None)
    select = _CANON_SELECT if trusted else _VERIFY_SELECT
    # ``hashed``: the UTF-8 bytes of prev_hash || canon, as the server has them (binary: no hex, no
    # decode/encode in Python), hashed here: the check does not rest on the server's sha256.
    async for rows in _batches(log.store, select + query, args, name="audit_verify", batch=batch, types=_VERIFY_TYPES):
        for seq, prev, digest, hashed, head, plan, mid, result, tail in rows:
            # the common case inline (in order, linked, canon hashes to the stored hash); anything
            # else goes through ChainWalk, which says what is wrong
            if hashed is not None and seq == expected and prev == linked and sha256(hashed).hexdigest() == digest:
                first = seq if first is None else first
                linked, expected, last, checked = digest, seq + 1, seq, checked + 1
                continue
            walk.prev, walk.expected, walk.checked, walk.first, walk.last = linked, expected, checked, first, last
            if not walk.link(seq, prev):
                return walk.report()
            if (sha256(hashed).hexdigest() if hashed is not None
                    else sha256((prev + head + canon(plan) + mid + canon(result) + tail).encode()).hexdigest()) == digest:
                walk.done(seq, digest)
            else:
                row = await log.row(seq)  # the original way, before calling it broken
                if row is None or audit_hash(row["prev_hash"], audit_record(row)) != row["hash"] or row["hash"] != digest:
                    walk.content_differs(seq)
                    return walk.report()
                walk.done(seq, digest)
            linked, expected, checked, first, last = walk.prev, walk.expected, walk.checked, walk.first, walk.last
    walk.prev, walk.expected, walk.checked, walk.first, walk.last = linked, expected, checked, first, last
    return walk.report()


def verify_lines(lines: Iterable[str]) -> tuple[ChainReport, str | None]:
    """An export (JSON lines) on its own, line by line, anchored at its first row's ``prev_hash``
    (returned with the report)."""
    walk = ChainWalk(prev_hash=None, start_seq=None)
    anchor: str | None = None
    loads, encode, sha256 = json.loads, _COMPACT.encode, hashlib.sha256
    for line in lines:
        if not line.strip():
            continue
        row = loads(line)
        seq, prev, digest = int(row["seq"]), row["prev_hash"], row["hash"]
        anchor = prev if anchor is None else anchor
        if not walk.link(seq, prev):
            break
        record = {k: row.get(k) for k in FIELDS}
        if sha256((prev + encode(record)).encode()).hexdigest() != digest and audit_hash(prev, audit_record(row)) != digest:
            walk.content_differs(seq)
            break
        walk.done(seq, digest)
    return walk.report(), anchor


async def export_jsonl(log: AuditLog, out: IO[str], *, since: datetime | None = None, until: datetime | None = None,
                       batch: int = BATCH) -> int:
    """Write ``export_line`` for each row in the range, streamed; the number of rows."""
    canon, n = _Reencode(_EXPORT), 0
    query, args = _range(since, until, None)
    async for rows in _batches(log.store, _EXPORT_SELECT + query, args, name="audit_export", batch=batch,
                               types=("int8", "text", "text", "text", "text", "text")):
        out.write("".join([f"{head}{canon(plan)}{mid}{canon(result)}{tail}\n" for _, head, plan, mid, result, tail in rows]))
        n += len(rows)
    return n


async def export_csv(log: AuditLog, out: IO[str], *, since: datetime | None = None, until: datetime | None = None,
                     batch: int = BATCH) -> int:
    """The csv export (``CSV_HEADER``), streamed; the number of rows."""
    canon, n = _Reencode(_CSV), 0
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    query, args = _range(since, until, None)
    async for rows in _batches(log.store, _CSV_SELECT + query, args, name="audit_export_csv", batch=batch,
                               types=("int8", *("text",) * 11)):
        writer.writerows([(*r[:8], canon(r[8]), canon(r[9]), r[10], r[11]) for r in rows])
        n += len(rows)
    return n


async def stored_hashes(log: AuditLog, *, batch: int = BATCH) -> AsyncIterator[tuple[int, str]]:
    """(seq, hash) of every row, in order, streamed."""
    async for rows in _batches(log.store, "SELECT seq, hash FROM audit_events ORDER BY seq", [], name="audit_hashes", batch=batch):
        for seq, digest in rows:
            yield seq, digest
