"""The Kubernetes emulator is only worth its tests if real clients cannot tell it from a cluster.
Here the real ``kubectl`` (a client nobody here wrote) runs its rollout, scale, get, logs, patch and
create-job commands against it and must see what it would see on a cluster: server-side printed
tables, the kubelet's log rules, field selectors, HPA bounds, protobuf request bodies, and rollouts
that take time (``rollout status`` following them to success, or to the progress deadline)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.sandbox.kube_apiserver import KubeApiServer, cronjob_manifest, deployment_manifest, hpa_manifest

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed on this machine")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[KubeApiServer, str]]:
    with KubeApiServer() as server:
        server.cluster.create_deployment("shop", deployment_manifest("web", "nginx:1.25.0", replicas=2, namespace="shop"))
        yield server, server.kubeconfig(str(tmp_path / "kubeconfig"))


def kubectl(kubeconfig: str, *args: str, ok: bool = True) -> str:
    # A discovery cache of its own: kubectl keys ~/.kube/cache by host:port, and an ephemeral port
    # reused from an earlier run would otherwise bring back that run's API groups.
    proc = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "--cache-dir", kubeconfig + ".cache", "-n", "shop", *args],
                          capture_output=True, text=True, timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def image(server: KubeApiServer) -> str:
    return str(server.cluster.get("apps/deployments", "shop", "web")["spec"]["template"]["spec"]["containers"][0]["image"])


def test_rollout_history_undo_and_to_revision(api: tuple[KubeApiServer, str]) -> None:
    server, kc = api
    kubectl(kc, "set", "image", "deployment/web", "web=nginx:1.25.1")
    kubectl(kc, "annotate", "deployment/web", "kubernetes.io/change-cause=bump to 1.25.2", "--overwrite")
    kubectl(kc, "set", "image", "deployment/web", "web=nginx:1.25.2")
    history = kubectl(kc, "rollout", "history", "deployment/web")
    assert [line.split()[0] for line in history.splitlines()[2:] if line.strip()] == ["1", "2", "3"]
    assert "bump to 1.25.2" in history
    assert "nginx:1.25.1" in kubectl(kc, "rollout", "history", "deployment/web", "--revision=2")

    assert "rolled back" in kubectl(kc, "rollout", "undo", "deployment/web")
    assert image(server) == "nginx:1.25.1"
    history = kubectl(kc, "rollout", "history", "deployment/web")
    assert [line.split()[0] for line in history.splitlines()[2:] if line.strip()] == ["1", "3", "4"]

    kubectl(kc, "rollout", "undo", "deployment/web", "--to-revision=1")
    assert image(server) == "nginx:1.25.0"
    # Defaulting on write makes the copied-back template equal to the live one: kubectl notices.
    out = kubectl(kc, "rollout", "undo", "deployment/web", "--to-revision=5")
    assert "skipped rollback (current template already matches revision 5)" in out
    out = kubectl(kc, "rollout", "undo", "deployment/web", "--to-revision=42", ok=False)
    assert "unable to find specified revision 42 in history" in out


def test_rollout_status_restart_and_scale(api: tuple[KubeApiServer, str]) -> None:
    server, kc = api
    assert 'deployment "web" successfully rolled out' in kubectl(kc, "rollout", "status", "deployment/web", "--timeout=20s")
    kubectl(kc, "rollout", "restart", "deployment/web")
    d = server.cluster.get("apps/deployments", "shop", "web")
    assert "kubectl.kubernetes.io/restartedAt" in d["spec"]["template"]["metadata"]["annotations"]
    assert d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    assert "scaled" in kubectl(kc, "scale", "deployment/web", "--replicas=5")
    assert server.cluster.get("apps/deployments", "shop", "web")["spec"]["replicas"] == 5
    assert len(server.cluster.list_objects("v1/pods", "shop", "app=web")) == 5
    # --current-replicas is a precondition kubectl checks against the scale subresource.
    out = kubectl(kc, "scale", "deployment/web", "--current-replicas=3", "--replicas=1", ok=False)
    assert "Expected replicas to be 3, was 5" in out
    assert 'deployment "web" successfully rolled out' in kubectl(kc, "rollout", "status", "deployment/web", "--timeout=20s")


def test_a_snapshot_restores_the_same_cluster(api: tuple[KubeApiServer, str]) -> None:
    server, kc = api
    kubectl(kc, "set", "image", "deployment/web", "web=nginx:1.26.0")
    state = server.cluster.snapshot()
    with KubeApiServer() as other:
        other.cluster.restore(state)
        kc2 = other.kubeconfig(kc + ".2")
        history = kubectl(kc2, "rollout", "history", "deployment/web")
        assert [line.split()[0] for line in history.splitlines()[2:] if line.strip()] == ["1", "2"]
        kubectl(kc2, "rollout", "undo", "deployment/web")
        assert other.cluster.get("apps/deployments", "shop", "web")["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.25.0"


def test_not_found_and_conflict_are_shaped_like_kubernetes(api: tuple[KubeApiServer, str]) -> None:
    _, kc = api
    assert 'Error from server (NotFound): deployments.apps "nope" not found' in kubectl(kc, "get", "deployment", "nope", ok=False)
    assert 'deployments.apps "nope" not found' in kubectl(kc, "scale", "deployment/nope", "--replicas=2", ok=False)
    out = kubectl(kc, "scale", "deployment/web", "--replicas=3", "--resource-version=1", ok=False)
    assert "Expected resource version to be 1, was" in out


def pods(server: KubeApiServer) -> list[str]:
    return [p["metadata"]["name"] for p in server.cluster.pods_of("shop", "web")]


def test_get_pods_shows_readiness_restarts_and_the_crash(api: tuple[KubeApiServer, str]) -> None:
    server, kc = api
    crashed, healthy = pods(server)
    server.cluster.crash_pod("shop", crashed, reason="OOMKilled", exit_code=137)
    table = kubectl(kc, "get", "pods", "-l", "app=web", "-o", "wide")
    lines = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert table.split()[:5] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert lines[crashed][1:4] == ["0/1", "CrashLoopBackOff", "1"] and re.match(r"\(\d+s$", lines[crashed][4])
    assert lines[healthy][1:4] == ["1/1", "Running", "0"] and "emulated-node" in lines[healthy]
    assert kubectl(kc, "get", "pods", "-l", "app=nope").strip() == "No resources found in shop namespace."
    pod = next(p for p in json.loads(kubectl(kc, "get", "pods", "-l", "app=web", "-o", "json"))["items"]
               if p["metadata"]["name"] == crashed)
    cs = pod["status"]["containerStatuses"][0]
    assert pod["status"]["phase"] == "Running" and pod["spec"]["nodeName"] == "emulated-node" and pod["status"]["startTime"]
    assert cs["ready"] is False and cs["restartCount"] == 1 and cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert cs["lastState"]["terminated"]["reason"] == "OOMKilled" and cs["lastState"]["terminated"]["exitCode"] == 137
    assert cs["lastState"]["terminated"]["finishedAt"]
    assert kubectl(kc, "get", "deployment", "web").split()[5:9] == ["web", "1/2", "2", "1"]  # READY, UP-TO-DATE, AVAILABLE


def test_logs_tail_since_previous_and_of_a_deployment(api: tuple[KubeApiServer, str]) -> None:
    server, kc = api
    first, second = pods(server)
    old = datetime.now(UTC) - timedelta(hours=2)
    server.cluster.append_log("shop", first, ["booting", "listening on :8080"], at=old)
    server.cluster.append_log("shop", first, ["GET /healthz 200", "GET /orders 500", "GET /orders 200"])
    assert kubectl(kc, "logs", f"pod/{first}").splitlines() == ["booting", "listening on :8080", "GET /healthz 200",
                                                                 "GET /orders 500", "GET /orders 200"]
    assert kubectl(kc, "logs", f"pod/{first}", "--tail=2").splitlines() == ["GET /orders 500", "GET /orders 200"]
    assert kubectl(kc, "logs", f"pod/{first}", "--since=1h").splitlines() == ["GET /healthz 200", "GET /orders 500",
                                                                              "GET /orders 200"]
    stamped = kubectl(kc, "logs", f"pod/{first}", "--tail=1", "--timestamps").strip()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z GET /orders 200", stamped)
    assert kubectl(kc, "logs", f"pod/{first}", "--limit-bytes=7") == "booting"
    out = kubectl(kc, "logs", f"pod/{first}", "--previous", ok=False)
    assert f'Error from server (BadRequest): previous terminated container "web" in pod "{first}" not found' in out
    server.cluster.crash_pod("shop", first, reason="Error", exit_code=1, back_off=False)  # restarted at once
    server.cluster.append_log("shop", first, ["booting again"])
    assert kubectl(kc, "logs", f"pod/{first}", "--previous", "--tail=1").splitlines() == ["GET /orders 200"]
    assert kubectl(kc, "logs", f"pod/{first}").splitlines() == ["booting again"]
    server.cluster.append_log("shop", second, ["second pod"])
    out = kubectl(kc, "logs", "deploy/web")
    assert re.search(r"Found 2 pods, using pod/web-", out)
    chosen = re.search(r"using pod/(\S+)", out)
    assert chosen and ("second pod" in out) == (chosen.group(1) == second)


def test_events_with_field_selectors(api: tuple[KubeApiServer, str]) -> None:
    server, kc = api
    crashed, _ = pods(server)
    server.cluster.crash_pod("shop", crashed)
    server.cluster.crash_pod("shop", crashed)  # once more: the same event counts up
    out = kubectl(kc, "get", "events", "--field-selector", f"involvedObject.name={crashed},type=Warning")
    rows = out.splitlines()
    assert rows[0].split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"] and len(rows) == 2
    assert rows[1].split()[1:4] == ["Warning", "BackOff", f"pod/{crashed}"]
    wide = kubectl(kc, "get", "events", "--field-selector", f"involvedObject.name={crashed}", "-o", "wide")
    assert "kubelet, emulated-node" in wide and re.search(r"spec\.containers\{web\}", wide)
    events = json.loads(kubectl(kc, "get", "events", "--field-selector", "involvedObject.kind=Deployment", "-o", "json"))["items"]
    assert [e["reason"] for e in events] == ["ScalingReplicaSet"] and events[0]["message"].startswith("Scaled up replica set web-")
    assert json.loads(kubectl(kc, "get", "events", "--field-selector", "type=Warning", "-o", "json"))["items"][0]["count"] == 2
    out = kubectl(kc, "get", "events", "--field-selector", "spec.nope=1", ok=False)
    assert "field label not supported: spec.nope" in out


def test_hpa_get_patch_and_bounds(api: tuple[KubeApiServer, str]) -> None:
    server, kc = api
    kubectl(kc, "scale", "deployment/web", "--replicas=5")
    server.cluster.create_hpa("shop", hpa_manifest("web", "web", min_replicas=2, max_replicas=6, namespace="shop"))
    server.cluster.set_hpa_utilization("shop", "web", 40)  # below the 80 % target: 5 × 40/80 → 3
    header, row = kubectl(kc, "get", "hpa").splitlines()
    assert header.split() == ["NAME", "REFERENCE", "TARGETS", "MINPODS", "MAXPODS", "REPLICAS", "AGE"]
    assert row.split()[:8] == ["web", "Deployment/web", "cpu:", "40%/80%", "2", "6", "3", row.split()[7]]
    assert "horizontalpodautoscaler.autoscaling/web patched" in kubectl(
        kc, "patch", "hpa", "web", "--type", "merge", "-p", '{"spec":{"minReplicas":4,"maxReplicas":4}}')
    assert server.cluster.get("apps/deployments", "shop", "web")["spec"]["replicas"] == 4  # put in range at once
    assert "scaled" in kubectl(kc, "scale", "deployment/web", "--replicas=9")
    assert server.cluster.get("apps/deployments", "shop", "web")["spec"]["replicas"] == 4  # and kept there
    rescales = kubectl(kc, "get", "events", "--field-selector", "involvedObject.kind=HorizontalPodAutoscaler,reason=SuccessfulRescale")
    assert "New size: 4; reason: Current number of replicas above Spec.MaxReplicas" in rescales
    out = kubectl(kc, "patch", "hpa", "web", "--type", "merge", "-p", '{"spec":{"minReplicas":5}}', ok=False)
    # kubectl words an Invalid Status from its details and causes, as for a real server.
    assert out.strip() == ('The HorizontalPodAutoscaler "web" is invalid: spec.maxReplicas: Invalid value: 4: must be greater '
                           "than or equal to `minReplicas`")
    hpa = json.loads(kubectl(kc, "get", "hpa", "web", "-o", "json"))
    out = kubectl(kc, "patch", "hpa", "web", "--type", "json", "-p",
                  json.dumps([{"op": "test", "path": "/metadata/resourceVersion", "value": hpa["metadata"]["resourceVersion"]},
                              {"op": "replace", "path": "/spec/maxReplicas", "value": 7}]))
    assert "patched" in out and server.cluster.get("autoscaling/horizontalpodautoscalers", "shop", "web")["spec"]["maxReplicas"] == 7
    assert "patched (no change)" in kubectl(kc, "patch", "hpa", "web", "--type", "merge", "-p", '{"spec":{"maxReplicas":7}}')


def test_create_job_from_a_cronjob(api: tuple[KubeApiServer, str]) -> None:
    """kubectl GETs the CronJob and POSTs the Job as protobuf; the Job must be the one kubectl
    meant (compared with its own client-side rendering), pointer fields set to zero included."""
    server, kc = api
    cron = cronjob_manifest("nightly", "postgres:16", namespace="shop")
    job_spec = cron["spec"]["jobTemplate"]["spec"]
    job_spec.update(backoffLimit=0, activeDeadlineSeconds=600)
    container = job_spec["template"]["spec"]["containers"][0]
    container.update(env=[{"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {"name": "pg", "key": "password"}}}],
                     resources={"requests": {"cpu": "250m", "memory": "512Mi"}},
                     readinessProbe={"tcpSocket": {"port": "pg"}, "periodSeconds": 5},
                     ports=[{"containerPort": 5432, "name": "pg"}], stdin=False)
    job_spec["template"]["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "pg"}}]
    server.cluster.create_cronjob("shop", cron)
    meant = json.loads(kubectl(kc, "create", "job", "backup-1", "--from=cronjob/nightly", "--dry-run=client", "-o", "json"))
    assert kubectl(kc, "create", "job", "backup-1", "--from=cronjob/nightly").strip() == "job.batch/backup-1 created"
    job = server.cluster.get("batch/jobs", "shop", "backup-1")
    stored = server.cluster.get("batch/cronjobs", "shop", "nightly")
    assert job["metadata"]["annotations"] == {"cronjob.kubernetes.io/instantiate": "manual"} == meant["metadata"]["annotations"]
    assert job["metadata"]["ownerReferences"] == meant["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "CronJob", "name": "nightly", "uid": stored["metadata"]["uid"], "controller": True}]
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 600
    template = job["spec"]["template"]
    for label in ("batch.kubernetes.io/controller-uid", "batch.kubernetes.io/job-name", "controller-uid", "job-name"):
        template["metadata"]["labels"].pop(label)
    assert template == stored["spec"]["jobTemplate"]["spec"]["template"]
    assert kubectl(kc, "get", "jobs").splitlines()[1].split()[:4] == ["backup-1", "Complete", "1/1", "0s"]
    assert kubectl(kc, "get", "pods", "-l", "job-name=backup-1").splitlines()[1].split()[1:3] == ["0/1", "Completed"]
    out = kubectl(kc, "create", "job", "backup-1", "--from=cronjob/nightly", ok=False)
    assert out.strip() == 'error: failed to create job: jobs.batch "backup-1" already exists'  # kubectl's own wording
    out = kubectl(kc, "create", "job", "backup-2", "--from=cronjob/nope", ok=False)
    assert 'cronjobs.batch "nope" not found' in out


def test_rollout_status_follows_a_rollout_in_steps(api: tuple[KubeApiServer, str]) -> None:
    server, kc = api
    kubectl(kc, "scale", "deployment/web", "--replicas=3")
    server.cluster.set_rollout("shop", "web", "steps", step_seconds=0.3)
    kubectl(kc, "set", "image", "deployment/web", "web=nginx:1.26.0")
    started = time.monotonic()
    out = kubectl(kc, "rollout", "status", "deployment/web", "--timeout=30s")
    assert time.monotonic() - started >= 0.5  # it waited for the steps
    lines = out.strip().splitlines()
    # kubectl's own start-up can take longer than a step on a loaded machine: which step it sees first varies.
    assert any(re.fullmatch(r'Waiting for deployment "web" rollout to finish: [12] out of 3 new replicas have been updated\.\.\.', line)
               for line in lines), lines
    assert lines[-1] == 'deployment "web" successfully rolled out'
    d = server.cluster.get("apps/deployments", "shop", "web")
    assert d["status"]["updatedReplicas"] == d["status"]["availableReplicas"] == 3
    assert [c["reason"] for c in d["status"]["conditions"]] == ["MinimumReplicasAvailable", "NewReplicaSetAvailable"]
    scaled = [e["message"] for e in server.cluster.list_objects("v1/events", "shop", field_selector="reason=ScalingReplicaSet")]
    assert sum(m.startswith("Scaled down replica set") for m in scaled) == 3  # one old pod at a time


def test_rollout_status_reports_the_progress_deadline(api: tuple[KubeApiServer, str]) -> None:
    server, kc = api
    kubectl(kc, "patch", "deployment/web", "-p", '{"spec":{"progressDeadlineSeconds":2}}')
    server.cluster.set_rollout("shop", "web", "stuck")
    started = time.monotonic()
    kubectl(kc, "set", "image", "deployment/web", "web=nginx:9.9.9")
    proc = subprocess.run(["kubectl", "--kubeconfig", kc, "--cache-dir", kc + ".cache", "-n", "shop", "rollout", "status",
                           "deployment/web", "--timeout=30s"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and 'error: deployment "web" exceeded its progress deadline' in proc.stderr
    assert 2 <= time.monotonic() - started < 15
    assert "1 out of 2 new replicas have been updated" in proc.stdout
    stuck = [line.split() for line in kubectl(kc, "get", "pods").splitlines()[1:]]
    assert sorted(row[2] for row in stuck) == ["ImagePullBackOff", "Running", "Running"]  # the old pods still serve
    progressing = server.cluster.get("apps/deployments", "shop", "web")["status"]["conditions"][1]
    assert (progressing["status"], progressing["reason"]) == ("False", "ProgressDeadlineExceeded")
    server.cluster.set_rollout("shop", "web", "instant")  # the image "appears": it completes at once
    assert 'deployment "web" successfully rolled out' in kubectl(kc, "rollout", "status", "deployment/web", "--timeout=20s")
