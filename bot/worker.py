"""Execution: an approved request, handed over through BullMQ, run at most once.

``Executor.run`` is what a job does:

1. claim: ``approved → running`` in one conditional UPDATE (zero rows: another worker has it, or it
   was never approved: stop);
2. take the target's lock (one action per target at a time);
3. re-plan and compare fingerprints: if the target changed since approval, ``stale``, not run;
4. execute, with a heartbeat so that a lost worker is noticed;
5. ``succeeded``/``failed``, audit, result in the card's thread;
6. follow what the change set going (a rollout, a job) when the command can: each step in the
   thread, the end in the audit trail (``followed``/``follow_failed``, the latter posted to the audit
   channel as loudly as a failure). This runs as a task of its own after the job has ended, so a
   rollout of many minutes holds neither a worker slot nor the target's lock; a replica that stops
   meanwhile stops following (the request itself is already recorded as succeeded).

A ``running`` request whose heartbeat stopped becomes ``unknown`` (the sweeper), never retried:
re-running a rollback or a provider toggle blindly is worse than asking a human.

The sweeper also expires requests whose approval window passed and re-enqueues approved requests
whose job was lost (Redis down at the moment of approval): the job id is the request id, so this
never makes two executions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

from bullmq import Worker as BullWorker

from bot.adapters.redis_pools import worker_url
from bot.adapters.store import Store
from bot.approvals import Approvals, Enqueue
from bot.audit import Audit
from bot.domain import SYSTEM, OpsRequest, Plan, Progress, RequestState
from bot.errors import BackendUnavailable, ExecutionError, OpsbotError, OutcomeUnknown, UserError
from bot.messages import thread_result
from bot.metrics import Metrics
from bot.notices import Notices
from bot.ports import Context
from commands.registry import command

log = logging.getLogger(__name__)


class Executor:
    def __init__(self, *, ctx: Context, store: Store, notices: Notices, audit: Audit, metrics: Metrics, worker_id: str,
                 lock_wait: float = 60.0, heartbeat_every: float = 5.0) -> None:
        self.ctx, self.store, self.notices, self.audit, self.metrics = ctx, store, notices, audit, metrics
        self.worker_id, self.lock_wait, self.heartbeat_every = worker_id, lock_wait, heartbeat_every
        self.following: set[asyncio.Task[None]] = set()

    async def run(self, request_id: str) -> str:
        request = await self.store.transition(request_id, from_state=RequestState.APPROVED, to_state=RequestState.RUNNING,
                                              worker=self.worker_id)
        if request is None:
            current = await self.store.get(request_id)
            log.info("request %s not claimed (state %s)", request_id, current.state if current else "missing")
            return current.state.value if current else "missing"
        await self._record("started", request)
        self.notices.card_changed()
        target = str(request.plan["target"])
        async with self.store.target_lock(target, wait=self.lock_wait) as locked:
            if not locked:
                busy = ", ".join(await self.store.open_requests_on(target)) or "another request"
                return await self._finish(request, RequestState.FAILED,
                                          error=f"another action on {request.plan['target_label']} is running ({busy}); "
                                                "nothing was done. Try again when it has finished.")
            return await self._run_locked(request)

    async def _run_locked(self, request: OpsRequest) -> str:
        try:
            cmd = command(request.command, self.ctx.config)
        except KeyError:  # an action removed from the config since the request was made
            return await self._finish(request, RequestState.FAILED,
                                      error=f"`{request.command}` is no longer a command in opsbot's config (it was removed or "
                                            "renamed since this was requested); nothing was done.")
        try:
            fresh = await cmd.plan(dict(request.plan["params"]), self.ctx)
        except UserError as exc:
            return await self._finish(request, RequestState.STALE, error=str(exc))
        except OpsbotError as exc:
            return await self._finish(request, RequestState.FAILED, error=f"could not re-check the target: {exc}")
        if fresh.fingerprint != request.plan["fingerprint"]:
            return await self._finish(request, RequestState.STALE, error=_what_changed(request.plan, fresh))
        env = self.ctx.config.environments.get(fresh.environment)
        if env is not None and env.frozen:  # frozen since it was approved (a restart with a new policy): not run
            return await self._finish(request, RequestState.FAILED,
                                      error=f"{fresh.environment} is frozen now ({env.frozen}); it was not when this was "
                                            "approved. Nothing was done.")
        started = time.monotonic()
        heartbeat = asyncio.create_task(self._heartbeat(request.id))
        try:
            outcome = await cmd.execute(fresh, replace(self.ctx, request_id=request.id, requester=request.requester.user_id,
                                                       reason=request.reason))
        except UserError as exc:  # the target moved between re-plan and write (e.g. a 409 or a row changed)
            return await self._finish(request, RequestState.STALE, error=str(exc), started=started)
        except OutcomeUnknown as exc:  # a write was sent and no clear answer came back: a human looks first
            return await self._finish(request, RequestState.UNKNOWN, error=str(exc), started=started)
        except (ExecutionError, BackendUnavailable) as exc:
            return await self._finish(request, RequestState.FAILED, error=str(exc), started=started)
        except Exception as exc:
            log.exception("request %s crashed", request.id)
            return await self._finish(request, RequestState.FAILED, error=f"internal error ({type(exc).__name__}); see opsbot logs",
                                      started=started)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        final = await self._finish(request, RequestState.SUCCEEDED, result={"message": outcome.message, **outcome.details},
                                   started=started)
        steps = cmd.follow(fresh, outcome, self.ctx) if final == RequestState.SUCCEEDED.value else None
        if steps is not None:
            task = asyncio.create_task(self._follow(request, steps), name=f"follow:{request.id}")
            self.following.add(task)
            task.add_done_callback(self.following.discard)
        return final

    async def _follow(self, request: OpsRequest, steps: AsyncIterator[Progress]) -> None:
        last: Progress | None = None
        try:
            async for step in steps:
                last = step
                await self.notices.thread(request, step.text)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("following request %s failed", request.id)
            last = Progress(text="opsbot stopped following this change (internal error; see its logs)", done=True, failed=True)
            await self.notices.thread(request, last.text)
        if last is not None and last.done:
            event = "follow_failed" if last.failed else "followed"
            await self._record(event, request, result={"message": last.text})

    def following_request(self, request_id: str) -> bool:
        return any(t.get_name() == f"follow:{request_id}" for t in self.following)

    async def stop_following(self) -> None:
        for task in list(self.following):
            task.cancel()
        if self.following:
            await asyncio.wait(set(self.following), timeout=5)

    async def _heartbeat(self, request_id: str) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_every)
            try:
                await self.store.heartbeat(request_id)
            except BackendUnavailable:
                log.warning("heartbeat for %s failed", request_id)

    async def _finish(self, request: OpsRequest, state: RequestState, *, error: str | None = None,
                      result: dict[str, Any] | None = None, started: float | None = None) -> str:
        done = await self.store.transition(request.id, from_state=RequestState.RUNNING, to_state=state,
                                           result=result, error=error)
        if done is None:  # the sweeper declared it unknown meanwhile; keep that verdict
            log.error("request %s finished as %s but was no longer running", request.id, state.value)
            return "lost"
        if started is not None:
            self.metrics.execution_duration.labels(request.command, state.value).observe(time.monotonic() - started)
        self.metrics.requests.labels(request.command, state.value).inc()
        await self._record(state.value, done, result=result or {"error": error})
        self.notices.card_changed()
        await self.notices.thread(done, thread_result(done))
        return state.value

    async def _record(self, event: str, request: OpsRequest, result: dict[str, Any] | None = None) -> None:
        await self.audit.record(event, actor=SYSTEM, channel_id=request.channel_id, request_id=request.id,
                                text=request.text, plan=request.plan, result=result)

    async def mark_lost(self, lease: timedelta) -> int:
        n = 0
        for request_id in await self.store.lost_running(lease):
            request = await self.store.transition(request_id, from_state=RequestState.RUNNING, to_state=RequestState.UNKNOWN,
                                                  error="worker lost mid-action (heartbeat stopped)")
            if request is not None:
                n += 1
                await self._record("unknown", request, result={"error": request.error})
                self.notices.card_changed()
                await self.notices.thread(request, thread_result(request))
        return n


def _what_changed(approved: dict[str, Any], fresh: Plan) -> str:
    changes = []
    for key, now in {**fresh.before, **fresh.observed}.items():
        then = {**approved.get("before", {}), **approved.get("observed", {})}.get(key)
        if then == now:
            continue
        if key == "definition":  # an action's YAML (commands/actions/base.py)
            changes.append("the action's definition in opsbot's config changed since it was approved")
            continue
        if isinstance(then, list) and isinstance(now, list):  # e.g. the ids of a batch: say which ones moved
            gone, new = [v for v in then if v not in now], [v for v in now if v not in then]
            parts = [f"{what} {', '.join(map(str, items[:10]))}" + (f" and {len(items) - 10} more" if len(items) > 10 else "")
                     for what, items in (("no longer there:", gone), ("new:", new)) if items]
            changes.append(f"{key}: {'; '.join(parts) or 'the same, in another order'}")
        else:
            changes.append(f"{key} was {then}, now {now}")
    return f"{approved.get('target_label', 'the target')} changed after approval ({'; '.join(changes) or 'plan differs'})."


class ActionWorker:
    """The BullMQ consumer of opsbot's action queue plus the sweeper."""

    def __init__(self, *, executor: Executor, approvals: Approvals, actions: Enqueue, store: Store, redis_url: str,
                 queue_name: str, prefix: str = "bull", sweep_every: float = 5.0, lease: timedelta = timedelta(minutes=2),
                 requeue_after: timedelta = timedelta(seconds=30)) -> None:
        self.executor, self.approvals, self.actions, self.store = executor, approvals, actions, store
        self.redis_url, self.queue_name, self.prefix = redis_url, queue_name, prefix
        self.sweep_every, self.lease, self.requeue_after = sweep_every, lease, requeue_after
        self._worker: Any = None
        self._sweeper: asyncio.Task[None] | None = None

    async def _process(self, job: Any, token: str) -> str:
        return await self.executor.run(str(job.data["requestId"]))

    async def start(self) -> None:
        # drainDelay: how long one BZPOPMIN waits on an empty queue (a job wakes it at once); its
        # connection's read timeout must be longer (worker_url, see redis_pools.py).
        self._worker = BullWorker(self.queue_name, self._process,
                                  {"connection": worker_url(self.redis_url), "prefix": self.prefix, "concurrency": 4,
                                   "lockDuration": 60000, "maxStalledCount": 0, "drainDelay": 5})
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def sweep(self) -> None:
        await self.approvals.expire_due()
        await self.executor.mark_lost(self.lease)
        for request_id in await self.store.approved_waiting(self.requeue_after):
            await self.actions.enqueue(request_id)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except BackendUnavailable as exc:  # an outage is expected: said without a traceback
                log.warning("sweep: %s; will try again", exc)
            except Exception:
                log.exception("sweep failed; will try again")
            await asyncio.sleep(self.sweep_every)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking jobs and let the running one finish (bounded by ``grace``). bullmq's
        ``Worker.close`` shields itself against cancellation and waits for its jobs for ever, so it
        runs as its own task here; past the grace period it is closed with force (a request cut off
        that way has a stopped heartbeat and becomes ``unknown``, never silently retried)."""
        await self.executor.stop_following()
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._worker:
            closing = asyncio.ensure_future(self._worker.close())
            done, _ = await asyncio.wait({closing}, timeout=grace)
            if not done:
                log.warning("the action worker did not stop within %s s; closing it with force", grace)
                forced = asyncio.ensure_future(self._worker.close(force=True))
                await asyncio.wait({closing, forced}, timeout=grace)
