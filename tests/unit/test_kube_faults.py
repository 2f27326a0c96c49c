"""The kube adapter when the cluster misbehaves: the real ``kubernetes`` client against the emulator,
with faults injected over HTTP (``KubeApiServer.faults``). Reads are retried, writes are sent once
and say when their outcome is unknown, refusals name what is missing, and a hung API server costs
each call a bounded time and never the threads the rest of the bot needs."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from bot.adapters.kube import KubeAdapter
from bot.config import parse_config
from bot.errors import BackendUnavailable, Conflict, ExecutionError, OutcomeUnknown
from bot.sandbox.kube_apiserver import KubeApiServer, cronjob_manifest, hpa_manifest

CONFIG = parse_config("environments: {production: {kube_context: nova-prod}}")
WORKER = "/apis/apps/v1/namespaces/nova/deployments/nova-worker"
RS = "/apis/apps/v1/namespaces/nova/replicasets"
PODS = "/api/v1/namespaces/nova/pods"
EVENTS = "/api/v1/namespaces/nova/events"
HPAS = "/apis/autoscaling/v2/namespaces/nova/horizontalpodautoscalers"
CRONJOB = "/apis/batch/v1/namespaces/nova/cronjobs/nightly-backup"
JOBS = "/apis/batch/v1/namespaces/nova/jobs"

Make = Callable[..., KubeAdapter]


@pytest_asyncio.fixture
async def make(kube: KubeApiServer, kubeconfig: str) -> AsyncIterator[Make]:
    adapters: list[KubeAdapter] = []

    def build(**kwargs: Any) -> KubeAdapter:
        adapters.append(KubeAdapter(CONFIG, kubeconfig=kubeconfig, **kwargs))
        return adapters[-1]

    yield build
    kube.faults.clear()  # answer what still hangs, so the adapters' threads end
    for adapter in adapters:
        adapter.close()


def sent(kube: KubeApiServer, method: str, path: str) -> int:
    """How many requests with this method and exact path reached the emulator."""
    return sum(1 for m, p, _ in kube.cluster.requests if m == method and p == path)


def replicas(kube: KubeApiServer) -> int:
    return int(kube.cluster.get("apps/deployments", "nova", "nova-worker")["spec"]["replicas"])


async def test_reads_that_meet_5xx_are_retried_and_succeed(kube: KubeApiServer, make: Make) -> None:
    kubectl = make()
    kube.faults.add(method="GET", path_re=r"/deployments/nova-worker$", status=503, times=2)
    kube.faults.add(method="GET", path_re=r"/replicasets$", status=502, times=1)
    d = await kubectl.read_deployment("production", "nova", "nova-worker")
    assert d["spec"]["replicas"] == 3 and sent(kube, "GET", WORKER) == 3  # two 503s, then the answer
    items = await kubectl.list_replicasets("production", "nova", "app=nova-worker")
    assert len(items) == 1 and sent(kube, "GET", RS) == 2
    kube.faults.add(method="GET", path_re=r"^/version/?$", status=504, times=1)
    await kubectl.ping("production")
    assert sent(kube, "GET", "/version/") == 2


async def test_reads_give_up_after_the_bounded_retries(kube: KubeApiServer, make: Make) -> None:
    kubectl = make()
    kube.faults.add(method="GET", path_re=r"/deployments/nova-worker$", status=500, message="etcdserver: request timed out")
    with pytest.raises(ExecutionError, match=r"500 Internal Server Error to read deployment nova/nova-worker \(after 3 attempts\): "
                                             r"etcdserver: request timed out") as err:
        await kubectl.read_deployment("production", "nova", "nova-worker")
    assert err.value.temporary and sent(kube, "GET", WORKER) == 3


async def test_a_patch_that_meets_503_is_sent_once_and_its_outcome_is_unknown(kube: KubeApiServer, make: Make) -> None:
    kubectl = make()
    d = await kubectl.read_deployment("production", "nova", "nova-worker")
    kube.faults.add(method="PATCH", path_re=r"/scale$", status=503, times=1)
    with pytest.raises(OutcomeUnknown) as err:
        await kubectl.scale_deployment("production", "nova", "nova-worker", replicas=6, resource_version=d["metadata"]["resourceVersion"])
    assert isinstance(err.value, ExecutionError) and err.value.temporary
    assert "503 Service Unavailable to scale deployment nova/nova-worker" in str(err.value)
    assert "may or may not have been applied, so opsbot did not retry it" in str(err.value)
    assert sent(kube, "PATCH", WORKER + "/scale") == 1  # exactly one: never retried, although the fault was used up
    assert replicas(kube) == 3

    kube.faults.add(method="PATCH", path_re=r"/nova-worker$", status=500, times=1)
    template = d["spec"]["template"]
    with pytest.raises(OutcomeUnknown, match="500 Internal Server Error to roll back deployment nova/nova-worker"):
        await kubectl.replace_pod_template("production", "nova", "nova-worker", template=template,
                                           resource_version=d["metadata"]["resourceVersion"])
    assert sent(kube, "PATCH", WORKER) == 1


async def test_409_is_a_conflict_and_not_retried(kube: KubeApiServer, make: Make) -> None:
    kubectl = make()
    d = await kubectl.read_deployment("production", "nova", "nova-worker")
    kube.faults.add(method="PATCH", path_re=r"/scale$", status=409, times=1, message="the object has been modified")
    with pytest.raises(Conflict, match="Kubernetes refused the write: the object has been modified"):
        await kubectl.scale_deployment("production", "nova", "nova-worker", replicas=6, resource_version=d["metadata"]["resourceVersion"])
    assert sent(kube, "PATCH", WORKER + "/scale") == 1 and replicas(kube) == 3


async def test_403_names_the_verb_resource_and_namespace_opsbot_lacks(kube: KubeApiServer, make: Make) -> None:
    kubectl = make()
    d = await kubectl.read_deployment("production", "nova", "nova-worker")
    # The server's own message is not what the adapter goes by: it knows what it asked for.
    kube.faults.add(status=403, message="forbidden")
    with pytest.raises(ExecutionError) as err:
        await kubectl.scale_deployment("production", "nova", "nova-worker", replicas=6, resource_version=d["metadata"]["resourceVersion"])
    assert str(err.value) == ("Kubernetes denied opsbot's service account: it may not patch deployments/scale in namespace nova "
                              "(403 Forbidden). Grant it in manifests/managed-namespace/role.yaml")
    assert not err.value.temporary
    with pytest.raises(ExecutionError, match=r"it may not list replicasets in namespace nova \(403 Forbidden\)"):
        await kubectl.list_replicasets("production", "nova", "app=nova-worker")
    with pytest.raises(ExecutionError, match=r"it may not get deployments in namespace nova \(403 Forbidden\)"):
        await kubectl.read_deployment("production", "nova", "nova-worker")
    assert sent(kube, "GET", RS) == 1 and sent(kube, "GET", WORKER) == 2  # a 403 is not retried


async def test_401_says_the_credentials_were_rejected(kube: KubeApiServer, make: Make) -> None:
    kube.require_token, kube.token = True, "a-token-the-kubeconfig-does-not-have"
    with pytest.raises(ExecutionError, match=r"Kubernetes rejected opsbot's credentials for production \(401 Unauthorized\)"):
        await make().read_deployment("production", "nova", "nova-worker")


async def test_a_hung_api_server_fails_a_read_within_the_bound(kube: KubeApiServer, make: Make) -> None:
    kubectl = make(connect_timeout=0.5, read_timeout=1.0, deadline=1.5)
    kube.faults.add(path_re=r"/deployments/", hang=30)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"the Kubernetes API is unavailable: read deployment nova/nova-worker "
                                                 r"did not answer within 1(\.\d)? s"):
        await kubectl.read_deployment("production", "nova", "nova-worker")
    assert time.monotonic() - started < 2.5
    assert sent(kube, "GET", WORKER) == 1  # a read that timed out is not tried again


async def test_a_hung_write_says_its_outcome_is_unknown(kube: KubeApiServer, make: Make) -> None:
    kubectl = make(connect_timeout=0.5, read_timeout=1.0, deadline=1.5)
    d = await kubectl.read_deployment("production", "nova", "nova-worker")
    kube.faults.add(method="PATCH", hang=30)
    started = time.monotonic()
    with pytest.raises(OutcomeUnknown, match=r"did not answer within 1(\.\d)? s to scale deployment nova/nova-worker\. "
                                             "The write may or may not have been applied"):
        await kubectl.scale_deployment("production", "nova", "nova-worker", replicas=6, resource_version=d["metadata"]["resourceVersion"])
    assert time.monotonic() - started < 2.5 and sent(kube, "PATCH", WORKER + "/scale") == 1


async def test_hung_calls_use_only_the_adapters_threads(kube: KubeApiServer, make: Make) -> None:
    """More hung calls than asyncio's default executor has threads (min(32, cores + 4)): what else
    runs in that executor — DNS lookups for aiohttp, asyncio.to_thread — still answers at once."""
    before = set(threading.enumerate())
    kubectl = make(connect_timeout=0.5, read_timeout=10.0, deadline=3.0, threads=4)
    kube.faults.add(path_re=r"/deployments/", hang=30)
    calls = [asyncio.create_task(kubectl.read_deployment("production", "nova", "nova-worker")) for _ in range(40)]
    for _ in range(30):  # let them reach the server and hang there
        await asyncio.sleep(0.05)
        if sent(kube, "GET", WORKER) >= 4:
            break
    await asyncio.sleep(0.1)
    assert sent(kube, "GET", WORKER) == 4  # one per thread; the other 36 wait their turn
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    await asyncio.wait_for(loop.getaddrinfo("localhost", 80), timeout=2)
    assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), timeout=2) == "free"
    assert time.monotonic() - started < 0.5
    assert not any(c.done() for c in calls)
    kube_threads = [t for t in set(threading.enumerate()) - before if t.name.startswith("kube_")]
    assert 0 < len(kube_threads) <= 4
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert time.monotonic() - started < 4  # every one of the 40 timed out, queued or not
    assert all(isinstance(r, BackendUnavailable) and "did not answer within 3 s" in str(r) for r in results), results


async def test_calls_queued_behind_hung_threads_time_out_and_are_never_sent(kube: KubeApiServer, make: Make) -> None:
    kubectl = make(connect_timeout=0.5, read_timeout=10.0, deadline=1.5, threads=2)
    d = await kubectl.read_deployment("production", "nova", "nova-worker")
    kube.faults.add(method="GET", path_re=r"/deployments/nova-worker$", hang=30)
    started = time.monotonic()
    # Two reads take both threads and hang; the write and three more reads, started once both reads
    # are held at the server, wait for a thread until their deadline and are dropped unsent.
    reads = [asyncio.create_task(kubectl.read_deployment("production", "nova", "nova-worker")) for _ in range(2)]
    for _ in range(40):  # on a loaded machine a thread can take a while to send its read
        if sent(kube, "GET", WORKER) >= 1 + 2:
            break
        await asyncio.sleep(0.01)
    assert sent(kube, "GET", WORKER) == 1 + 2
    write = asyncio.create_task(kubectl.scale_deployment("production", "nova", "nova-worker", replicas=6,
                                                         resource_version=d["metadata"]["resourceVersion"]))
    extra = [asyncio.create_task(kubectl.read_deployment("production", "nova", "nova-worker")) for _ in range(3)]
    with pytest.raises(BackendUnavailable, match=r"scale deployment nova/nova-worker did not answer within 1.5 s: all 2 Kubernetes "
                                                 "client threads were busy with earlier calls, so nothing was sent"):
        await write
    results = await asyncio.gather(*reads, *extra, return_exceptions=True)
    elapsed = time.monotonic() - started
    assert all(isinstance(r, BackendUnavailable) and "did not answer within 1.5 s" in str(r) for r in results), results
    assert elapsed < 2.5
    kube.faults.clear()  # the hung reads are answered; the threads are free again
    await asyncio.sleep(0.3)
    assert sent(kube, "PATCH", WORKER + "/scale") == 0 and replicas(kube) == 3
    assert sent(kube, "GET", WORKER) == 1 + 2  # the first read, then one per thread: the queued reads never went out
    assert (await kubectl.read_deployment("production", "nova", "nova-worker"))["spec"]["replicas"] == 3


async def test_close_does_not_wait_for_hung_calls(kube: KubeApiServer, make: Make) -> None:
    kubectl = make(connect_timeout=0.5, read_timeout=10.0, deadline=5.0, threads=1)
    kube.faults.add(hang=30)
    hung = asyncio.create_task(kubectl.read_deployment("production", "nova", "nova-worker"))
    queued = asyncio.create_task(kubectl.read_deployment("production", "nova", "nova-worker"))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    kubectl.close()
    assert time.monotonic() - started < 0.2
    with pytest.raises(BackendUnavailable, match="opsbot is shutting down"):
        await kubectl.read_deployment("production", "nova", "nova-worker")
    with pytest.raises(BackendUnavailable, match="opsbot is shutting down"):
        await queued
    hung.cancel()
    await asyncio.gather(hung, return_exceptions=True)
    await asyncio.sleep(0.1)
    assert sent(kube, "GET", WORKER) == 1  # the queued call was cancelled by close(), never sent


# -- the issue-9 calls: each read retried on 5xx, each write sent once, each refusal named


def backup_job(name: str = "backup-manual-1") -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "annotations": {"cronjob.kubernetes.io/instantiate": "manual"}},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "backup", "image": "pg:16"}]}}}}


@pytest_asyncio.fixture
async def nova(kube: KubeApiServer) -> KubeApiServer:
    """nova-worker under an HPA (2..6), a nightly backup CronJob, one finished Job, a pod with logs."""
    kube.cluster.create_hpa("nova", hpa_manifest("nova-worker", "nova-worker", min_replicas=2, max_replicas=6, namespace="nova"))
    kube.cluster.create_cronjob("nova", cronjob_manifest("nightly-backup", "pg:16", namespace="nova"))
    kube.cluster.create_job("nova", backup_job("backup-old"))
    pod = kube.cluster.pods_of("nova", "nova-worker")[0]["metadata"]["name"]
    kube.cluster.append_log("nova", pod, ["worker started", "job 42 done"])
    return kube


def worker_pod(kube: KubeApiServer) -> str:
    return str(kube.cluster.pods_of("nova", "nova-worker")[0]["metadata"]["name"])


async def read_log(kubectl: KubeAdapter, pod: str) -> str:
    return await kubectl.read_pod_log("production", "nova", pod, container=None, since_seconds=None, tail_lines=None,
                                      previous=False, limit_bytes=10_000)


async def test_new_reads_that_meet_5xx_are_retried_and_succeed(nova: KubeApiServer, make: Make) -> None:
    kubectl, pod = make(), worker_pod(nova)
    nova.faults.add(method="GET", path_re=r"/pods$", status=503, times=1)
    assert len(await kubectl.list_pods("production", "nova", "app=nova-worker")) == 3 and sent(nova, "GET", PODS) == 2
    nova.faults.add(method="GET", path_re=r"/log$", status=502, times=2)
    assert await read_log(kubectl, pod) == "worker started\njob 42 done\n"
    assert sent(nova, "GET", f"{PODS}/{pod}/log") == 3
    nova.faults.add(method="GET", path_re=r"/events$", status=500, times=1)
    assert await kubectl.list_events("production", "nova", field_selector="involvedObject.kind=Deployment")
    assert sent(nova, "GET", EVENTS) == 2
    nova.faults.add(method="GET", path_re=r"/horizontalpodautoscalers$", status=503, times=1)
    hpa = await kubectl.find_hpa("production", "nova", "nova-worker")
    assert hpa is not None and sent(nova, "GET", HPAS) == 2
    nova.faults.add(method="GET", path_re=r"/cronjobs/", status=504, times=1)
    assert (await kubectl.read_cronjob("production", "nova", "nightly-backup"))["spec"]["schedule"] == "0 3 * * *"
    assert sent(nova, "GET", CRONJOB) == 2
    nova.faults.add(method="GET", path_re=r"/jobs/", status=503, times=2)
    assert (await kubectl.read_job("production", "nova", "backup-old"))["status"]["succeeded"] == 1
    assert sent(nova, "GET", f"{JOBS}/backup-old") == 3


async def test_create_job_that_meets_503_is_sent_once_and_its_outcome_is_unknown(nova: KubeApiServer, make: Make) -> None:
    kubectl = make()
    nova.faults.add(method="POST", path_re=r"/jobs$", status=503, times=1)
    with pytest.raises(OutcomeUnknown) as err:
        await kubectl.create_job("production", "nova", backup_job())
    assert "503 Service Unavailable to create job nova/backup-manual-1" in str(err.value)
    assert "may or may not have been applied, so opsbot did not retry it: look at the jobs in namespace nova" in str(err.value)
    assert sent(nova, "POST", JOBS) == 1  # exactly one: never retried, although the fault was used up
    assert [j["metadata"]["name"] for j in nova.cluster.list_objects("batch/jobs", "nova")] == ["backup-old"]


async def test_new_writes_that_meet_5xx_are_sent_once(nova: KubeApiServer, make: Make) -> None:
    kubectl = make()
    hpa = await kubectl.find_hpa("production", "nova", "nova-worker")
    assert hpa is not None
    nova.faults.add(method="PATCH", path_re=r"/horizontalpodautoscalers/", status=500, times=1)
    with pytest.raises(OutcomeUnknown, match=r"500 Internal Server Error to set the bounds of horizontalpodautoscaler "
                                             r"nova/nova-worker: .* look at the HorizontalPodAutoscaler"):
        await kubectl.patch_hpa_bounds("production", "nova", "nova-worker", min_replicas=3, max_replicas=4,
                                       resource_version=hpa["metadata"]["resourceVersion"])
    assert sent(nova, "PATCH", f"{HPAS}/nova-worker") == 1
    d = await kubectl.read_deployment("production", "nova", "nova-worker")
    nova.faults.add(method="PATCH", path_re=r"/nova-worker$", status=503, times=1)
    with pytest.raises(OutcomeUnknown, match="503 Service Unavailable to restart deployment nova/nova-worker"):
        await kubectl.restart_deployment("production", "nova", "nova-worker", restarted_at="2030-01-01T00:00:00Z",
                                         resource_version=d["metadata"]["resourceVersion"])
    assert sent(nova, "PATCH", WORKER) == 1
    assert "annotations" not in replicas_template(nova)


def replicas_template(kube: KubeApiServer) -> dict[str, Any]:
    return dict(kube.cluster.get("apps/deployments", "nova", "nova-worker")["spec"]["template"]["metadata"])


async def test_403s_of_the_new_calls_name_what_opsbot_lacks(nova: KubeApiServer, make: Make) -> None:
    kubectl, pod = make(), worker_pod(nova)
    nova.faults.add(status=403, message="forbidden")
    grant = r" in namespace nova \(403 Forbidden\)\. Grant it in manifests/managed-namespace/role\.yaml"
    with pytest.raises(ExecutionError, match=r"it may not create jobs" + grant) as err:
        await kubectl.create_job("production", "nova", backup_job())
    assert not err.value.temporary and sent(nova, "POST", JOBS) == 1
    with pytest.raises(ExecutionError, match=r"it may not get pods/log" + grant):
        await read_log(kubectl, pod)
    with pytest.raises(ExecutionError, match=r"it may not list pods" + grant):
        await kubectl.list_pods("production", "nova", "app=nova-worker")
    with pytest.raises(ExecutionError, match=r"it may not list events" + grant):
        await kubectl.list_events("production", "nova", field_selector="type=Warning")
    with pytest.raises(ExecutionError, match=r"it may not list horizontalpodautoscalers" + grant):
        await kubectl.find_hpa("production", "nova", "nova-worker")
    with pytest.raises(ExecutionError, match=r"it may not patch horizontalpodautoscalers" + grant):
        await kubectl.patch_hpa_bounds("production", "nova", "nova-worker", min_replicas=1, max_replicas=2, resource_version="1")
    with pytest.raises(ExecutionError, match=r"it may not patch deployments" + grant):
        await kubectl.restart_deployment("production", "nova", "nova-worker", restarted_at="x", resource_version="1")
    with pytest.raises(ExecutionError, match=r"it may not get cronjobs" + grant):
        await kubectl.read_cronjob("production", "nova", "nightly-backup")
    with pytest.raises(ExecutionError, match=r"it may not get jobs" + grant):
        await kubectl.read_job("production", "nova", "backup-old")
    assert sent(nova, "GET", PODS) == 1 and sent(nova, "GET", CRONJOB) == 1  # a 403 is not retried


async def test_hung_new_calls_are_bounded_by_the_deadline(nova: KubeApiServer, make: Make) -> None:
    kubectl, pod = make(connect_timeout=0.5, read_timeout=1.0, deadline=1.5), worker_pod(nova)
    nova.faults.add(path_re=r"/log$", hang=30)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=rf"read the logs of pod nova/{pod} did not answer within 1(\.\d)? s"):
        await read_log(kubectl, pod)
    assert time.monotonic() - started < 2.5 and sent(nova, "GET", f"{PODS}/{pod}/log") == 1
    nova.faults.add(method="POST", path_re=r"/jobs$", hang=30)
    started = time.monotonic()
    with pytest.raises(OutcomeUnknown, match=r"did not answer within 1(\.\d)? s to create job nova/backup-manual-1\. "
                                             "The write may or may not have been applied"):
        await kubectl.create_job("production", "nova", backup_job())
    assert time.monotonic() - started < 2.5 and sent(nova, "POST", JOBS) == 1
    nova.faults.add(path_re=r"/horizontalpodautoscalers", hang=30)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="list horizontalpodautoscalers in nova did not answer within"):
        await kubectl.find_hpa("production", "nova", "nova-worker")
    assert time.monotonic() - started < 2.5
