"""The platforms' own PostgreSQL databases (providers, webhook events), through psycopg 3.

Table and column names come from config; they are validated as plain identifiers when the config
loads and always composed with ``psycopg.sql.Identifier``. Values are always bound parameters.
A connection is opened per operation (these commands are rare and a pool per platform database
would hold connections the platform needs more), with a short connect timeout so that a database
that is down makes the command fail closed quickly.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from bot.config import Config, Providers, Webhooks
from bot.errors import BackendUnavailable, ExecutionError

Obj = dict[str, Any]


def _table(spec: Providers | Webhooks) -> sql.Identifier:
    return sql.Identifier(spec.schema_, spec.table) if spec.schema_ else sql.Identifier(spec.table)


class PlatformDbAdapter:
    def __init__(self, config: Config) -> None:
        self._config = config

    @contextlib.asynccontextmanager
    async def _connect(self, database: str) -> AsyncIterator[psycopg.AsyncConnection[Obj]]:
        url = self._config.databases[database].url
        try:
            conn = await psycopg.AsyncConnection.connect(url, connect_timeout=5, row_factory=dict_row)
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
        async with self._connect(spec.database) as conn:
            return await (await conn.execute(q, (name,))).fetchone()

    async def provider_names(self, spec: Providers) -> list[str]:
        q = sql.SQL("SELECT {k} AS name FROM {t} ORDER BY {k} LIMIT 50").format(t=_table(spec), k=sql.Identifier(spec.key))
        async with self._connect(spec.database) as conn:
            return [str(r["name"]) for r in await (await conn.execute(q)).fetchall()]

    async def set_provider_active(self, spec: Providers, name: str, *, active: bool, expect: bool) -> bool:
        q = sql.SQL("UPDATE {t} SET {a} = %s WHERE {k} = %s AND {a} = %s").format(
            t=_table(spec), a=sql.Identifier(spec.active_column), k=sql.Identifier(spec.key))
        async with self._connect(spec.database) as conn, conn.transaction():
            cur = await conn.execute(q, (active, name, expect))
            if cur.rowcount > 1:
                raise ExecutionError(f"{spec.table}.{spec.key} = {name!r} matched {cur.rowcount} rows; refusing (rolled back).")
            return cur.rowcount == 1

    async def webhook_event(self, spec: Webhooks, event_id: str) -> Obj | None:
        q = sql.SQL("SELECT * FROM {t} WHERE {id}::text = %s").format(t=_table(spec), id=sql.Identifier(spec.id_column))
        async with self._connect(spec.database) as conn:
            return await (await conn.execute(q, (event_id,))).fetchone()

    async def replay_webhook(self, spec: Webhooks, event_id: str, enqueue: Callable[[Obj], Awaitable[None]]) -> Obj | None:
        sets = [sql.SQL("{s} = %s").format(s=sql.Identifier(spec.status_column))]
        if spec.error_column:
            sets.append(sql.SQL("{e} = NULL").format(e=sql.Identifier(spec.error_column)))
        q = sql.SQL("UPDATE {t} SET {sets} WHERE {id}::text = %s AND {s}::text = ANY(%s) RETURNING *").format(
            t=_table(spec), sets=sql.SQL(", ").join(sets), id=sql.Identifier(spec.id_column),
            s=sql.Identifier(spec.status_column))
        async with self._connect(spec.database) as conn, conn.transaction():
            row = await (await conn.execute(q, (spec.reset_to, event_id, list(spec.replayable)))).fetchone()
            if row is None:
                return None
            await enqueue(row)  # raises → the transaction rolls back: the row stays as it was
            return row
