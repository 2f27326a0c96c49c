"""The kube adapter through the official client against the emulator: 409s and 404s become
opsbot's errors, and a cluster that is down fails fast. The issue-9 calls (pods, logs, events,
HPAs, restart, CronJobs and Jobs) read and write what kubectl would, and answer with opsbot's
errors where the cluster refuses."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from bot.adapters.kube import KubeAdapter
from bot.config import parse_config
from bot.errors import BackendUnavailable, Conflict, ExecutionError, NotFound
from bot.sandbox.kube_apiserver import KubeApiServer, cronjob_manifest, deployment_manifest, hpa_manifest

CONFIG = parse_config("environments: {prod: {kube_context: emulator}}")


async def test_stale_resource_version_is_a_conflict_and_writes_nothing(tmp_path: Path) -> None:
    with KubeApiServer() as server:
        server.cluster.create_deployment("shop", deployment_manifest("web", "nginx:1", replicas=2, namespace="shop"))
        kube = KubeAdapter(CONFIG, kubeconfig=server.kubeconfig(str(tmp_path / "kc")))
        d = await kube.read_deployment("prod", "shop", "web")
        await kube.scale_deployment("prod", "shop", "web", replicas=4, resource_version=d["metadata"]["resourceVersion"])
        with pytest.raises(Conflict, match="the object has been modified"):
            await kube.scale_deployment("prod", "shop", "web", replicas=9, resource_version=d["metadata"]["resourceVersion"])
        template = d["spec"]["template"]
        template["spec"]["containers"][0]["image"] = "nginx:2"
        with pytest.raises(Conflict):
            await kube.replace_pod_template("prod", "shop", "web", template=template, resource_version=d["metadata"]["resourceVersion"])
        now = server.cluster.get("apps/deployments", "shop", "web")
        assert now["spec"]["replicas"] == 4 and now["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1"
        with pytest.raises(NotFound, match=r'deployments\.apps "nope" not found'):
            await kube.read_deployment("prod", "shop", "nope")
        kube.close()


async def test_a_cluster_that_is_down_fails_fast(tmp_path: Path) -> None:
    server = KubeApiServer()
    kc = server.kubeconfig(str(tmp_path / "kc"))
    server.server_close()  # nothing listens on that port any more
    kube = KubeAdapter(CONFIG, kubeconfig=kc)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="Kubernetes API is unavailable"):
        await kube.read_deployment("prod", "shop", "web")
    assert time.monotonic() - started < 5
    kube.close()


@pytest_asyncio.fixture
async def shop(tmp_path: Path) -> AsyncIterator[tuple[KubeApiServer, KubeAdapter]]:
    with KubeApiServer() as server:
        server.cluster.create_deployment("shop", deployment_manifest("web", "nginx:1", replicas=2, namespace="shop"))
        kube = KubeAdapter(CONFIG, kubeconfig=server.kubeconfig(str(tmp_path / "kc")))
        yield server, kube
        kube.close()


async def test_list_pods_and_their_status(shop: tuple[KubeApiServer, KubeAdapter]) -> None:
    server, kube = shop
    crashed = server.cluster.pods_of("shop", "web")[0]["metadata"]["name"]
    server.cluster.crash_pod("shop", crashed, reason="OOMKilled", exit_code=137)
    pods = {p["metadata"]["name"]: p for p in await kube.list_pods("prod", "shop", "app=web")}
    assert len(pods) == 2 and await kube.list_pods("prod", "shop", "app=nope") == []
    cs = pods[crashed]["status"]["containerStatuses"][0]
    assert (cs["ready"], cs["restartCount"], cs["lastState"]["terminated"]["reason"]) == (False, 1, "OOMKilled")
    assert all(p["spec"]["nodeName"] and p["status"]["startTime"] for p in pods.values())


async def test_read_pod_log_passes_its_options_and_a_400_is_not_found(shop: tuple[KubeApiServer, KubeAdapter]) -> None:
    server, kube = shop
    pod = server.cluster.pods_of("shop", "web")[0]["metadata"]["name"]
    server.cluster.append_log("shop", pod, ["old line"], at=datetime.now(UTC) - timedelta(hours=1))
    server.cluster.append_log("shop", pod, ["one", "two", "three"])

    async def log(**options: object) -> str:
        args = {"container": None, "since_seconds": None, "tail_lines": None, "previous": False, "limit_bytes": 1 << 20} | options
        return await kube.read_pod_log("prod", "shop", pod, **args)  # type: ignore[arg-type]

    assert await log() == "old line\none\ntwo\nthree\n"
    assert await log(tail_lines=2) == "two\nthree\n"
    assert await log(since_seconds=600) == "one\ntwo\nthree\n"
    assert await log(limit_bytes=5) == "old l"
    assert await log(container="web", tail_lines=1) == "three\n"
    with pytest.raises(NotFound, match=f'previous terminated container "web" in pod "{pod}" not found'):
        await log(previous=True)
    server.cluster.crash_pod("shop", pod, back_off=False)
    assert await log(previous=True, tail_lines=1) == "three\n" and await log() == ""
    with pytest.raises(NotFound, match=f"container nope is not valid for pod {pod}"):
        await log(container="nope")
    with pytest.raises(NotFound, match=r'pods "gone" not found'):
        await kube.read_pod_log("prod", "shop", "gone", container=None, since_seconds=None, tail_lines=None, previous=False,
                                limit_bytes=100)
    sidecar = deployment_manifest("api", "api:1", namespace="shop", containers=[
        {"name": "api", "image": "api:1"}, {"name": "proxy", "image": "envoy:1"}])
    server.cluster.create_deployment("shop", sidecar)
    two = server.cluster.pods_of("shop", "api")[0]["metadata"]["name"]
    with pytest.raises(NotFound, match=rf"a container name must be specified for pod {two}, choose one of: \[api proxy\]"):
        await kube.read_pod_log("prod", "shop", two, container=None, since_seconds=None, tail_lines=None, previous=False,
                                limit_bytes=100)
    server.cluster.append_log("shop", two, ["proxy up"], container="proxy")
    assert await kube.read_pod_log("prod", "shop", two, container="proxy", since_seconds=None, tail_lines=None, previous=False,
                                   limit_bytes=100) == "proxy up\n"


async def test_list_events_by_field_selector(shop: tuple[KubeApiServer, KubeAdapter]) -> None:
    server, kube = shop
    pod = server.cluster.pods_of("shop", "web")[0]
    server.cluster.crash_pod("shop", pod["metadata"]["name"])
    server.cluster.add_event("shop", pod, type="Warning", reason="Unhealthy", message="Readiness probe failed: 503", count=4)
    name = pod["metadata"]["name"]
    warnings = await kube.list_events("prod", "shop", field_selector=f"involvedObject.name={name},type=Warning")
    assert sorted((e["reason"], e["count"]) for e in warnings) == [("BackOff", 1), ("Unhealthy", 4)]
    by_uid = await kube.list_events("prod", "shop", field_selector=f"involvedObject.uid={pod['metadata']['uid']}")
    assert len(by_uid) == 2
    scaling = await kube.list_events("prod", "shop", field_selector="involvedObject.kind=Deployment,involvedObject.name=web")
    assert [e["reason"] for e in scaling] == ["ScalingReplicaSet"]
    with pytest.raises(ExecutionError, match="field label not supported: nope"):
        await kube.list_events("prod", "shop", field_selector="nope=1")


async def test_find_hpa_and_patch_its_bounds(shop: tuple[KubeApiServer, KubeAdapter]) -> None:
    server, kube = shop
    assert await kube.find_hpa("prod", "shop", "web") is None
    server.cluster.create_deployment("shop", deployment_manifest("other", "nginx:1", namespace="shop"))
    server.cluster.create_hpa("shop", hpa_manifest("other", "other", max_replicas=3, namespace="shop"))
    server.cluster.create_hpa("shop", hpa_manifest("web-hpa", "web", min_replicas=2, max_replicas=5, namespace="shop"))
    hpa = await kube.find_hpa("prod", "shop", "web")
    assert hpa is not None and hpa["metadata"]["name"] == "web-hpa" and hpa["spec"]["maxReplicas"] == 5
    rv = hpa["metadata"]["resourceVersion"]
    patched = await kube.patch_hpa_bounds("prod", "shop", "web-hpa", min_replicas=3, max_replicas=4, resource_version=rv)
    assert (patched["spec"]["minReplicas"], patched["spec"]["maxReplicas"]) == (3, 4)
    assert server.cluster.get("apps/deployments", "shop", "web")["spec"]["replicas"] == 3  # the HPA acted on its new bounds
    with pytest.raises(Conflict, match="the object has been modified"):
        await kube.patch_hpa_bounds("prod", "shop", "web-hpa", min_replicas=1, max_replicas=9, resource_version=rv)
    fresh = await kube.find_hpa("prod", "shop", "web")
    assert fresh is not None
    with pytest.raises(ExecutionError, match=r"422 Unprocessable Entity .*must be greater than or equal to `minReplicas`"):
        await kube.patch_hpa_bounds("prod", "shop", "web-hpa", min_replicas=5, max_replicas=2,
                                    resource_version=fresh["metadata"]["resourceVersion"])
    with pytest.raises(NotFound):
        await kube.patch_hpa_bounds("prod", "shop", "nope", min_replicas=1, max_replicas=2, resource_version="1")


async def test_restart_deployment_like_kubectl_rollout_restart(shop: tuple[KubeApiServer, KubeAdapter]) -> None:
    server, kube = shop
    d = await kube.read_deployment("prod", "shop", "web")
    before = {p["metadata"]["name"] for p in server.cluster.pods_of("shop", "web")}
    done = await kube.restart_deployment("prod", "shop", "web", restarted_at="2030-01-02T03:04:05Z",
                                         resource_version=d["metadata"]["resourceVersion"])
    annotations = done["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"kubectl.kubernetes.io/restartedAt": "2030-01-02T03:04:05Z"}
    now = server.cluster.get("apps/deployments", "shop", "web")
    assert now["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    assert not before & {p["metadata"]["name"] for p in server.cluster.pods_of("shop", "web")}  # every pod replaced
    with pytest.raises(Conflict):
        await kube.restart_deployment("prod", "shop", "web", restarted_at="2030-01-02T03:04:06Z",
                                      resource_version=d["metadata"]["resourceVersion"])
    assert server.cluster.get("apps/deployments", "shop", "web")["metadata"]["generation"] == 2


async def test_read_cronjob_create_job_and_read_it(shop: tuple[KubeApiServer, KubeAdapter]) -> None:
    server, kube = shop
    server.cluster.create_cronjob("shop", cronjob_manifest("nightly", "postgres:16", namespace="shop"))
    cron = await kube.read_cronjob("prod", "shop", "nightly")
    body = {  # what `kubectl create job backup-1 --from=cronjob/nightly` sends
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "backup-1", "annotations": {"cronjob.kubernetes.io/instantiate": "manual"},
                     "labels": cron["spec"]["jobTemplate"]["metadata"].get("labels"),
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "nightly",
                                          "uid": cron["metadata"]["uid"], "controller": True}]},
        "spec": cron["spec"]["jobTemplate"]["spec"],
    }
    created = await kube.create_job("prod", "shop", body)
    assert created["metadata"]["name"] == "backup-1" and created["spec"]["selector"]["matchLabels"]
    job = await kube.read_job("prod", "shop", "backup-1")
    assert job["status"]["succeeded"] == 1 and [c["type"] for c in job["status"]["conditions"]][-1] == "Complete"
    with pytest.raises(Conflict, match=r'jobs\.batch "backup-1" already exists'):
        await kube.create_job("prod", "shop", body)
    assert sum(1 for m, p, _ in server.cluster.requests if m == "POST" and p.endswith("/jobs")) == 2  # never retried
    server.cluster.job_behaviour = "fail"
    await kube.create_job("prod", "shop", {**body, "metadata": {**body["metadata"], "name": "backup-2"}})
    failed = await kube.read_job("prod", "shop", "backup-2")
    assert failed["status"]["failed"] == 7 and failed["status"]["conditions"][-1]["reason"] == "BackoffLimitExceeded"
    with pytest.raises(NotFound, match=r'cronjobs\.batch "nope" not found'):
        await kube.read_cronjob("prod", "shop", "nope")
    with pytest.raises(NotFound, match=r'jobs\.batch "nope" not found'):
        await kube.read_job("prod", "shop", "nope")


async def test_the_kubeconfig_is_loaded_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a kubeconfig takes a while (a file read, YAML, certificates written to temporary
    files). It is made slow here (0.3 s); a ticker on the loop must keep ticking during the first
    call, and the loading must happen in a client thread, not on the loop's."""
    import asyncio
    import threading

    from kubernetes import config as kube_config

    real = kube_config.load_kube_config
    loaded_in: list[str] = []

    def slow_load(*args: object, **kwargs: object) -> None:
        loaded_in.append(threading.current_thread().name)
        time.sleep(0.3)  # blocks whichever thread runs it
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kube_config, "load_kube_config", slow_load)
    with KubeApiServer() as server:
        server.cluster.create_deployment("shop", deployment_manifest("web", "nginx:1", replicas=2, namespace="shop"))
        kube = KubeAdapter(CONFIG, kubeconfig=server.kubeconfig(str(tmp_path / "kc")))
        ticks = 0
        gaps: list[float] = []

        async def ticker() -> None:
            nonlocal ticks
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last, ticks = now, ticks + 1

        tick = asyncio.ensure_future(ticker())
        try:
            await asyncio.sleep(0.02)
            before = ticks
            d = await kube.read_deployment("prod", "shop", "web")  # the first call: loads the kubeconfig
            during = ticks - before
        finally:
            tick.cancel()
        assert d["spec"]["replicas"] == 2
        assert loaded_in and all(name.startswith("kube") for name in loaded_in), loaded_in
        # the load alone took 0.3 s; a blocked loop would have ticked at most once meanwhile
        assert during >= 5, (during, max(gaps))
        kube.close()


async def test_load_at_start_reads_every_kubeconfig_in_a_client_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from kubernetes import config as kube_config

    real = kube_config.load_kube_config
    loaded_in: list[str] = []

    def recording(*args: object, **kwargs: object) -> None:
        loaded_in.append(threading.current_thread().name)
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kube_config, "load_kube_config", recording)
    config = parse_config("environments: {prod: {kube_context: emulator}, eu: {kube_context: missing-context}}")
    with KubeApiServer() as server:
        server.cluster.create_deployment("shop", deployment_manifest("web", "nginx:1", replicas=2, namespace="shop"))
        kube = KubeAdapter(config, kubeconfig=server.kubeconfig(str(tmp_path / "kc")))
        await kube.load()  # a context that is not in the kubeconfig is logged, not raised
        assert len(loaded_in) == 2 and all(name.startswith("kube") for name in loaded_in), loaded_in
        await kube.read_deployment("prod", "shop", "web")
        assert len(loaded_in) == 2  # loaded once, at start
        with pytest.raises(BackendUnavailable, match="no usable kubeconfig"):  # still said by the call that needs it
            await kube.read_deployment("eu", "shop", "web")
        kube.close()
