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
from bot.sandbox.kube_apiserver import KubeApiServer

CONFIG = parse_config("environments: {production: {kube_context: nova-prod}}")
WORKER = "/apis/apps/v1/namespaces/nova/deployments/nova-worker"
RS = "/apis/apps/v1/namespaces/nova/replicasets"

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
                              "(403 Forbidden). Grant it in manifests/base/rbac.yaml")
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
    # Two reads take both threads and hang; the write and three more reads, started with them, wait
    # for a thread until their deadline and are dropped unsent.
    reads = [asyncio.create_task(kubectl.read_deployment("production", "nova", "nova-worker")) for _ in range(2)]
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
