"""Runbook: "kubectl rollout undo deployment/x [--to-revision=N]" (seed 001 §1.4), from chat."""

from __future__ import annotations

import subprocess

from bot.sandbox.kube_apiserver import KubeApiServer
from tests.conftest import ALICE, CAROL
from tests.harness import Harness


def api(kube: KubeApiServer) -> dict:  # type: ignore[type-arg]
    return kube.cluster.get("apps/deployments", "nova", "nova-api")


def image(kube: KubeApiServer) -> str:
    return str(api(kube)["spec"]["template"]["spec"]["containers"][0]["image"])


def revision(kube: KubeApiServer) -> str:
    return str(api(kube)["metadata"]["annotations"]["deployment.kubernetes.io/revision"])


async def test_rollback_to_previous_revision_reverts_the_template(bot: Harness, kube: KubeApiServer) -> None:
    assert (image(kube), revision(kube)) == ("ghcr.io/nova/api:1.4.2", "3")
    await bot.slash(ALICE, '/ops rollback api --reason "1.4.2 breaks checkout"')
    request = await bot.requested()
    card = bot.slack.in_channel(Harness.INCIDENT)[-1].all_text()
    assert "revision 3 (nova-api=ghcr.io/nova/api:1.4.2) → 2 (nova-api=ghcr.io/nova/api:1.4.1)" in card

    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert image(kube) == "ghcr.io/nova/api:1.4.1"
    # The controller re-used revision 2's ReplicaSet and made it revision 4, as a cluster does.
    assert revision(kube) == "4"
    rs = kube.cluster.list_objects("apps/replicasets", "nova", "app=nova-api")
    assert sorted(r["metadata"]["annotations"]["deployment.kubernetes.io/revision"] for r in rs) == ["1", "3", "4"]
    # The write was a JSON patch carrying the resourceVersion read just before (409 if it moved).
    patches = [r for r in kube.cluster.requests if r[0] == "PATCH" and r[1].endswith("/deployments/nova-api")]
    assert patches == [("PATCH", "/apis/apps/v1/namespaces/nova/deployments/nova-api", "application/json-patch+json")]
    assert await bot.audit_events(request.id) == ["requested", "approval_given", "approved", "started", "succeeded", "followed"]


async def test_rollback_to_a_given_revision(bot: Harness, kube: KubeApiServer) -> None:
    await bot.slash(ALICE, "/ops rollback api --to-revision 1")
    request = await bot.requested()
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert image(kube) == "ghcr.io/nova/api:1.4.0"


async def test_rollback_to_a_revision_that_does_not_exist(bot: Harness, kube: KubeApiServer) -> None:
    await bot.slash(ALICE, "/ops rollback api --to-revision 9")
    reply = await bot.response(containing="no revision 9")
    assert "Revisions kept: 1, 2, 3" in reply["text"]
    assert await bot.last_request() is None


async def test_rollback_is_stale_when_someone_rolls_out_after_approval_was_asked(bot: Harness, kube: KubeApiServer,
                                                                                  kubeconfig: str) -> None:
    await bot.slash(ALICE, "/ops rollback api")
    request = await bot.requested()
    # Meanwhile a deploy goes out by hand (a real kubectl against the emulator).
    subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "-n", "nova", "set", "image", "deployment/nova-api",
                    "nova-api=ghcr.io/nova/api:1.5.0"], check=True, capture_output=True, timeout=30)
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "stale"
    assert "revision was 3, now 4" in (done.error or "")
    assert image(kube) == "ghcr.io/nova/api:1.5.0", "the newer rollout was not overwritten"
    thread = bot.slack.thread(Harness.INCIDENT, done.card_ts or "")
    assert any("request again" in m.text for m in thread)
