"""opsbot's state in real PostgreSQL: transitions happen once, the requester cannot approve at the
database level, and the audit table is append-only and chained."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest
import pytest_asyncio

from bot.adapters.store import Store, verify_chain
from bot.domain import Actor, RequestState, UserId

ALICE, CAROL = Actor(UserId("U_A"), "alice"), Actor(UserId("U_C"), "carol")
PLAN = {"target": "deployment/p/n/w", "environment": "p", "fingerprint": "f", "summary": "w: 1 → 2"}


@pytest_asyncio.fixture
async def store(state_db: str) -> AsyncIterator[Store]:
    s = Store(state_db, max_size=20)
    await s.open()
    yield s
    await s.close()


async def _request(store: Store, state: RequestState = RequestState.APPROVED, required: int = 1) -> str:
    r = await store.create_request(id=f"r-{id(state)}{asyncio.get_running_loop().time()}", command="scale", text="scale w 2",
                                   requester=ALICE, channel_id="C", plan=PLAN, reason="", state=state,
                                   approvals_required=required, approver_roles=("approver",), rule="r", expires_in=60)
    return r.id


async def test_a_request_is_claimed_once_among_racing_workers(store: Store) -> None:
    rid = await _request(store)
    claims = await asyncio.gather(*(store.transition(rid, from_state=RequestState.APPROVED, to_state=RequestState.RUNNING,
                                                     worker=f"w{i}") for i in range(10)))
    assert sum(c is not None for c in claims) == 1


async def test_the_database_refuses_a_self_approval(store: Store, state_db: str) -> None:
    rid = await _request(store, RequestState.PENDING_APPROVAL)
    with psycopg.connect(state_db) as conn, pytest.raises(psycopg.errors.CheckViolation, match="cannot approve own request"):
        conn.execute("INSERT INTO ops_approvals (request_id, approver_id, decision) VALUES (%s, %s, 'approve')", (rid, ALICE.user_id))


async def test_audit_is_append_only_and_chained_under_concurrency(store: Store, state_db: str) -> None:
    async def writer(n: int) -> None:
        for i in range(50):
            await store.append_audit(event="requested", actor=CAROL, channel_id="C", request_id=f"r{n}-{i}",
                                     command_text="scale w 2", plan=PLAN, result=None)

    await asyncio.gather(writer(1), writer(2))
    rows = await store.audit_rows()
    assert [r["seq"] for r in rows] == list(range(1, 101))
    assert verify_chain(rows) is None
    with psycopg.connect(state_db) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("UPDATE audit_events SET actor_id = 'U_X' WHERE seq = 5")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("DELETE FROM audit_events WHERE seq = 5")
    # An edit that bypasses the trigger is found at its row.
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
        conn.execute("UPDATE audit_events SET command_text = 'scale w 20' WHERE seq = 42")
    assert verify_chain(await store.audit_rows()) == 42
