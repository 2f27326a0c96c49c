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

Scheduled reverts (``Reverts``, a flag action's ``revert_after``): an outcome that carries
``revert`` (when, and when to announce it) gets a row in ``scheduled_reverts`` before the success is
recorded. The sweeper announces it in the request's thread shortly before it is due, then claims it
(one conditional UPDATE: one replica), takes the target's lock and calls the command's ``revert``,
which puts the old value back only if the flag still holds what the request set. Every step is on
the original request's audit trail, by opsbot. A backend down at that moment unclaims the row for a
later try (said once in the thread and the trail); it is never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from bullmq import Worker as BullWorker

from bot.adapters.redis_pools import worker_url
from bot.adapters.store import Store
from bot.approvals import Approvals, Enqueue
from bot.audit import Audit
from bot.domain import SYSTEM, OpsRequest, Outcome, Plan, Progress, RequestState
from bot.errors import BackendUnavailable, ExecutionError, OpsbotError, OutcomeUnknown, UserError
from bot.messages import mrkdwn, thread_result
from bot.metrics import Metrics
from bot.notices import Notices
from bot.ports import Context
from commands.registry import command

log = logging.getLogger(__name__)

CONCURRENCY = 4  # jobs one worker process runs at once (BullMQ's concurrency)
# Connections a process keeps checked out for long stretches: each running job's target lock (a
# session advisory lock, held for the whole action) and the two posters' locks (bot/notices.py,
# the audit poster), held for a whole posting round. The pool is sized on top of these (runtime.py).
HELD_CONNECTIONS = CONCURRENCY + 2


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
        outcome = await self._schedule_revert(request, fresh, outcome)  # before the success is recorded: a crash keeps it
        result = {"message": outcome.message, **outcome.details}
        final = await self._finish(request, RequestState.SUCCEEDED, result={**result, "undo": _undo_offer(cmd, request, result)},
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

    async def _schedule_revert(self, request: OpsRequest, plan: Plan, outcome: Outcome) -> Outcome:
        """An outcome asking to be put back later (``revert``: due_at, announce_at, text) is kept in
        ``scheduled_reverts``, unless it puts back what a pending revert on the same target would: then
        that revert has been done by hand, early, and ends (its thread is told); none is scheduled."""
        revert = outcome.details.get("revert")
        if not isinstance(revert, dict):
            return outcome
        try:
            ended = await self.store.supersede_reverts(target=plan.target, value=plan.after, by=request.id)
            if not ended:
                await self.store.schedule_revert(request.id, due_at=datetime.fromisoformat(revert["due_at"]),
                                                 announce_at=datetime.fromisoformat(revert["announce_at"]))
        except BackendUnavailable as exc:  # the change is made; say loudly that nothing will undo it
            log.error("request %s: auto-revert not scheduled: %s", request.id, exc)
            return replace(outcome, message=f"{outcome.message} :rotating_light: Its auto-revert could NOT be scheduled "
                                            f"({exc}): put it back by hand when it is time.")
        for old_id in ended:
            old = await self.store.get(old_id)
            if old is not None:
                text = f":heavy_check_mark: Auto-revert of `{old_id}` cancelled: `{request.id}` put it back already ({plan.summary})."
                await self._record("revert_superseded", old, result={"message": text, "by": request.id})
                await self.notices.thread(old, mrkdwn(text))
        if ended:
            note = (f" That ends {', '.join(f'`{i}`' for i in ended)} early: its auto-revert is cancelled, and none is "
                    "scheduled for this change.")
            return replace(outcome, message=outcome.message + note, details={**outcome.details, "revert": None})
        return replace(outcome, message=f"{outcome.message} {revert.get('text', '')}".strip())

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
        await self.notices.thread(done, thread_result(done), undo_button=bool(((done.result or {}).get("undo") or {}).get("offered")))
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


def _undo_offer(cmd: Any, request: OpsRequest, result: dict[str, Any]) -> dict[str, Any]:
    """Whether the card and thread of a success offer Undo (bot/undo.py), and why not; a command's
    bug here must not keep the success from being recorded."""
    try:
        return dict(cmd.undo_offer(request.plan, result))
    except Exception:
        log.exception("the undo offer of %s failed", request.id)
        return {"offered": False, "why": "opsbot could not work out its inverse (internal error; see its logs)"}


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
        self.reverts = Reverts(executor)

    async def _process(self, job: Any, token: str) -> str:
        return await self.executor.run(str(job.data["requestId"]))

    async def start(self) -> None:
        # drainDelay: how long one BZPOPMIN waits on an empty queue (a job wakes it at once); its
        # connection's read timeout must be longer (worker_url, see redis_pools.py).
        self._worker = BullWorker(self.queue_name, self._process,
                                  {"connection": worker_url(self.redis_url), "prefix": self.prefix, "concurrency": CONCURRENCY,
                                   "lockDuration": 60000, "maxStalledCount": 0, "drainDelay": 5})
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def sweep(self) -> None:
        await self.approvals.expire_due()
        await self.executor.mark_lost(self.lease)
        for request_id in await self.store.approved_waiting(self.requeue_after):
            await self.actions.enqueue(request_id)
        await self.reverts.run_due()
        await self.approvals.reminders.run_due()

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


# ---------------------------------------------------------------------------------------------- scheduled reverts


class Revertible(Protocol):
    """What a command with an automatic revert offers the worker (commands/actions/flag.py)."""

    def target_key(self, params: dict[str, Any]) -> str: ...

    def revert_notice(self, plan: dict[str, Any], request_id: str, seconds_left: float) -> str: ...

    def revert_delayed_notice(self, plan: dict[str, Any], request_id: str, error: str) -> str: ...

    async def revert(self, plan: dict[str, Any], ctx: Context, request_id: str) -> Outcome: ...


_EMOJI = re.compile(r"^:[a-z0-9_+-]+:\s*")


class Reverts:
    """Announces and runs the due rows of ``scheduled_reverts`` (called from every replica's sweeper)."""

    def __init__(self, executor: Executor, *, lease: timedelta = timedelta(minutes=5), retry_every: float = 30.0) -> None:
        self.executor, self.lease, self.retry_every = executor, lease, retry_every

    async def run_due(self, now: datetime | None = None) -> int:
        """Announce what is due soon, then revert what is due; ``now`` lets tests move time. Returns how
        many reverts this replica claimed."""
        store = self.executor.store
        for row in await store.reverts_to_announce(now):
            await self._guarded(row["request_id"], self._announce(row["request_id"], float(row["seconds_left"])))
        claimed = await store.claim_due_reverts(self.executor.worker_id, lease=self.lease, now=now)
        for row in claimed:
            await self._guarded(row["request_id"], self._revert(row))
        return len(claimed)

    async def _guarded(self, request_id: str, step: Any) -> None:
        try:
            await step
        except BackendUnavailable as exc:  # opsbot's own database: the row is unchanged or still claimed, tried later
            log.warning("revert of %s: %s; will try again", request_id, exc)
        except Exception:
            log.exception("revert of %s crashed; will try again", request_id)

    async def _command(self, request: OpsRequest) -> Revertible | None:
        try:
            cmd = command(request.command, self.executor.ctx.config)
        except KeyError:
            return None
        return cmd if hasattr(cmd, "revert") else None  # type: ignore[return-value]

    async def _announce(self, request_id: str, seconds_left: float) -> None:
        request = await self.executor.store.get(request_id)
        cmd = await self._command(request) if request else None
        if request is None or cmd is None:
            return  # said when it is due (_revert)
        text = cmd.revert_notice(request.plan, request.id, seconds_left)
        await self.executor._record("revert_announced", request, result={"message": text})
        await self.executor.notices.thread(request, mrkdwn(text))

    async def _revert(self, row: dict[str, Any]) -> None:
        ex, worker = self.executor, self.executor.worker_id
        request = await ex.store.get(row["request_id"])
        assert request is not None  # a foreign key
        cmd = await self._command(request)
        if cmd is None:
            await self._failed(request, f"the action `{request.command}` is no longer in opsbot's config, so opsbot cannot put "
                                        f"it back; do it by hand (it was: {request.plan.get('summary', request.text)}).")
            return
        if cmd.target_key(dict(request.plan["params"])) != request.plan["target"]:  # the flag moved in the config
            await self._failed(request, f"the action `{request.command}` now names another flag in opsbot's config than the "
                                        "one this request set, so opsbot does not put it back (it would write where nobody "
                                        f"approved); do it by hand (it was: {request.plan.get('summary', request.text)}).")
            return
        async with ex.store.target_lock(str(request.plan["target"]), wait=0) as locked:
            if not locked:  # a request on the same flag is running: after it, not interleaved with it
                await ex.store.revert_later(request.id, worker, "the flag is busy", delay=min(5.0, self.retry_every),
                                            warned=False)
                return
            try:
                outcome = await cmd.revert(request.plan, ex.ctx, request.id)
            except (BackendUnavailable, OutcomeUnknown) as exc:  # a compare-and-set: trying again cannot do it twice
                await ex.store.revert_later(request.id, worker, str(exc), delay=self.retry_every, warned=True)
                if row["warned_at"] is None:  # said once, not every try
                    await ex._record("revert_delayed", request, result={"error": str(exc)})
                    await ex.notices.thread(request, mrkdwn(cmd.revert_delayed_notice(request.plan, request.id, str(exc))))
                return
            except Exception as exc:
                if not isinstance(exc, ExecutionError):
                    log.exception("revert of %s crashed", request.id)
                why = str(exc) if isinstance(exc, ExecutionError) else f"internal error ({type(exc).__name__}); see opsbot logs"
                await self._failed(request, f"{request.plan.get('summary', request.text)} could not be put back "
                                            f"(auto-revert of `{request.id}`): {why} Check it and put it back by hand.")
                return
            event, state = ("reverted", "reverted") if outcome.ok else ("revert_skipped", "skipped")
            if not await ex.store.revert_done(request.id, worker, state):  # ended meanwhile (a request put it back by hand)
                log.info("revert of %s was ended by another request meanwhile", request.id)
                return
        await ex._record(event, request, result={"message": outcome.message, **outcome.details})
        await self._tell(request, outcome.message)

    async def _failed(self, request: OpsRequest, why: str) -> None:
        await self.executor.store.revert_done(request.id, self.executor.worker_id, "failed", why)
        await self.executor._record("revert_failed", request, result={"error": why})
        await self._tell(request, f":red_circle: {why}")

    async def _tell(self, request: OpsRequest, text: str) -> None:
        """In the thread, and on the card (its result line), how the revert ended."""
        await self.executor.store.note_result(request.id, "Auto-revert: " + _EMOJI.sub("", text))
        self.executor.notices.card_changed()
        await self.executor.notices.thread(request, mrkdwn(text))  # it quotes the flag's values: platform text
