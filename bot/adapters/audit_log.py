"""The audit trail in PostgreSQL: an append-only, hash-chained table, its outbox to the audit
channel, retention checkpoints, search and export.

The chain
---------
Each row's ``hash`` is ``sha256(prev_hash || canonical_json(record))`` in lowercase hex, where
``record`` is the row without its hashes::

    {"seq", "at", "event", "actor_id", "actor_name", "channel_id", "request_id", "command_text", "plan", "result"}

and ``canonical_json`` is JSON with sorted keys, ``","``/``":"`` separators, no ASCII escaping
(UTF-8), and ``at`` written as ISO-8601 in UTC with microseconds (``2026-11-22T12:13:46.123456+00:00``).
The first row's ``prev_hash`` is 64 zeros (or, after ``prune``, the last pruned row's hash, kept in
``audit_checkpoints``). Anyone can recompute it from an export with ``sha256sum`` and ``jq -cS``.

Appends take a transaction-scoped advisory lock, read the last row and insert the next, all in one
server-side call (``audit_append``, migration 008, one round trip): two bot
replicas appending at once still produce one chain with no gaps. The table refuses UPDATE, DELETE
and TRUNCATE with a trigger, and the bot's own role is granted only SELECT and INSERT on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from bot.adapters.store import Store
from bot.domain import canonical_json

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_AUDIT_LOCK = 0x0A0D17  # advisory lock: audit appends
_OUTBOX_LOCK = 0x0A0D18  # advisory lock: one poster at a time across replicas
FIELDS = ("seq", "at", "event", "actor_id", "actor_name", "channel_id", "request_id", "command_text", "plan", "result")


def _iso(at: datetime | str) -> str:
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


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
        only while the server reads the head, hashes and inserts, never while Python works."""
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
                     offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Rows matching all the filters, newest first, and how many match in all."""
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
            args += [target, f"%{target}%", f"%{target}%"]
        if since:
            where.append(sql.SQL("at >= %s"))
            args.append(since)
        if outcome:
            where.append(sql.SQL("event = %s"))
            args.append(outcome)
        cond = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")
        async with self.store.connection() as conn:
            total = await (await conn.execute(sql.SQL("SELECT count(*) AS n FROM audit_events") + cond, args)).fetchone()
            rows = await (await conn.execute(sql.SQL("SELECT * FROM audit_events") + cond
                                             + sql.SQL(" ORDER BY seq DESC LIMIT %s OFFSET %s"), [*args, limit, offset])).fetchall()
        return rows, int(total["n"]) if total else 0

    async def verify(self) -> ChainReport:
        """The whole chain in the database, from the genesis or the latest pruning checkpoint."""
        async with self.store.connection() as conn:
            cps = await (await conn.execute("SELECT * FROM audit_checkpoints ORDER BY upto_seq")).fetchall()
        prev_cp = GENESIS
        for cp in cps:
            if cp["prev_hash"] != prev_cp or checkpoint_hash(prev_cp, cp) != cp["hash"]:
                return ChainReport(False, 0, None, None, int(cp["upto_seq"]), f"checkpoint up to {cp['upto_seq']} was altered")
            prev_cp = cp["hash"]
        start_prev, start_seq = (cps[-1]["last_hash"], cps[-1]["upto_seq"] + 1) if cps else (GENESIS, 1)
        return verify_rows(await self.rows(), prev_hash=start_prev, start_seq=start_seq)

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

    async def mark_failed(self, seq: int, error: str, *, uncertain: bool, delay: float, give_up: bool = False) -> None:
        async with self.store.connection() as conn:
            await conn.execute(
                """UPDATE audit_outbox SET attempts = attempts + 1, last_error = %s, uncertain = uncertain OR %s, gave_up = %s,
                       next_attempt_at = now() + make_interval(secs => %s) WHERE seq = %s""",
                (error[:500], uncertain, give_up, delay, seq))

    async def stale_headlines(self) -> list[dict[str, Any]]:
        """Request threads whose headline does not show their last posted row yet."""
        async with self.store.connection() as conn:
            return await (await conn.execute(
                """SELECT t.request_id, t.channel, t.ts, last.seq FROM audit_threads t
                   CROSS JOIN LATERAL (SELECT max(o.seq) AS seq FROM audit_outbox o
                                       WHERE o.request_id = t.request_id AND o.posted_ts IS NOT NULL) last
                   WHERE last.seq > t.headline_seq LIMIT 50""")).fetchall()

    async def thread_members(self, channel: str, ts: str) -> list[dict[str, Any]]:
        """The requests whose headline is the message ``ts`` (several when a backlog shared one), in
        the order they were posted, each with the row its headline is to show."""
        async with self.store.connection() as conn:
            return await (await conn.execute(
                """SELECT t.request_id, greatest(t.headline_seq, (SELECT max(o.seq) FROM audit_outbox o
                       WHERE o.request_id = t.request_id AND o.posted_ts IS NOT NULL)) AS seq
                   FROM audit_threads t WHERE t.channel = %s AND t.ts = %s
                   ORDER BY (SELECT min(e.seq) FROM audit_events e WHERE e.request_id = t.request_id), t.request_id""",
                (channel, ts))).fetchall()

    async def headline_shown(self, request_id: str, seq: int) -> None:
        async with self.store.connection() as conn:
            await conn.execute("UPDATE audit_threads SET headline_seq = greatest(headline_seq, %s) WHERE request_id = %s",
                               (seq, request_id))

    async def row(self, seq: int) -> dict[str, Any] | None:
        async with self.store.connection() as conn:
            return await (await conn.execute("SELECT * FROM audit_events WHERE seq = %s", (seq,))).fetchone()

    async def poster_lock(self) -> Any:
        """Session advisory lock held while one replica posts (keeps a request's thread in order)."""
        return self.store.target_lock(f"audit-outbox-{_OUTBOX_LOCK}", wait=0)

    async def thread(self, request_id: str) -> dict[str, Any] | None:
        async with self.store.connection() as conn:
            return await (await conn.execute("SELECT * FROM audit_threads WHERE request_id = %s", (request_id,))).fetchone()

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


def export_line(row: dict[str, Any]) -> str:
    """One JSON line of an export: the hashed record plus both hashes, enough to verify on its own."""
    return json.dumps({**audit_record(row), "prev_hash": row["prev_hash"], "hash": row["hash"]}, ensure_ascii=False, sort_keys=True)
