"""The Kubernetes emulator is only worth its tests if real clients cannot tell it from a cluster.
Here the real ``kubectl`` (a client nobody here wrote) runs its rollout and scale commands against
it and must see what it would see on a cluster."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.sandbox.kube_apiserver import KubeApiServer, deployment_manifest

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed on this machine")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[KubeApiServer, str]]:
    with KubeApiServer() as server:
        server.cluster.create_deployment("shop", deployment_manifest("web", "nginx:1.25.0", replicas=2, namespace="shop"))
        yield server, server.kubeconfig(str(tmp_path / "kubeconfig"))


def kubectl(kubeconfig: str, *args: str, ok: bool = True) -> str:
    proc = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "-n", "shop", *args], capture_output=True, text=True, timeout=60)
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
