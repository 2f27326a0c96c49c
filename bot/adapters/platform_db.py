"""The platforms' own PostgreSQL databases (providers, webhook events, pg_stat_activity), through psycopg 3.

Table and column names come from config; they are validated as plain identifiers when the config
loads and always composed with ``psycopg.sql.Identifier``. Values are always bound parameters.
A connection is opened per operation (these commands are rare and a pool per platform database
would hold connections the platform needs more), with a short connect timeout so that a database
that is down makes the command fail closed quickly. Each connection says who it is
(``application_name = opsbot``) and every transaction sets a ``statement_timeout`` and a
``lock_timeout`` (``set_config(…, true)``, i.e. ``SET LOCAL``: it works through pgbouncer in
transaction mode, where startup options do not).

The `/ops db …` reads are bounded as a whole (connect included) by ``budget`` seconds
(bot/adapters/bounded.py), so a database that is paused or black-holed is reported in time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from bot.action_config import template_parts
from bot.adapters.bounded import within
from bot.config import Config, Providers, Webhooks
from bot.errors import BackendUnavailable, ExecutionError, OutcomeUnknown

Obj = dict[str, Any]
T = TypeVar("T")
APPLICATION_NAME = "opsbot"
STATEMENT_TIMEOUT_MS = 5000  # the writes (providers, webhooks, signalling a backend)
LOCK_TIMEOUT_MS = 2000

# One backend of pg_stat_activity with what deciding whether it may be signalled needs. The clock
# is clock_timestamp(): the row is read right before the signal, inside a longer transaction.
_SESSION = """
SELECT a.pid, a.datname IS NOT DISTINCT FROM current_database() AS here, a.usename, a.application_name,
       host(a.client_addr) AS client, a.backend_type, a.state, a.wait_event_type, a.wait_event,
       a.backend_start, a.xact_start, a.query_start, a.state_change, a.query,
       extract(epoch FROM clock_timestamp() - a.query_start)::float8 AS query_seconds,
       extract(epoch FROM clock_timestamp() - a.backend_start)::float8 AS backend_seconds,
       a.pid = pg_backend_pid() AS is_self, coalesce(r.rolsuper, false) AS superuser
  FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid
 WHERE a.pid = %s
"""
_GROUPS = """
SELECT a.datname IS NOT DISTINCT FROM current_database() AS here, a.backend_type, a.state,
       coalesce(a.application_name, '') AS application, count(*)::int AS n,
       max(extract(epoch FROM now() - a.state_change))::float8 AS oldest_seconds
  FROM pg_stat_activity a
 WHERE a.pid <> pg_backend_pid()
 GROUP BY 1, 2, 3, 4
 ORDER BY n DESC
 LIMIT 500
"""
_LONG_QUERIES = """
SELECT a.pid, a.usename, a.application_name, host(a.client_addr) AS client, a.state, a.wait_event_type, a.wait_event,
       extract(epoch FROM now() - a.query_start)::float8 AS query_seconds,
       extract(epoch FROM now() - a.xact_start)::float8 AS xact_seconds,
       left(a.query, 2000) AS query
  FROM pg_stat_activity a
 WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'
   AND a.state IS NOT NULL AND a.state <> 'idle' AND a.query_start IS NOT NULL
   AND a.query_start <= now() - make_interval(secs => %s)
 ORDER BY a.query_start
 LIMIT %s
"""


async def _limits(conn: psycopg.AsyncConnection[Obj], statement_ms: int = STATEMENT_TIMEOUT_MS) -> None:
    """``SET LOCAL statement_timeout``/``lock_timeout`` for the transaction that is open on ``conn``."""
    await conn.execute("SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true)",
                       (f"{statement_ms}ms", f"{min(LOCK_TIMEOUT_MS, statement_ms)}ms"))


def action_query(template: str, values: Obj) -> tuple[sql.SQL, Obj]:
    """An action's SQL template (``{name}`` placeholders, ``{{``/``}}`` braces) as a psycopg query with
    named placeholders, and the values it binds. A value never becomes part of the statement's text."""
    text: list[str] = []
    bound: Obj = {}
    for literal, name in template_parts(template):
        if name is None:
            text.append(literal.replace("%", "%%"))
        else:
            text.append(f"%({name})s")
            bound[name] = values[name]
    return sql.SQL("".join(text)), bound  # type: ignore[arg-type]  # (the config's text: not a literal, by design)


def _flag_table(table: tuple[str | None, str]) -> sql.Identifier:
    return sql.Identifier(table[0], table[1]) if table[0] else sql.Identifier(table[1])


def _table(spec: Providers | Webhooks) -> sql.Identifier:
    return sql.Identifier(spec.schema_, spec.table) if spec.schema_ else sql.Identifier(spec.table)


class PlatformDbAdapter:
    def __init__(self, config: Config) -> None:
        self._config = config

    @contextlib.asynccontextmanager
    async def _connect(self, database: str) -> AsyncIterator[psycopg.AsyncConnection[Obj]]:
        url = self._config.databases[database].url
        try:
            conn = await psycopg.AsyncConnection.connect(url, connect_timeout=5, row_factory=dict_row,
                                                         application_name=APPLICATION_NAME)
        except psycopg.OperationalError as exc:
            raise BackendUnavailable(f"database `{database}`", str(exc).strip().splitlines()[0] if str(exc) else "unreachable") from exc
        try:
            async with conn:
                yield conn
        except psycopg.OperationalError as exc:
            raise BackendUnavailable(f"database `{database}`", str(exc).strip().splitlines()[0]) from exc
        except psycopg.Error as exc:
            raise ExecutionError(f"database `{database}`: {exc.diag.message_primary or exc}") from exc

    async def provider(self, spec: Providers, name: str) -> Obj | None:
        q = sql.SQL("SELECT * FROM {t} WHERE {k} = %s").format(t=_table(spec), k=sql.Identifier(spec.key))
        async with self._connect(spec.database) as conn, conn.transaction():
            await _limits(conn)
            return await (await conn.execute(q, (name,))).fetchone()

    async def provider_names(self, spec: Providers) -> list[str]:
        q = sql.SQL("SELECT {k} AS name FROM {t} ORDER BY {k} LIMIT 50").format(t=_table(spec), k=sql.Identifier(spec.key))
        async with self._connect(spec.database) as conn, conn.transaction():
            await _limits(conn)
            return [str(r["name"]) for r in await (await conn.execute(q)).fetchall()]

    async def set_provider_active(self, spec: Providers, name: str, *, active: bool, expect: bool) -> bool:
        q = sql.SQL("UPDATE {t} SET {a} = %s WHERE {k} = %s AND {a} = %s").format(
            t=_table(spec), a=sql.Identifier(spec.active_column), k=sql.Identifier(spec.key))
        async with self._connect(spec.database) as conn, conn.transaction():
            await _limits(conn)
            cur = await conn.execute(q, (active, name, expect))
            if cur.rowcount > 1:
                raise ExecutionError(f"{spec.table}.{spec.key} = {name!r} matched {cur.rowcount} rows; refusing (rolled back).")
            return cur.rowcount == 1

    async def webhook_event(self, spec: Webhooks, event_id: str) -> Obj | None:
        q = sql.SQL("SELECT * FROM {t} WHERE {id}::text = %s").format(t=_table(spec), id=sql.Identifier(spec.id_column))
        async with self._connect(spec.database) as conn, conn.transaction():
            await _limits(conn)
            return await (await conn.execute(q, (event_id,))).fetchone()

    async def replay_webhook(self, spec: Webhooks, event_id: str, enqueue: Callable[[Obj], Awaitable[None]]) -> Obj | None:
        sets = [sql.SQL("{s} = %s").format(s=sql.Identifier(spec.status_column))]
        if spec.error_column:
            sets.append(sql.SQL("{e} = NULL").format(e=sql.Identifier(spec.error_column)))
        q = sql.SQL("UPDATE {t} SET {sets} WHERE {id}::text = %s AND {s}::text = ANY(%s) RETURNING *").format(
            t=_table(spec), sets=sql.SQL(", ").join(sets), id=sql.Identifier(spec.id_column),
            s=sql.Identifier(spec.status_column))
        async with self._connect(spec.database) as conn, conn.transaction():
            await _limits(conn)
            row = await (await conn.execute(q, (spec.reset_to, event_id, list(spec.replayable)))).fetchone()
            if row is None:
                return None
            await enqueue(row)  # raises → the transaction rolls back: the row stays as it was
            return row

    # ------------------------------------------------------------------ `actions:` (kinds sql and flag)

    async def action_rows(self, database: str, query: str, values: Obj, *, max_rows: int, timeout: float) -> list[Obj]:
        q, bound = action_query(query, values)

        async def run() -> list[Obj]:
            async with self._connect(database) as conn, conn.transaction():
                await conn.execute("SET TRANSACTION READ ONLY")
                await _limits(conn, max(100, int(timeout * 1000) - 200))
                cur = await conn.execute(q, bound)
                return await cur.fetchmany(max_rows + 1) if cur.description else []  # one more: "more than max_rows"

        return await within(timeout, run(), backend=f"database `{database}`")

    async def run_statement(self, database: str, statement: str, values: Obj, *, rows: tuple[int, int], timeout: float,
                            then: Callable[[list[Obj]], Awaitable[None]] | None = None) -> tuple[int, list[Obj]]:
        q, bound = action_query(statement, values)
        step = {"at": "connecting"}  # → "running" → "committing" → "committed"

        async def run() -> tuple[int, list[Obj]]:
            async with self._connect(database) as conn:
                async with conn.transaction():
                    await _limits(conn, int(timeout * 1000))
                    step["at"] = "running"
                    cur = await conn.execute(q, bound)
                    count = cur.rowcount
                    returned = await cur.fetchmany(1000) if cur.description else []
                    lo, hi = rows
                    if not lo <= count <= hi:
                        expected = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
                        raise ExecutionError(f"the statement touched {count} row{'s' if count != 1 else ''}, expected {expected}; "
                                             "it was rolled back, nothing changed.")
                    if then is not None:
                        await then(returned)  # raises → rolled back
                    step["at"] = "committing"
                step["at"] = "committed"
                return count, returned

        try:
            return await within(timeout + 5, run(), backend=f"database `{database}`")
        except (BackendUnavailable, ExecutionError) as exc:
            if step["at"] == "committing" and (isinstance(exc, BackendUnavailable) or "connection" in str(exc).lower()):
                raise OutcomeUnknown(f"the COMMIT was sent to database `{database}` and no answer came back ({exc}); the change "
                                     "may or may not have been applied. Look before trying again.") from exc
            raise

    async def read_flag(self, database: str, table: tuple[str | None, str], key_column: str, value_column: str,
                        key: str) -> tuple[bool, Any]:
        q = sql.SQL("SELECT {v} AS value FROM {t} WHERE {k} = %s").format(
            v=sql.Identifier(value_column), t=_flag_table(table), k=sql.Identifier(key_column))

        async def run() -> tuple[bool, Any]:
            async with self._connect(database) as conn, conn.transaction():
                await _limits(conn)
                found = await (await conn.execute(q, (key,))).fetchall()
                if len(found) > 1:
                    raise ExecutionError(f"{table[1]}.{key_column} = {key!r} matches {len(found)} rows; a flag is one row.")
                return (True, found[0]["value"]) if found else (False, None)

        return await within(STATEMENT_TIMEOUT_MS / 1000, run(), backend=f"database `{database}`")

    async def write_flag(self, database: str, table: tuple[str | None, str], key_column: str, value_column: str, key: str,
                         *, value: Any, expect: Any) -> bool:
        q = sql.SQL("UPDATE {t} SET {v} = %s WHERE {k} = %s AND {v} IS NOT DISTINCT FROM %s").format(
            v=sql.Identifier(value_column), t=_flag_table(table), k=sql.Identifier(key_column))
        step = {"at": "connecting"}  # → "committing": from then on a lost answer means "may have been written"

        async def run() -> bool:
            async with self._connect(database) as conn:
                async with conn.transaction():
                    await _limits(conn)
                    cur = await conn.execute(q, (value, key, expect))
                    if cur.rowcount > 1:
                        raise ExecutionError(f"{table[1]}.{key_column} = {key!r} matched {cur.rowcount} rows; refusing (rolled back).")
                    step["at"] = "committing"
                step["at"] = "committed"
                return cur.rowcount == 1

        try:
            return await within(STATEMENT_TIMEOUT_MS / 1000 + 2, run(), backend=f"database `{database}`")
        except (BackendUnavailable, ExecutionError) as exc:
            if step["at"] == "committing" and not isinstance(exc, OutcomeUnknown):
                raise OutcomeUnknown(f"the COMMIT of the flag was sent to database `{database}` and no answer came back ({exc}); "
                                     "it may or may not have been changed. Look before trying again.") from exc
            raise

    # ------------------------------------------------------------------ pg_stat_activity (`/ops db …`)

    async def _bounded(self, database: str, budget: float, work: Callable[[psycopg.AsyncConnection[Obj]], Awaitable[T]]) -> T:
        """``work`` on a fresh connection inside one transaction with a statement timeout below
        ``budget``; the whole (connect included) answers or fails within ``budget`` seconds."""
        async def run() -> T:
            async with self._connect(database) as conn, conn.transaction():
                await _limits(conn, max(100, int(budget * 1000) - 200))
                return await work(conn)

        return await within(budget, run(), backend=f"database `{database}`")

    async def activity(self, database: str, *, budget: float) -> Obj:
        async def work(conn: psycopg.AsyncConnection[Obj]) -> Obj:
            settings = await (await conn.execute(
                "SELECT current_setting('max_connections')::int AS max_connections, "
                "current_setting('superuser_reserved_connections')::int AS reserved")).fetchone()
            groups = await (await conn.execute(_GROUPS)).fetchall()
            return {**(settings or {}), "groups": groups}

        return await self._bounded(database, budget, work)

    async def long_queries(self, database: str, *, over_seconds: int, limit: int, budget: float) -> list[Obj]:
        async def work(conn: psycopg.AsyncConnection[Obj]) -> list[Obj]:
            return await (await conn.execute(_LONG_QUERIES, (over_seconds, limit))).fetchall()

        return await self._bounded(database, budget, work)

    async def session(self, database: str, pid: int, *, budget: float) -> Obj | None:
        async def work(conn: psycopg.AsyncConnection[Obj]) -> Obj | None:
            return await (await conn.execute(_SESSION, (pid,))).fetchone()

        return await self._bounded(database, budget, work)

    async def signal_session(self, database: str, pid: int, *, terminate: bool, still: Callable[[Obj | None], None],
                             budget: float) -> Obj:
        function = "pg_terminate_backend" if terminate else "pg_cancel_backend"
        step: dict[str, Any] = {"at": "checking"}  # → "sending" → "sent": what a failure in the middle means

        async def run() -> Obj:
            async with self._connect(database) as conn:
                async with conn.transaction():
                    await _limits(conn)
                    await conn.execute("SELECT pg_stat_clear_snapshot()")  # this very moment, not a cached view
                    before = await (await conn.execute(_SESSION, (pid,))).fetchone()
                    still(before)  # raises when the session is not the approved one any more: nothing is sent
                    step["at"] = "sending"
                    row = await (await conn.execute(sql.SQL("SELECT {f}(%s) AS sent").format(f=sql.Identifier(function)),
                                                    (pid,))).fetchone()
                    step.update(at="sent", sent=bool(row and row["sent"]))
                sent = bool(step["sent"])
                return {"sent": sent, "ended": await _watch(conn, pid, before or {}, terminate=terminate) if sent else False}

        try:
            return await within(budget, run(), backend=f"database `{database}`")
        except (BackendUnavailable, ExecutionError) as exc:
            if step["at"] == "sent":  # PostgreSQL answered the signal; only what came after it failed
                return {"sent": bool(step["sent"]), "ended": False}
            if step["at"] == "sending" and isinstance(exc, BackendUnavailable):  # (an ExecutionError is a clear "no")
                raise OutcomeUnknown(f"`{function}({pid})` was sent to database `{database}` but no answer came back ({exc}); "
                                     "it may or may not have been applied. Look before trying again.") from exc
            raise


async def _watch(conn: psycopg.AsyncConnection[Obj], pid: int, before: Obj, *, terminate: bool) -> bool:
    """Up to 2 s after a signal: did it work? (A query in a step that cannot be interrupted takes a
    moment.) Watching is best effort: a failure here says nothing about the signal."""
    try:
        for _ in range(20):
            await asyncio.sleep(0.1)
            async with conn.transaction():
                await _limits(conn)
                await conn.execute("SELECT pg_stat_clear_snapshot()")
                now = await (await conn.execute(_SESSION, (pid,))).fetchone()
            if _ended(before, now, terminate=terminate):
                return True
    except psycopg.Error:
        pass
    return False


def _ended(before: Obj, now: Obj | None, *, terminate: bool) -> bool:
    """After a signal: is the backend gone (terminate) / is the query it ran over (cancel)?"""
    if now is None or now["backend_start"] != before.get("backend_start"):
        return True
    if terminate:
        return False
    return bool(now["query_start"] != before.get("query_start") or now["state"] != before.get("state"))
