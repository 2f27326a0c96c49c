"""Pure pieces of the Kubernetes commands: where a rollout stands (kubectl's rules), how a pod's
line reads, and what secret-scrubbing removes from log text."""

from __future__ import annotations

from typing import Any

import pytest

from bot.pipeline import _chunks
from bot.redaction import scrub_text
from commands.k8s.pods import pod_line
from commands.k8s.workload import rollout_state


def dep(*, gen: int = 2, observed: int = 2, replicas: int = 3, updated: int = 3, total: int = 3, available: int = 3,
        reason: str = "NewReplicaSetAvailable") -> dict[str, Any]:
    return {"metadata": {"name": "web", "generation": gen}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "updatedReplicas": updated, "replicas": total, "availableReplicas": available,
                       "conditions": [{"type": "Progressing", "status": "True", "reason": reason}]}}


@pytest.mark.parametrize(("d", "text", "done", "failed"), [
    (dep(gen=3, observed=2), "waiting for the deployment spec update to be observed", False, False),
    (dep(updated=1, total=4), "1 of 3 updated replicas", False, False),
    (dep(total=4), "1 old replicas pending termination", False, False),
    (dep(available=2), "2 of 3 updated replicas available", False, False),
    (dep(), "successfully rolled out (3 of 3 available)", True, False),
    (dep(updated=1, reason="ProgressDeadlineExceeded"), 'deployment "web" exceeded its progress deadline', True, True),
])
def test_rollout_state_decides_as_kubectl_does(d: dict[str, Any], text: str, done: bool, failed: bool) -> None:
    state = rollout_state(d)
    assert (state.text, state.done, state.failed) == (text, done, failed)


def test_pod_line_prefers_the_waiting_reason_and_names_the_last_termination() -> None:
    pod = {"metadata": {"name": "web-1"}, "spec": {"nodeName": "node-a", "containers": [{"name": "web"}]},
           "status": {"phase": "Running", "containerStatuses": [{
               "name": "web", "ready": False, "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
               "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137, "finishedAt": "2020-01-01T00:00:00Z"}}}]}}
    line = pod_line(pod)
    assert line.startswith("`web-1` CrashLoopBackOff, ready 0/1, restarts 4")
    assert "node node-a" in line and "web: OOMKilled (exit 137" in line


@pytest.mark.parametrize(("text", "gone"), [
    ("login ok password=hunter2 user=x", "hunter2"),
    ('{"api_key": "abc123xyz", "n": 1}', "abc123xyz"),
    ("Authorization: Bearer abcdefghijklmnop", "abcdefghijklmnop"),
    ("dsn postgres://app:s3cret@db:5432/app", "s3cret"),
    ("posting with xoxb-1234-5678-abcdefgh", "xoxb-1234-5678-abcdefgh"),
    ("key AKIAABCDEFGHIJKLMNOP used", "AKIAABCDEFGHIJKLMNOP"),
    ("jwt eyJhbGciOiJIUzI1.eyJzdWIiOiIxMjM0.SflKxwRJSMeKKF2QT4f", "SflKxwRJSMeKKF2QT4f"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "MIIEow"),
    ("client_secret: 'x y z'", "x y z"),
])
def test_secret_shapes_are_scrubbed(text: str, gone: str) -> None:
    out = scrub_text(text)
    assert gone not in out and "[redacted]" in out


def test_ordinary_log_lines_are_left_alone_and_known_secrets_go_wherever_they_are() -> None:
    line = "GET /v1/health 200 12ms tokens_used=0? no: token_count 5"
    assert scrub_text("GET /v1/health 200 12ms job=42 ok") == "GET /v1/health 200 12ms job=42 ok"
    assert "s3cr3t-value" not in scrub_text("echo s3cr3t-value", ("s3cr3t-value",))
    assert scrub_text(line).startswith("GET /v1/health 200 12ms")


def test_chunks_cut_at_line_ends_and_never_exceed_the_size() -> None:
    text = "\n".join(f"line {i}" for i in range(1000)) + "\n" + "x" * 9000
    chunks = _chunks(text, 3500)
    assert all(len(c) <= 3500 for c in chunks)
    assert "".join(c.replace("\n", "") for c in chunks) == text.replace("\n", "")
    assert chunks[0].startswith("line 0\nline 1")
