"""The deploy manifests render with the real kubectl (kustomize) and carry the shipped policies."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent


def test_policy_copies_match_the_sources() -> None:
    assert (ROOT / "manifests/base/policy.yaml").read_text() == (ROOT / "policies/default.yaml").read_text()
    assert (ROOT / "manifests/overlays/nova-rms/policy.yaml").read_text() == (ROOT / "policies/examples/nova-rms.yaml").read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed on this machine")
def test_overlay_renders() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "manifests/overlays/nova-rms")], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    docs = {(d["kind"], d["metadata"].get("namespace")): d for d in yaml.safe_load_all(out)}
    deploy = docs[("Deployment", "opsbot")]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/nova/opsbot:0.1.0" and container["args"] == ["serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert docs[("RoleBinding", "nova")]["subjects"][0] == {"kind": "ServiceAccount", "name": "opsbot", "namespace": "opsbot"}
    cm = next(d for (k, _), d in docs.items() if k == "ConfigMap")
    assert "billing-webhooks" in cm["data"]["policy.yaml"]


def _base_deployment() -> dict:  # type: ignore[type-arg]
    return next(d for d in yaml.safe_load_all((ROOT / "manifests/base/deployment.yaml").read_text()) if d["kind"] == "Deployment")


def test_only_the_migrate_init_container_gets_the_database_owner() -> None:
    """The bot runs as the app role (DATABASE_URL in opsbot-secrets); the owner's URL, which can
    disable the audit trail's append-only trigger, is in its own Secret, read by `migrate` only."""
    pod = _base_deployment()["spec"]["template"]["spec"]
    (migrate,) = pod["initContainers"]
    assert migrate["args"][:2] == ["migrate", "--app-role"]
    assert "envFrom" not in migrate
    owner = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in migrate["env"]}
    assert owner == {"DATABASE_OWNER_URL": {"name": "opsbot-db-owner", "key": "DATABASE_OWNER_URL"}}
    for container in pod["containers"]:
        assert {s["secretRef"]["name"] for s in container.get("envFrom", [])} == {"opsbot-secrets"}
        assert not [e for e in container.get("env", []) if "OWNER" in e["name"]]


def test_the_spool_is_a_writable_volume_under_a_read_only_root() -> None:
    pod = _base_deployment()["spec"]["template"]["spec"]
    (bot,) = pod["containers"]
    assert bot["securityContext"]["readOnlyRootFilesystem"] is True
    spool_dir = next(e["value"] for e in bot["env"] if e["name"] == "OPSBOT_SPOOL_DIR")
    mount = next(m for m in bot["volumeMounts"] if m["mountPath"] == spool_dir)
    assert not mount.get("readOnly")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume


# Web API calls (slack_sdk method names) that need each bot scope; a scope none of them is used for
# is asked of every workspace for nothing.
_SCOPE_CALLS = {
    "chat:write": ["chat_postMessage", "chat_update", "chat_postEphemeral"],
    "usergroups:read": ["usergroups_users_list"],
    "channels:history": ["conversations_history", "conversations_replies"],
    "groups:history": ["conversations_history", "conversations_replies"],
    "users:read": ["users_info", "users_list"],
}


def test_the_slack_app_asks_only_for_scopes_the_code_uses() -> None:
    app = yaml.safe_load((ROOT / "manifests/slack-app.yaml").read_text())
    scopes = app["oauth_config"]["scopes"]["bot"]
    code = "\n".join(p.read_text() for p in (ROOT / "bot").rglob("*.py") if "sandbox" not in p.parts)
    assert "commands" in scopes and app["features"]["slash_commands"][0]["command"] == "/ops"
    for scope in scopes:
        if scope == "commands":
            continue
        assert scope in _SCOPE_CALLS, f"{scope}: add it to _SCOPE_CALLS with the Web API calls that need it"
        assert any(f".{call}(" in code for call in _SCOPE_CALLS[scope]), f"{scope} is requested but no code calls {_SCOPE_CALLS[scope]}"
