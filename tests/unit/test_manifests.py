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
