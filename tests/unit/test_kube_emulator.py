"""The emulator's controllers and kubelet rules, through the official Python client where a
client would see them: HPA bounds enforced at once, logs per container instance, watches that
follow a paced rollout, jobs that complete, fail or run, and a controller thread that lives and
dies with the server."""

from __future__ import annotations

import random
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from bot.sandbox import kube_apiserver
from bot.sandbox.kube_apiserver import ApiError, Cluster, KubeApiServer, _Objects, cronjob_manifest, deployment_manifest, hpa_manifest

DEPLOY = "apps/deployments"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[KubeApiServer, client.ApiClient]]:
    with KubeApiServer() as server:
        server.cluster.create_deployment("shop", deployment_manifest("web", "nginx:1", replicas=3, namespace="shop"))
        cfg = client.Configuration()
        config.load_kube_config(config_file=server.kubeconfig(str(tmp_path / "kc")), client_configuration=cfg)
        with client.ApiClient(cfg) as api_client:
            yield server, api_client


def replicas(cluster: Cluster) -> int:
    return int(cluster.get(DEPLOY, "shop", "web")["spec"]["replicas"])


def test_an_hpa_keeps_the_replicas_in_its_bounds(api: tuple[KubeApiServer, client.ApiClient]) -> None:
    server, api_client = api
    apps, c = client.AppsV1Api(api_client), server.cluster
    c.create_hpa("shop", hpa_manifest("web", "web", min_replicas=2, max_replicas=4, namespace="shop"))
    answer = apps.patch_namespaced_deployment_scale("web", "shop", {"spec": {"replicas": 8}})
    assert answer.spec.replicas == 8  # the write itself succeeded, as on a cluster …
    assert replicas(c) == 4  # … and the HPA put it back at once
    hpa = c.get("autoscaling/horizontalpodautoscalers", "shop", "web")
    assert (hpa["status"]["currentReplicas"], hpa["status"]["desiredReplicas"]) == (4, 4)
    assert hpa["status"]["conditions"][0]["reason"] == "SucceededRescale" and hpa["status"]["lastScaleTime"]
    apps.patch_namespaced_deployment_scale("web", "shop", {"spec": {"replicas": 1}})
    assert replicas(c) == 2
    apps.patch_namespaced_deployment_scale("web", "shop", {"spec": {"replicas": 0}})
    assert replicas(c) == 0  # scaled to zero: autoscaling is disabled, as on a cluster
    hpa = c.get("autoscaling/horizontalpodautoscalers", "shop", "web")
    assert any(cond["reason"] == "ScalingDisabled" for cond in hpa["status"]["conditions"])
    apps.patch_namespaced_deployment_scale("web", "shop", {"spec": {"replicas": 3}})
    c.set_hpa_utilization("shop", "web", 85)  # within the 10 % tolerance of 80 %: no change
    assert replicas(c) == 3
    c.set_hpa_utilization("shop", "web", 120)  # ceil(3 × 120/80) = 5, limited to 4
    assert replicas(c) == 4
    hpa = c.get("autoscaling/horizontalpodautoscalers", "shop", "web")
    assert hpa["status"]["currentMetrics"][0]["resource"]["current"]["averageUtilization"] == 120
    assert [cond["reason"] for cond in hpa["status"]["conditions"]][-1] == "TooManyReplicas"
    hpa = c.get("autoscaling/horizontalpodautoscalers", "shop", "web")
    stale = hpa["metadata"]["resourceVersion"]
    hpa["spec"]["maxReplicas"] = 3
    assert c.replace_hpa("shop", "web", hpa)["metadata"]["resourceVersion"] != stale
    assert replicas(c) == 3  # someone else's edit: the new bounds apply at once
    with pytest.raises(ApiError, match="the object has been modified"):
        c.replace_hpa("shop", "web", {**hpa, "metadata": {**hpa["metadata"], "resourceVersion": stale}})
    client.AutoscalingV2Api(api_client).delete_namespaced_horizontal_pod_autoscaler("web", "shop")
    apps.patch_namespaced_deployment_scale("web", "shop", {"spec": {"replicas": 9}})
    assert replicas(c) == 9  # no HPA, no bounds
    with pytest.raises(ApiError, match="must be greater than or equal to `minReplicas`"):
        c.create_hpa("shop", hpa_manifest("bad", "web", min_replicas=5, max_replicas=2, namespace="shop"))
    orphan = c.create_hpa("shop", hpa_manifest("orphan", "nope", namespace="shop"))
    assert orphan["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300  # v2 defaulting
    status = c.get("autoscaling/horizontalpodautoscalers", "shop", "orphan")["status"]
    assert status["conditions"][0]["reason"] == "FailedGetScale"


def test_logs_follow_the_container_instances_as_the_kubelet_does(api: tuple[KubeApiServer, client.ApiClient]) -> None:
    server, api_client = api
    core, c = client.CoreV1Api(api_client), server.cluster
    pod = c.pods_of("shop", "web")[0]["metadata"]["name"]
    with pytest.raises(ValueError, match="previous terminated container"):
        c.append_log("shop", pod, ["x"], previous=True)
    c.append_log("shop", pod, "first run\nout of memory")
    c.crash_pod("shop", pod, reason="OOMKilled", exit_code=137)
    # In CrashLoopBackOff no container runs: the current log is the crashed container's, like --previous.
    assert core.read_namespaced_pod_log(pod, "shop") == core.read_namespaced_pod_log(pod, "shop", previous=True) \
        == "first run\nout of memory\n"
    c.recover_pod("shop", pod)
    c.append_log("shop", pod, ["second run"])
    assert core.read_namespaced_pod_log(pod, "shop") == "second run\n"
    assert core.read_namespaced_pod_log(pod, "shop", previous=True, tail_lines=1) == "out of memory\n"
    stamp = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    c.append_log("shop", pod, ["stamped"], at=stamp)
    assert core.read_namespaced_pod_log(pod, "shop", timestamps=True, tail_lines=1) == "2030-01-02T03:04:05.123456000Z stamped\n"
    since = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with urllib.request.urlopen(f"{server.url}/api/v1/namespaces/shop/pods/{pod}/log?sinceTime={since}", timeout=10) as resp:
        assert resp.headers["Content-Type"] == "text/plain"
        assert resp.read() == b"stamped\n"  # only the line from 2030 is after tomorrow
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod_log(pod, "shop", limit_bytes=0)
    assert err.value.status == 422 and "limitBytes: Invalid value: 0: must be greater than 0" in err.value.body
    status = c.get("v1/pods", "shop", pod)["status"]["containerStatuses"][0]
    assert (status["restartCount"], status["ready"], status["lastState"]["terminated"]["exitCode"]) == (1, True, 137)


def test_a_stuck_pod_has_no_logs_yet(api: tuple[KubeApiServer, client.ApiClient]) -> None:
    server, api_client = api
    c = server.cluster
    c.set_rollout("shop", "web", "stuck")
    d = c.get(DEPLOY, "shop", "web")
    d["spec"]["template"]["spec"]["containers"][0]["image"] = "nginx:does-not-exist"
    c.update_deployment("shop", "web", d)
    new = [p for p in c.pods_of("shop", "web") if p["status"]["phase"] == "Pending"]
    assert len(new) == 1 and new[0]["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff"
    name = new[0]["metadata"]["name"]
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(api_client).read_namespaced_pod_log(name, "shop")
    assert err.value.status == 400
    assert f'container \\"web\\" in pod \\"{name}\\" is waiting to start: trying and failing to pull image' in err.value.body
    reasons = {e["reason"] for e in c.list_objects("v1/events", "shop", field_selector=f"involvedObject.name={name}")}
    assert reasons == {"Failed", "BackOff"}


def test_a_watch_follows_a_rollout_in_steps(api: tuple[KubeApiServer, client.ApiClient]) -> None:
    server, api_client = api
    apps, c = client.AppsV1Api(api_client), server.cluster
    c.set_rollout("shop", "web", "steps", step_seconds=0.3)
    seen: list[tuple[str, int, int, str]] = []

    def follow() -> None:  # what a client following the rollout does: watch, from the current state on
        for event in watch.Watch().stream(apps.list_namespaced_deployment, "shop", field_selector="metadata.name=web",
                                          timeout_seconds=10):
            d, st = event["object"], event["object"].status
            progressing = next(cond for cond in st.conditions if cond.type == "Progressing")
            seen.append((event["type"], st.updated_replicas or 0, st.available_replicas or 0, progressing.reason))
            observed = d.metadata.generation <= (st.observed_generation or 0)  # as kubectl checks it
            if d.metadata.generation == 2 and observed and progressing.reason == "NewReplicaSetAvailable":
                return

    follower = threading.Thread(target=follow)
    follower.start()
    for _ in range(100):
        if seen:
            break
        time.sleep(0.02)
    assert seen == [("ADDED", 3, 3, "NewReplicaSetAvailable")]  # a watch without resourceVersion starts with the state
    started = time.monotonic()
    apps.patch_namespaced_deployment("web", "shop", {"spec": {"template": {"spec": {"containers": [
        {"name": "web", "image": "nginx:2"}]}}}})
    follower.join(timeout=10)
    assert not follower.is_alive() and time.monotonic() - started < 8
    seen = [s for s in seen[2:] if s[0] == "MODIFIED"]  # after the state and the spec change itself
    updated = [u for _, u, _, _ in seen]
    assert updated == sorted(updated) and {1, 2, 3} <= set(updated)  # one new replica per step, never backwards
    assert "ReplicaSetUpdated" in {r for _, _, _, r in seen} and all(a >= 3 for _, _, a, _ in seen)  # none unavailable (maxUnavailable 0)


def test_jobs_complete_fail_or_run(api: tuple[KubeApiServer, client.ApiClient]) -> None:
    server, api_client = api
    batch, c = client.BatchV1Api(api_client), server.cluster
    c.create_cronjob("shop", cronjob_manifest("nightly", "pg:16", namespace="shop"))
    template = c.get("batch/cronjobs", "shop", "nightly")["spec"]["jobTemplate"]["spec"]
    c.job_behaviour = "running"
    batch.create_namespaced_job("shop", {"metadata": {"name": "long"}, "spec": template})
    job = c.get("batch/jobs", "shop", "long")
    assert (job["status"]["active"], job["status"].get("succeeded")) == (1, None)
    running = c.list_objects("v1/pods", "shop", "job-name=long")
    assert [p["status"]["phase"] for p in running] == ["Running"]
    c.finish_job("shop", "long", succeeded=False)
    pods = c.list_objects("v1/pods", "shop", "job-name=long")
    assert len(pods) == 7 and running[0]["metadata"]["name"] in {p["metadata"]["name"] for p in pods}  # ended in place
    assert {p["status"]["phase"] for p in pods} == {"Failed"}
    job = c.get("batch/jobs", "shop", "long")
    assert [cond["type"] for cond in job["status"]["conditions"]] == ["FailureTarget", "Failed"]
    assert "active" not in job["status"] and job["status"]["failed"] == 7
    c.job_behaviour = "complete"
    batch.create_namespaced_job("shop", {"metadata": {"generateName": "backup-"}, "spec": template})
    done = [j for j in c.list_objects("batch/jobs", "shop") if j["metadata"]["name"].startswith("backup-")]
    assert len(done) == 1 and done[0]["status"]["succeeded"] == 1
    with pytest.raises(ApiException) as err:
        batch.create_namespaced_job("shop", {"metadata": {"name": "bad"}, "spec": {"template": {"spec": {
            "containers": [{"name": "x", "image": "x"}]}}}})
    assert err.value.status == 422 and 'restartPolicy: Unsupported value: \\"Always\\"' in err.value.body
    batch.delete_namespaced_job("long", "shop")
    assert c.list_objects("v1/pods", "shop", "job-name=long") == []  # the pods went with it


def test_field_selectors_a_server_does_not_index_are_refused(api: tuple[KubeApiServer, client.ApiClient]) -> None:
    _, api_client = api
    core = client.CoreV1Api(api_client)
    assert len(core.list_namespaced_pod("shop", field_selector="status.phase=Running,spec.nodeName=emulated-node").items) == 3
    assert core.list_namespaced_pod("shop", field_selector="status.phase!=Running").items == []
    for bad, message in (("spec.containers=1", "field label not supported: spec.containers"),
                         ("status.phase", "invalid selector")):
        with pytest.raises(ApiException) as err:
            core.list_namespaced_pod("shop", field_selector=bad)
        assert err.value.status == 400 and message in err.value.body


def test_events_are_capped_per_namespace(api: tuple[KubeApiServer, client.ApiClient], monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = api
    monkeypatch.setattr(kube_apiserver, "MAX_EVENTS", 5)
    d = server.cluster.get(DEPLOY, "shop", "web")
    for i in range(8):
        server.cluster.add_event("shop", d, reason="Note", message=f"note {i}")
    notes = [e["message"] for e in server.cluster.list_objects("v1/events", "shop", field_selector="reason=Note")]
    assert len(server.cluster.list_objects("v1/events", "shop")) == 5 and "note 7" in notes and "note 0" not in notes


def test_snapshots_keep_logs_and_the_controller_thread_ends_with_the_server(tmp_path: Path) -> None:
    server = KubeApiServer().start()
    server.cluster.create_deployment("shop", deployment_manifest("web", "nginx:1", namespace="shop"))
    pod = server.cluster.pods_of("shop", "web")[0]["metadata"]["name"]
    server.cluster.append_log("shop", pod, ["kept"])
    assert any(t.name == "kube-controller" for t in threading.enumerate())
    state = server.cluster.snapshot()
    server.stop()
    assert not any(t.name == "kube-controller" and t.is_alive() for t in threading.enumerate())
    other = Cluster()
    other.restore(state)
    assert other.read_log("shop", pod) == b"kept\n"


def test_the_objects_by_namespace_stay_the_objects_in_the_same_order() -> None:
    """The controllers' lookups by (resource, namespace) and by controller read indexes the store
    keeps beside its dict (issue 13: scanning every object, events first, was most of the
    emulator's CPU): after any mix of puts, re-puts (owners changed too), deletes and a restore,
    they say what filtering the dict says, in its order."""
    rng = random.Random(13)
    objects = _Objects()
    for _ in range(5000):
        key = (rng.choice(["pods", "events", "apps/replicasets"]), rng.choice(["a", "b"]), f"n{rng.randrange(60)}")
        if rng.random() < 0.3:
            objects.pop(key, None)
        elif rng.random() < 0.05 and key in objects:
            del objects[key]
        else:
            owners = [{"uid": rng.choice("uvw"), "controller": rng.random() < 0.8} for _ in range(rng.randrange(4))]  # (a uid twice, too)
            objects[key] = {"metadata": {"name": key[2], "v": rng.random(), "ownerReferences": owners},
                            **({"involvedObject": {"uid": rng.choice("uvw")}} if key[0] == "events" and rng.random() < 0.9 else {})}
    for copy in (objects, _Objects(dict(objects))):
        for res in ("pods", "events", "apps/replicasets", "jobs"):
            for ns in ("a", "b", "c"):
                want = [o for (r, n, _), o in copy.items() if (r, n) == (res, ns)]
                assert copy.of(res, ns) == want and all(a is b for a, b in zip(copy.of(res, ns), want, strict=True))
                assert copy.sorted_of(res, ns) == sorted((k, o) for k, o in copy.items() if k[:2] == (res, ns))
            assert copy.sorted_of(res, None) == sorted((k, o) for k, o in copy.items() if k[0] == res)
            for uid in "uvwx":
                for ns in ("a", "b"):
                    assert copy.controlled(uid, ns, res) == [(k, o) for k, o in copy.items() if k[:2] == (res, ns) and any(
                        r["uid"] == uid and r["controller"] for r in o["metadata"]["ownerReferences"])]
                    assert copy.events_about(uid, ns) == [o for k, o in copy.items() if k[1] == ns and
                                                          (o.get("involvedObject") or {}).get("uid") == uid]
        assert sum(len(p) for p in copy.placed.values()) == len(copy) and all(copy.placed.values())
    twice = {"metadata": {"name": "t", "ownerReferences": [{"uid": "u", "controller": True}] * 2}}  # one controller named twice
    objects[("pods", "a", "t")] = twice
    assert objects.controlled("u", "a", "pods")[-1] == (("pods", "a", "t"), twice)
    assert objects.pop(("pods", "a", "t")) is twice and ("pods", "a", "t") not in {k for k, _ in objects.controlled("u", "a")}
    with pytest.raises(TypeError, match="only by assignment"):
        objects.update({("pods", "a", "x"): {}})
    with pytest.raises(KeyError):
        objects.pop(("pods", "z", "none"))
