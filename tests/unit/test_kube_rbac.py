"""manifests/base/rbac.yaml grants what the kube adapter uses, and nothing it does not: the
emulator enforces the ClusterRole's rules (403 with a real API server's words for anything else)
while every adapter call runs, and the role's rules are exactly the expected set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bot.adapters.kube import KubeAdapter
from bot.config import parse_config
from bot.errors import ExecutionError
from bot.sandbox.kube_apiserver import KubeApiServer, cronjob_manifest, deployment_manifest, hpa_manifest

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIG = parse_config("environments: {prod: {kube_context: emulator}}")


def role() -> dict:  # type: ignore[type-arg]
    docs = list(yaml.safe_load_all((ROOT / "manifests/base/rbac.yaml").read_text()))
    return next(d for d in docs if d["kind"] == "ClusterRole")


def test_the_role_grants_exactly_these_rules() -> None:
    granted = {(group, resource, verb) for rule in role()["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == {
        ("apps", "deployments", "get"), ("apps", "deployments", "list"), ("apps", "deployments", "watch"),
        ("apps", "deployments", "patch"), ("apps", "deployments/scale", "get"), ("apps", "deployments/scale", "patch"),
        ("apps", "replicasets", "get"), ("apps", "replicasets", "list"), ("", "pods", "get"), ("", "pods", "list"),
        ("", "pods/log", "get"), ("", "events", "list"),
        ("autoscaling", "horizontalpodautoscalers", "get"), ("autoscaling", "horizontalpodautoscalers", "list"),
        ("autoscaling", "horizontalpodautoscalers", "patch"),
        ("batch", "cronjobs", "get"), ("batch", "jobs", "create"), ("batch", "jobs", "get"),
    }
    assert not any(rule.get("resourceNames") for rule in role()["rules"])


async def test_every_adapter_call_works_under_the_shipped_role(tmp_path: Path) -> None:
    with KubeApiServer() as server:
        c = server.cluster
        c.create_deployment("shop", deployment_manifest("web", "nginx:1", replicas=2, namespace="shop"))
        c.create_hpa("shop", hpa_manifest("web", "web", min_replicas=1, max_replicas=4, namespace="shop"))
        c.create_cronjob("shop", cronjob_manifest("nightly", "pg:16", namespace="shop"))
        pod = c.pods_of("shop", "web")[0]["metadata"]["name"]
        c.append_log("shop", pod, ["ready"])
        server.rbac = role()["rules"]
        kube = KubeAdapter(CONFIG, kubeconfig=server.kubeconfig(str(tmp_path / "kc")))
        try:
            await kube.ping("prod")
            d = await kube.read_deployment("prod", "shop", "web")
            assert len(await kube.list_replicasets("prod", "shop", "app=web")) == 1
            d = await kube.scale_deployment("prod", "shop", "web", replicas=3, resource_version=d["metadata"]["resourceVersion"])
            d = await kube.read_deployment("prod", "shop", "web")
            d = await kube.restart_deployment("prod", "shop", "web", restarted_at="2030-01-01T00:00:00Z",
                                              resource_version=d["metadata"]["resourceVersion"])
            await kube.replace_pod_template("prod", "shop", "web", template=d["spec"]["template"],
                                            resource_version=d["metadata"]["resourceVersion"])
            pods = await kube.list_pods("prod", "shop", "app=web")
            assert len(pods) == 3
            await kube.read_pod_log("prod", "shop", pods[0]["metadata"]["name"], container=None, since_seconds=60,
                                    tail_lines=10, previous=False, limit_bytes=1000)
            assert await kube.list_events("prod", "shop", field_selector="involvedObject.kind=Deployment")
            hpa = await kube.find_hpa("prod", "shop", "web")
            assert hpa is not None
            await kube.patch_hpa_bounds("prod", "shop", "web", min_replicas=2, max_replicas=5,
                                        resource_version=hpa["metadata"]["resourceVersion"])
            cron = await kube.read_cronjob("prod", "shop", "nightly")
            await kube.create_job("prod", "shop", {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "b1"},
                                                   "spec": cron["spec"]["jobTemplate"]["spec"]})
            assert (await kube.read_job("prod", "shop", "b1"))["status"]["succeeded"] == 1

            # Take one rule away: the adapter names it, and the server's refusal reads like a real one.
            server.rbac = [r for r in role()["rules"] if r["resources"] != ["pods/log"]]
            with pytest.raises(ExecutionError, match=r"it may not get pods/log in namespace shop \(403 Forbidden\)"):
                await kube.read_pod_log("prod", "shop", pods[0]["metadata"]["name"], container=None, since_seconds=None,
                                        tail_lines=None, previous=False, limit_bytes=1000)
        finally:
            kube.close()


def test_the_emulator_refuses_like_a_real_api_server(tmp_path: Path) -> None:
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    with KubeApiServer() as server:
        server.cluster.create_deployment("shop", deployment_manifest("web", "nginx:1", namespace="shop"))
        server.rbac = role()["rules"]
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
