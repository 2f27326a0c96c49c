"""A deadline on one backend call that does not wait for the call to clean up after itself.

``asyncio.wait_for`` waits for the cancelled call to finish cancelling, and some clients take long
over that: psycopg, cancelled in the middle of a query, sends the server a cancel request and waits
up to 5 s for it, twice — against a server that stopped answering that is ten seconds after the
deadline. A person who asked a read-only question is owed an answer within 2 s (bot/pipeline.py),
so ``within`` answers at the deadline and lets the cancelled call end in the background.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from bot.errors import BackendUnavailable

T = TypeVar("T")
_ending: set[asyncio.Future[Any]] = set()  # cancelled calls still cleaning up (kept referenced until done)


async def within(seconds: float, work: Awaitable[T], *, backend: str) -> T:
    """``await work``, or ``BackendUnavailable(backend, "no answer within …")`` after ``seconds``."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        _abandon(task)
        raise
    if not done:
        _abandon(task)
        raise BackendUnavailable(backend, f"no answer within {seconds:g} s (slow, paused or unreachable)")
    return task.result()


def _abandon(task: asyncio.Future[Any]) -> None:
    task.cancel()
    _ending.add(task)
    task.add_done_callback(_ended)


def _ended(task: asyncio.Future[Any]) -> None:
    _ending.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it: the caller was already told
