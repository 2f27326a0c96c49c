"""The composition root: settings + config → every part wired together, started and stopped.

Used by ``opsbot serve``/``opsbot worker`` and by the tests (which build exactly what production
runs, pointed at the fakes through SLACK_API_URL and KUBECONFIG).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from bot.adapters.audit_log import AuditLog
from bot.adapters.directory import UserGroupDirectory, slack_fetch
from bot.adapters.http_probe import HttpProbeAdapter
from bot.adapters.kube import KubeAdapter
from bot.adapters.platform_db import PlatformDbAdapter
from bot.adapters.queues import ActionQueue, QueueAdapter
from bot.adapters.ratelimit import RateLimiter
from bot.adapters.redis_pools import RedisPools
from bot.adapters.redis_targets import RedisTargetAdapter
from bot.adapters.spool import AuditSpool
from bot.adapters.store import Store
from bot.approvals import Approvals
from bot.audit import Audit, AuditPoster, secret_values
from bot.config import Config
from bot.errors import BackendUnavailable
from bot.messages import busy_text
from bot.metrics import Metrics
from bot.notices import Notices
from bot.pipeline import Admission, Pipeline
from bot.ports import Context, Directory, NoDirectory
from bot.settings import Settings
from bot.slack.app import build_app
from bot.slack.chat import SlackChat
from bot.slack.payloads import command_request, shape_problem
from bot.worker import HELD_CONNECTIONS, ActionWorker, Executor
from commands.actions.http import secret_header_values

log = logging.getLogger(__name__)
QUERY_CONNECTIONS = 10  # what a process's queries share, besides the connections it holds (HELD_CONNECTIONS)


def state_store(url: str, *, timeout: float = 10.0) -> Store:
    """opsbot's own database, pooled. Its four running jobs and two posters each keep a connection
    checked out for a lock (bot/worker.py ``HELD_CONNECTIONS``); with a pool of only 10, those six
    left four for every query, and a worker's checkouts waited ~0.3 s each (bench/workers_e2e.py,
    ``db_pool``). The pool holds them on top of its 10 for queries: at most 16 per process (mind
    PostgreSQL's ``max_connections`` across replicas), opened as needed."""
    return Store(url, max_size=QUERY_CONNECTIONS + HELD_CONNECTIONS, timeout=timeout)


MAX_BODY = 256 * 1024  # the largest Slack payloads (block_actions with a full message) are tens of kB
_TIMESTAMP = re.compile(r"[0-9]{1,12}")  # X-Slack-Request-Timestamp: Unix seconds, ASCII digits only


@dataclass
class Runtime:
    settings: Settings
    config: Config
    store: Store
    kube: KubeAdapter
    queues: QueueAdapter
    actions: ActionQueue
    chat: SlackChat
    audit: Audit
    approvals: Approvals
    pipeline: Pipeline
    executor: Executor
    worker: ActionWorker
    bolt: AsyncApp
    metrics: Metrics
    inflight: set[asyncio.Task[Any]]
    poster: AuditPoster
    notices: Notices
    redis: RedisPools  # every Redis connection of opsbot's own (not bullmq's Worker's); closed last
    probes: HttpProbeAdapter  # the HTTP client of `/ops health`

    @classmethod
    def build(cls, settings: Settings, config: Config) -> Runtime:
        metrics = Metrics()
        store = state_store(settings.database_url)
        metrics.watch_pool(store.pool.get_stats)
        kube = KubeAdapter(config, kubeconfig=settings.kubeconfig)
        redis = RedisPools()
        queues = QueueAdapter(redis)
        actions = ActionQueue(redis.client(settings.redis_url), settings.actions_queue, settings.queue_prefix)
        client = AsyncWebClient(token=settings.slack_bot_token, base_url=settings.slack_api_url)
        chat = SlackChat(client)
        secrets = secret_values([settings.slack_bot_token, settings.slack_signing_secret, settings.slack_app_token,
                                 settings.database_url, settings.redis_url,
                                 *(db.url for db in config.databases.values()), *(q.redis_url for q in config.queues.values()),
                                 *(r.url for r in config.redis.values()), *secret_header_values(config)])
        audit = Audit(AuditLog(store), audit_channel=config.slack.audit_channel, secrets=secrets,
                      spool=AuditSpool(settings.spool_dir, on_quarantine=metrics.spool_quarantined.inc))
        poster = AuditPoster(audit=audit, store=store, chat=chat, metrics=metrics)
        notices = Notices(store=store, chat=chat, metrics=metrics, secrets=secrets)
        probes = HttpProbeAdapter()
        ctx = Context(config=config, kube=kube, databases=PlatformDbAdapter(config), queues=queues,
                      redis=RedisTargetAdapter(config, redis), http=probes)
        directory: Directory = NoDirectory()
        if config.usergroups:
            directory = UserGroupDirectory(redis.client(settings.redis_url), slack_fetch(client), ttl=config.slack.usergroup_cache,
                                           groups=config.usergroups, prefix=f"opsbot:{settings.queue_prefix}",
                                           on_config_error=lambda g, e: metrics.usergroup_config_errors.labels(g, e).inc())
        limiter = RateLimiter(redis.client(settings.redis_url), prefix=f"opsbot:{settings.queue_prefix}")
        approvals = Approvals(config=config, store=store, chat=chat, audit=audit, actions=actions, metrics=metrics,
                              directory=directory, notices=notices)
        pipeline = Pipeline(config=config, ctx=ctx, chat=chat, audit=audit, approvals=approvals, metrics=metrics, limiter=limiter,
                            admission=Admission(settings.max_in_flight))
        executor = Executor(ctx=ctx, store=store, notices=notices, audit=audit, metrics=metrics, worker_id=settings.worker_id)
        worker = ActionWorker(executor=executor, approvals=approvals, actions=actions, store=store, redis_url=settings.redis_url,
                              queue_name=settings.actions_queue, prefix=settings.queue_prefix,
                              lease=timedelta(seconds=settings.worker_lease))
        inflight: set[asyncio.Task[Any]] = set()
        bolt = build_app(client=client, signing_secret=settings.slack_signing_secret, pipeline=pipeline, approvals=approvals,
                         inflight=inflight)
        return cls(settings=settings, config=config, store=store, kube=kube, queues=queues, actions=actions, chat=chat,
                   audit=audit, approvals=approvals, pipeline=pipeline, executor=executor, worker=worker, bolt=bolt,
                   metrics=metrics, inflight=inflight, poster=poster, notices=notices, redis=redis, probes=probes)

    async def start(self, *, with_worker: bool = True) -> None:
        await self.kube.load()  # the kubeconfig, in the client threads: no request ever waits for it on the loop
        self.chat.open()
        await self.store.open()
        self.poster.start()
        self.notices.start()
        if with_worker:
            await self.worker.start()

    async def stop(self, *, grace: float = 10.0) -> None:
        """Let requests already acked finish (bounded), then close everything."""
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=grace)
        writer = self.pipeline.busy_writer  # the busy refusals still queued: no audit row is cut off
        if writer is not None and not writer.done():
            await asyncio.wait({writer}, timeout=grace)
            if not writer.done():  # (not left to spool row after row once the database pool is closed)
                log.warning("stopping: %d busy refusal(s) not audited after %s s", self.pipeline.busy_pending, grace)
                writer.cancel()
        closers: list[tuple[str, Any]] = [
            ("worker", self.worker.stop), ("notices", self.notices.stop), ("audit poster", self.poster.stop),
            ("action queue", self.actions.close), ("platform queues", self.queues.close), ("health probes", self.probes.close),
            ("slack replies", self.chat.close),
            ("redis connections", self.redis.close),
        ]
        for name, close in closers:
            # Each step is bounded: a backend that is down must not keep the process from exiting.
            # (asyncio.wait, not wait_for: wait_for would wait for ever on a task that ignores cancellation.)
            step = asyncio.ensure_future(close())
            done, _ = await asyncio.wait({step}, timeout=grace * 2)
            if not done:
                log.warning("stopping %s: still not done after %s s; going on", name, grace * 2)
            elif step.exception() is not None:
                log.warning("stopping %s: %s", name, step.exception())
        self.kube.close()
        await self.store.close()
        if self.audit.spool is not None:
            self.audit.spool.close()

    async def readiness(self) -> dict[str, Any]:
        checks: dict[str, str] = {"config": "ok"}

        async def check(name: str, probe: Any) -> None:
            try:
                await asyncio.wait_for(probe(), timeout=3)
                checks[name] = "ok"
            except (BackendUnavailable, TimeoutError) as exc:
                checks[name] = str(exc) or "timed out"

        await asyncio.gather(check("database", self.store.ping), check("redis", self.actions.ping))
        return {"ready": all(v == "ok" for v in checks.values()), "checks": checks}

    def busy_ack(self, body: Any) -> str | None:
        """The fast path under overload: a signed `/ops` slash command (``body``, parsed) that
        arrives while admission is full is answered here with ``busy_text`` and recorded as
        ``busy`` (``Pipeline.record_busy`` queues the row for one writer task), without
        Bolt's dispatch (at 300 commands/s that dispatch alone took the process's core, and the
        busy answers came seconds late). Returns the ack's text, or None: Bolt handles the request
        as always (clicks, which are never refused as busy; a command while there is room; a
        payload or command that does not read, which Bolt's listener answers and records).
        The listener checks admission again itself, so a request that got past here while the
        bound filled is still refused there (once: each attempt is audited exactly once)."""
        if not isinstance(body, dict) or body.get("command") != "/ops" or "payload" in body:
            return None
        load = self.pipeline.admission.full()
        if load is None:
            return None
        try:
            req = command_request(body)
            inv = self.pipeline.parse(req)
        except Exception:  # MalformedPayload, a usage error, a bug: the listener answers and records it
            return None
        self.pipeline.record_busy(req, inv, load)  # queued; Runtime.stop waits for the queue's writer
        return busy_text(load.in_flight, load.retry_after)

    def socket_mode_handler(self, app_token: str) -> Any:
        """Socket Mode's handler, with the same fast path: a slash command envelope while admission
        is full is answered busy without Bolt's dispatch (the listener's own check stays behind it)."""
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
        from slack_sdk.socket_mode.response import SocketModeResponse

        runtime = self

        class Handler(AsyncSocketModeHandler):  # type: ignore[misc]
            async def handle(self, client: Any, req: Any) -> None:
                busy = runtime.busy_ack(req.payload) if req.type == "slash_commands" else None
                if busy is None:
                    await super().handle(client, req)
                else:
                    await client.send_socket_mode_response(SocketModeResponse(envelope_id=req.envelope_id, payload={"text": busy}))

        return Handler(self.bolt, app_token)

    def web_app(self, *, slack: bool = True) -> web.Application:
        """HTTP: Slack events (slash commands and interactivity), health, readiness, metrics.
        ``slack=False`` (`opsbot worker`): health, readiness and metrics only, for the probes and scraping.

        Before Bolt sees a request: bodies over ``MAX_BODY`` get 413 (Slack's own payloads are far
        smaller; a huge body would otherwise be parsed on the event loop), and a body Bolt cannot
        read gets 401 if its signature is wrong and 400 if it is signed but malformed, logged as a
        warning without a traceback (a malformed request is the sender's problem, not opsbot's)."""
        app = web.Application(client_max_size=MAX_BODY)
        verifier = SignatureVerifier(self.settings.slack_signing_secret)

        async def slack_events(request: web.Request) -> web.Response:
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                log.warning("refused a %s-byte request to /slack/events (limit %d)", request.content_length, MAX_BODY)
                return web.json_response({"error": f"request body over {MAX_BODY} bytes"}, status=413)
            # slack_sdk's verifier does int(timestamp): a missing, non-numeric or over-long one would
            # raise (a 500 with a traceback) instead of being refused. Slack sends Unix seconds.
            timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
            if not _TIMESTAMP.fullmatch(timestamp) or not verifier.is_valid(
                    body=raw.decode("utf-8", "replace"), timestamp=timestamp, signature=request.headers.get("X-Slack-Signature", "")):
                return web.json_response({"error": "invalid request signature"}, status=401)
            try:
                bolt_req = await to_bolt_request(request)
                problem = shape_problem(bolt_req.body)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                log.warning("refused a signed but malformed request to /slack/events: %s", problem)
                return web.json_response({"error": f"malformed Slack payload: {problem}"}, status=400)
            busy = self.busy_ack(bolt_req.body)
            if busy is not None:  # past the admission bound: answered here, without Bolt's dispatch
                return web.Response(text=busy, content_type="text/plain")  # what Bolt sends for a text-only ack
            try:
                return await to_aiohttp_response(await self.bolt.async_dispatch(bolt_req))
            except Exception as exc:  # Bolt could not make sense of a (signed) payload
                log.warning("refused a request Bolt could not dispatch: %s: %s", type(exc).__name__, exc)
                return web.json_response({"error": "malformed Slack payload"}, status=400)

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        async def readyz(_: web.Request) -> web.Response:
            body = await self.readiness()
            return web.json_response(body, status=200 if body["ready"] else 503)

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        if slack:
            app.router.add_post("/slack/events", slack_events)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        return app
