"""The deploy manifests: every overlay renders with the real kubectl (kustomize), every object it
renders is valid against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: an unknown or
misspelt field is an error), and every Deployment is locked down, probed, bounded and spread the way
SECURITY.md's operator checklist says."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bot.cli import parser
from bot.config import parse_config

ROOT = Path(__file__).resolve().parent.parent.parent
OVERLAYS = sorted(p.name for p in (ROOT / "manifests/overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The oldest Kubernetes minor the manifests are for (matchLabelKeys, unhealthyPodEvictionPolicy) and
# the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
SECRETS = {"opsbot-secrets", "opsbot-db-owner"}
Obj = dict[str, Any]

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed on this machine")


def test_policy_copies_match_the_sources() -> None:
    assert (ROOT / "manifests/base/policy.yaml").read_text() == (ROOT / "policies/default.yaml").read_text()
    assert (ROOT / "manifests/overlays/nova-rms/policy.yaml").read_text() == (ROOT / "policies/examples/nova-rms.yaml").read_text()


def test_the_overlays_are_the_documented_ones() -> None:
    assert OVERLAYS == ["nova-rms", "production", "staging"]


def test_the_file_a_403_names_leads_to_the_role() -> None:
    """A refused call says "Grant it in <RBAC_FILE>": that file must exist and lead to the Role."""
    from bot.adapters.kube import RBAC_FILE

    text = (ROOT / RBAC_FILE).read_text()
    assert (ROOT / "manifests/managed-namespace/role.yaml").is_file()
    assert RBAC_FILE == "manifests/managed-namespace/role.yaml" or "manifests/managed-namespace/role.yaml" in text
    assert "rbac.yaml" not in (ROOT / "manifests/base/kustomization.yaml").read_text()  # not a resource: it grants nothing


@functools.cache
def render(overlay: str) -> tuple[Obj, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "manifests/overlays" / overlay)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def of_kind(docs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[Obj, ...], kind: str, name: str) -> Obj:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def pods(docs: tuple[Obj, ...]) -> list[tuple[Obj, Obj]]:
    """(Deployment, its pod spec) for each rendered Deployment."""
    return [(d, d["spec"]["template"]["spec"]) for d in of_kind(docs, "Deployment")]


def selects(selector: Obj, labels: Obj) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_kubernetes_schemas(overlay: str) -> None:
    docs = render(overlay)
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "Role",
            "RoleBinding"} == {d["kind"] for d in docs}
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {doc['kind']} {doc['metadata']['name']} is not valid for Kubernetes {version}: {exc.message}")


def test_the_schema_check_catches_a_misspelt_field() -> None:
    """What the test above relies on: strict validation refuses an unknown field, offline."""
    deployment = next(d for d in yaml.safe_load_all((ROOT / "manifests/base/deployment.yaml").read_text()))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = {**container["securityContext"], "readOnlyRootFileSystem": True}
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_server_and_a_worker_deployment_two_replicas_each(overlay: str) -> None:
    docs = render(overlay)
    server, worker = named(docs, "Deployment", "opsbot-server"), named(docs, "Deployment", "opsbot-worker")
    assert len(of_kind(docs, "Deployment")) == 2
    assert server["spec"]["replicas"] == worker["spec"]["replicas"] == 2
    assert [c["args"] for c in server["spec"]["template"]["spec"]["containers"]] == [["serve", "--no-worker"]]
    assert [c["args"] for c in worker["spec"]["template"]["spec"]["containers"]] == [["worker"]]
    for deployment, pod in pods(docs):
        assert selects(deployment["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
        assert pod["serviceAccountName"] == "opsbot" and pod.get("automountServiceAccountToken", True)
        for container in pod["initContainers"] + pod["containers"]:
            parser().parse_args(container["args"])  # exits (fails the test) on a flag `opsbot` does not have
            assert container["image"] == server["spec"]["template"]["spec"]["containers"][0]["image"]
            assert not container["image"].endswith(":latest") and ":" in container["image"]
    if overlay == "nova-rms":
        assert server["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/nova/opsbot:0.1.0"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down(overlay: str) -> None:
    for deployment, pod in pods(render(overlay)):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        for container in pod["initContainers"] + pod["containers"]:
            where = f"{overlay}: {deployment['metadata']['name']}/{container['name']}"
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities") == {"drop": ["ALL"]}, where
            assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert not sc.get("privileged") and sc.get("runAsUser", 1) > 0, where


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_volumes_only_where_needed(overlay: str) -> None:
    """Read-only root: /tmp (HOME, TMPDIR) and the audit spool are emptyDirs, the policy is mounted
    read-only, nothing else is writable, and nothing is a hostPath."""
    for deployment, pod in pods(render(overlay)):
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert all(set(v) - {"name"} <= {"emptyDir", "configMap"} for v in volumes.values()), volumes
        for container in pod["initContainers"] + pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for mount in container.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if "configMap" in volume:
                    assert mount.get("readOnly") is True, (deployment["metadata"]["name"], mount)
                else:
                    assert "sizeLimit" in volume["emptyDir"], volume
                    assert mount["mountPath"] in {"/tmp", env.get("OPSBOT_SPOOL_DIR")}, (deployment["metadata"]["name"], mount)
            if container["name"] == "opsbot":
                mounts = {m["mountPath"] for m in container["volumeMounts"]}
                assert {"/tmp", env["OPSBOT_SPOOL_DIR"], "/etc/opsbot"} <= mounts
                assert env["OPSBOT_CONFIG"] == "/etc/opsbot/policy.yaml"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_resources(overlay: str) -> None:
    docs = render(overlay)
    server = named(docs, "Deployment", "opsbot-server")["spec"]["template"]["spec"]["containers"][0]
    port = {p["name"]: p["containerPort"] for p in server["ports"]}["http"]
    assert {"name": "PORT", "value": str(port)} in server["env"]
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert server["startupProbe"]["httpGet"]["path"] == "/healthz"
    # `opsbot worker` serves /healthz, /readyz and /metrics (no /slack/events) on its own $PORT.
    worker = named(docs, "Deployment", "opsbot-worker")["spec"]["template"]["spec"]["containers"][0]
    port = {p["name"]: p["containerPort"] for p in worker["ports"]}["health"]
    assert {"name": "PORT", "value": str(port)} in worker["env"]
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    for deployment, pod in pods(docs):
        for container in pod["initContainers"] + pod["containers"]:
            res = container["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), (deployment["metadata"]["name"], container["name"])
            assert _mebibytes(res["limits"]["memory"]) <= 256 and _mebibytes(res["requests"]["memory"]) <= _mebibytes(
                res["limits"]["memory"])


def _mebibytes(quantity: str) -> float:
    m = re.fullmatch(r"([0-9]+)(Mi|Gi)", quantity)
    assert m, f"memory quantities are written in Mi or Gi here, not {quantity!r}"
    return int(m.group(1)) * (1024 if m.group(2) == "Gi" else 1)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_disruption_budget_and_a_spread_per_deployment(overlay: str) -> None:
    docs = render(overlay)
    budgets = of_kind(docs, "PodDisruptionBudget")
    for deployment, pod in pods(docs):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (pdb,) = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        assert 0 < pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
        spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
        assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for constraint in spread.values():
            assert constraint["maxSkew"] == 1 and selects(constraint["labelSelector"], labels)
        strict = spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
        assert strict == (overlay == "production"), "production spreads replicas over nodes strictly, the others prefer it"
    services = of_kind(docs, "Service")
    assert [s["metadata"]["name"] for s in services] == ["opsbot"]
    server_labels = named(docs, "Deployment", "opsbot-server")["spec"]["template"]["metadata"]["labels"]
    worker_labels = named(docs, "Deployment", "opsbot-worker")["spec"]["template"]["metadata"]["labels"]
    assert selects({"matchLabels": services[0]["spec"]["selector"]}, server_labels)
    assert not selects({"matchLabels": services[0]["spec"]["selector"]}, worker_labels)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_shipped(overlay: str) -> None:
    """The bot runs as the app role (DATABASE_URL in opsbot-secrets); the owner's URL, which can
    disable the audit trail's append-only trigger, is in its own Secret, read by `migrate` only."""
    docs = render(overlay)
    assert not of_kind(docs, "Secret")
    for _, pod in pods(docs):
        (migrate,) = pod["initContainers"]
        assert migrate["args"][:2] == ["migrate", "--app-role"] and "envFrom" not in migrate
        owner = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in migrate["env"]}
        assert owner == {"DATABASE_OWNER_URL": {"name": "opsbot-db-owner", "key": "DATABASE_OWNER_URL"}}
        for container in pod["containers"]:
            assert [s["secretRef"] for s in container["envFrom"]] == [{"name": "opsbot-secrets"}]
            assert not [e for e in container.get("env", []) if "OWNER" in e["name"] or "secretKeyRef" in e.get("valueFrom", {})]
            assert not [e for e in container.get("env", []) if re.search(r"TOKEN|SECRET|URL", e["name"]) and "value" in e]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_policy_configmap_is_the_policy_file(overlay: str) -> None:
    docs = render(overlay)
    (cm,) = of_kind(docs, "ConfigMap")
    source = ROOT / "manifests/overlays" / overlay / "policy.yaml"
    expected = (source if source.is_file() else ROOT / "manifests/base/policy.yaml").read_text()
    assert cm["data"] == {"policy.yaml": expected}
    assert re.fullmatch(r"opsbot-policy-[a-z0-9]{10}", cm["metadata"]["name"])  # a new policy restarts the pods
    for _, pod in pods(docs):
        assert {"name": "policy", "configMap": {"name": cm["metadata"]["name"]}} in pod["volumes"]


# What each egress rule is for, by port: anything else needs a reason here first.
_EGRESS_PORTS = {53: "DNS", 443: "HTTPS: Slack, the API server's Service port, HTTP targets", 6443: "the API server",
                 5432: "PostgreSQL", 6379: "Redis"}
_PLACEHOLDER = re.compile(r"192\.0\.2\.[0-9]+/32")  # TEST-NET-1: routed nowhere


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay: str) -> None:
    docs = render(overlay)
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(docs, "NetworkPolicy")}
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs, "Deployment")}
    deny = policies.pop("opsbot-default-deny")
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    assert all(selects(deny["podSelector"], pod) for pod in labels.values())
    ingress = {name: p for name, p in policies.items() if "Ingress" in p["policyTypes"]}
    assert sorted(ingress) == ["opsbot-server-ingress", "opsbot-worker-ingress"]
    rule = ingress["opsbot-server-ingress"]
    assert selects(rule["podSelector"], labels["opsbot-server"]) and not selects(rule["podSelector"], labels["opsbot-worker"])
    assert rule["ingress"] == [{"ports": [{"protocol": "TCP", "port": 3000}]}]
    rule = ingress["opsbot-worker-ingress"]  # the workers' /metrics only
    assert selects(rule["podSelector"], labels["opsbot-worker"]) and not selects(rule["podSelector"], labels["opsbot-server"])
    assert rule["ingress"] == [{"ports": [{"protocol": "TCP", "port": 3001}]}]
    egress_ports: dict[str, set[int]] = {}
    for name, spec in policies.items():
        if name in ingress:
            continue
        assert spec["policyTypes"] == ["Egress"] and all(selects(spec["podSelector"], pod) for pod in labels.values()), name
        for rule in spec["egress"]:
            assert rule.get("to") and rule.get("ports"), f"{name}: an egress rule names its destinations and its ports"
            egress_ports.setdefault(name, set()).update(p["port"] for p in rule["ports"])
    assert set(egress_ports) == {"opsbot-egress-dns", "opsbot-egress-apiserver", "opsbot-egress-postgresql", "opsbot-egress-redis",
                                 "opsbot-egress-slack", "opsbot-egress-http-targets"}
    assert egress_ports["opsbot-egress-dns"] == {53} and egress_ports["opsbot-egress-slack"] == {443}
    assert egress_ports["opsbot-egress-postgresql"] == {5432} and egress_ports["opsbot-egress-redis"] == {6379}
    assert egress_ports["opsbot-egress-apiserver"] == {443, 6443}
    everywhere = [r for spec in policies.values() for r in spec.get("egress", []) for to in r["to"]
                  if to.get("ipBlock", {}).get("cidr") == "0.0.0.0/0"]
    assert len(everywhere) == 1 and everywhere[0]["ports"] == [{"protocol": "TCP", "port": 443}]
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(everywhere[0]["to"][0]["ipBlock"]["except"])
    for spec in policies.values():
        for r in spec.get("egress", []):
            for to in r["to"]:
                cidr = to.get("ipBlock", {}).get("cidr")
                assert cidr in (None, "0.0.0.0/0") or _PLACEHOLDER.fullmatch(cidr), f"{cidr}: a real address in a shipped overlay?"
    if overlay == "nova-rms":  # the health: probes in the Nova policy: nova-api:3000, nova-worker:3001
        (http,) = policies["opsbot-egress-http-targets"]["egress"]
        assert http["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "nova"}}}]
        assert {p["port"] for p in http["ports"]} == {3000, 3001}
    assert all(port in _EGRESS_PORTS or (overlay == "nova-rms" and port in (3000, 3001))
               for ports in egress_ports.values() for port in ports)


def managed_namespaces(overlay: str) -> set[str]:
    """The namespaces the overlay's policy file names (deployments, cronjobs)."""
    (cm,) = of_kind(render(overlay), "ConfigMap")
    config = parse_config(cm["data"]["policy.yaml"], missing_env=[])
    return {d.namespace for d in config.deployments.values()} | {c.namespace for c in config.cronjobs.values()}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_role_per_managed_namespace_and_nothing_cluster_wide(overlay: str) -> None:
    docs = render(overlay)
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in of_kind(docs, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in of_kind(docs, "RoleBinding")}
    assert set(roles) == set(bindings) and "opsbot" not in roles  # no rights in its own namespace
    assert managed_namespaces(overlay) <= set(roles)
    if overlay == "nova-rms":
        assert set(roles) == managed_namespaces(overlay) == {"nova"}
    for ns, binding in bindings.items():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": roles[ns]["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "opsbot", "namespace": "opsbot"}]
    (sa,) = of_kind(docs, "ServiceAccount")
    assert (sa["metadata"]["name"], sa["metadata"]["namespace"]) == ("opsbot", "opsbot")


# Web API methods (slack_sdk names) the code calls → the bot scopes each needs (any one of them);
# [] for methods that need none. A method not listed here fails the test until someone says.
_METHOD_SCOPES: dict[str, list[str]] = {
    "auth_test": [],
    "chat_getPermalink": [],
    "chat_postMessage": ["chat:write"],
    "chat_postEphemeral": ["chat:write"],
    "chat_update": ["chat:write"],
    "conversations_history": ["channels:history", "groups:history"],
    "conversations_replies": ["channels:history", "groups:history"],
    "usergroups_users_list": ["usergroups:read"],
    "views_open": [],  # the Deny dialog: no scope, the click's trigger_id is the permission
    "files_upload_v2": ["files:write"],  # /ops timeline's file (bot/timeline.py)
    "views_publish": [],  # the Home tab: no scope, the app_home feature
    "conversations_members": ["channels:read", "groups:read"],  # the Home tab's "your channels"
    "conversations_open": ["im:write"],  # /ops timeline of another channel: the asker's DM, to share its file there
}


def _web_api_calls() -> set[str]:
    from slack_sdk.web.async_base_client import AsyncBaseClient
    from slack_sdk.web.async_client import AsyncWebClient

    methods = set(dir(AsyncWebClient)) - set(dir(AsyncBaseClient))
    files = [p for p in (ROOT / "bot").rglob("*.py") if "sandbox" not in p.parts] + list((ROOT / "commands").rglob("*.py"))
    code = "\n".join(p.read_text() for p in files)
    return {m for m in re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)\(", code) if m in methods}


def test_the_slack_app_asks_for_exactly_the_scopes_the_code_uses() -> None:
    app = yaml.safe_load((ROOT / "manifests/slack-app.yaml").read_text())
    scopes = set(app["oauth_config"]["scopes"]["bot"])
    assert app["features"]["slash_commands"][0]["command"] == "/ops"
    calls = _web_api_calls()
    assert "chat_postMessage" in calls  # the scan sees the code (a scan that finds nothing proves nothing)
    unknown = calls - set(_METHOD_SCOPES)
    assert not unknown, f"add {sorted(unknown)} to _METHOD_SCOPES with the scopes Slack documents for them"
    needed = {"commands"}  # /ops itself
    for call in calls:
        if _METHOD_SCOPES[call]:
            assert scopes & set(_METHOD_SCOPES[call]), f"{call} needs one of {_METHOD_SCOPES[call]}; none is in slack-app.yaml"
            needed |= set(_METHOD_SCOPES[call])
    assert scopes == needed, f"asked of every workspace for nothing: {sorted(scopes - needed)}"
