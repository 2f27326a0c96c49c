"""The demo platform the sandbox plays: Nova RMS (seed 003) — its Kubernetes namespace with revision
history, its database (providers, billing webhook events, some failed), the HTTP health endpoints
of its API and worker, and the admin endpoints the examples' http actions call — used by the tests
and by `opsbot dev`. Seeding is idempotent, so a reused data directory keeps working."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bot.sandbox.kube_apiserver import Cluster, cronjob_manifest, deployment_manifest, hpa_manifest

PLATFORM_SCHEMA = """
CREATE TABLE IF NOT EXISTS "Provider" (id serial PRIMARY KEY, name text UNIQUE NOT NULL, "isActive" boolean NOT NULL DEFAULT true);
INSERT INTO "Provider" (name, "isActive") VALUES ('twilio', true), ('vonage', true), ('plivo', false)
    ON CONFLICT (name) DO NOTHING;
CREATE TABLE IF NOT EXISTS billing_webhook_events (
    id uuid PRIMARY KEY, event_type text NOT NULL, status text NOT NULL, last_error text,
    payload jsonb NOT NULL DEFAULT '{}', created_at timestamptz NOT NULL DEFAULT now());
INSERT INTO billing_webhook_events (id, event_type, status, last_error) VALUES
    ('8f2c1b9e-5d4a-4c3b-9a1e-0f6d2c8b7a51', 'invoice.paid', 'failed', 'ECONNRESET talking to ledger'),
    ('1d6e8f00-aaaa-4bbb-8ccc-000000000002', 'subscription.updated', 'processed', NULL),
    ('2b7c9d11-bbbb-4ccc-9ddd-000000000003', 'invoice.created', 'pending', NULL)
    ON CONFLICT (id) DO NOTHING;
"""


# The tables the examples' plan queries read, by the name the query uses (bot/sandbox/world.py
# ``seed_plan_tables``): a plan query is free SQL, so these cannot be derived from the config.
DEMO_TABLES = {
    # NepXy (seed 004) "Payouts stuck in SENT: inspect app.mobile_money_payouts for attempt_count and next_retry_at".
    "app.mobile_money_payouts": """
CREATE SCHEMA IF NOT EXISTS app;
CREATE TABLE IF NOT EXISTS app.mobile_money_payouts (
    transaction_id text PRIMARY KEY, provider text NOT NULL, status text NOT NULL,
    attempt_count integer NOT NULL DEFAULT 0, next_retry_at timestamptz);
INSERT INTO app.mobile_money_payouts (transaction_id, provider, status, attempt_count, next_retry_at) VALUES
    ('tx-20260301-0042', 'tmoney', 'SENT', 3, '2026-03-01 10:15:00+00'),
    ('tx-20260301-0043', 'flooz', 'FAILED', 5, NULL)
    ON CONFLICT (transaction_id) DO NOTHING;
""",
}
ADMIN_KEY: web.AppKey[list[dict[str, Any]]] = web.AppKey("admin_requests", list)


def seed_cluster(cluster: Cluster) -> None:
    """nova-worker at 3 replicas; nova-api with three revisions (1.4.0 → 1.4.1 → 1.4.2) to roll back;
    the nightly database backup CronJob (`/ops backup db-backup`)."""
    cluster.create_deployment("nova", deployment_manifest("nova-worker", "ghcr.io/nova/worker:2.3.0", replicas=3, namespace="nova"))
    cluster.create_deployment("nova", deployment_manifest("nova-api", "ghcr.io/nova/api:1.4.0", replicas=3, namespace="nova"))
    for tag in ("1.4.1", "1.4.2"):
        d = cluster.get("apps/deployments", "nova", "nova-api")
        d["spec"]["template"]["spec"]["containers"][0]["image"] = f"ghcr.io/nova/api:{tag}"
        cluster.update_deployment("nova", "nova-api", d)
    cluster.create_cronjob("nova", cronjob_manifest("nova-db-backup", "ghcr.io/nova/pg-backup:15", schedule="0 2 * * *",
                                                    namespace="nova", command=["/bin/sh", "-c", "pg_dump | gzip | upload"]))


def seed_incident(cluster: Cluster) -> None:
    """What the playground adds to make the look-around commands worth typing: an autoscaler on
    nova-api, a worker pod that was OOM-killed, and log lines (one with a secret to scrub)."""
    cluster.create_hpa("nova", hpa_manifest("nova-api", "nova-api", min_replicas=2, max_replicas=12, cpu_percent=70,
                                            namespace="nova"))
    pods = cluster.pods_of("nova", "nova-worker")
    if not pods:
        return
    cluster.crash_pod("nova", pods[0]["metadata"]["name"], reason="OOMKilled", exit_code=137)
    for pod in pods:
        cluster.append_log("nova", pod["metadata"]["name"], [
            "worker started, concurrency 8",
            "processing billing-webhooks job 8f2c1b9e (invoice.paid)",
            "ERROR ledger timeout after 30000ms (ECONNRESET) url=postgres://nova:hunter2@ledger-db:5432/ledger",
            "retrying job 8f2c1b9e in 5000ms (attempt 2 of 3)",
            "processed job 2b7c9d11 (invoice.created) in 84ms",
        ])


DEMO_METRICS = """# HELP nova_api_billing_webhook_total Billing webhook events by status.
# TYPE nova_api_billing_webhook_total counter
nova_api_billing_webhook_total{status="processed"} 1841
nova_api_billing_webhook_total{status="retrying"} 3
nova_api_billing_webhook_total{status="failed"} 1
"""


def health_app(metrics: list[str] | None = None) -> web.Application:
    """The demo platform's HTTP endpoints on one server, for `/ops health` in the playground (the
    config's probe URLs point at it): Nova's API (`/health`, `/metrics`) and worker (`/healthz`,
    `/readyz`), and any other path a config's probe asks for — a path with "ready" in it answers
    ``{"ready": true}``, `…/metrics` a text exposition with a line for each of ``metrics`` (the
    metric names the config's probes show), anything else ``{"status": "ok"}``. Any POST, PUT, PATCH
    or DELETE is an http action's admin call: kept in ``app[ADMIN_KEY]`` and answered 200."""
    extra = "".join(f'# TYPE {m} counter\n{m}{{status="ok"}} 1841\n{m}{{status="failed"}} 1\n'
                    for m in dict.fromkeys(metrics or ()) if m not in DEMO_METRICS)

    async def any_path(request: web.Request) -> web.Response:
        path = request.path.rstrip("/")
        if path.endswith("/metrics"):
            return web.Response(text=DEMO_METRICS + extra, content_type="text/plain")
        if path.endswith("/healthz"):
            return web.json_response({"ok": True})
        if "ready" in path.rsplit("/", 1)[-1]:
            return web.json_response({"ready": True, "queue": "billing-webhooks"})
        return web.json_response({"status": "ok", "version": "1.4.2", "checks": {"database": "ok", "redis": "ok"}})

    async def admin(request: web.Request) -> web.Response:
        """An admin endpoint an http action calls (`POST …/payouts/{id}/retry`, `/ops/outbox/{id}/retry`):
        recorded (without the Authorization header's value) and answered 200 with a small JSON body."""
        body = await request.read()
        headers = {k: ("<set>" if k.lower() == "authorization" else v) for k, v in request.headers.items()}
        requests.append({"method": request.method, "path": request.path_qs, "headers": headers,
                         "body": body.decode("utf-8", "replace")[:2000]})
        return web.json_response({"ok": True, "accepted": request.path, "note": "the demo platform recorded this request"})

    app = web.Application()
    requests: list[dict[str, Any]] = []
    app[ADMIN_KEY] = requests
    app.router.add_get("/{tail:.*}", any_path)
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        app.router.add_route(method, "/{tail:.*}", admin)
    return app
