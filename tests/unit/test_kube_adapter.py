"""The kube adapter through the official client against the emulator: 409s and 404s become
opsbot's errors, and a cluster that is down fails fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bot.adapters.kube import KubeAdapter
from bot.config import parse_config
from bot.errors import BackendUnavailable, Conflict, NotFound
from bot.sandbox.kube_apiserver import KubeApiServer, deployment_manifest

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
