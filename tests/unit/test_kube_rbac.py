"""The Role the overlays bind in each managed namespace grants what the kube adapter uses, and
nothing it does not, both ways: the emulator enforces the rendered Role (403 with a real API
server's words for anything else) while every adapter call runs, it records each authorisation
decision, and the rules the Role grants are exactly the (group, resource, verb) triples those
calls were decided on."""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bot.sandbox.kube_apiserver as apiserver
from bot.adapters.kube import KubeAdapter
from bot.config import parse_config
from bot.errors import ExecutionError
from bot.sandbox.kube_apiserver import KubeApiServer, cronjob_manifest, deployment_manifest, hpa_manifest
from tests.unit.test_manifests import OVERLAYS, of_kind, render

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIG = parse_config("environments: {prod: {kube_context: emulator}}")
Triple = tuple[str, str, str]  # (apiGroup, resource, verb)

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed on this machine")


def roles() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for overlay in OVERLAYS:
        for role in of_kind(render(overlay), "Role"):
            yield overlay, role["metadata"]["namespace"], role


ROLES = list(roles()) if shutil.which("kubectl") else []


def granted(rules: list[dict[str, Any]]) -> set[Triple]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"] for resource in rule["resources"]
            for verb in rule["verbs"]}


def test_every_overlay_binds_roles_and_they_are_one_role() -> None:
    assert {overlay for overlay, _, _ in ROLES} == set(OVERLAYS)
    assert len({json.dumps(role["rules"], sort_keys=True) for _, _, role in ROLES}) == 1
    for _, _, role in ROLES:
        assert not any(rule.get("resourceNames") or rule.get("nonResourceURLs") for rule in role["rules"])
        assert not any("*" in rule["verbs"] or "*" in rule["resources"] or "*" in rule["apiGroups"] for rule in role["rules"])
    # What SECURITY.md's threat model describes: reads, the patches that scale/roll back/restart, and
    # creating a Job from a CronJob. No delete, no create but Jobs, no Secrets, no exec.
    assert granted(ROLES[0][2]["rules"]) == {
        ("apps", "deployments", "get"), ("apps", "deployments", "patch"), ("apps", "deployments/scale", "patch"),
        ("apps", "replicasets", "list"), ("", "pods", "list"), ("", "pods/log", "get"), ("", "events", "list"),
        ("autoscaling", "horizontalpodautoscalers", "list"), ("autoscaling", "horizontalpodautoscalers", "patch"),
        ("batch", "cronjobs", "get"), ("batch", "jobs", "create"), ("batch", "jobs", "get"),
    }


class Recorded:
    """The adapter, noting which of its methods were called (so a new one cannot be left out)."""

    def __init__(self, kube: KubeAdapter) -> None:
        self.kube, self.called = kube, set[str]()

    def __getattr__(self, name: str) -> Any:
        self.called.add(name)
        return getattr(self.kube, name)


def adapter_methods() -> set[str]:
    return {name for name, fn in inspect.getmembers(KubeAdapter, inspect.iscoroutinefunction) if not name.startswith("_")}


async def exercise(kube: Recorded, ns: str) -> None:
    """Every adapter call, as the commands make them (status/history/rollback/restart/scale/pods/logs/
    events/hpa/backup), against objects in ``ns``."""
    await kube.ping("prod")
    d = await kube.read_deployment("prod", ns, "web")
    assert len(await kube.list_replicasets("prod", ns, "app=web")) == 1
    await kube.scale_deployment("prod", ns, "web", replicas=3, resource_version=d["metadata"]["resourceVersion"])
    d = await kube.read_deployment("prod", ns, "web")
    d = await kube.restart_deployment("prod", ns, "web", restarted_at="2030-01-01T00:00:00Z",
                                      resource_version=d["metadata"]["resourceVersion"])
    await kube.replace_pod_template("prod", ns, "web", template=d["spec"]["template"], resource_version=d["metadata"]["resourceVersion"])
    pods = await kube.list_pods("prod", ns, "app=web")
    assert len(pods) == 3
    await kube.read_pod_log("prod", ns, pods[0]["metadata"]["name"], container=None, since_seconds=60, tail_lines=10, previous=False,
                            limit_bytes=1000)
    assert await kube.list_events("prod", ns, field_selector="involvedObject.kind=Deployment")
    hpa = await kube.find_hpa("prod", ns, "web")
    assert hpa is not None
    await kube.patch_hpa_bounds("prod", ns, "web", min_replicas=2, max_replicas=5, resource_version=hpa["metadata"]["resourceVersion"])
    cron = await kube.read_cronjob("prod", ns, "nightly")
    await kube.create_job("prod", ns, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "b1"},
                                       "spec": cron["spec"]["jobTemplate"]["spec"]})
    assert (await kube.read_job("prod", ns, "b1"))["status"]["succeeded"] == 1


def seed(server: KubeApiServer, ns: str) -> str:
    c = server.cluster
    c.create_deployment(ns, deployment_manifest("web", "nginx:1", replicas=2, namespace=ns))
    c.create_hpa(ns, hpa_manifest("web", "web", min_replicas=1, max_replicas=4, namespace=ns))
    c.create_cronjob(ns, cronjob_manifest("nightly", "pg:16", namespace=ns))
    pod = c.pods_of(ns, "web")[0]["metadata"]["name"]
    c.append_log(ns, pod, ["ready"])
    return str(pod)


@pytest.mark.parametrize(("overlay", "ns", "role"), ROLES, ids=[f"{o}-{ns}" for o, ns, _ in ROLES])
async def test_the_role_allows_every_call_and_nothing_else(overlay: str, ns: str, role: dict[str, Any], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    decisions: list[tuple[Triple, bool]] = []
    real = apiserver.rbac_allows

    def recording(rules: list[dict[str, Any]], verb: str, group: str, resource: str, name: str | None) -> bool:
        allowed = real(rules, verb, group, resource, name)
        decisions.append(((group, resource, verb), allowed))
        return allowed

    monkeypatch.setattr(apiserver, "rbac_allows", recording)
    with KubeApiServer() as server:
        seed(server, ns)
        server.rbac = role["rules"]
        kube = KubeAdapter(CONFIG, kubeconfig=server.kubeconfig(str(tmp_path / "kc")))
        recorded = Recorded(kube)
        try:
            await exercise(recorded, ns)
        finally:
            kube.close()
    assert recorded.called >= adapter_methods(), f"exercise() does not call {sorted(adapter_methods() - recorded.called)}"
    assert [t for t, allowed in decisions if not allowed] == []
    used = {t for t, _ in decisions}
    assert used <= granted(role["rules"])
    assert granted(role["rules"]) - used == set(), f"{overlay}: the Role in {ns} grants what no call uses"


async def test_a_rule_taken_away_is_named_by_the_adapter(tmp_path: Path) -> None:
    _, ns, role = ROLES[0]
    with KubeApiServer() as server:
        pod = seed(server, ns)
        server.rbac = [r for r in role["rules"] if r["resources"] != ["pods/log"]]
        kube = KubeAdapter(CONFIG, kubeconfig=server.kubeconfig(str(tmp_path / "kc")))
        try:
            with pytest.raises(ExecutionError, match=rf"it may not get pods/log in namespace {ns} \(403 Forbidden\)"):
                await kube.read_pod_log("prod", ns, pod, container=None, since_seconds=None, tail_lines=None, previous=False,
                                        limit_bytes=1000)
            # And without `get` on deployments, which the old ClusterRole also gave (with watch): every
            # command's plan starts with reading the deployment.
            server.rbac = [r for r in role["rules"] if r["resources"] != ["deployments"]]
            with pytest.raises(ExecutionError, match=r"may not get deployments"):
                await kube.read_deployment("prod", ns, "web")
        finally:
            kube.close()


def test_the_emulator_refuses_like_a_real_api_server(tmp_path: Path) -> None:
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    _, _, role = ROLES[0]
    with KubeApiServer() as server:
        server.cluster.create_deployment("shop", deployment_manifest("web", "nginx:1", namespace="shop"))
        server.rbac = role["rules"]
        cfg = client.Configuration()
        config.load_kube_config(config_file=server.kubeconfig(str(tmp_path / "kc")), client_configuration=cfg)
        with client.ApiClient(cfg) as api:
            with pytest.raises(ApiException) as err:
                client.AppsV1Api(api).delete_namespaced_deployment("web", "shop")
            assert err.value.status == 403
            status = json.loads(err.value.body)
            assert (status["reason"], status["details"]) == ("Forbidden", {"name": "web", "group": "apps", "kind": "deployments"})
            assert status["message"] == ('deployments.apps "web" is forbidden: User "system:serviceaccount:opsbot:opsbot" cannot '
                                         'delete resource "deployments" in API group "apps" in the namespace "shop"')
            with pytest.raises(ApiException) as err:
                client.BatchV1Api(api).list_namespaced_job("shop")
            assert json.loads(err.value.body)["message"] == (
                'jobs.batch is forbidden: User "system:serviceaccount:opsbot:opsbot" cannot list resource "jobs" in API group '
                '"batch" in the namespace "shop"')
