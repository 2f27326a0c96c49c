"""opsbot's own PostgreSQL state: requests, approvals, the audit chain, target locks, scheduled reverts.

Every state transition is one statement that names the state it leaves, so it happens once no
matter how many replicas or clicks race (zero rows back: someone else got there first). Votes are
counted in the same transaction that inserts them, with the request row locked ``FOR UPDATE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from bot.domain import Actor, Approval, ChannelId, OpsRequest, RequestId, RequestState, UserId
from bot.errors import BackendUnavailable, Busy, DuplicateDelivery, DuplicateUndo, MigrationsPending
from bot.lru import LRU

log = logging.getLogger(__name__)


STATE_DATABASE = "the opsbot database"


@contextlib.asynccontextmanager
async def _db_errors(exhausted: Callable[[], BackendUnavailable] | None = None) -> AsyncIterator[None]:
    """psycopg's errors → ours. ``exhausted`` says what a pool timeout means (``_Pool.exhausted``);
    PoolTimeout is an OperationalError, so it is told apart first."""
    try:
        yield
    except PoolTimeout as exc:
        if exhausted is not None:
            raise exhausted() from exc
        raise BackendUnavailable(STATE_DATABASE, "no connection could be had in time (pool timeout)") from exc
    except psycopg.OperationalError as exc:
        raise BackendUnavailable(STATE_DATABASE, str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__) from exc


RECHECK_AFTER = 1.0  # seconds in the pool after which a connection is tested before it is handed out
SUSPECT_FOR = 30.0  # after a connection failed, every checkout is tested for this long (the others may be dead too)


class _Pool(AsyncConnectionPool):  # type: ignore[type-arg]  # built with row_factory=dict_row (see Store)
    """psycopg_pool's pool, telling a pool whose connections were all in use for its whole wait
    (``Busy``: the database answers, there was more work than connections) apart from a database
    that cannot be reached or stopped answering (``BackendUnavailable``). psycopg_pool raises the
    same ``PoolTimeout`` for both; what happened during the wait tells them apart: a connection
    attempt that failed (down), no connection given back at all (hung: every holder is waiting on
    it), or connections coming and going, just never free when this request's turn came (busy)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # id(connection) → when it last came back to the pool. Every live connection comes back
        # often, so the least recently returned are ids of connections long closed (or ones idle for
        # ages, which are tested anyway): room for 4 × the pool, and no clearing of the live ones.
        self._returned: LRU[int, float] = LRU(64)
        super().__init__(*args, check=self._check_if_idle, **kwargs)
        self._returned.size = max(64, 4 * self.max_size)
        self.returned_at = float("-inf")  # when a connection last came back to the pool
        self.suspect_until = float("-inf")  # until when every checkout is tested (a connection failed lately)

    async def putconn(self, conn: Any) -> None:
        self.returned_at = time.monotonic()
        self._returned[id(conn)] = self.returned_at
        await super().putconn(conn)

    async def _check_if_idle(self, conn: Any) -> None:
        """The checkout test (one round trip), for a connection that sat in the pool for
        ``RECHECK_AFTER`` s or more: one that came back moments ago was answering then (a broken one
        is not put back), and testing it too doubled the round trips of every command under load.
        Except after a connection failed (``suspect``): the database restarted or the network dropped,
        and a connection given back just before that is as dead as the one that failed, so for
        ``SUSPECT_FOR`` s every connection is tested (a dead one is replaced, not handed out)."""
        now = time.monotonic()
        if now - self._returned.get(id(conn), float("-inf")) >= RECHECK_AFTER or now < self.suspect_until or conn.closed:
            await AsyncConnectionPool.check_connection(conn)

    def suspect(self) -> None:
        self.suspect_until = time.monotonic() + SUSPECT_FOR

    def connect_errors(self) -> int:
        return int(self.get_stats().get("connections_errors", 0))

    def exhausted(self, *, started: float, errors_before: int) -> BackendUnavailable:
        waited = f"{self.timeout:g} s"
        if self.connect_errors() > errors_before or self.get_stats().get("pool_size", 0) == 0:
            return BackendUnavailable(STATE_DATABASE, f"no connection could be made to it for {waited}")
        if self.returned_at < started:
            return BackendUnavailable(STATE_DATABASE, f"it did not answer for {waited} on any of opsbot's {self.max_size} connections")
        return Busy(STATE_DATABASE, f"all {self.max_size} connections to {STATE_DATABASE} were in use for {waited}")


_SELECT_REQUEST = """SELECT r.*, t.permalink AS audit_permalink FROM ops_requests r
                     LEFT JOIN audit_threads t ON t.request_id = r.id WHERE r.id = %s"""


@dataclass(frozen=True)
class VoteResult:
    outcome: str  # counted | approved | denied | ineligible | closed | duplicate | expired | missing | forged
    request: OpsRequest | None
    message: str = ""


def _request(row: dict[str, Any], approvals: list[dict[str, Any]] | None = None) -> OpsRequest:
    return OpsRequest(
        id=RequestId(row["id"]),
        command=row["command"],
        text=row["command_text"],
        requester=Actor(UserId(row["requester_id"]), row["requester_name"]),
        channel_id=ChannelId(row["channel_id"]),
        plan=row["plan"],
        reason=row["reason"],
        state=RequestState(row["state"]),
        approvals_required=row["approvals_required"],
        approver_roles=tuple(row["approver_roles"]),
        rule=row["rule"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        approvals=tuple(
            Approval(approver=Actor(UserId(a["approver_id"]), a["approver_name"]), decision=a["decision"], at=a["at"],
                     roles=tuple(a["approver_roles"]))
            for a in approvals or []
        ),
        approvals_each=tuple(row["approvals_each"]),
        break_glass=row["break_glass"],
        review_state=row["review_state"],
        reviewed_by=row["reviewed_by"],
        audit_permalink=row.get("audit_permalink"),
        card_channel=row["card_channel"],
        card_ts=row["card_ts"],
        card_version=row.get("card_version", 0),
        undo_of=row.get("undo_of"),
        undo_of_link=row.get("undo_of_link"),
        result=row["result"],
        error=row["error"],
        approvers_named=tuple(row.get("approvers_named") or ()),
        remind_after=row.get("remind_after"),
        escalate_after=row.get("escalate_after"),
        escalate_to=tuple(row.get("escalate_to") or ()),
        escalated_at=row.get("escalated_at"),
        deny_reason=row.get("deny_reason"),
    )


class Store:
    # The pool: 10 connections, a 10 s wait, on purpose.
    # * Why not more: every command ends in an audit append, and appends are serialised by the
    #   chain's advisory lock (audit_log.py), so more connections would add PostgreSQL backends
    #   waiting on that lock, not throughput; waiting in the pool's queue is cheaper. Ten per replica
    #   also keeps ten replicas (plus workers) well inside PostgreSQL's default max_connections (100).
    # * Why the wait cannot be reached by a burst: how much work is in flight is bounded before it
    #   gets here (bot/pipeline.py ``Admission``, 100 commands per process; the worker runs 4 jobs),
    #   so at most ~100 checkouts of ~1–3 ms each are ever queued: tens of ms against 10 s. The wait
    #   is for a database that stopped answering, and a pool timeout says which it was (``_Pool``).
    # Measured (tests/scenarios/test_burst.py, 2 shared cores): 500 concurrent `/ops status` → 75 of
    # 1312 checkouts waited, ~0.1 s on average, none near the 10 s timeout; 1000 → 161 waited, ~0.2 s.
    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 10.0) -> None:
        self.url = url
        # check: a connection is tested when it is taken from the pool (one round trip) if it sat
        # there for a second or more (``_Pool._check_if_idle``), so that after the database restarted
        # or the network dropped, no request gets a dead connection.
        self.pool = _Pool(url, min_size=min_size, max_size=max_size, open=False,
                          kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": 5}, timeout=timeout)

    async def open(self) -> None:
        async with _db_errors():
            await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
        """A pooled connection (autocommit, dict rows); psycopg errors become BackendUnavailable."""
        async with self._conn() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
        started, errors = time.monotonic(), self.pool.connect_errors()
        try:
            async with _db_errors(lambda: self.pool.exhausted(started=started, errors_before=errors)), self.pool.connection() as conn:
                yield conn  # type: ignore[misc]  # the pool is built with row_factory=dict_row
        except BackendUnavailable as exc:
            if not isinstance(exc, Busy):
                self.pool.suspect()
            raise

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.execute("SELECT 1")

    # ------------------------------------------------------------------ migrations

    async def grant_app_role(self, role: str) -> None:
        """What the bot's own database role may do: requests and approvals read/write, the audit
        trail read and append only (no UPDATE, DELETE or TRUNCATE, whatever a bug in the bot tries)."""
        from psycopg import sql

        r = sql.Identifier(role)
        async with self._conn() as conn, conn.transaction():
            # The migrations' lock: several `migrate` init containers starting at once (one per replica)
            # would otherwise race on the same catalog rows ("tuple concurrently updated").
            await conn.execute("SELECT pg_advisory_xact_lock(7171717)")
            for stmt in (
                "GRANT USAGE ON SCHEMA public TO {r}",
                "GRANT SELECT, INSERT, UPDATE ON ops_requests, ops_approvals, audit_outbox, audit_threads, chat_outbox TO {r}",
                "GRANT USAGE ON SEQUENCE chat_outbox_id_seq TO {r}",
                "GRANT SELECT ON opsbot_migrations TO {r}",
                "GRANT SELECT, INSERT, UPDATE ON scheduled_reverts TO {r}",
                "GRANT SELECT, INSERT, UPDATE ON approval_reminders TO {r}",
                "GRANT SELECT, INSERT ON audit_events TO {r}",
                "GRANT SELECT ON audit_checkpoints TO {r}",
                "GRANT SELECT, INSERT, UPDATE ON home_views TO {r}",
                "REVOKE UPDATE, DELETE, TRUNCATE ON audit_events, audit_checkpoints FROM {r}",
            ):
                await conn.execute(sql.SQL(stmt).format(r=r))

    @staticmethod
    def _migration_files() -> list[Any]:
        return sorted((f for f in resources.files("bot.migrations").iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)

    async def pending_migrations(self) -> list[str]:
        """The migrations not applied yet, read-only: works as the bot's app role (which may read
        ``opsbot_migrations`` but not create anything). All of them when the table is missing."""
        async with self._conn() as conn:
            exists = await (await conn.execute("SELECT to_regclass('opsbot_migrations') IS NOT NULL AS e")).fetchone()
            if not exists or not exists["e"]:
                done: set[str] = set()
            else:
                done = {r["name"] for r in await (await conn.execute("SELECT name FROM opsbot_migrations")).fetchall()}
        return [f.name for f in self._migration_files() if f.name not in done]

    async def ensure_migrated(self) -> list[str]:
        """At start (``opsbot serve``/``worker``): nothing to do when every migration is applied
        (the usual case, and the only one the least-privilege app role can be in); otherwise apply
        them, which needs the database owner. A role that may not gets ``MigrationsPending``,
        saying what to run, instead of a traceback."""
        try:
            pending = await self.pending_migrations()
        except psycopg.errors.InsufficientPrivilege:
            pending = ["(cannot read opsbot_migrations)"]
        if not pending:
            return []
        try:
            return await self.migrate()
        except psycopg.errors.InsufficientPrivilege as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            async with self._conn() as conn:
                me = await (await conn.execute("SELECT current_user AS u")).fetchone()
            role = me["u"] if me else "<this role>"
            raise MigrationsPending(
                f"opsbot's database needs migration(s) {', '.join(pending)}, and role {role} may not apply them ({detail}); "
                f"run `opsbot migrate` as the database owner: DATABASE_URL=<owner URL> opsbot migrate --app-role {role}, "
                "then start opsbot again.") from exc

    async def migrate(self) -> list[str]:
        """Apply bot/migrations/*.sql in order, once each, under an advisory lock (as the database owner)."""
        applied: list[str] = []
        files = self._migration_files()
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7171717)")
            await conn.execute("CREATE TABLE IF NOT EXISTS opsbot_migrations (name text PRIMARY KEY, applied_at timestamptz DEFAULT now())")
            done = {r["name"] for r in await (await conn.execute("SELECT name FROM opsbot_migrations")).fetchall()}
            for f in files:
                if f.name in done:
                    continue
                await conn.execute(f.read_text())  # type: ignore[arg-type]
                await conn.execute("INSERT INTO opsbot_migrations (name) VALUES (%s)", (f.name,))
                applied.append(f.name)
        return applied

    # ------------------------------------------------------------------ requests

    async def create_request(self, *, id: str, command: str, text: str, requester: Actor, channel_id: str,
                             plan: dict[str, Any], reason: str, state: RequestState, approvals_required: int,
                             approver_roles: tuple[str, ...], rule: str | None, expires_in: int,
                             approvals_each: tuple[str, ...] = (), break_glass: str = "", delivery_id: str = "",
                             remind_after: int | None = None, escalate_after: int | None = None,
                             escalate_to: tuple[str, ...] = (), approvers_named: tuple[str, ...] = (),
                             undo_of: str | None = None, undo_of_link: str | None = None) -> OpsRequest:
        """DuplicateDelivery when a request of this Slack delivery (``delivery_id``) exists already;
        DuplicateUndo when ``undo_of`` has an undo open or succeeded already (migration 010)."""
        async with self._conn() as conn:
            try:
                row = await self._insert_request(conn, (
                    id, command, text, requester.user_id, requester.name, channel_id, plan["target"], plan["environment"],
                    Jsonb(plan), plan["fingerprint"], reason, state.value, approvals_required, list(approver_roles), rule,
                    expires_in, state.value, list(approvals_each), break_glass, "needed" if break_glass else None,
                    delivery_id or None, remind_after, escalate_after, list(escalate_to), list(approvers_named),
                    undo_of, undo_of_link))
            except psycopg.errors.UniqueViolation as exc:
                if undo_of is None or "ops_requests_one_undo" not in str(exc):
                    raise
                raise DuplicateUndo(undo_of, await self.undo_of(undo_of) or "?") from None
            if row is None:
                first = await (await conn.execute("SELECT id FROM ops_requests WHERE delivery_id = %s", (delivery_id,))).fetchone()
                raise DuplicateDelivery(str(first["id"]) if first else "?")
        return _request(row)

    async def by_delivery(self, delivery_id: str) -> OpsRequest | None:
        """The request opened by this delivery (``delivery_id``), if any."""
        if not delivery_id:
            return None
        async with self._conn() as conn:
            row = await (await conn.execute("SELECT id FROM ops_requests WHERE delivery_id = %s", (delivery_id,))).fetchone()
        return await self.get(str(row["id"])) if row else None

    async def undo_of(self, original_id: str) -> str | None:
        """The undo of ``original_id`` that is open or succeeded, if any."""
        async with self._conn() as conn:
            row = await (await conn.execute(
                "SELECT id FROM ops_requests WHERE undo_of = %s AND state IN ('pending_approval', 'approved', 'running', "
                "'succeeded') ORDER BY created_at LIMIT 1", (original_id,))).fetchone()
        return str(row["id"]) if row else None

    @staticmethod
    async def _insert_request(conn: psycopg.AsyncConnection[dict[str, Any]], values: tuple[Any, ...]) -> dict[str, Any] | None:
        return await (await conn.execute(
                """INSERT INTO ops_requests (id, command, command_text, requester_id, requester_name, channel_id, target,
                       environment, plan, fingerprint, reason, state, approvals_required, approver_roles, rule, expires_at,
                       decided_at, approvals_each, break_glass, review_state, delivery_id,
                       remind_after, escalate_after, escalate_to, approvers_named, undo_of, undo_of_link)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s),
                       CASE WHEN %s = 'approved' THEN now() END, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (delivery_id) WHERE delivery_id IS NOT NULL DO NOTHING
                   RETURNING *""", values)).fetchone()

    async def get(self, request_id: str) -> OpsRequest | None:
        async with self._conn() as conn:
            return await self._read(conn, _SELECT_REQUEST, (request_id,), request_id)

    async def get_many(self, request_ids: list[str]) -> dict[str, OpsRequest]:
        """The requests of ``request_ids`` that exist, in two queries whatever their number (the audit
        poster places a round's rows of many new requests at once)."""
        if not request_ids:
            return {}
        async with self._conn() as conn:
            rows = await (await conn.execute(
                """SELECT r.*, t.permalink AS audit_permalink FROM ops_requests r
                   LEFT JOIN audit_threads t ON t.request_id = r.id WHERE r.id = ANY(%s)""", (request_ids,))).fetchall()
            approvals: dict[str, list[dict[str, Any]]] = {}
            for a in await (await conn.execute(
                    "SELECT * FROM ops_approvals WHERE request_id = ANY(%s) ORDER BY at", ([r["id"] for r in rows],))).fetchall():
                approvals.setdefault(a["request_id"], []).append(a)
        return {row["id"]: _request(row, approvals.get(row["id"], [])) for row in rows}

    async def set_card(self, request_id: str, channel: str, ts: str) -> OpsRequest | None:
        """Where the request's card is; returns the request as it is now (None if there is no such request)."""
        async with self._conn() as conn:
            return await self._read(conn, """WITH r AS (UPDATE ops_requests SET card_channel = %s, card_ts = %s WHERE id = %s RETURNING *)
                                             SELECT r.*, t.permalink AS audit_permalink FROM r
                                             LEFT JOIN audit_threads t ON t.request_id = r.id""",
                                    (channel, ts, request_id), request_id)

    @staticmethod
    async def _read(conn: psycopg.AsyncConnection[dict[str, Any]], query: str, args: tuple[Any, ...],
                    request_id: str) -> OpsRequest | None:
        """The request row ``query`` returns and its approvals, both sent at once (psycopg's pipeline
        mode: one round trip instead of two; each statement is still its own, in order)."""
        async with conn.pipeline():
            found = await conn.execute(query, args)  # type: ignore[arg-type]  # one of the constant queries above
            approvals = await conn.execute("SELECT * FROM ops_approvals WHERE request_id = %s ORDER BY at", (request_id,))
            row = await found.fetchone()
            votes = await approvals.fetchall()
        return _request(row, votes) if row is not None else None

    async def vote(self, request_id: str, approver: Actor, decision: str, *, roles: tuple[str, ...],
                   card: tuple[str, str] | None, eligible: Callable[[OpsRequest], str | None],
                   quorum: Callable[[OpsRequest, list[tuple[str, ...]]], bool], reason: str | None = None) -> VoteResult:
        """Record an Approve/Deny click made on ``card`` (channel, message ts). ``eligible(request)``
        returns None or why this person may not vote; ``quorum(request, roles of each approving
        person)`` says whether it is enough. Both run inside the transaction, with the request row
        locked. A click whose card is not this request's card is ``forged``: a button's value is
        whatever the client sent, the message it was clicked on is what Slack saw. ``card`` None:
        the click came from a Home tab, whose origin the caller checked (``Approvals.click``)."""
        async with self._conn() as conn, conn.transaction():
            row = await (await conn.execute(
                "SELECT *, expires_at <= now() AS is_expired FROM ops_requests WHERE id = %s FOR UPDATE", (request_id,)
            )).fetchone()
            if row is None:
                return VoteResult("missing", None, "that request does not exist.")
            approvals = await (await conn.execute(
                "SELECT * FROM ops_approvals WHERE request_id = %s ORDER BY at", (request_id,))).fetchall()
            request = _request(row, approvals)
            if card is not None and (request.card_channel, request.card_ts) != card:
                return VoteResult("forged", request, f"this button does not belong to request `{request_id}`'s approval card; "
                                                     "nothing was counted. Click Approve or Deny on the request's own card.")
            if request.state is not RequestState.PENDING_APPROVAL:
                return VoteResult("closed", request, f"this request is already {request.state.value.replace('_', ' ')}; nothing changed.")
            if row["is_expired"]:
                await conn.execute("UPDATE ops_requests SET state = 'expired', decided_at = now() WHERE id = %s", (request_id,))
                return VoteResult("expired", await self._reload(conn, request_id), "this request has expired; nothing changed.")
            why_not = eligible(request)
            if why_not:
                return VoteResult("ineligible", request, why_not)
            if any(a.approver.user_id == approver.user_id for a in request.approvals):
                return VoteResult("duplicate", request, "you have already voted on this request.")
            await conn.execute(
                "INSERT INTO ops_approvals (request_id, approver_id, approver_name, decision, approver_roles) VALUES (%s, %s, %s, %s, %s)",
                (request_id, approver.user_id, approver.name, decision, list(roles)),
            )
            if decision == "deny":
                await conn.execute("UPDATE ops_requests SET state = 'denied', decided_at = now(), deny_reason = %s WHERE id = %s",
                                   (reason, request_id))
                return VoteResult("denied", await self._reload(conn, request_id))
            approving = [a.roles for a in request.approvals if a.decision == "approve"] + [roles]
            if quorum(request, approving):
                await conn.execute("UPDATE ops_requests SET state = 'approved', decided_at = now() WHERE id = %s", (request_id,))
                return VoteResult("approved", await self._reload(conn, request_id))
            await conn.execute("UPDATE ops_requests SET card_version = card_version + 1 WHERE id = %s", (request_id,))
            return VoteResult("counted", await self._reload(conn, request_id))

    async def _reload(self, conn: psycopg.AsyncConnection[dict[str, Any]], request_id: str) -> OpsRequest:
        row = await (await conn.execute(_SELECT_REQUEST, (request_id,))).fetchone()
        approvals = await (await conn.execute("SELECT * FROM ops_approvals WHERE request_id = %s ORDER BY at", (request_id,))).fetchall()
        assert row is not None
        return _request(row, approvals)

    async def transition(self, request_id: str, *, from_state: RequestState, to_state: RequestState,
                         worker: str | None = None, result: dict[str, Any] | None = None,
                         error: str | None = None) -> OpsRequest | None:
        """The one way a request changes state. None when it was not in ``from_state`` (someone else moved it)."""
        sets = ["state = %(to)s"]
        if to_state is RequestState.RUNNING:
            sets += ["claimed_by = %(worker)s", "claimed_at = now()", "heartbeat_at = now()"]
        if to_state.final:
            sets += ["finished_at = now()", "result = %(result)s", "error = %(error)s"]
        if from_state is RequestState.PENDING_APPROVAL:
            sets += ["decided_at = now()"]
        async with self._conn() as conn:
            row = await (await conn.execute(
                f"UPDATE ops_requests SET {', '.join(sets)} WHERE id = %(id)s AND state = %(from)s RETURNING id",
                {"to": to_state.value, "from": from_state.value, "id": request_id, "worker": worker,
                 "result": Jsonb(result) if result is not None else None, "error": error},
            )).fetchone()
            if row is None:
                return None
            return await self._reload(conn, request_id)

    async def cancel(self, request_id: str, requester_id: str) -> OpsRequest | None:
        """The requester withdraws a request that has not started. None if it is not theirs or too late."""
        async with self._conn() as conn:
            row = await (await conn.execute(
                """UPDATE ops_requests SET state = 'cancelled', finished_at = now(), decided_at = coalesce(decided_at, now())
                   WHERE id = %s AND requester_id = %s AND state IN ('pending_approval', 'approved') RETURNING id""",
                (request_id, requester_id))).fetchone()
            return await self._reload(conn, request_id) if row else None

    async def open_requests_of(self, user_id: str, *, limit: int) -> list[str]:
        """The oldest ``limit`` open requests of ``user_id`` (pending approval, approved or running):
        the caller's cap is all it needs to know, so this stays one bounded read however many the
        user has open (the partial index ``ops_requests_requester_open`` serves it)."""
        async with self._conn() as conn:
            rows = await (await conn.execute(
                "SELECT id FROM ops_requests WHERE requester_id = %s AND state IN ('pending_approval', 'approved', 'running') "
                "ORDER BY created_at LIMIT %s", (user_id, limit))).fetchall()
        return [r["id"] for r in rows]

    async def pending(self) -> list[OpsRequest]:
        async with self._conn() as conn:
            rows = await (await conn.execute(
                "SELECT * FROM ops_requests WHERE state = 'pending_approval' AND expires_at > now() ORDER BY created_at LIMIT 100"
            )).fetchall()
            approvals = await (await conn.execute(
                "SELECT * FROM ops_approvals WHERE request_id = ANY(%s) ORDER BY at", ([r["id"] for r in rows],))).fetchall()
        return [_request(r, [a for a in approvals if a["request_id"] == r["id"]]) for r in rows]

    # ------------------------------------------------------------------ the Home tab (issue 14)

    async def open_requests_by(self, user_id: str, *, limit: int = 20) -> list[OpsRequest]:
        """``user_id``'s own open requests (pending approval, approved or running), oldest first."""
        async with self._conn() as conn:
            rows = await (await conn.execute(
                "SELECT * FROM ops_requests WHERE requester_id = %s AND state IN ('pending_approval', 'approved', 'running') "
                "ORDER BY created_at LIMIT %s", (user_id, limit))).fetchall()
            approvals = await (await conn.execute(
                "SELECT * FROM ops_approvals WHERE request_id = ANY(%s) ORDER BY at", ([r["id"] for r in rows],))).fetchall()
        return [_request(r, [a for a in approvals if a["request_id"] == r["id"]]) for r in rows]

    async def remember_home_view(self, user_id: str, view_id: str) -> None:
        async with self._conn() as conn:
            await conn.execute("INSERT INTO home_views (user_id, view_id) VALUES (%s, %s) ON CONFLICT (user_id) "
                               "DO UPDATE SET view_id = excluded.view_id, published_at = now()", (user_id, view_id))

    async def home_view_of(self, user_id: str) -> str | None:
        """The id of the Home tab opsbot last published for ``user_id`` (None: never)."""
        async with self._conn() as conn:
            row = await (await conn.execute("SELECT view_id FROM home_views WHERE user_id = %s", (user_id,))).fetchone()
        return str(row["view_id"]) if row else None

    async def acknowledge(self, request_id: str, reviewer_id: str) -> OpsRequest | None:
        """Break-glass review: the first eligible acknowledgement closes it."""
        async with self._conn() as conn:
            row = await (await conn.execute(
                "UPDATE ops_requests SET review_state = 'acknowledged', reviewed_by = %s, reviewed_at = now() "
                "WHERE id = %s AND review_state = 'needed' RETURNING id", (reviewer_id, request_id))).fetchone()
            return await self._reload(conn, request_id) if row else None

    async def heartbeat(self, request_id: str) -> None:
        async with self._conn() as conn:
            await conn.execute("UPDATE ops_requests SET heartbeat_at = now() WHERE id = %s AND state = 'running'", (request_id,))

    async def due_for_expiry(self) -> list[str]:
        async with self._conn() as conn:
            rows = await (await conn.execute(
                "SELECT id FROM ops_requests WHERE state = 'pending_approval' AND expires_at <= now() ORDER BY created_at"
            )).fetchall()
        return [r["id"] for r in rows]

    async def approved_waiting(self, older_than: timedelta) -> list[str]:
        async with self._conn() as conn:
            rows = await (await conn.execute(
                "SELECT id FROM ops_requests WHERE state = 'approved' AND decided_at <= now() - %s ORDER BY decided_at",
                (older_than,))).fetchall()
        return [r["id"] for r in rows]

    async def lost_running(self, lease: timedelta) -> list[str]:
        async with self._conn() as conn:
            rows = await (await conn.execute(
                "SELECT id FROM ops_requests WHERE state = 'running' AND heartbeat_at <= now() - %s", (lease,))).fetchall()
        return [r["id"] for r in rows]

    async def open_requests_on(self, target: str) -> list[str]:
        async with self._conn() as conn:
            rows = await (await conn.execute(
                "SELECT id FROM ops_requests WHERE target = %s AND state IN ('running') ORDER BY created_at", (target,))).fetchall()
        return [r["id"] for r in rows]

    # ------------------------------------------------------------------ what the incident channel is told

    async def add_thread_notice(self, request_id: str, text: str, *, undo_button: str | None = None) -> None:
        async with self._conn() as conn:
            await conn.execute("INSERT INTO chat_outbox (request_id, text, undo_button) VALUES (%s, %s, %s)",
                               (request_id, text, undo_button))

    async def due_thread_notices(self, limit: int = 100) -> list[dict[str, Any]]:
        """Unposted thread replies, oldest first, with where they go (the card's thread) and
        whether each is due yet (the poster keeps each channel's order: a channel whose oldest
        reply is not due waits)."""
        async with self._conn() as conn:
            return await (await conn.execute(
                """SELECT o.id, o.request_id, o.text, o.undo_button, o.attempts, o.uncertain, o.next_attempt_at <= now() AS due,
                          coalesce(r.card_channel, r.channel_id) AS channel, r.card_ts AS thread_ts
                   FROM chat_outbox o JOIN ops_requests r ON r.id = o.request_id
                   WHERE o.posted_ts IS NULL AND NOT o.gave_up ORDER BY o.id LIMIT %s""", (limit,))).fetchall()

    async def thread_notice_posted(self, notice_id: int, ts: str) -> None:
        async with self._conn() as conn:
            await conn.execute("UPDATE chat_outbox SET posted_ts = %s, uncertain = false, last_error = NULL WHERE id = %s",
                               (ts, notice_id))

    async def thread_notice_failed(self, notice_id: int, error: str, *, uncertain: bool, delay: float, give_up: bool) -> None:
        async with self._conn() as conn:
            await conn.execute(
                """UPDATE chat_outbox SET attempts = attempts + 1, last_error = %s, uncertain = uncertain OR %s, gave_up = %s,
                       next_attempt_at = now() + make_interval(secs => %s) WHERE id = %s""",
                (error[:500], uncertain, give_up, delay, notice_id))

    async def cards_behind(self, limit: int = 50) -> list[str]:
        """Requests whose card shows an older state than the row (latest state wins: the card is
        re-rendered from the row when it is updated)."""
        async with self._conn() as conn:
            rows = await (await conn.execute(
                """SELECT id FROM ops_requests WHERE card_version > card_shown AND card_ts IS NOT NULL
                       AND card_next_attempt_at <= now() ORDER BY card_next_attempt_at LIMIT %s""", (limit,))).fetchall()
        return [r["id"] for r in rows]

    async def card_shown(self, request_id: str, version: int) -> None:
        async with self._conn() as conn:
            await conn.execute("UPDATE ops_requests SET card_shown = greatest(card_shown, %s), card_attempts = 0, card_error = NULL "
                               "WHERE id = %s", (version, request_id))

    async def card_failed(self, request_id: str, error: str, *, delay: float, give_up_version: int | None) -> None:
        """A card update failed: try again after ``delay``, or (a permanent error) stop trying for
        this version."""
        async with self._conn() as conn:
            await conn.execute(
                """UPDATE ops_requests SET card_attempts = card_attempts + 1, card_error = %s,
                       card_next_attempt_at = now() + make_interval(secs => %s),
                       card_shown = CASE WHEN %s::int IS NULL THEN card_shown ELSE greatest(card_shown, %s::int) END
                   WHERE id = %s""", (error[:500], delay, give_up_version, give_up_version, request_id))

    async def touch_card(self, request_id: str) -> None:
        """The card must be drawn again though the request did not change (e.g. its audit link appeared)."""
        await self.touch_cards([request_id])

    async def touch_cards(self, request_ids: list[str]) -> None:
        async with self._conn() as conn:
            await conn.execute("UPDATE ops_requests SET card_version = card_version + 1 WHERE id = ANY(%s)", (request_ids,))

    # ------------------------------------------------------------------ scheduled reverts (a flag's revert_after)

    async def schedule_revert(self, request_id: str, *, due_at: datetime, announce_at: datetime) -> None:
        async with self._conn() as conn:
            await conn.execute("INSERT INTO scheduled_reverts (request_id, due_at, announce_at) VALUES (%s, %s, %s) "
                               "ON CONFLICT (request_id) DO NOTHING", (request_id, due_at, announce_at))

    async def supersede_reverts(self, *, target: str, value: dict[str, Any], by: str) -> list[str]:
        """End the pending reverts on ``target`` that would put back ``value`` (a plan's ``before``):
        request ``by`` just did (it holds the target's lock, so no revert on it is writing now: one that
        claimed its row meanwhile finds it done)."""
        async with self._conn() as conn:
            rows = await (await conn.execute(
                """UPDATE scheduled_reverts s SET done_at = now(), outcome = 'superseded', last_error = 'ended by ' || %s
                   FROM ops_requests r
                   WHERE r.id = s.request_id AND s.done_at IS NULL AND r.target = %s
                     AND r.plan->'before' = %s AND r.id <> %s
                   RETURNING s.request_id""", (by, target, Jsonb(value), by))).fetchall()
        return [r["request_id"] for r in rows]

    async def reverts_to_announce(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """Marks the reverts whose announcement is due as announced and returns them (request_id,
        seconds_left): one statement, so among racing replicas each is announced by one."""
        async with self._conn() as conn:
            return await (await conn.execute(
                """UPDATE scheduled_reverts SET announced_at = coalesce(%(now)s, now())
                   WHERE announced_at IS NULL AND done_at IS NULL AND announce_at <= coalesce(%(now)s, now())
                   RETURNING request_id, greatest(0, extract(epoch FROM due_at - coalesce(%(now)s, now())))::float AS seconds_left""",
                {"now": now})).fetchall()

    async def claim_due_reverts(self, worker: str, *, lease: timedelta, now: datetime | None = None) -> list[dict[str, Any]]:
        """Claims the reverts that are due (one conditional UPDATE: a row is claimed by one replica;
        a claim older than ``lease`` — its replica was lost — is taken again)."""
        async with self._conn() as conn:
            return await (await conn.execute(
                """UPDATE scheduled_reverts SET claimed_by = %(w)s, claimed_at = coalesce(%(now)s, now()), attempts = attempts + 1
                   WHERE done_at IS NULL AND due_at <= coalesce(%(now)s, now()) AND next_attempt_at <= coalesce(%(now)s, now())
                     AND (claimed_by IS NULL OR claimed_at < coalesce(%(now)s, now()) - %(lease)s)
                   RETURNING *""", {"w": worker, "now": now, "lease": lease})).fetchall()

    async def revert_done(self, request_id: str, worker: str, outcome: str, error: str | None = None) -> bool:
        async with self._conn() as conn:
            row = await (await conn.execute(
                "UPDATE scheduled_reverts SET done_at = now(), outcome = %s, last_error = coalesce(%s, last_error) "
                "WHERE request_id = %s AND claimed_by = %s AND done_at IS NULL RETURNING request_id",
                (outcome, error, request_id, worker))).fetchone()
        return row is not None

    async def revert_later(self, request_id: str, worker: str, error: str, *, delay: float, warned: bool) -> None:
        """Not now (the backend was down, the flag busy): unclaimed again, tried after ``delay`` seconds
        (the revert is kept). ``warned``: the thread and the trail were told (once)."""
        async with self._conn() as conn:
            await conn.execute(
                """UPDATE scheduled_reverts SET claimed_by = NULL, claimed_at = NULL, last_error = %s,
                       warned_at = CASE WHEN %s THEN coalesce(warned_at, now()) ELSE warned_at END,
                       next_attempt_at = now() + make_interval(secs => %s)
                   WHERE request_id = %s AND claimed_by = %s AND done_at IS NULL""",
                (error[:500], warned, delay, request_id, worker))

    async def note_result(self, request_id: str, note: str) -> None:
        """Add a line to a finished request's result message (what its card shows), e.g. how its
        auto-revert ended; the card_version trigger sees the change and the card is drawn again."""
        async with self._conn() as conn:
            await conn.execute(
                """UPDATE ops_requests SET result = coalesce(result, '{}'::jsonb)
                       || jsonb_build_object('message', concat_ws(' ', result->>'message', %s::text))
                   WHERE id = %s""", (note, request_id))

    @contextlib.asynccontextmanager
    async def target_lock(self, target: str, *, wait: float) -> AsyncIterator[bool]:
        """One action per target: a session advisory lock on a dedicated connection, held for the
        whole action. Yields False if it could not be had within ``wait`` seconds."""
        async with self._conn() as conn:
            deadline = asyncio.get_running_loop().time() + wait
            got = False
            while True:
                r = await (await conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0)) AS ok", (target,))).fetchone()
                got = bool(r and r["ok"])
                if got or asyncio.get_running_loop().time() >= deadline:
                    break
                await asyncio.sleep(0.2)
            try:
                yield got
            finally:
                if got:
                    await conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (target,))
