"""opsbot's state in real PostgreSQL: transitions happen once, the requester cannot approve at the
database level."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest
import pytest_asyncio

from bot.adapters.store import Store
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
