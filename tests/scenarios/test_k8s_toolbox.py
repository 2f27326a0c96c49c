"""Runbook steps on Kubernetes, from chat (seeds 001, 003): look at pods, events, logs and history,
restart, change the autoscaler, force a backup, and follow each change to its end."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.sandbox.kube_apiserver import KubeApiServer
from tests.conftest import ALICE, CAROL, DAN, EVE, MALLORY
from tests.harness import Harness


def deployment(kube: KubeApiServer, name: str = "nova-worker") -> dict[str, Any]:
    return kube.cluster.get("apps/deployments", "nova", name)


def thread_texts(bot: Harness, request: Any) -> list[str]:
    return [m.text for m in bot.slack.thread(Harness.INCIDENT, request.card_ts or "")]


async def approved_and_done(bot: Harness, text: str, *, approver: str = CAROL) -> Any:
    await bot.slash(ALICE, text)
    request = await bot.requested()
    await bot.click(approver, request.id, "approve")
    return await bot.state_of(request.id, "succeeded", "failed", "stale", "unknown")


# ---------------------------------------------------------------- restart + following the rollout

async def test_restart_rolls_every_pod_and_the_thread_follows_the_rollout(bot: Harness, kube: KubeApiServer) -> None:
    before = {p["metadata"]["name"] for p in kube.cluster.pods_of("nova", "nova-worker")}
    await bot.slash(ALICE, '/ops restart worker --reason "INC-77 worker stuck"')
    request = await bot.requested()
    card = bot.slack.in_channel(Harness.INCIDENT)[-1]
    assert "nova-worker: restart all 3 pods" in card.all_text()
    assert "maxUnavailable" in card.all_text()
    assert card.all_text().count("environment") == 1, "the environment is said once, on the target line"
    assert "restartedAt" not in str(deployment(kube)["spec"]["template"]["metadata"].get("annotations")), "nothing before approval"

    await bot.click(CAROL, request.id, "approve")
    done = await bot.state_of(request.id, "succeeded", "failed")
    assert done.state.value == "succeeded", done.error
    stamp = deployment(kube)["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
    assert stamp.endswith("Z") and done.result and done.result["restarted_at"] == stamp
    after = {p["metadata"]["name"] for p in kube.cluster.pods_of("nova", "nova-worker")}
    assert after and not after & before, "every pod was replaced"

    async def followed() -> list[str] | None:
        texts = thread_texts(bot, done)
        return texts if any("successfully rolled out" in t for t in texts) else None

    texts = await bot.eventually(followed, what="the rollout's end in the thread")
    assert "Rollout of nova-worker: successfully rolled out (3 of 3 available)" in texts[-1]
    assert await bot.eventually(lambda: _has(bot, request.id, "followed"), what="the followed row")


async def test_a_stuck_rollout_is_said_loudly_in_the_thread_and_the_audit_channel(bot: Harness, kube: KubeApiServer) -> None:
    d = deployment(kube)
    d["spec"]["progressDeadlineSeconds"] = 2
    kube.cluster.update_deployment("nova", "nova-worker", d)
    kube.cluster.set_rollout("nova", "nova-worker", mode="stuck")
    done = await approved_and_done(bot, "/ops restart worker")
    assert done.state.value == "succeeded", "the restart itself was applied"

    async def loud() -> list[str] | None:
        texts = thread_texts(bot, done)
        return texts if any("exceeded its progress deadline" in t for t in texts) else None

    texts = await bot.eventually(loud, timeout=20, what="the failed rollout in the thread")
    assert texts[-1].startswith(":rotating_light:")
    assert await bot.eventually(lambda: _has(bot, done.id, "follow_failed"), what="the follow_failed row")

    async def headline() -> str | None:
        head = next((m for m in bot.slack.in_channel("C0AUDIT") if done.id in m.text), None)
        return head.text if head and "rollout/job failed" in head.text else None

    assert "succeeded" in await bot.eventually(headline, what="the audit headline to say the rollout failed")


async def test_two_fast_approvals_restart_once(bot: Harness, kube: KubeApiServer) -> None:
    await bot.slash(ALICE, "/ops restart api")
    request = await bot.requested()
    await asyncio.gather(bot.click(CAROL, request.id, "approve"), bot.click(DAN, request.id, "approve"))
    done = await bot.state_of(request.id, "succeeded", "failed")
    assert done.state.value == "succeeded"
    patches = [r for r in kube.cluster.requests if r[0] == "PATCH" and r[1].endswith("/deployments/nova-api")]
    assert len(patches) == 1
    assert (await bot.audit_events(request.id)).count("started") == 1


async def test_restart_of_a_paused_deployment_is_refused(bot: Harness, kube: KubeApiServer) -> None:
    d = deployment(kube)
    d["spec"]["paused"] = True
    kube.cluster.update_deployment("nova", "nova-worker", d)
    await bot.slash(ALICE, "/ops restart worker")
    reply = await bot.response(containing="paused")
    assert "resumed" in reply["text"]
    assert await bot.last_request() is None


# ---------------------------------------------------------------- read-only looks

async def test_history_lists_revisions_with_images_and_marks_the_current_one(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops history api")
    text = (await bot.response(containing="revisions,"))["text"]
    assert "nova-api: 3 revisions, current 3" in text
    lines = text.splitlines()
    assert "`3` nova-api=ghcr.io/nova/api:1.4.2" in lines[1] and "← current" in lines[1]
    assert "`1` nova-api=ghcr.io/nova/api:1.4.0" in lines[3]
    assert "/ops rollback api" in text
    assert await bot.eventually(bot.audit_events, what="the read row") == ["read"]


async def test_pods_show_why_the_last_run_ended(bot: Harness, kube: KubeApiServer) -> None:
    pod = kube.cluster.pods_of("nova", "nova-worker")[0]["metadata"]["name"]
    kube.cluster.crash_pod("nova", pod, reason="OOMKilled", exit_code=137)
    await bot.slash(EVE, "/ops pods worker")
    text = (await bot.response(containing=" pods,"))["text"]
    assert "nova-worker: 3 pods, 3 running, 1 restart" in text
    line = next(line for line in text.splitlines() if pod in line)
    assert "restarts 1" in line and "OOMKilled (exit 137" in line and "node " in line


async def test_events_show_the_warnings_of_the_deployments_pods(bot: Harness, kube: KubeApiServer) -> None:
    pods = kube.cluster.pods_of("nova", "nova-worker")
    kube.cluster.crash_pod("nova", pods[0]["metadata"]["name"], reason="Error", exit_code=1)
    other = kube.cluster.pods_of("nova", "nova-api")[0]
    kube.cluster.add_event("nova", other, type="Warning", reason="Unhealthy", message="api probe failed")
    await bot.slash(ALICE, "/ops events worker")
    text = (await bot.response(containing="warning event"))["text"]
    assert "BackOff" in text and pods[0]["metadata"]["name"] in text
    assert "api probe failed" not in text, "another deployment's events are not shown"


async def test_logs_are_posted_in_a_thread_scrubbed_and_not_stored(bot: Harness, kube: KubeApiServer) -> None:
    pod = kube.cluster.pods_of("nova", "nova-worker")[0]["metadata"]["name"]
    kube.cluster.append_log("nova", pod, ["job 17 ok", "ERROR ledger timeout password=hunter2 url=postgres://app:s3cret@db/x",
                                          "job 18 ok", "error: retry Authorization: Bearer abcdefghijklmnop"])
    await bot.slash(ALICE, "/ops logs worker --grep error --tail 50")

    async def posted() -> list[Any] | None:
        heads = [m for m in bot.slack.in_channel(Harness.INCIDENT) if "log lines" in m.text]
        replies = bot.slack.thread(Harness.INCIDENT, heads[-1].ts) if heads else []
        return [heads[-1], *replies] if replies else None

    head, *replies = await bot.eventually(posted, what="the logs answer")
    assert "nova-worker: 2 log lines" in head.text and f"<@{ALICE}>" in head.text
    body = "\n".join(m.text for m in replies)
    assert "ERROR ledger timeout" in body and "job 17" not in body
    assert "hunter2" not in body and "s3cret" not in body and "abcdefghijklmnop" not in body
    assert body.count("[redacted]") >= 3
    rows = await bot.eventually(lambda: _rows(bot), what="the read row")
    assert rows[-1]["event"] == "read" and rows[-1]["plan"]["facts"]["lines"] == 2
    assert "ledger timeout" not in str(rows), "log lines are never kept in the audit trail"


async def test_logs_flags_with_bad_values_say_what_to_type(bot: Harness) -> None:
    cases = {
        "/ops logs worker --tail 100000": "1 to 1000 lines",
        "/ops logs worker --since 99y": "duration such as 10m",
        "/ops logs worker --since 30d": "at most 7d",
        "/ops logs worker --container ../etc": "container name",
        "/ops logs worker --grep": "needs a value",
        "/ops logs worker --tail ５": "digits 0-9",
        "/ops logs worker --tail 5 --tail 6": "given twice",
    }
    for text, expected in cases.items():
        status, body = await bot.slash(ALICE, text)
        assert status == 200
        assert expected in body, (text, body)
    async def all_rows() -> list[str] | None:
        events = await bot.audit_events()
        return events if len(events) >= len(cases) else None

    assert await bot.eventually(all_rows, what="invalid rows") == ["invalid"] * len(cases)


async def test_logs_are_denied_to_roles_the_policy_does_not_name(bot: Harness) -> None:
    await bot.slash(EVE, "/ops logs worker")  # auditors read the trail, not the platform's logs
    assert "you may not run `logs`" in (await bot.response(containing="Not allowed"))["text"]
    await bot.slash(MALLORY, "/ops pods worker")
    assert "Not allowed" in (await bot.response(containing="Not allowed"))["text"]


async def test_a_hung_cluster_is_said_within_two_seconds_then_refused(bot: Harness, kube: KubeApiServer) -> None:
    kube.faults.add(path_re=r"/pods", hang=60)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await bot.slash(ALICE, "/ops pods worker")
    held = await bot.response(containing="Still working on it", timeout=10)
    took = loop.time() - started
    assert "slow to answer" in held["text"]
    assert took < 4, took  # said at 2 s; generous for a loaded machine
    reply = await bot.response(containing="Refused", timeout=40)  # the adapter's deadline for one call
    kube.faults.clear()
    assert "the Kubernetes API" in reply["text"] and "Nothing was changed" in reply["text"]
    rows = await bot.eventually(lambda: _rows(bot), what="the refused row")
    assert rows[-1]["event"] == "refused"


async def test_a_cluster_that_is_down_refuses_reads_with_the_reason(bot: Harness, kube: KubeApiServer) -> None:
    kube.faults.add(path_re=r"/replicasets", status=503)
    await bot.slash(ALICE, "/ops history api")
    reply = await bot.response(containing="Refused")
    assert "Kubernetes" in reply["text"] and "Nothing was changed" in reply["text"]


# ---------------------------------------------------------------- autoscaler

def add_hpa(kube: KubeApiServer, low: int = 2, high: int = 10) -> None:
    kube.cluster.create_hpa("nova", {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "nova-worker", "namespace": "nova"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nova-worker"},
                 "minReplicas": low, "maxReplicas": high,
                 "metrics": [{"type": "Resource",
                              "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]},
    })


async def test_status_shows_the_autoscaler_and_scale_warns_it_will_override(bot: Harness, kube: KubeApiServer) -> None:
    add_hpa(kube)
    await bot.slash(ALICE, "/ops status worker")
    assert "autoscaler nova-worker: 2–10 replicas" in (await bot.response(containing="autoscaler"))["text"]
    await bot.slash(ALICE, "/ops scale worker 15")
    await bot.requested()
    card = bot.slack.in_channel(Harness.INCIDENT)[-1].all_text()
    assert "will put it back within 2–10" in card and "/ops hpa worker --min 2 --max 15" in card


async def test_hpa_bounds_change_after_approval(bot: Harness, kube: KubeApiServer) -> None:
    add_hpa(kube)
    done = await approved_and_done(bot, "/ops hpa worker --max 15")
    assert done.state.value == "succeeded", done.error
    hpa = kube.cluster.get("autoscaling/horizontalpodautoscalers", "nova", "nova-worker")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 15)
    assert done.plan["summary"] == "nova-worker: 2–10 → 2–15 replicas"


async def test_hpa_bad_input_and_missing_autoscaler(bot: Harness) -> None:
    for text, expected in {"/ops hpa worker": "say what to change", "/ops hpa worker --min 5 --max 3": "above `--max`",
                           "/ops hpa worker --max 99": "1 to 20"}.items():
        _status, body = await bot.slash(ALICE, text)
        assert expected in body, (text, body)
    await bot.slash(ALICE, "/ops hpa api --max 8")
    assert "has no HorizontalPodAutoscaler" in (await bot.response(containing="HorizontalPodAutoscaler"))["text"]
    assert await bot.last_request() is None


async def test_hpa_changed_after_approval_is_stale(bot: Harness, kube: KubeApiServer) -> None:
    add_hpa(kube)
    await bot.slash(ALICE, "/ops hpa worker --max 12")
    request = await bot.requested()
    hpa = kube.cluster.get("autoscaling/horizontalpodautoscalers", "nova", "nova-worker")
    hpa["spec"]["maxReplicas"] = 11
    kube.cluster.replace_hpa("nova", "nova-worker", hpa)
    await bot.click(CAROL, request.id, "approve")
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "stale"
    assert kube.cluster.get("autoscaling/horizontalpodautoscalers", "nova", "nova-worker")["spec"]["maxReplicas"] == 11


# ---------------------------------------------------------------- backup (a job from a cronjob)

async def test_backup_creates_a_job_like_kubectl_and_follows_it(bot: Harness, kube: KubeApiServer) -> None:
    done = await approved_and_done(bot, '/ops backup db-backup --reason "before migration 42"')
    assert done.state.value == "succeeded", done.error
    name = done.result["job"]
    job = kube.cluster.get("batch/jobs", "nova", name)
    assert name.startswith("nova-db-backup-manual-")
    assert job["metadata"]["annotations"]["cronjob.kubernetes.io/instantiate"] == "manual"
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("CronJob", "nova-db-backup", True)

    async def finished() -> list[str] | None:
        texts = thread_texts(bot, done)
        return texts if any(f"Job {name} completed" in t for t in texts) else None

    await bot.eventually(finished, timeout=15, what="the job's end in the thread")


async def test_backup_of_an_unknown_cronjob_names_the_known_ones(bot: Harness) -> None:
    _status, body = await bot.slash(ALICE, "/ops backup db-bakup")
    assert "unknown cronjob `db-bakup`" in body and "db-backup" in body


async def test_backup_create_that_gets_no_answer_is_unknown_and_not_retried(bot: Harness, kube: KubeApiServer) -> None:
    kube.faults.add(method="POST", path_re=r"/jobs$", status=503)
    done = await approved_and_done(bot, "/ops backup db-backup")
    assert done.state.value == "unknown", done.error
    posts = [r for r in kube.cluster.requests if r[0] == "POST" and r[1].endswith("/jobs")]
    assert len(posts) == 1, "a write is never sent twice"


async def _has(bot: Harness, request_id: str, event: str) -> bool:
    return event in await bot.audit_events(request_id)


async def _rows(bot: Harness) -> list[dict[str, Any]]:
    return list(await bot.runtime.audit.log.rows())
