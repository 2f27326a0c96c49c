"""Each seed platform's main incident, walked through `/ops` with that platform's own example config
(policies/examples/*.yaml, unchanged but for the `${…}` variables pointing at this test's PostgreSQL,
Redis and HTTP stand-ins), its own people (the config's role members and Slack user groups), its own
cluster (the emulator seeded with the config's namespaces, deployments and revision history), its
own tables and its own queues.

Every step goes through signed Slack requests, as a person in the incident channel would type it,
and each test checks what that person would check: the answer or the card, who approved, the
target's real state afterwards, the thread, and the audit trail in order."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from bullmq import Queue, Worker

from bot.config import Config, load_config
from bot.domain import OpsRequest
from bot.sandbox.demo import PLATFORM_SCHEMA, seed_cluster
from bot.sandbox.kube_apiserver import Cluster, KubeApiServer, cronjob_manifest, deployment_manifest
from bot.sandbox.slack_api import FakeSlack
from tests.conftest import ROOT, fresh_db
from tests.harness import Harness

EXAMPLES = ROOT / "policies" / "examples"
CHANGE_CAUSE = "kubernetes.io/change-cause"


# ---------------------------------------------------------------------------------------------- a platform's world


def example(name: str, env: dict[str, str], queue_prefix: str) -> Config:
    """policies/examples/<name>.yaml as shipped, its variables from ``env``; its queues under this
    test's Redis prefix (so tests sharing a Redis never see each other's jobs)."""
    config = load_config(EXAMPLES / f"{name}.yaml", env=env)
    queues = {k: q.model_copy(update={"prefix": queue_prefix}) for k, q in config.queues.items()}
    return config.model_copy(update={"queues": queues})


def kubeconfig(api: KubeApiServer, path: Path, config: Config) -> str:
    """A kubeconfig with one context per environment of the config (``kube_context``), all of them
    pointing at the emulator, as a real one points each at its cluster."""
    api.kubeconfig(str(path))
    data = json.loads(path.read_text())
    data["contexts"] = [{"name": env.kube_context, "context": {"cluster": "emulator", "user": "emulator"}}
                        for env in config.environments.values() if env.kube_context]
    data["current-context"] = data["contexts"][0]["name"]
    path.write_text(json.dumps(data))
    return str(path)


@asynccontextmanager
async def opsbot(config: Config, api: KubeApiServer, *, slack: FakeSlack, state_db: str, redis_url: str, queue_prefix: str,
                 tmp_path: Path) -> AsyncIterator[Harness]:
    bot = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url,
                              kubeconfig=kubeconfig(api, tmp_path / "kubeconfig", config), queue_prefix=queue_prefix)
    try:
        yield bot
    finally:
        await asyncio.wait_for(bot.stop(), timeout=60)


def deploy(cluster: Cluster, namespace: str, name: str, image: str, cause: str) -> None:
    """A release as CI does it: a new image and its change-cause (a new revision)."""
    d = cluster.get("apps/deployments", namespace, name)
    d["metadata"].setdefault("annotations", {})[CHANGE_CAUSE] = cause
    d["spec"]["template"]["spec"]["containers"][0]["image"] = image
    cluster.update_deployment(namespace, name, d)


def image_of(cluster: Cluster, namespace: str, name: str) -> str:
    return str(cluster.get("apps/deployments", namespace, name)["spec"]["template"]["spec"]["containers"][0]["image"])


def platform_db(pg_admin: str, schema: str) -> str:
    url = fresh_db(pg_admin)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(schema)  # type: ignore[arg-type]
    return url


def app_role(url: str, role: str) -> str:
    """The platform's own (non-superuser) database role, reading its tables, and a URL that
    connects as it (opsbot never signals superuser sessions)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")  # type: ignore[arg-type]
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")  # type: ignore[arg-type]
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{role}@{rest.partition('@')[2]}"


async def running(conn: psycopg.AsyncConnection[Any], admin_url: str, query: str) -> asyncio.Task[Any]:
    """Start ``query`` on ``conn``; return once pg_stat_activity shows it active."""
    task = asyncio.create_task(conn.execute(query))  # type: ignore[arg-type]
    await active_for(admin_url, conn.info.backend_pid, query, 0.0, task)
    return task


async def active_for(admin_url: str, pid: int, query: str, seconds: float, task: asyncio.Task[Any]) -> None:
    """Until ``query`` has been running on ``pid`` for ``seconds`` (what `--over` will see)."""
    deadline = time.monotonic() + 10 + seconds
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as admin:
        while True:
            row = await (await admin.execute("SELECT state, query, extract(epoch FROM now() - query_start)::float8 "
                                             "FROM pg_stat_activity WHERE pid = %s", (pid,))).fetchone()
            if row and row[0] == "active" and row[1] == query and row[2] >= seconds:
                return
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, f"{query!r} is not running on pid {pid}"
            await asyncio.sleep(0.05)


@asynccontextmanager
async def http_service(routes: dict[str, Callable[[], Any]]) -> AsyncIterator[str]:
    """A loopback HTTP server standing in for the platform's API: path → a function that returns
    what to answer (a dict is sent as JSON, a str as text, a (status, dict) pair with that status)."""
    async def handle(request: web.Request) -> web.Response:
        make = routes.get(request.path)
        if make is None:
            return web.Response(status=404, text="not found")
        answer = make()
        status, body = answer if isinstance(answer, tuple) else (200, answer)
        if isinstance(body, str):
            return web.Response(status=status, text=body, content_type="text/plain")
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------------- the chat side


class Incident:
    """The incident channel as the people in it use it."""

    def __init__(self, bot: Harness, channel: str) -> None:
        self.bot, self.channel = bot, channel

    async def look(self, user: str, text: str, containing: str) -> str:
        """A read-only command: its answer (only the asker sees it unless it says otherwise)."""
        status, body = await self.bot.slash(user, text, channel=self.channel)
        assert status == 200, body
        try:
            return str((await self.bot.response(containing=containing))["text"])
        except AssertionError:
            raise AssertionError(f"{text}: ack {body!r}; answers {self.bot.slack.responses[-3:]}") from None

    async def ask(self, user: str, text: str) -> OpsRequest:
        """A mutating command: the request it opens, once its card is in the channel."""
        earlier = await self.bot.last_request()
        status, body = await self.bot.slash(user, text, channel=self.channel)
        assert status == 200, body

        async def opened() -> OpsRequest | None:
            r = await self.bot.last_request()
            return r if r is not None and r.card_ts and (earlier is None or r.id != earlier.id) else None

        return await self.bot.eventually(opened, what=f"the request {text!r} opens")

    async def approve(self, user: str, request: OpsRequest) -> None:
        status, body = await self.bot.click(user, request.id, "approve", channel=self.channel)
        assert status == 200, body

    async def done(self, request: OpsRequest, timeout: float = 15.0, *, followed: bool = True) -> OpsRequest:
        final = await self.bot.state_of(request.id, "succeeded", "failed", "stale", "unknown", "denied", "expired",
                                        timeout=timeout, followed=followed)
        assert final.state.value == "succeeded", final.error
        return final

    async def state(self, request: OpsRequest) -> str:
        r = await self.bot.runtime.store.get(request.id)
        assert r is not None
        return r.state.value

    def card(self, request: OpsRequest) -> str:
        return next(m for m in self.bot.slack.in_channel(self.channel) if m.ts == request.card_ts).all_text()

    async def card_says(self, request: OpsRequest, text: str) -> str:
        """The card once it says ``text`` (cards are updated as approvals come in)."""
        async def probe() -> str | None:
            card = self.card(request)
            return card if text in card else None
        return await self.bot.eventually(probe, what=f"the card of {request.id} to say {text!r}")

    def thread(self, request: OpsRequest) -> list[str]:
        return [m.text for m in self.bot.slack.thread(self.channel, request.card_ts or "")]

    async def in_thread(self, request: OpsRequest, text: str, timeout: float = 15.0) -> list[str]:
        async def probe() -> list[str] | None:
            texts = self.thread(request)
            return texts if any(text in t for t in texts) else None
        return await self.bot.eventually(probe, timeout=timeout, what=f"{text!r} in the thread of {request.id}")

    async def logs_reply(self, deployment: str) -> tuple[str, str]:
        """`/ops logs` answers with a message in the channel and the lines in its thread."""
        async def probe() -> tuple[str, str] | None:
            heads = [m for m in self.bot.slack.in_channel(self.channel) if f"*{deployment}: " in m.text and "log lines" in m.text]
            replies = self.bot.slack.thread(self.channel, heads[-1].ts) if heads else []
            return (heads[-1].text, "\n".join(m.text for m in replies)) if replies else None
        return await self.bot.eventually(probe, what=f"the logs of {deployment} in a thread")

    async def told(self, user: str, text: str) -> str:
        """What only ``user`` sees (an ephemeral message), once it says ``text``."""
        async def probe() -> str | None:
            return next((m.text for m in self.bot.slack.ephemeral_to(user) if text in m.text), None)
        return await self.bot.eventually(probe, what=f"{user} to be told {text!r}")

    async def trail(self) -> list[tuple[str, str, str]]:
        """The audit trail so far, in order: (event, who, command) per row."""
        return [(r["event"], r["actor_id"], r["command_text"]) for r in await self.bot.runtime.audit.log.rows()]

    async def recorded(self, request: OpsRequest, event: str, timeout: float = 15.0) -> None:
        """Wait for a late row of a request (``followed``: the rollout or job it started has ended)."""
        async def probe() -> bool:
            return event in await self.bot.audit_events(request.id)
        await self.bot.eventually(probe, timeout=timeout, what=f"the {event} row of {request.id}")


# ---------------------------------------------------------------------------------------------- 001 NEXUS

NEXUS_SCHEMA = """
CREATE TABLE creators (id bigserial PRIMARY KEY, handle text UNIQUE NOT NULL);
CREATE TABLE videos (id bigserial PRIMARY KEY, creator_id bigint REFERENCES creators, title text, views bigint DEFAULT 0);
INSERT INTO creators (handle) SELECT 'creator' || g FROM generate_series(1, 50) g;
INSERT INTO videos (creator_id, title, views) SELECT 1 + g % 50, 'video ' || g, g * 7 FROM generate_series(1, 500) g;
"""
NEXUS_ENGINEER, NEXUS_SRE1, NEXUS_SRE2 = "U0NXSDEV7", "U0NXSSRE1", "U0NXSSRE2"
NEXUS_CHANNEL = "C0NXSINCIDENT"
# A trending-creators report someone started by hand, holding its locks for minutes.
NEXUS_REPORT = "SELECT c.handle, sum(v.views), pg_sleep(60) FROM creators c JOIN videos v ON v.creator_id = c.id GROUP BY c.handle"


def nexus_cluster(cluster: Cluster) -> None:
    """nexus-production as the runbook describes it: api-gateway (4 replicas, three releases, the
    last one bad) and user-service; nexus-staging's user-service; the postgres-backup CronJob."""
    ns = "nexus-production"
    cluster.create_deployment(ns, deployment_manifest("user-service", "ghcr.io/nexus/user-service:3.2.0", replicas=3, namespace=ns))
    cluster.create_deployment(ns, deployment_manifest("api-gateway", "ghcr.io/nexus/api-gateway:2.7.0", replicas=4, namespace=ns))
    deploy(cluster, ns, "api-gateway", "ghcr.io/nexus/api-gateway:2.8.0", "release 2.8.0 (argocd sync 1f3c9ab)")
    deploy(cluster, ns, "api-gateway", "ghcr.io/nexus/api-gateway:2.8.1", "release 2.8.1 (argocd sync 7d21e04)")
    cluster.create_deployment("nexus-staging", deployment_manifest("user-service", "ghcr.io/nexus/user-service:3.3.0-rc1",
                                                                   namespace="nexus-staging"))
    cluster.create_cronjob(ns, cronjob_manifest("postgres-backup", "ghcr.io/nexus/pg-backup:15", schedule="0 3 * * *",
                                                namespace=ns, command=["/bin/sh", "-c", "pg_dump | gzip | aws s3 cp - s3://nexus-backups/"]))


async def test_nexus_api_gateway_errors_after_a_deploy(tmp_path: Path, pg_admin: str, redis_url: str, state_db: str,
                                                       queue_prefix: str, slack: FakeSlack) -> None:
    """Seed 001, "Platform Down / High API Latency" after release 2.8.1: check the pods, the events
    and the logs, find the long query and kill it, check recent deployments, roll back to the last
    working revision by its number (outside the Sunday window: two SREs), follow the rollout."""
    db = platform_db(pg_admin, NEXUS_SCHEMA)
    config = example("nexus", {"NEXUS_DATABASE_URL": db, "NEXUS_REDIS_URL": redis_url}, queue_prefix)
    slack.usergroups = {"S0NXSENG": [NEXUS_ENGINEER, "U0NXSDEV8"]}  # engineers are a Slack user group
    with KubeApiServer() as api:
        nexus_cluster(api.cluster)
        ns = "nexus-production"
        pods = api.cluster.pods_of(ns, "api-gateway")
        api.cluster.crash_pod(ns, pods[0]["metadata"]["name"], reason="Error", exit_code=1)
        api.cluster.add_event(ns, pods[1], type="Warning", reason="Unhealthy",
                              message="Readiness probe failed: HTTP probe failed with statuscode: 502")
        for pod in pods:
            api.cluster.append_log(ns, pod["metadata"]["name"], [
                "gateway 2.8.1 listening on :8080",
                "GET /v1/feed 200 41ms",
                "ERROR upstream user-service timeout after 30000ms db=postgres://gateway:gw-s3cret@nexus-db:5432/nexus",
                "GET /v1/feed 504 30002ms",
            ])
        reporter = await psycopg.AsyncConnection.connect(app_role(db, "nexus_reports"), application_name="metabase",
                                                         autocommit=True)
        report = await running(reporter, db, NEXUS_REPORT)
        try:
            async with opsbot(config, api, slack=slack, state_db=state_db, redis_url=redis_url, queue_prefix=queue_prefix,
                              tmp_path=tmp_path) as bot:
                # A Wednesday afternoon: outside the Sunday 02:00–06:00 maintenance window.
                bot.runtime.pipeline.clock = lambda: datetime(2025, 3, 12, 14, 30, tzinfo=UTC)
                await nexus_story(Incident(bot, NEXUS_CHANNEL), api, reporter, report, db)
        finally:
            report.cancel()
            await asyncio.gather(report, return_exceptions=True)
            await reporter.close()


async def nexus_story(room: Incident, api: KubeApiServer, reporter: psycopg.AsyncConnection[Any], report: asyncio.Task[Any],
                      db: str) -> None:
    bot, ns, eng = room.bot, "nexus-production", NEXUS_ENGINEER

    # Diagnosis: "Check pod status".
    text = await room.look(eng, "/ops pods api-gateway", " pods,")
    crashed = api.cluster.pods_of(ns, "api-gateway")[0]["metadata"]["name"]
    assert "api-gateway: 4 pods, 4 running, 1 restart" in text
    assert f"`{crashed}` CrashLoopBackOff, ready 0/1, restarts 1" in text and "last ended: api-gateway: Error (exit 1" in text
    # … its warning events …
    text = await room.look(eng, "/ops events api-gateway", "warning events")
    assert "api-gateway: 2 warning events" in text
    assert "*BackOff*: Back-off restarting failed container" in text and "*Unhealthy*: Readiness probe failed" in text
    # … "Check logs: kubectl logs -f deployment/api-gateway --tail=100": in a thread, secrets scrubbed.
    await bot.slash(eng, "/ops logs api-gateway --tail 100", channel=NEXUS_CHANNEL)
    head, logs = await room.logs_reply("api-gateway")
    assert "api-gateway: 16 log lines" in head and "at most 100 per pod" in head
    assert logs.count("ERROR upstream user-service timeout after 30000ms") == 4
    assert "gw-s3cret" not in logs and "postgres://gateway:[redacted]@nexus-db" in logs

    # "High API Latency: check database slow queries": the hand-run report, running for seconds.
    pid = reporter.info.backend_pid
    await active_for(db, pid, NEXUS_REPORT, 2.0, report)
    text = await room.look(eng, "/ops db queries nexus --over 2s", "non-idle")
    line = next(line for line in text.splitlines() if f"`{pid}`" in line)
    assert "user `nexus_reports`" in line and "app `metabase`" in line and "pg_sleep(60)" in line

    # Kill it: one SRE approves; the card shows the session, and the approval expires in 10 minutes.
    cancel = await room.ask(eng, f'/ops db cancel nexus {pid} --reason "report holds the videos table"')
    card = room.card(cancel)
    assert f"cancel the query of pid {pid} on nexus: nexus_reports / metabase" in card
    assert "policy: kill-a-query" in card and "approvals from sre" in card
    assert (cancel.expires_at - cancel.created_at).total_seconds() == 600
    assert not report.done(), "nothing is cancelled before approval"
    await room.approve(NEXUS_SRE1, cancel)
    cancel = await room.done(cancel)
    await asyncio.wait({report}, timeout=5)
    assert isinstance(report.exception(), psycopg.errors.QueryCanceled)
    assert [a.approver.user_id for a in cancel.approvals] == [NEXUS_SRE1]

    # "Check recent deployments": 2.8.1 went out last; 2.8.0 was the last working one.
    text = await room.look(eng, "/ops history api-gateway", "revisions,")
    assert "api-gateway: 3 revisions, current 3" in text
    assert "`3` api-gateway=ghcr.io/nexus/api-gateway:2.8.1 — release 2.8.1 (argocd sync 7d21e04)" in text
    assert "`2` api-gateway=ghcr.io/nexus/api-gateway:2.8.0 — release 2.8.0 (argocd sync 1f3c9ab)" in text

    # "Rollback if deployment-related": `kubectl rollout undo deployment/api-gateway --to-revision=2`.
    api.cluster.set_rollout(ns, "api-gateway", mode="steps", step_seconds=0.3)
    rollback = await room.ask(eng, '/ops rollback api-gateway --to-revision 2 --reason "5xx since 2.8.1"')
    card = room.card(rollback)
    assert "revision 3 (api-gateway=ghcr.io/nexus/api-gateway:2.8.1) → 2 (api-gateway=ghcr.io/nexus/api-gateway:2.8.0)" in card
    assert "outside-maintenance-window" in card and "approvals 0/2" in card
    await room.approve(NEXUS_SRE1, rollback)
    await room.card_says(rollback, f"approvals 1/2: <@{NEXUS_SRE1}>")
    assert await room.state(rollback) == "pending_approval", "one SRE is not enough outside the window"
    assert image_of(api.cluster, ns, "api-gateway").endswith(":2.8.1")
    await room.approve(NEXUS_SRE2, rollback)
    rollback = await room.done(rollback)
    assert [a.approver.user_id for a in rollback.approvals] == [NEXUS_SRE1, NEXUS_SRE2]
    await room.card_says(rollback, f"approvals 2/2: <@{NEXUS_SRE1}>, <@{NEXUS_SRE2}>")
    assert image_of(api.cluster, ns, "api-gateway") == "ghcr.io/nexus/api-gateway:2.8.0"

    # Follow the rollout, step by step, to its end.
    texts = await room.in_thread(rollback, "successfully rolled out")
    assert any(t.startswith(":hourglass_flowing_sand: Rollout of api-gateway:") for t in texts), "progress on the way"
    assert texts[-1] == ":white_check_mark: Rollout of api-gateway: successfully rolled out (4 of 4 available)."
    d = api.cluster.get("apps/deployments", ns, "api-gateway")
    assert d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "4"
    assert all(p["status"]["containerStatuses"][0]["image"].endswith(":2.8.0") for p in api.cluster.pods_of(ns, "api-gateway"))
    await room.recorded(rollback, "followed")

    kill = f'db cancel nexus {pid} --reason "report holds the videos table"'
    undo = 'rollback api-gateway --to-revision 2 --reason "5xx since 2.8.1"'
    assert await room.trail() == [
        ("read", eng, "pods api-gateway"),
        ("read", eng, "events api-gateway"),
        ("read", eng, "logs api-gateway --tail 100"),
        ("read", eng, "db queries nexus --over 2s"),
        ("requested", eng, kill), ("approval_given", NEXUS_SRE1, kill), ("approved", NEXUS_SRE1, kill),
        ("started", "opsbot", kill), ("succeeded", "opsbot", kill),
        ("read", eng, "history api-gateway"),
        ("requested", eng, undo), ("approval_given", NEXUS_SRE1, undo), ("approval_given", NEXUS_SRE2, undo),
        ("approved", NEXUS_SRE2, undo), ("started", "opsbot", undo), ("succeeded", "opsbot", undo), ("followed", "opsbot", undo),
    ]


# ---------------------------------------------------------------------------------------------- 000 NexNum

NEXNUM_SCHEMA = """
CREATE TABLE "Provider" (id text PRIMARY KEY, name text UNIQUE NOT NULL, "isActive" boolean NOT NULL DEFAULT true,
                         priority integer NOT NULL);
INSERT INTO "Provider" (id, name, "isActive", priority) VALUES
    ('prv_1', 'smsactivate', true, 1), ('prv_2', 'fivesim', true, 2), ('prv_3', 'smshub', true, 3);
"""
NEXNUM_ENG, NEXNUM_ONCALL, NEXNUM_LEAD1, NEXNUM_LEAD2 = "U0NEXENG1", "U0NEXPAGER", "U0NEXLEAD1", "U0NEXLEAD2"
NEXNUM_CHANNEL = "C0NEXINCIDENT"


def provider_active(db: str) -> dict[str, bool]:
    with psycopg.connect(db) as conn:
        return dict(conn.execute('SELECT name, "isActive" FROM "Provider" ORDER BY priority').fetchall())


def nexnum_cluster(cluster: Cluster) -> None:
    """The Next.js app (2 replicas) and the single `nexnum-worker`, which must never run twice:
    Recreate, as the config advises."""
    cluster.create_deployment("nexnum", deployment_manifest("nexnum-app", "ghcr.io/nexnum/app:1.9.3", replicas=2, namespace="nexnum"))
    worker = deployment_manifest("nexnum-worker", "ghcr.io/nexnum/worker:1.9.3", replicas=1, namespace="nexnum")
    worker["spec"]["strategy"] = {"type": "Recreate"}
    cluster.create_deployment("nexnum", worker)


async def test_nexnum_one_sms_provider_failing_and_a_stuck_worker(tmp_path: Path, pg_admin: str, redis_url: str,
                                                                    state_db: str, queue_prefix: str, slack: FakeSlack) -> None:
    """Seed 000, "High Purchase Failure Rate (SEV-1)" with one provider failing: disable it (a lead
    approves, within 10 minutes) so routing falls back; "Worker Stuck": restart the worker and
    check its logs; once the provider recovers, enable it again. The audit trail tells it all."""
    db = platform_db(pg_admin, NEXNUM_SCHEMA)
    config = example("nexnum", {"NEXNUM_DATABASE_URL": db, "NEXNUM_REDIS_URL": redis_url}, queue_prefix)
    slack.usergroups = {"S0NEXONCALL": [NEXNUM_ONCALL]}  # this week's on-call is in the on-call group
    with KubeApiServer() as api:
        nexnum_cluster(api.cluster)
        async with opsbot(config, api, slack=slack, state_db=state_db, redis_url=redis_url, queue_prefix=queue_prefix,
                          tmp_path=tmp_path) as bot:
            room = Incident(bot, NEXNUM_CHANNEL)
            eng, ns = NEXNUM_ENG, "nexnum"

            # One provider answers E_PROVIDER_ERROR: "Disable provider temporarily" (Provider.isActive false).
            disable = await room.ask(eng, '/ops disable provider smsactivate --reason "SEV-1: E_PROVIDER_ERROR on smsactivate"')
            card = room.card(disable)
            assert "disable provider smsactivate: isActive true → false" in card
            assert "policy: provider-override" in card and "approvals from approver" in card
            # The override approval lapses after 10 minutes, and the card says until when.
            assert (disable.expires_at - disable.created_at).total_seconds() == 600
            assert f"expires <!date^{int(disable.expires_at.timestamp())}^{{time}}|{disable.expires_at:%H:%M} UTC>" in card
            assert provider_active(db)["smsactivate"] is True, "nothing changes before approval"
            await room.approve(NEXNUM_LEAD1, disable)
            disable = await room.done(disable)
            assert provider_active(db) == {"smsactivate": False, "fivesim": True, "smshub": True}
            assert any("provider smsactivate is now disabled" in t for t in room.thread(disable))

            # "Worker Stuck: SMS not arriving": the worker looks up but polls nothing.
            old = api.cluster.pods_of(ns, "nexnum-worker")
            api.cluster.append_log(ns, old[0]["metadata"]["name"], ["poller: waiting for lock sms:poll (held 1843s)"] * 3)
            text = await room.look(eng, "/ops pods worker", " pod,")
            assert "nexnum-worker: 1 pod, 1 running, 0 restarts" in text
            # "Restart the container" — the on-call engineer of the user group asks, the other lead approves.
            restart = await room.ask(NEXNUM_ONCALL, '/ops restart worker --reason "SMS not arriving"')
            card = room.card(restart)
            assert "nexnum-worker: restart its 1 pod" in card and "Recreate: every pod stops before new ones start" in card
            await room.approve(NEXNUM_LEAD2, restart)
            restart = await room.done(restart)
            await room.in_thread(restart, "Rollout of nexnum-worker: successfully rolled out (1 of 1 available)")
            new = api.cluster.pods_of(ns, "nexnum-worker")
            assert len(new) == 1 and new[0]["metadata"]["name"] != old[0]["metadata"]["name"], "one new worker, never two"
            template = api.cluster.get("apps/deployments", ns, "nexnum-worker")["spec"]["template"]
            assert template["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] == (restart.result or {})["restarted_at"]
            await room.recorded(restart, "followed")
            # "Check logs": the new worker polls again.
            api.cluster.append_log(ns, new[0]["metadata"]["name"], ["poller: acquired lock sms:poll",
                                                                    "order ord_7781 RECEIVED code via fivesim"])
            await bot.slash(eng, "/ops logs worker --tail 20", channel=NEXNUM_CHANNEL)
            head, logs = await room.logs_reply("nexnum-worker")
            assert "nexnum-worker: 2 log lines" in head and "RECEIVED code via fivesim" in logs and "held 1843s" not in logs

            # smsactivate is back: route to it again.
            enable = await room.ask(eng, "/ops enable provider smsactivate")
            assert "enable provider smsactivate: isActive false → true" in room.card(enable)
            await room.approve(NEXNUM_LEAD1, enable)
            await room.done(enable)
            assert provider_active(db) == {"smsactivate": True, "fivesim": True, "smshub": True}

            off = 'disable provider smsactivate --reason "SEV-1: E_PROVIDER_ERROR on smsactivate"'
            kick = 'restart worker --reason "SMS not arriving"'
            on = "enable provider smsactivate"
            assert await room.trail() == [
                ("requested", eng, off), ("approval_given", NEXNUM_LEAD1, off), ("approved", NEXNUM_LEAD1, off),
                ("started", "opsbot", off), ("succeeded", "opsbot", off),
                ("read", eng, "pods worker"),
                ("requested", NEXNUM_ONCALL, kick), ("approval_given", NEXNUM_LEAD2, kick), ("approved", NEXNUM_LEAD2, kick),
                ("started", "opsbot", kick), ("succeeded", "opsbot", kick), ("followed", "opsbot", kick),
                ("read", eng, "logs worker --tail 20"),
                ("requested", eng, on), ("approval_given", NEXNUM_LEAD1, on), ("approved", NEXNUM_LEAD1, on),
                ("started", "opsbot", on), ("succeeded", "opsbot", on),
            ]


# ---------------------------------------------------------------------------------------------- 002 NearbyBazaar

NB_ENG, NB_CTO, NB_LEAD = "U0NBDEV3", "U0NBCTO", "U0NBLEAD"
SMTP_421 = "421 4.7.0 smtp.mailrelay.example: too many concurrent connections from 10.2.0.0/16"


def nearbybazaar_cluster(cluster: Cluster) -> None:
    for name, image, replicas in (("api", "ghcr.io/nearbybazaar/api:0.42.0", 3), ("web", "ghcr.io/nearbybazaar/web:0.42.0", 2),
                                  ("queue-workers", "ghcr.io/nearbybazaar/workers:0.42.0", 2)):
        cluster.create_deployment("nearbybazaar", deployment_manifest(name, image, replicas=replicas, namespace="nearbybazaar"))
    cluster.create_deployment("nearbybazaar-staging", deployment_manifest("api", "ghcr.io/nearbybazaar/api:0.43.0-rc1",
                                                                          namespace="nearbybazaar-staging"))


async def email_backlog(queue: Queue, redis_url: str, prefix: str, *, failing: list[str], waiting: list[str]) -> None:
    """A retry storm on the `email` queue: the relay refused these sends (a BullMQ worker failed
    them, oldest first, a second apart), and more mail queues up behind them."""
    for job_id in failing:
        await queue.add("order-confirmation", {"orderId": job_id}, {"jobId": job_id})

    async def relay_refuses(job: Any, token: str) -> None:
        raise RuntimeError(SMTP_421)

    worker = Worker("email", relay_refuses, {"connection": redis_url, "prefix": prefix})
    try:
        deadline = time.monotonic() + 20
        while (await queue.getJobCounts("failed"))["failed"] < len(failing):
            assert time.monotonic() < deadline, "the worker did not fail the jobs"
            await asyncio.sleep(0.05)
    finally:
        await worker.close(force=True)
    base = round(time.time() * 1000) - 600_000
    for i, job_id in enumerate(failing):
        await queue.client.hset(queue.toKey(job_id), "finishedOn", base + i * 1000)
        await queue.client.zadd(queue.toKey("failed"), {job_id: base + i * 1000})
    for job_id in waiting:
        await queue.add("order-confirmation", {"orderId": job_id}, {"jobId": job_id})


async def drain(queue: Queue, redis_url: str, prefix: str) -> None:
    """The scaled-up workers, the relay answering again: every waiting mail is sent."""
    async def send(job: Any, token: str) -> str:
        return "250 OK"

    worker = Worker("email", send, {"connection": redis_url, "prefix": prefix})
    try:
        deadline = time.monotonic() + 20
        while (counts := await queue.getJobCounts("waiting", "active"))["waiting"] + counts["active"] > 0:
            assert time.monotonic() < deadline, "the workers did not drain the queue"
            await asyncio.sleep(0.05)
    finally:
        await worker.close()


async def test_nearbybazaar_queues_delayed_by_a_retry_storm(tmp_path: Path, pg_admin: str, redis_url: str, state_db: str,
                                                             queue_prefix: str, slack: FakeSlack) -> None:
    """Seed 002, on-call checklist and "Redis/queues delayed": assess impact with the API's
    `/v1/health`, inspect the email queue, look for the retry storm, retry a bounded batch, scale
    the workers, and check health again once the backlog drains."""
    health: dict[str, Any] = {"status": "degraded", "version": "0.42.0",
                              "checks": {"mongodb": "ok", "redis": "ok", "queues": "email backlog"}}
    failing = [f"mail-{i:03d}" for i in range(7)]
    waiting = [f"mail-{i:03d}" for i in range(7, 19)]
    slack.usergroups = {"S0NBONCALL": [NB_ENG]}
    async with http_service({"/v1/health": lambda: (503 if health["status"] != "ok" else 200, health)}) as api_url:
        config = example("nearbybazaar", {"NB_REDIS_URL": redis_url, "NB_API_URL": api_url}, queue_prefix)
        queue = Queue("email", {"connection": redis_url, "prefix": queue_prefix})
        try:
            await email_backlog(queue, redis_url, queue_prefix, failing=failing, waiting=waiting)
            with KubeApiServer() as api:
                nearbybazaar_cluster(api.cluster)
                async with opsbot(config, api, slack=slack, state_db=state_db, redis_url=redis_url,
                                  queue_prefix=queue_prefix, tmp_path=tmp_path) as bot:
                    await nearbybazaar_story(Incident(bot, Harness.INCIDENT), api, queue, redis_url, queue_prefix,
                                             health, failing, waiting)
        finally:
            await queue.close()


async def nearbybazaar_story(room: Incident, api: KubeApiServer, queue: Queue, redis_url: str, prefix: str,
                             health: dict[str, Any], failing: list[str], waiting: list[str]) -> None:
    eng, ns = NB_ENG, "nearbybazaar"
    # "Quickly assess impact (API health /v1/health)": the API says its queues lag.
    text = await room.look(eng, "/ops health api", "health of")
    assert text.splitlines()[0] == "*health of api: 0 of 1 probe healthy*"
    assert ":x: `api/v1-health` 503 in" in text and 'status=degraded version=0.42.0' in text and '"queues":"email backlog"' in text

    # "Redis/queues delayed: inspect queue dashboards. Look for retry storms."
    text = await room.look(eng, "/ops queue stats email", "email:")
    assert "*email: running, 12 waiting, 0 active, 7 failed*" in text
    assert f"oldest waiting job: `{waiting[0]}` (order-confirmation)" in text
    text = await room.look(eng, "/ops queue failed email", "failed jobs")
    jobs = [line for line in text.splitlines() if line.startswith("• `")]
    assert "*email: 7 failed jobs*" in text and [line.split("`")[1] for line in jobs] == failing[::-1], "newest first"
    assert all("order-confirmation — 1 attempt, failed " in line and line.endswith(f"m ago: {SMTP_421}") for line in jobs)

    # The relay's limit is lifted: retry a bounded batch, the oldest five; the card names them.
    retry = await room.ask(eng, '/ops queue retry-failed email --limit 5 --reason "relay limit lifted"')
    card = room.card(retry)
    assert "email: retry 5 of 7 failed jobs" in card
    assert "oldest first: " + ", ".join(f"`{i}`" for i in failing[:5]) in card and "2 newer failed jobs stay failed" in card
    assert "policy: queue-changes" in card and "approvals 0/1" in card
    assert await queue.getJobCounts("failed") == {"failed": 7}, "nothing is retried before approval"
    await room.approve(NB_CTO, retry)
    retry = await room.done(retry)
    assert {i: await queue.getJobState(i) for i in failing} == {**{i: "waiting" for i in failing[:5]},
                                                                **{i: "failed" for i in failing[5:]}}
    assert (":large_green_circle: Done: retried 5 of 5 failed jobs on `email`: "
            + ", ".join(f"`{i}`" for i in failing[:5]) + ".") in room.thread(retry)

    # "Scale workers": 2 → 4 is routine (one approval); doubling more than that at once needs two.
    await room.bot.slash(eng, "/ops scale queue-workers 8 --dry-run")
    assert "2 approvals from approver required by sudden-scale" in (await room.bot.response(containing="Dry run"))["text"]
    scale = await room.ask(eng, "/ops scale queue-workers 4")
    card = room.card(scale)
    assert "queue-workers: 2 → 4 replicas" in card and "policy: production" in card and "approvals 0/1" in card
    await room.approve(NB_LEAD, scale)
    scale = await room.done(scale)
    assert api.cluster.get("apps/deployments", ns, "queue-workers")["spec"]["replicas"] == 4
    assert len(api.cluster.pods_of(ns, "queue-workers")) == 4
    await room.in_thread(scale, "Rollout of queue-workers: successfully rolled out (4 of 4 available)")
    await room.recorded(scale, "followed")

    # The workers drain the backlog; the queue and the API say so.
    await drain(queue, redis_url, prefix)
    health["status"], health["checks"]["queues"] = "ok", "ok"
    text = await room.look(eng, "/ops queue stats email", "email:")
    assert "*email: running, 0 waiting, 0 active, 2 failed*" in text and "completed 17" in text
    text = await room.look(eng, "/ops health api", "health of")
    assert text.splitlines()[0] == "*health of api: 1 probe healthy*" and "status=ok" in text

    batch = 'queue retry-failed email --limit 5 --reason "relay limit lifted"'
    more = "scale queue-workers 4"
    assert await room.trail() == [
        ("read", eng, "health api"), ("read", eng, "queue stats email"), ("read", eng, "queue failed email"),
        ("requested", eng, batch), ("approval_given", NB_CTO, batch), ("approved", NB_CTO, batch),
        ("started", "opsbot", batch), ("succeeded", "opsbot", batch),
        ("dry_run", eng, "scale queue-workers 8 --dry-run"),
        ("requested", eng, more), ("approval_given", NB_LEAD, more), ("approved", NB_LEAD, more),
        ("started", "opsbot", more), ("succeeded", "opsbot", more), ("followed", "opsbot", more),
        ("read", eng, "queue stats email"), ("read", eng, "health api"),
    ]


# ---------------------------------------------------------------------------------------------- 003 Nova RMS

NOVA_ENG, NOVA_APPROVER1, NOVA_APPROVER2 = "U0ALICE", "U0CAROL", "U0DAN"
NOVA_EVENT = "8f2c1b9e-5d4a-4c3b-9a1e-0f6d2c8b7a51"  # PLATFORM_SCHEMA's failed invoice.paid event


def webhook_row(db: str, event_id: str) -> tuple[str, str | None]:
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT status, last_error FROM billing_webhook_events WHERE id = %s", (event_id,)).fetchone()
    assert row is not None
    return row[0], row[1]


async def test_nova_rms_a_failed_billing_webhook(tmp_path: Path, pg_admin: str, redis_url: str, state_db: str,
                                                 queue_prefix: str, slack: FakeSlack) -> None:
    """Seed 003, Billing Webhooks and Incident Response: the `failed` counter alerts; force a backup
    before touching the data; replay the failed event; the worker does not take the job, so restart
    it; the job is processed and the post-deploy checks pass again."""
    metrics = {"processed": 1841, "retrying": 3, "failed": 1}
    ready = {"ready": False, "queue": "billing-webhooks"}

    def exposition() -> str:
        return "".join(f'nova_api_billing_webhook_total{{status="{k}"}} {v}\n' for k, v in metrics.items())

    routes: dict[str, Callable[[], Any]] = {
        "/health": lambda: {"status": "ok", "version": "1.4.2", "checks": {"database": "ok", "redis": "ok"}},
        "/metrics": exposition,
        "/worker/healthz": lambda: {"ok": True},
        "/worker/readyz": lambda: (200 if ready["ready"] else 503, ready),
    }
    db = platform_db(pg_admin, PLATFORM_SCHEMA)
    async with http_service(routes) as url:
        config = example("nova-rms", {"NOVA_DATABASE_URL": db, "NOVA_REDIS_URL": redis_url, "NOVA_API_URL": url,
                                      "NOVA_WORKER_URL": url + "/worker"}, queue_prefix)
        queue = Queue("billing-webhooks", {"connection": redis_url, "prefix": queue_prefix})
        try:
            with KubeApiServer() as api:
                seed_cluster(api.cluster)
                async with opsbot(config, api, slack=slack, state_db=state_db, redis_url=redis_url,
                                  queue_prefix=queue_prefix, tmp_path=tmp_path) as bot:
                    await nova_story(Incident(bot, Harness.INCIDENT), api, db, queue, redis_url, queue_prefix, metrics, ready)
        finally:
            await queue.close()


async def nova_story(room: Incident, api: KubeApiServer, db: str, queue: Queue, redis_url: str, prefix: str,
                     metrics: dict[str, int], ready: dict[str, Any]) -> None:
    eng, ns = NOVA_ENG, "nova"
    # The alert: `nova_api_billing_webhook_total{status="failed"}` went up, and the worker is not ready.
    text = await room.look(eng, "/ops health", "health of")
    assert text.splitlines()[0] == "*health of 2 services: 3 of 4 probes healthy*"
    assert 'nova_api_billing_webhook_total{status="failed"} 1' in text
    assert ":x: `worker/readyz` 503" in text and "ready=false" in text
    assert webhook_row(db, NOVA_EVENT) == ("failed", "ECONNRESET talking to ledger")

    # Before touching billing data, "force a backup" (`kubectl create job --from=cronjob/nova-db-backup`),
    # and follow the job until it has finished.
    api.cluster.job_behaviour = "running"
    backup = await room.ask(eng, '/ops backup db-backup --reason "before replaying INC-204 webhooks"')
    card = room.card(backup)
    assert "nova-db-backup: run a job now from its template" in card and "images: nova-db-backup=ghcr.io/nova/pg-backup:15" in card
    assert "last scheduled never, last succeeded never" in card and "policy: production-changes" in card
    await room.approve(NOVA_APPROVER1, backup)
    backup = await room.done(backup, followed=False)  # the job is still running: it is followed below
    job = str((backup.result or {})["job"])
    await room.in_thread(backup, f":hourglass_flowing_sand: Job {job}: 1 running, 0 succeeded, 0 failed…")
    api.cluster.finish_job(ns, job, succeeded=True)  # pg_dump is done
    texts = await room.in_thread(backup, "completed")
    assert texts[-1].startswith(f":white_check_mark: Job {job} completed (after ")
    owner = api.cluster.get("batch/jobs", ns, job)["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("CronJob", "nova-db-backup")
    await room.recorded(backup, "followed")

    # "To replay a failed event, update status back to 'pending', clear last_error, and requeue"
    # with the event id as the job id.
    replay = await room.ask(eng, f"/ops replay webhook {NOVA_EVENT}")
    card = room.card(replay)
    assert f"webhook {NOVA_EVENT}: failed → pending, queue job on billing-webhooks" in card
    assert "last error: ECONNRESET talking to ledger" in card
    await room.approve(NOVA_APPROVER2, replay)
    replay = await room.done(replay)
    assert webhook_row(db, NOVA_EVENT) == ("pending", None)
    queued = await queue.getJob(NOVA_EVENT)
    assert queued is not None and queued.name == "process"
    assert queued.data == {"eventId": NOVA_EVENT, "eventType": "invoice.paid"}
    text = await room.look(eng, "/ops queue stats billing-webhooks", "billing-webhooks:")
    assert "*billing-webhooks: running, 1 waiting, 0 active, 0 failed*" in text and f"oldest waiting job: `{NOVA_EVENT}`" in text

    # Nobody takes it: the worker is wedged. Restart it.
    before = {p["metadata"]["name"] for p in api.cluster.pods_of(ns, "nova-worker")}
    restart = await room.ask(eng, '/ops restart worker --reason "billing-webhooks jobs not taken"')
    assert "nova-worker: restart all 3 pods" in room.card(restart)
    await room.approve(NOVA_APPROVER1, restart)
    restart = await room.done(restart)
    await room.in_thread(restart, "Rollout of nova-worker: successfully rolled out (3 of 3 available)")
    assert not before & {p["metadata"]["name"] for p in api.cluster.pods_of(ns, "nova-worker")}, "every pod replaced"
    await room.recorded(restart, "followed")

    # The new workers take the job, as the platform's worker does; post-deploy verification passes.
    await process_webhooks(queue, redis_url, prefix, db, metrics)
    ready["ready"] = True
    assert webhook_row(db, NOVA_EVENT) == ("processed", None)
    text = await room.look(eng, "/ops queue stats billing-webhooks", "billing-webhooks:")
    assert "*billing-webhooks: running, 0 waiting, 0 active, 0 failed*" in text and "completed 1" in text
    text = await room.look(eng, "/ops health", "health of")
    assert text.splitlines()[0] == "*health of 2 services: all 4 probes healthy*"
    assert 'nova_api_billing_webhook_total{status="processed"} 1842' in text

    dump = 'backup db-backup --reason "before replaying INC-204 webhooks"'
    again = f"replay webhook {NOVA_EVENT}"
    kick = 'restart worker --reason "billing-webhooks jobs not taken"'
    assert [a.approver.user_id for r in (backup, replay, restart) for a in r.approvals] == \
        [NOVA_APPROVER1, NOVA_APPROVER2, NOVA_APPROVER1]
    assert await room.trail() == [
        ("read", eng, "health"),
        ("requested", eng, dump), ("approval_given", NOVA_APPROVER1, dump), ("approved", NOVA_APPROVER1, dump),
        ("started", "opsbot", dump), ("succeeded", "opsbot", dump), ("followed", "opsbot", dump),
        ("requested", eng, again), ("approval_given", NOVA_APPROVER2, again), ("approved", NOVA_APPROVER2, again),
        ("started", "opsbot", again), ("succeeded", "opsbot", again),
        ("read", eng, "queue stats billing-webhooks"),
        ("requested", eng, kick), ("approval_given", NOVA_APPROVER1, kick), ("approved", NOVA_APPROVER1, kick),
        ("started", "opsbot", kick), ("succeeded", "opsbot", kick), ("followed", "opsbot", kick),
        ("read", eng, "queue stats billing-webhooks"), ("read", eng, "health"),
    ]


async def process_webhooks(queue: Queue, redis_url: str, prefix: str, db: str, metrics: dict[str, int]) -> None:
    async def process(job: Any, token: str) -> str:
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            await conn.execute("UPDATE billing_webhook_events SET status = 'processed' WHERE id = %s", (job.data["eventId"],))
        metrics["processed"] += 1
        return "ok"

    worker = Worker("billing-webhooks", process, {"connection": redis_url, "prefix": prefix})
    try:
        deadline = time.monotonic() + 20
        while (await queue.getJobCounts("completed"))["completed"] < 1:
            assert time.monotonic() < deadline, "the worker did not process the job"
            await asyncio.sleep(0.05)
    finally:
        await worker.close()


# ---------------------------------------------------------------------------------------------- 004 NepXy

NEPXY_SCHEMA = """
CREATE SCHEMA app;
CREATE TABLE app.payout_providers (code text PRIMARY KEY, display_name text NOT NULL, enabled boolean NOT NULL DEFAULT true);
INSERT INTO app.payout_providers VALUES ('tmoney', 'TMoney', true), ('flooz', 'Flooz', true), ('momo', 'MTN MoMo', true),
    ('thunes', 'Thunes', true);
"""
NEPXY_ENG1, NEPXY_ENG2, NEPXY_LEAD, NEPXY_FIN1, NEPXY_FIN2 = "U0NPXENG1", "U0NPXENG2", "U0NPXLEAD", "U0NPXFIN1", "U0NPXFIN2"
NEPXY_CHANNEL = "C0NPXINCIDENT"


def providers_enabled(db: str) -> dict[str, bool]:
    with psycopg.connect(db) as conn:
        return dict(conn.execute("SELECT code, enabled FROM app.payout_providers ORDER BY code").fetchall())


def nepxy_cluster(cluster: Cluster) -> None:
    """The API (2.3.1, then the 2.4.0 release of the morning) and the payout worker."""
    ns = "nepxy"
    cluster.create_deployment(ns, deployment_manifest("nepxy-api", "ghcr.io/nepxy/api:2.3.1", replicas=2, namespace=ns))
    deploy(cluster, ns, "nepxy-api", "ghcr.io/nepxy/api:2.4.0", "release 2.4.0: webhook parser rewrite")
    cluster.create_deployment(ns, deployment_manifest("payout-worker", "ghcr.io/nepxy/api:2.3.1", replicas=2, namespace=ns))


async def test_nepxy_provider_downtime_and_a_safe_rollback(tmp_path: Path, pg_admin: str, redis_url: str, state_db: str,
                                                          queue_prefix: str, slack: FakeSlack) -> None:
    """Seed 004, "Provider downtime" (payout_attempts_total{result="FAILED"} spikes): check the
    payout worker, stop routing payouts to TMoney (money moves: an approver and finance both sign),
    roll the API back to the previous image ("Safe rollback") and verify `readyz`; when TMoney is
    back, enable it again under the same two signatures."""
    state = {"version": "2.4.0", "failed": 412}
    routes: dict[str, Callable[[], Any]] = {
        "/healthz": lambda: {"ok": True, "db_ok": True},
        "/readyz": lambda: ((200, {"ready": True, "migrations_ok": True}) if state["version"] == "2.3.1"
                            else (503, {"ready": False, "migrations_ok": False})),
        "/metrics": lambda: (f'payout_attempts_total{{provider="tmoney",result="FAILED"}} {state["failed"]}\n'
                             'payout_attempts_total{provider="flooz",result="SUCCESS"} 9031\n'),
    }
    db = platform_db(pg_admin, NEPXY_SCHEMA)
    async with http_service(routes) as url:
        config = example("nepxy", {"NEPXY_DATABASE_URL": db, "NEPXY_API_URL": url, "NEPXY_ADMIN_TOKEN": "t"}, queue_prefix)
        with KubeApiServer() as api:
            nepxy_cluster(api.cluster)
            async with opsbot(config, api, slack=slack, state_db=state_db, redis_url=redis_url, queue_prefix=queue_prefix,
                              tmp_path=tmp_path) as bot:
                await nepxy_story(Incident(bot, NEPXY_CHANNEL), api, db, state)


async def nepxy_story(room: Incident, api: KubeApiServer, db: str, state: dict[str, Any]) -> None:
    eng, ns, bot = NEPXY_ENG1, "nepxy", room.bot
    # Symptom: payout_attempts_total{result="FAILED"} spikes (and readyz is red since this morning's 2.4.0).
    text = await room.look(eng, "/ops health api", "health of")
    assert text.splitlines()[0] == "*health of api: 2 of 3 probes healthy*"
    assert 'payout_attempts_total{provider="tmoney",result="FAILED"} 412' in text
    assert ":x: `api/readyz` 503" in text and "ready=false migrations_ok=false" in text
    # "Check worker is running and healthy".
    text = await room.look(eng, "/ops pods payout-worker", " pods,")
    assert "payout-worker: 2 pods, 2 running, 0 restarts" in text

    # TMoney's status page confirms the outage: stop sending payouts there. Money moves, so an
    # approver and finance must both sign; another engineer cannot, and one signature does nothing.
    off = await room.ask(eng, '/ops disable provider tmoney --reason "TMoney status page: outage"')
    card = room.card(off)
    assert "disable provider tmoney: enabled true → false" in card and 'table "app"."payout_providers"' in card
    assert "policy: mobile-money-providers" in card and "approvals 0/2 · at least one from each of approver, finance" in card
    assert (off.expires_at - off.created_at).total_seconds() == 1800
    await room.approve(NEPXY_ENG2, off)
    await room.told(NEPXY_ENG2, "you cannot approve this: approvals must come from approver, finance.")
    await room.approve(NEPXY_LEAD, off)
    await room.card_says(off, f"approvals 1/2: <@{NEPXY_LEAD}>")
    assert await room.state(off) == "pending_approval" and providers_enabled(db)["tmoney"] is True, "one signature is not enough"
    await room.approve(NEPXY_FIN1, off)
    off = await room.done(off)
    assert [a.approver.user_id for a in off.approvals] == [NEPXY_LEAD, NEPXY_FIN1]
    assert providers_enabled(db) == {"flooz": True, "momo": True, "thunes": True, "tmoney": False}
    # (Thunes, cross-border and not mobile money, would be one approver's call, within 15 minutes.)
    await bot.slash(eng, "/ops disable provider thunes --dry-run", channel=NEPXY_CHANNEL)
    assert "1 approval from approver required by other-providers" in (await bot.response(containing="Dry run"))["text"]

    # "Safe rollback: re-deploy the previous container image", then "verify readyz is healthy".
    text = await room.look(eng, "/ops history api", "revisions,")
    assert "`2` nepxy-api=ghcr.io/nepxy/api:2.4.0 — release 2.4.0: webhook parser rewrite" in text and "← current" in text
    undo = await room.ask(eng, '/ops rollback api --reason "2.4.0 fails readyz"')
    card = room.card(undo)
    assert "nepxy-api: revision 2 (nepxy-api=ghcr.io/nepxy/api:2.4.0) → 1 (nepxy-api=ghcr.io/nepxy/api:2.3.1)" in card
    assert "policy: deployments" in card and "approvals 0/1" in card
    await room.approve(NEPXY_LEAD, undo)
    undo = await room.done(undo)
    assert image_of(api.cluster, ns, "nepxy-api") == "ghcr.io/nepxy/api:2.3.1"
    await room.in_thread(undo, "Rollout of nepxy-api: successfully rolled out (2 of 2 available)")
    await room.recorded(undo, "followed")
    state["version"] = "2.3.1"
    text = await room.look(eng, "/ops health api", "health of")
    assert text.splitlines()[0] == "*health of api: all 3 probes healthy*" and "ready=true migrations_ok=true" in text

    # TMoney is back: enable it, under the same two signatures; two from finance are not enough.
    on = await room.ask(NEPXY_ENG2, "/ops enable provider tmoney")
    await room.approve(NEPXY_FIN2, on)
    await room.card_says(on, f"approvals 1/2: <@{NEPXY_FIN2}>")
    await room.approve(NEPXY_FIN1, on)
    await room.card_says(on, f"approvals 2/2: <@{NEPXY_FIN2}>, <@{NEPXY_FIN1}>")
    assert await room.state(on) == "pending_approval" and providers_enabled(db)["tmoney"] is False, "finance twice, no approver"
    await room.approve(NEPXY_LEAD, on)
    await room.done(on)
    assert providers_enabled(db)["tmoney"] is True

    stop = 'disable provider tmoney --reason "TMoney status page: outage"'
    back = 'rollback api --reason "2.4.0 fails readyz"'
    resume = "enable provider tmoney"
    assert await room.trail() == [
        ("read", eng, "health api"), ("read", eng, "pods payout-worker"),
        ("requested", eng, stop), ("vote_refused", NEPXY_ENG2, stop), ("approval_given", NEPXY_LEAD, stop),
        ("approval_given", NEPXY_FIN1, stop), ("approved", NEPXY_FIN1, stop), ("started", "opsbot", stop),
        ("succeeded", "opsbot", stop),
        ("dry_run", eng, "disable provider thunes --dry-run"), ("read", eng, "history api"),
        ("requested", eng, back), ("approval_given", NEPXY_LEAD, back), ("approved", NEPXY_LEAD, back),
        ("started", "opsbot", back), ("succeeded", "opsbot", back), ("followed", "opsbot", back),
        ("read", eng, "health api"),
        ("requested", NEPXY_ENG2, resume), ("approval_given", NEPXY_FIN2, resume), ("approval_given", NEPXY_FIN1, resume),
        ("approval_given", NEPXY_LEAD, resume), ("approved", NEPXY_LEAD, resume), ("started", "opsbot", resume),
        ("succeeded", "opsbot", resume),
    ]
