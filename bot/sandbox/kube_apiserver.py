"""A Kubernetes API server emulator, served over real HTTP.

Only the slice of the API that opsbot (and ``kubectl``) touches is emulated, but that slice behaves
the way a real API server plus its controllers does, because the real clients (the ``kubernetes``
Python package and the ``kubectl`` binary) talk to it:

* discovery: ``/version``, ``/api``, ``/apis``, ``/api/v1``, ``/apis/apps/v1``,
  ``/apis/autoscaling/v2``, ``/apis/batch/v1`` (kubectl needs these before it sends anything else);
* server-side printing: a request that asks for ``as=Table`` (every ``kubectl get`` does) gets the
  columns the real API server prints (pods: READY, STATUS, RESTARTS "2 (5s ago)", AGE, IP, NODE…;
  deployments, replicasets, events, HPAs, jobs, cronjobs, namespaces), so ``kubectl get`` output
  reads as it does on a cluster;
* Deployments: get, list (label and field selectors), watch, create, replace, delete, and PATCH in
  the three content types clients send (JSON patch, merge patch, strategic merge patch), plus the
  ``scale`` and ``status`` subresources;
* ReplicaSets created the way the deployment controller does it: a template change makes a new
  ReplicaSet named ``<deployment>-<pod-template-hash>`` with the next
  ``deployment.kubernetes.io/revision``; going back to an old template re-uses that ReplicaSet and
  gives it the next revision (its old number lands in ``revision-history``), owner references set
  so that ``kubectl rollout history`` finds them; ``ScalingReplicaSet`` events on the Deployment;
* Pods per ReplicaSet (and per Job) with a realistic status: phase, ``spec.nodeName``,
  ``status.startTime``, pod IPs, conditions, ``containerStatuses[]`` with ``ready``,
  ``restartCount``, ``state`` and ``lastState.terminated{reason,exitCode,finishedAt}``;
* pod logs (``pods/{name}/log``, text/plain) with ``container``, ``previous``, ``sinceSeconds``,
  ``sinceTime``, ``tailLines``, ``timestamps``, ``limitBytes``, and the kubelet's 400s (previous
  container not found, a container name needed, a container still waiting to start);
* core/v1 Events, listed with field selectors (``involvedObject.name=…,type=Warning``; an
  unsupported field label is a 400, as on a real server);
* HorizontalPodAutoscalers (``autoscaling/v2``): get, list, watch, create, replace, patch, delete,
  ``status``; v2 defaulting (cpu 80 %, ``behavior``) and validation (min ≤ max);
* CronJobs and Jobs (``batch/v1``): get, list, watch, create, replace, patch, delete;
  ``kubectl create job NAME --from=cronjob/X`` works. Job defaulting (selector and
  ``controller-uid``/``job-name`` labels, backoffLimit …) and validation (restartPolicy);
* request bodies in JSON or, as kubectl's typed clients send them (``kubectl create job``,
  ``create deployment``, ``create cronjob``), protobuf for Jobs, CronJobs and Deployments; written
  objects lose their ``omitempty`` zero values as in a real server's round trip through its Go types;
* watches: from a ``resourceVersion``, or (without one) starting with an ``ADDED`` per object;
* ``resourceVersion`` preconditions (409 Conflict), 404s and 403s shaped as ``Status`` objects;
* the API server's defaulting of pod templates on write. Without it a template copied back from a
  ReplicaSet never compares equal to the one in the Deployment, and ``kubectl rollout undo`` would
  misbehave exactly where a real cluster does not.

Controllers, and where they are simpler than the real ones:

* **Rollouts** complete instantly by default (all replicas updated, ready and available at once),
  which is what most tests of the bot want. ``cluster.set_rollout(ns, name, mode="steps",
  step_seconds=0.5)`` paces one deployment like a real rolling update: the controller's surge /
  unavailable arithmetic (``maxSurge``, ``maxUnavailable``) decides how many new pods to create and
  old ones to remove, and each new pod becomes ready ``step_seconds`` after the previous one, so
  ``updatedReplicas``/``readyReplicas``/``availableReplicas`` and the ``Progressing`` condition
  (``NewReplicaSetCreated`` → ``ReplicaSetUpdated`` → ``NewReplicaSetAvailable``) move as on a
  cluster. ``mode="stuck"``: new pods never become ready (their container waits in
  ``ImagePullBackOff``, with the ``Failed``/``BackOff`` events), and once no progress was made for
  ``spec.progressDeadlineSeconds`` (real seconds) ``Progressing`` turns False with reason
  ``ProgressDeadlineExceeded``. Paced rollouts advance on a background thread that lives as long as
  the ``KubeApiServer`` (``Cluster.start_controller``); watches deliver every change.
  ``mode="instant"`` again finishes a paced rollout at once.
* **Pods** are restarted in place by nobody but the test: ``cluster.crash_pod(ns, pod,
  reason="OOMKilled", exit_code=137)`` ends the container (restartCount + 1, ``lastState``
  terminated, state waiting ``CrashLoopBackOff``, a ``BackOff`` Warning event; the pod and its
  deployment lose a ready replica); ``cluster.recover_pod(ns, pod)`` starts it again.
  ``cluster.append_log(ns, pod, lines, container=None, previous=False, at=None)`` writes log lines
  to the container instance ``kubectl logs`` (or ``--previous``) reads.
* **HPAs** act synchronously: while an HPA targets a Deployment, any write that leaves the
  deployment's replicas outside ``[minReplicas, maxReplicas]`` is followed at once by the HPA's own
  scale back into range (a real HPA does it within its 15 s sync period), with a
  ``SuccessfulRescale`` event; creating or patching an HPA applies its bounds at once. A deployment
  scaled to 0 disables autoscaling, as on a cluster. Metrics: there is no metrics server; the
  current cpu utilisation is ``<unknown>`` until a test sets it with
  ``cluster.set_hpa_utilization(ns, hpa, percent)``, and then the HPA scales by the real formula
  (``ceil(ready pods × current / target)``, 10 % tolerance) without the 5-minute scale-down
  stabilisation window.
* **Jobs** run instantly: a created Job gets its pod(s) and completes (``status.succeeded``,
  conditions ``SuccessCriteriaMet`` and ``Complete``). ``cluster.job_behaviour = "fail"`` makes new
  Jobs fail (``backoffLimit + 1`` failed pods, ``Failed``/``BackoffLimitExceeded``), ``"running"``
  leaves them running until ``cluster.finish_job(ns, name, succeeded=True)``. CronJobs are stored and
  served but never scheduled (no Jobs appear on their own).
* **Events** are emitted for the cases above; ``cluster.add_event(ns, involved, type=…, reason=…,
  message=…)`` adds any other. At most ``MAX_EVENTS`` are kept per namespace (a real cluster keeps
  them for an hour).

RBAC, for tests of what opsbot needs: ``api.rbac = [rules of a ClusterRole]`` makes the server
refuse (403, with the real message) every resource request those rules do not grant; ``None`` (the
default) allows everything.

Faults, for tests of what opsbot does when the cluster misbehaves (``api.faults``, a ``Faults``)::

    api.faults.add(method="PATCH", path_re=r"/scale$", status=503, times=1)  # the next scale PATCH gets a 503
    api.faults.add(path_re=r"/deployments/", hang=30)   # every matching request waits 30 s, then is answered
    api.faults.add(status=403, message="…")              # a Status body with this message (default: a generic one)
    api.faults.clear()                                   # no more faults; requests hanging now are answered at once

The first fault whose ``method`` (any when omitted) and ``path_re`` (``re.search`` on the URL path)
match a request is used, ``times`` times (for ever when omitted). It sleeps ``hang`` seconds, then
answers ``status`` with a ``Status`` body instead of doing the request; with no ``status`` the
request is then served normally. A request that gets a fault is still recorded in
``cluster.requests``, so a test can count what reached the server.

Not emulated: ``kubectl logs -f`` (``follow`` answers what is there and ends), ``dryRun`` (refused
with a 400 rather than applied), autoscaling/v1 (so ``kubectl autoscale``, which creates v1 HPAs,
gets a 404), pod deletion grace periods (pods vanish at once), paused deployments, CronJob
scheduling, admission, server-side apply, the aggregated discovery format (kubectl falls back).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import math
import random
import re
import secrets
import struct
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

Obj = dict[str, Any]

REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
HASH_LABEL = "pod-template-hash"
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
NODE_NAME = "emulated-node"
HOST_IP = "10.0.0.11"
MAX_EVENTS = 1000  # per namespace

# The keys of Cluster.objects: "<group or v1>/<plural>".
DEPLOYMENTS = "apps/deployments"
REPLICASETS = "apps/replicasets"
PODS = "v1/pods"
EVENTS = "v1/events"
HPAS = "autoscaling/horizontalpodautoscalers"
JOBS = "batch/jobs"
CRONJOBS = "batch/cronjobs"

ROLLOUT_MODES = ("instant", "steps", "stuck")
JOB_BEHAVIOURS = ("complete", "fail", "running")

# Lists whose items strategic merge patch merges by a key instead of replacing the whole list.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "ports": "containerPort",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "conditions": "type",
}

log = logging.getLogger("opsbot.sandbox.kube")


@dataclass(frozen=True)
class _Kind:
    group: str
    version: str
    plural: str
    kind: str
    fields: tuple[str, ...] = ()  # field labels beyond metadata.name and metadata.namespace

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def full(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


_KINDS: dict[str, _Kind] = {
    DEPLOYMENTS: _Kind("apps", "v1", "deployments", "Deployment"),
    REPLICASETS: _Kind("apps", "v1", "replicasets", "ReplicaSet", ("status.replicas",)),
    PODS: _Kind("", "v1", "pods", "Pod", (
        "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName", "spec.hostNetwork",
        "status.phase", "status.podIP", "status.nominatedNodeName")),
    EVENTS: _Kind("", "v1", "events", "Event", (
        "involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
        "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
        "reason", "reportingComponent", "source", "type")),
    HPAS: _Kind("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler"),
    JOBS: _Kind("batch", "v1", "jobs", "Job", ("status.successful",)),
    CRONJOBS: _Kind("batch", "v1", "cronjobs", "CronJob"),
    "v1/namespaces": _Kind("", "v1", "namespaces", "Namespace", ("status.phase",)),
}
# Field labels that are not the path of the field they select on.
_FIELD_PATHS = {(EVENTS, "source"): "source.component", (JOBS, "status.successful"): "status.succeeded"}


# --------------------------------------------------------------------------- time


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stamp(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None


def _nano(t: datetime) -> str:
    """RFC3339NanoFixed, as the kubelet prefixes log lines with ``timestamps=true``."""
    t = t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond * 1000:09d}Z"


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration: what ``kubectl get`` shows as AGE."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


def _since(stamp: str | None, now: datetime) -> str:
    t = _parse_time(stamp)
    return "<unknown>" if t is None else human_duration((now - t).total_seconds())


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def _words(resource: str) -> tuple[str, str, str]:
    """(group, plural, "plural.group") for a Cluster.objects key (or a bare plural)."""
    kind = _KINDS.get(resource)
    if kind is not None:
        return kind.group, kind.plural, kind.full
    group, _, plural = resource.rpartition("/")
    group = "" if group == "v1" else group
    return group, plural, f"{plural}.{group}" if group else plural


def _not_found(resource: str, name: str) -> ApiError:
    group, plural, full = _words(resource)
    return ApiError(404, "NotFound", f'{full} "{name}" not found', {"name": name, "group": group, "kind": plural})


def _conflict(resource: str, name: str) -> ApiError:
    group, plural, full = _words(resource)
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {full} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        {"name": name, "group": group, "kind": plural},
    )


def _already_exists(resource: str, name: str) -> ApiError:
    group, plural, full = _words(resource)
    return ApiError(409, "AlreadyExists", f'{full} "{name}" already exists', {"name": name, "group": group, "kind": plural})


def _invalid(resource: str, name: str, field: str, problem: str) -> ApiError:
    kind = _KINDS[resource]
    qualified = f"{kind.kind}.{kind.group}" if kind.group else kind.kind
    return ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: {field}: {problem}',
                    {"name": name, "group": kind.group, "kind": kind.kind,
                     "causes": [{"reason": "FieldValueInvalid", "message": problem, "field": field}]})


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# --------------------------------------------------------------------------- defaulting


def _default_container(c: Obj) -> None:
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    if "imagePullPolicy" not in c:
        image = str(c.get("image", ""))
        tag = image.rsplit("/", 1)[-1]
        c["imagePullPolicy"] = "Always" if (":" not in tag or tag.endswith(":latest")) and "@" not in tag else "IfNotPresent"
    c.setdefault("resources", {})
    for port in c.get("ports") or []:
        port.setdefault("protocol", "TCP")


def default_pod_template(t: Obj) -> None:
    """What the API server fills in on a pod template (pkg/apis/core/v1/defaults.go)."""
    t.setdefault("metadata", {})
    t["metadata"].setdefault("creationTimestamp", None)
    spec = t.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    for c in spec.get("containers") or []:
        _default_container(c)
    for c in spec.get("initContainers") or []:
        _default_container(c)


def default_deployment(d: Obj) -> None:
    spec = d.setdefault("spec", {})
    spec.setdefault("replicas", 1)
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    strategy = spec.setdefault("strategy", {"type": "RollingUpdate"})
    if strategy.get("type", "RollingUpdate") == "RollingUpdate":
        strategy["type"] = "RollingUpdate"
        ru = strategy.setdefault("rollingUpdate", {})
        ru.setdefault("maxUnavailable", "25%")
        ru.setdefault("maxSurge", "25%")
    default_pod_template(spec.setdefault("template", {}))


def default_hpa(h: Obj) -> None:
    """autoscaling/v2 defaulting (pkg/apis/autoscaling/v2/defaults.go)."""
    spec = h.setdefault("spec", {})
    spec.setdefault("minReplicas", 1)
    if not spec.get("metrics"):
        spec["metrics"] = [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]
    behavior = spec.setdefault("behavior", {})
    up = behavior.setdefault("scaleUp", {})
    up.setdefault("stabilizationWindowSeconds", 0)
    up.setdefault("selectPolicy", "Max")
    up.setdefault("policies", [{"type": "Pods", "value": 4, "periodSeconds": 15}, {"type": "Percent", "value": 100, "periodSeconds": 15}])
    down = behavior.setdefault("scaleDown", {})
    down.setdefault("stabilizationWindowSeconds", 300)
    down.setdefault("selectPolicy", "Max")
    down.setdefault("policies", [{"type": "Percent", "value": 100, "periodSeconds": 15}])


def default_job(j: Obj) -> None:
    spec = j.setdefault("spec", {})
    if spec.get("completions") is None and spec.get("parallelism") is None:
        spec["completions"] = 1
    spec.setdefault("parallelism", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("manualSelector", None)
    if spec.get("manualSelector") is None:
        spec.pop("manualSelector")
    spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
    default_pod_template(spec.setdefault("template", {}))


def default_cronjob(c: Obj) -> None:
    spec = c.setdefault("spec", {})
    spec.setdefault("concurrencyPolicy", "Allow")
    spec.setdefault("suspend", False)
    spec.setdefault("successfulJobsHistoryLimit", 3)
    spec.setdefault("failedJobsHistoryLimit", 1)
    template = spec.setdefault("jobTemplate", {})
    template.setdefault("metadata", {}).setdefault("creationTimestamp", None)
    default_pod_template(template.setdefault("spec", {}).setdefault("template", {}))


# --------------------------------------------------------------------------- patches


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge patch for the fields a Deployment has: like a merge patch, except that the
    lists named in ``_MERGE_KEYS`` are merged item by item on their key."""
    if isinstance(patch, list) and field in _MERGE_KEYS and isinstance(target, list):
        key = _MERGE_KEYS[field]
        result = [copy.deepcopy(item) for item in target]
        for item in patch:
            if not isinstance(item, dict):
                return copy.deepcopy(patch)
            if item.get("$patch") == "delete":
                result = [r for r in result if r.get(key) != item.get(key)]
                continue
            for i, existing in enumerate(result):
                if isinstance(existing, dict) and existing.get(key) == item.get(key):
                    result[i] = strategic_merge_patch(existing, item)
                    break
            else:
                result.append(copy.deepcopy(item))
        return result
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged: Obj = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = strategic_merge_patch(merged.get(key), value, key)
    return merged


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: list[Obj]) -> Any:
    """RFC 6902: add, remove, replace, test, copy, move."""
    doc = copy.deepcopy(doc)

    def parent(path: str) -> tuple[Any, str]:
        parts = _pointer(path)
        if not parts:
            raise ApiError(422, "Invalid", "cannot address the document root")
        node = doc
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node, parts[-1]

    def get(path: str) -> Any:
        node = doc
        for part in _pointer(path):
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        try:
            if kind == "test":
                if get(path) != op.get("value"):
                    raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: test failed at {path}")
                continue
            if kind in ("copy", "move"):
                value = copy.deepcopy(get(op["from"]))
                if kind == "move":
                    p, k = parent(op["from"])
                    del p[int(k) if isinstance(p, list) else k]
                kind, op = "add", {"path": path, "value": value}
            node, key = parent(path)
            if kind == "add":
                if isinstance(node, list):
                    node.insert(len(node) if key == "-" else int(key), copy.deepcopy(op["value"]))
                else:
                    node[key] = copy.deepcopy(op["value"])
            elif kind == "replace":
                if isinstance(node, list):
                    node[int(key)] = copy.deepcopy(op["value"])
                else:
                    if key not in node:
                        raise ApiError(422, "Invalid", f"replace operation does not apply: doc is missing key: {path}")
                    node[key] = copy.deepcopy(op["value"])
            elif kind == "remove":
                if isinstance(node, list):
                    del node[int(key)]
                else:
                    if key not in node:
                        raise ApiError(422, "Invalid", f"remove operation does not apply: doc is missing path: {path}")
                    del node[key]
            else:
                raise ApiError(422, "Invalid", f"unknown JSON patch operation {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {path}: {exc}") from exc
    return doc


# --------------------------------------------------------------------------- selectors

_SET_RE = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(selector: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def label_selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in _split_selector(selector or ""):
        term = term.strip()
        m = _SET_RE.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (op == "in") != (labels.get(key) in values):
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term and term not in labels:
            return False
    return True



def _field_value(obj: Obj, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, bool):
        return "true" if node else "false"
    if node is None:
        return "0" if path in ("status.replicas", "status.succeeded") else ("false" if path == "spec.hostNetwork" else "")
    return str(node)


def parse_field_selector(resource: str, selector: str) -> list[tuple[str, bool, str]]:
    """``[(field path, negated, value)]``; a 400 for what a real API server refuses (syntax, or a
    field label it does not index for that resource)."""
    terms: list[tuple[str, bool, str]] = []
    kind = _KINDS.get(resource)
    for raw in _split_selector(selector or ""):
        term = raw.strip()
        if not term:
            continue
        m = re.match(r"^([^=!\s]+)\s*(==|=|!=)\s*(.*)$", term)
        if not m:
            raise _bad_request(f"invalid selector: '{selector}'; can't understand '{term}'")
        label, op, value = m.group(1), m.group(2), m.group(3).strip()
        if kind is not None and label not in ("metadata.name", "metadata.namespace", *kind.fields):
            raise _bad_request(f'field label not supported: {label}')
        terms.append((_FIELD_PATHS.get((resource, label), label), op == "!=", value))
    return terms


def field_selector_matches(selector: str, obj: Obj, resource: str = "") -> bool:
    return all((_field_value(obj, path) == value) != neg for path, neg, value in parse_field_selector(resource, selector))


def _match_labels_selector(sel: Obj) -> str:
    terms = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for expr in sel.get("matchExpressions") or []:
        op = expr["operator"]
        if op in ("In", "NotIn"):
            terms.append(f"{expr['key']} {op.lower()} ({','.join(expr.get('values') or [])})")
        elif op == "Exists":
            terms.append(expr["key"])
        else:
            terms.append("!" + expr["key"])
    return ",".join(terms)


# --------------------------------------------------------------------------- helpers for the store


def _template_hash(template: Obj) -> str:
    t = copy.deepcopy(template)
    (t.get("metadata") or {}).get("labels", {}).pop(HASH_LABEL, None)
    digest = hashlib.sha256(json.dumps(t, sort_keys=True).encode()).digest()
    return "".join(_HASH_ALPHABET[b % len(_HASH_ALPHABET)] for b in digest[:10])


def _without_hash(template: Obj) -> Obj:
    t = copy.deepcopy(template)
    labels = (t.get("metadata") or {}).get("labels")
    if labels:
        labels.pop(HASH_LABEL, None)
    return t


def _suffix(n: int = 5) -> str:
    return "".join(secrets.choice(_HASH_ALPHABET) for _ in range(n))


def _container_id() -> str:
    return "containerd://" + secrets.token_hex(32)


def _image_ref(image: str) -> str:
    """How the container runtime reports an image: ``nginx:1`` is ``docker.io/library/nginx:1``."""
    first, _, rest = image.partition("/")
    if not rest:
        return f"docker.io/library/{image}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{image}"
    return image


def _image_id(image: str) -> str:
    ref = _image_ref(image)
    repo = ref.split("@", 1)[0]
    last = repo.rsplit("/", 1)
    if ":" in last[-1]:
        repo = repo.rsplit(":", 1)[0]
    return f"{repo}@sha256:{hashlib.sha256(ref.encode()).hexdigest()}"


def _owner_ref(obj: Obj, *, block: bool = True) -> Obj:
    ref = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
           "uid": obj["metadata"]["uid"], "controller": True}
    if block:
        ref["blockOwnerDeletion"] = True
    return ref


def _owned_by(obj: Obj, uid: str) -> bool:
    return any(o.get("uid") == uid and o.get("controller") for o in obj["metadata"].get("ownerReferences") or [])


def _revision(rs: Obj) -> int:
    return int((rs["metadata"].get("annotations") or {}).get(REVISION, "0"))


def _fencepost(value: Any, total: int, *, round_up: bool) -> int:
    if isinstance(value, int):
        return value
    text = str(value or "0")
    if text.endswith("%"):
        share = int(text[:-1]) * total / 100
        return math.ceil(share) if round_up else math.floor(share)
    return int(text)


def _surge_and_unavailable(d: Obj) -> tuple[int, int]:
    """deploymentutil.ResolveFenceposts: maxSurge rounds up, maxUnavailable down, never both 0."""
    desired = int(d["spec"]["replicas"])
    ru = (d["spec"].get("strategy") or {}).get("rollingUpdate") or {}
    surge = _fencepost(ru.get("maxSurge", "25%"), desired, round_up=True)
    unavailable = _fencepost(ru.get("maxUnavailable", "25%"), desired, round_up=False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


def _max_unavailable(d: Obj) -> int:
    desired = int(d["spec"]["replicas"])
    if (d["spec"].get("strategy") or {}).get("type") != "RollingUpdate" or desired == 0:
        return 0
    return min(_surge_and_unavailable(d)[1], desired)


def _pod_ready(pod: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in pod["status"].get("conditions") or [])


def _cpu_target(hpa: Obj) -> int | None:
    for metric in hpa["spec"].get("metrics") or []:
        resource = metric.get("resource") or {}
        if metric.get("type") == "Resource" and resource.get("name") == "cpu":
            value = (resource.get("target") or {}).get("averageUtilization")
            return int(value) if value is not None else None
    return None


_CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


@dataclass
class _Rollout:
    mode: str
    step_seconds: float
    next_at: float = 0.0  # time.monotonic() at which the next starting pod becomes ready


_Key = tuple[str, str, str]


class _Links:
    """Which keys name each value (a controller's uid, the uid an event is about), and which values
    each key names: kept as the key's object is stored again or removed."""

    def __init__(self) -> None:
        self.keys: dict[str, set[_Key]] = {}
        self._values: dict[_Key, tuple[str, ...]] = {}

    def set(self, key: _Key, values: tuple[str, ...]) -> None:
        if values != self._values.get(key, ()):
            self.drop(key)
            for value in values:
                self.keys.setdefault(value, set()).add(key)
            if values:
                self._values[key] = values

    def drop(self, key: _Key) -> None:
        for value in self._values.pop(key, ()):
            keys = self.keys[value]
            keys.discard(key)
            if not keys:
                del self.keys[value]


class _Objects(dict[_Key, Obj]):
    """The stored objects, (resource, namespace, name) → object, also kept by (resource, namespace),
    by controller (the uids its ownerReferences name as controller) and, for events, by the uid
    they are about, in the dict's order: the controllers look up a namespace's replicasets or a
    replicaset's pods many times per PATCH, and scanning every object (the events first among them)
    was most of the emulator's CPU under load (issue 13). Only assignment, ``pop`` and ``del``
    change it (an object's links are read when it is stored: the emulator stores an object again
    whenever it changes one)."""

    def __init__(self, items: dict[_Key, Obj] | None = None) -> None:
        super().__init__()
        self.placed: dict[tuple[str, str], dict[str, Obj]] = {}
        self.owned = _Links()  # controller uid → the keys it controls
        self.about = _Links()  # an event's involvedObject uid → the events' keys
        self._pos: dict[_Key, int] = {}  # a key's place in the dict's order
        self._next = 0
        for key, obj in (items or {}).items():
            self[key] = obj

    def __setitem__(self, key: _Key, obj: Obj) -> None:
        if key not in self._pos:
            self._pos[key], self._next = self._next, self._next + 1
        super().__setitem__(key, obj)
        self.placed.setdefault(key[:2], {})[key[2]] = obj  # (a name already there keeps its place, as in the dict)
        refs = (obj.get("metadata") or {}).get("ownerReferences") or []
        self.owned.set(key, tuple(dict.fromkeys(r["uid"] for r in refs if isinstance(r, dict) and r.get("controller") and r.get("uid"))))
        involved = obj.get("involvedObject")
        subject = str(involved.get("uid") or "") if isinstance(involved, dict) else ""
        self.about.set(key, (subject,) if subject else ())

    def pop(self, key: _Key, *default: Any) -> Any:
        if key not in self:
            return super().pop(key, *default)
        place = self.placed[key[:2]]
        del place[key[2]]
        if not place:
            del self.placed[key[:2]]
        self.owned.drop(key)
        self.about.drop(key)
        del self._pos[key]
        return super().pop(key)

    def __delitem__(self, key: _Key) -> None:
        self.pop(key)

    def _unindexed(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("the cluster's objects change only by assignment, pop and del")

    update = setdefault = popitem = clear = _unindexed  # type: ignore[assignment]

    def of(self, resource: str, namespace: str) -> list[Obj]:
        return list(self.placed.get((resource, namespace), {}).values())

    def sorted_of(self, resource: str, namespace: str | None) -> list[tuple[_Key, Obj]]:
        """The items of one resource (in one namespace, or all), sorted by key as ``sorted(items())``
        sorts them: a list reads those, not every object."""
        places = [(resource, namespace)] if namespace is not None else sorted(p for p in self.placed if p[0] == resource)
        return [((res, ns, name), obj) for res, ns in places for name, obj in sorted(self.placed.get((res, ns), {}).items())]

    def _linked(self, links: _Links, uid: str, namespace: str, resource: str | None) -> list[tuple[_Key, Obj]]:
        keys = [k for k in links.keys.get(uid, ()) if k[1] == namespace and (resource is None or k[0] == resource)]
        return [(k, self[k]) for k in sorted(keys, key=self._pos.__getitem__)]

    def events_about(self, uid: str, namespace: str) -> list[Obj]:
        """The stored objects whose involvedObject is ``uid`` (events), in ``namespace``, in the dict's order."""
        return [o for _, o in self._linked(self.about, uid, namespace, None)]

    def controlled(self, uid: str, namespace: str, resource: str | None = None) -> list[tuple[_Key, Obj]]:
        """The items whose controller is ``uid``, in ``namespace`` (of ``resource``, or any), in the dict's order."""
        return self._linked(self.owned, uid, namespace, resource)


class Cluster:
    """The objects and the controllers (deployment, replicaset, HPA, job). Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.rv = 1000
        self.objects = _Objects()  # (resource, namespace, name) -> object
        self.events: list[tuple[int, str, str, Obj]] = []  # the watch log: (rv, resource, type, object)
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content-type) for tests
        self.namespaces: set[str] = {"default", "kube-system"}
        self.logs: dict[str, list[tuple[datetime, str]]] = {}  # containerID -> (time, line)
        self.job_behaviour = "complete"  # what Jobs created from now on do: complete, fail, running
        self._rollouts: dict[tuple[str, str], _Rollout] = {}
        self._starting: set[str] = set()  # uids of pods a paced rollout has not made ready yet (starting, stuck)
        self._progress_at: dict[tuple[str, str], float] = {}  # last progress of a rollout (monotonic)
        self._utilization: dict[tuple[str, str], int] = {}  # (namespace, hpa) -> cpu %
        self._pod_seq: dict[str, int] = {}  # uid -> creation order
        self._seq = 0
        self._ips = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._controller: threading.Thread | None = None

    # -- persistence (`opsbot dev` keeps the sandbox cluster in its data directory)

    def snapshot(self) -> Obj:
        with self.lock:
            return {"rv": self.rv, "namespaces": sorted(self.namespaces),
                    "objects": [{"resource": r, "object": copy.deepcopy(o)} for (r, _, _), o in sorted(self.objects.items())],
                    "logs": {cid: [[_nano(t), line] for t, line in lines] for cid, lines in self.logs.items()}}

    def restore(self, state: Obj) -> None:
        with self.lock:
            self.rv = int(state["rv"])
            self.namespaces = set(state["namespaces"])
            self.objects = _Objects({(e["resource"], e["object"]["metadata"]["namespace"], e["object"]["metadata"]["name"]):
                                     e["object"] for e in state["objects"]})
            self.logs = {cid: [(_parse_time(t) or datetime.now(UTC), line) for t, line in lines]
                         for cid, lines in (state.get("logs") or {}).items()}
            self.events.clear()

    # -- generic helpers

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _record(self, resource: str, kind: str, obj: Obj) -> None:
        self.events.append((int(obj["metadata"]["resourceVersion"]), resource, kind, copy.deepcopy(obj)))
        del self.events[:-2000]
        self.changed.notify_all()

    def _put(self, resource: str, obj: Obj, event: str) -> Obj:
        meta = obj["metadata"]
        meta["resourceVersion"] = self._next_rv()
        self.objects[(resource, meta["namespace"], meta["name"])] = obj
        self._record(resource, event, obj)
        return obj

    def _delete(self, resource: str, namespace: str, name: str) -> Obj:
        obj: Obj = self.objects.pop((resource, namespace, name))
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._record(resource, "DELETED", obj)
        if resource == PODS:
            uid = obj["metadata"]["uid"]
            self._starting.discard(uid)
            self._pod_seq.pop(uid, None)
            for cs in obj["status"].get("containerStatuses") or []:
                self.logs.pop(cs.get("containerID") or "", None)
                self.logs.pop(((cs.get("lastState") or {}).get("terminated") or {}).get("containerID") or "", None)
        return obj

    def _delete_cascade(self, resource: str, namespace: str, name: str) -> Obj:
        """Delete an object and, like the garbage collector, everything it controls."""
        obj = self._delete(resource, namespace, name)
        uid = obj["metadata"]["uid"]
        for (res, ns, child), o in self.objects.controlled(uid, namespace):
            if res != EVENTS and _owned_by(o, uid) and (res, ns, child) in self.objects:
                self._delete_cascade(res, ns, child)
        return obj

    def _obj(self, resource: str, namespace: str, name: str) -> Obj:
        """The stored object itself (not a copy), or a 404."""
        obj = self.objects.get((resource, namespace, name))
        if obj is None:
            raise _not_found(resource, name)
        return obj

    def get(self, resource: str, namespace: str, name: str) -> Obj:
        with self.lock:
            return copy.deepcopy(self._obj(resource, namespace, name))

    def list_objects(self, resource: str, namespace: str | None, label_selector: str = "", field_selector: str = "") -> list[Obj]:
        terms = parse_field_selector(resource, field_selector)
        with self.lock:
            return [
                copy.deepcopy(o)
                for (res, ns, _), o in self.objects.sorted_of(resource, namespace)
                if label_selector_matches(label_selector, o["metadata"].get("labels") or {})
                and all((_field_value(o, path) == value) != neg for path, neg, value in terms)
            ]

    def _all(self, resource: str, namespace: str) -> list[Obj]:
        return self.objects.of(resource, namespace)

    # -- deployments

    def create_deployment(self, namespace: str, body: Obj) -> Obj:
        with self.lock:
            d = copy.deepcopy(body)
            d["apiVersion"], d["kind"] = "apps/v1", "Deployment"
            meta = d.setdefault("metadata", {})
            name = meta.get("name")
            if not name:
                raise ApiError(422, "Invalid", "Deployment.apps is invalid: metadata.name: Required value")
            if (DEPLOYMENTS, namespace, name) in self.objects:
                raise _already_exists(DEPLOYMENTS, name)
            self.namespaces.add(namespace)
            drop_empty_fields("apps.Deployment", d)
            meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            meta.setdefault("annotations", {})
            default_deployment(d)
            self._validate_deployment(d)
            d["status"] = {}
            self._put(DEPLOYMENTS, d, "ADDED")
            self._reconcile(namespace, name)
            created = self.get(DEPLOYMENTS, namespace, name)
            self._autoscale_target(namespace, "Deployment", name)
            return created

    def _validate_deployment(self, d: Obj) -> None:
        spec = d["spec"]
        selector = spec.get("selector") or {}
        labels = (spec["template"].get("metadata") or {}).get("labels") or {}
        if not selector.get("matchLabels") and not selector.get("matchExpressions"):
            raise ApiError(422, "Invalid", f'Deployment.apps "{d["metadata"]["name"]}" is invalid: spec.selector: Required value')
        if not label_selector_matches(_match_labels_selector(selector), labels):
            raise ApiError(422, "Invalid", f'Deployment.apps "{d["metadata"]["name"]}" is invalid: spec.template.metadata.labels: '
                           "Invalid value: `selector` does not match template `labels`")
        if not isinstance(spec.get("replicas"), int) or spec["replicas"] < 0:
            raise ApiError(422, "Invalid", f'Deployment.apps "{d["metadata"]["name"]}" is invalid: spec.replicas: '
                           "Invalid value: must be greater than or equal to 0")
        if not spec["template"].get("spec", {}).get("containers"):
            raise ApiError(422, "Invalid", f'Deployment.apps "{d["metadata"]["name"]}" is invalid: '
                           "spec.template.spec.containers: Required value")

    def update_deployment(self, namespace: str, name: str, new: Obj, *, subresource: str = "") -> Obj:
        """Replace semantics shared by PUT and PATCH: resourceVersion precondition, defaulting,
        generation bump on spec change, then the controllers. The answer is the object as this
        write left it; an HPA that puts the replicas back in range writes after it."""
        with self.lock:
            current = self.get(DEPLOYMENTS, namespace, name)
            new = copy.deepcopy(new)
            meta = new.setdefault("metadata", {})
            rv = meta.get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                raise _conflict(DEPLOYMENTS, name)
            if meta.get("name", name) != name:
                raise ApiError(400, "BadRequest",
                               f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})")
            # Fields the server owns.
            for key in ("uid", "creationTimestamp", "namespace", "generation"):
                meta[key] = current["metadata"].get(key)
            meta["name"] = name
            new["apiVersion"], new["kind"] = "apps/v1", "Deployment"
            if subresource == "status":
                current["status"] = new.get("status", {})
                new = current
            else:
                drop_empty_fields("apps.Deployment", new)
                new["status"] = current.get("status", {})
                default_deployment(new)
                self._validate_deployment(new)
                if current.get("spec", {}).get("selector") != new["spec"].get("selector"):
                    raise ApiError(422, "Invalid", f'Deployment.apps "{name}" is invalid: spec.selector: '
                                   "Invalid value: field is immutable")
                if new["spec"] != current["spec"]:
                    meta["generation"] = int(current["metadata"]["generation"]) + 1
            self._put(DEPLOYMENTS, new, "MODIFIED")
            self._reconcile(namespace, name)
            result = self.get(DEPLOYMENTS, namespace, name)
            self._autoscale_target(namespace, "Deployment", name)
            return result

    def delete_deployment(self, namespace: str, name: str) -> Obj:
        with self.lock:
            d = self.get(DEPLOYMENTS, namespace, name)
            for rs in self._owned_replicasets(d):
                self._scale_rs(rs, 0)
                self._delete(REPLICASETS, namespace, rs["metadata"]["name"])
            self._rollouts.pop((namespace, name), None)
            self._progress_at.pop((namespace, name), None)
            deleted = self._delete(DEPLOYMENTS, namespace, name)
            self._autoscale_target(namespace, "Deployment", name)
            return deleted

    def scale_of(self, d: Obj) -> Obj:
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {k: d["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")},
            "spec": {"replicas": d["spec"]["replicas"]},
            "status": {"replicas": d["status"].get("replicas", 0), "selector": _match_labels_selector(d["spec"]["selector"])},
        }

    # -- rollout pacing (a test knob) and the controller thread

    def set_rollout(self, namespace: str, name: str, mode: str = "instant", *, step_seconds: float = 0.5) -> None:
        """How the rollouts of one deployment progress from now on: ``instant`` (the default: done
        at once), ``steps`` (one new pod ready per ``step_seconds``) or ``stuck`` (new pods never
        ready; ``ProgressDeadlineExceeded`` after ``spec.progressDeadlineSeconds``). The deployment
        need not exist yet. Paced modes need the controller thread (a started KubeApiServer)."""
        if mode not in ROLLOUT_MODES:
            raise ValueError(f"mode must be one of {', '.join(ROLLOUT_MODES)}, not {mode!r}")
        if step_seconds <= 0:
            raise ValueError("step_seconds must be positive")
        with self.lock:
            if mode == "instant":
                self._rollouts.pop((namespace, name), None)
            else:
                self._rollouts[(namespace, name)] = _Rollout(mode, step_seconds, time.monotonic() + step_seconds)
            if (DEPLOYMENTS, namespace, name) in self.objects:
                self._reconcile(namespace, name)
        self._wake.set()

    def start_controller(self) -> None:
        """Run paced rollouts (and their progress deadlines) on a background thread."""
        with self.lock:
            if self._controller is not None:
                return
            self._stop.clear()
            self._controller = threading.Thread(target=self._run_controller, name="kube-controller", daemon=True)
            self._controller.start()

    def stop_controller(self) -> None:
        with self.lock:
            thread, self._controller = self._controller, None
        self._stop.set()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run_controller(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            with self.lock:
                paced = [key for key, r in self._rollouts.items() if r.mode != "instant"]
                for namespace, name in paced:
                    if (DEPLOYMENTS, namespace, name) in self.objects and not self._settled(namespace, name):
                        try:
                            self._reconcile(namespace, name)
                        except Exception:  # a bug in the emulator must not stop every later rollout
                            log.exception("the emulated deployment controller failed on %s/%s", namespace, name)
            self._wake.wait(0.05 if paced else 1.0)

    def _settled(self, namespace: str, name: str) -> bool:
        """Nothing left for the paced controller to do: no pod waiting to become ready, and the
        rollout complete or past its deadline (a write that starts another calls _reconcile itself)."""
        d = self.objects[(DEPLOYMENTS, namespace, name)]
        uid = d["metadata"]["uid"]
        progressing: Obj = next((c for c in (d.get("status") or {}).get("conditions") or [] if c["type"] == "Progressing"), {})
        if progressing.get("reason") not in ("NewReplicaSetAvailable", "ProgressDeadlineExceeded"):
            return False
        if self._rollouts[(namespace, name)].mode == "stuck":  # its waiting pods wait for ever
            return True
        owned = {rs["metadata"]["uid"] for _, rs in self.objects.controlled(uid, namespace, REPLICASETS) if _owned_by(rs, uid)}
        return not any(p["metadata"]["uid"] in self._starting and _owned_by(p, o)
                       for o in owned for _, p in self.objects.controlled(o, namespace, PODS))

    # -- the deployment controller

    def _owned_replicasets(self, d: Obj) -> list[Obj]:
        uid = d["metadata"]["uid"]
        return [rs for _, rs in self.objects.controlled(uid, d["metadata"]["namespace"], REPLICASETS) if _owned_by(rs, uid)]

    def _rs_pods(self, rs: Obj) -> list[Obj]:
        uid = rs["metadata"]["uid"]
        return [p for _, p in self.objects.controlled(uid, rs["metadata"]["namespace"], PODS) if _owned_by(p, uid)]

    def _available(self, rs: Obj) -> int:
        return sum(1 for p in self._rs_pods(rs) if _pod_ready(p))

    def _new_replicaset(self, d: Obj) -> tuple[Obj, str]:
        """The ReplicaSet of the current template, made or re-used: (rs, "created" | "found" | "")."""
        namespace, name = d["metadata"]["namespace"], d["metadata"]["name"]
        owned = self._owned_replicasets(d)
        template = d["spec"]["template"]
        new_rs = next((rs for rs in owned if _without_hash(rs["spec"]["template"]) == _without_hash(template)), None)
        max_rev = max((_revision(rs) for rs in owned), default=0)
        d_ann = d["metadata"].setdefault("annotations", {})
        if new_rs is None:
            h = _template_hash(template)
            rs_template = copy.deepcopy(template)
            rs_template.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = h
            selector = copy.deepcopy(d["spec"]["selector"])
            selector.setdefault("matchLabels", {})[HASH_LABEL] = h
            skip = (REVISION, REVISION_HISTORY, "kubectl.kubernetes.io/last-applied-configuration")
            annotations = {k: v for k, v in d_ann.items() if k not in skip}
            annotations.update({
                REVISION: str(max_rev + 1),
                "deployment.kubernetes.io/desired-replicas": str(d["spec"]["replicas"]),
                "deployment.kubernetes.io/max-replicas": str(d["spec"]["replicas"] + 1),
            })
            new_rs = {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": f"{name}-{h}",
                    "namespace": namespace,
                    "uid": str(uuid.uuid4()),
                    "creationTimestamp": _now(),
                    "generation": 1,
                    "labels": dict(rs_template["metadata"]["labels"]),
                    "annotations": annotations,
                    "ownerReferences": [_owner_ref(d)],
                },
                "spec": {"replicas": 0, "selector": selector, "template": rs_template},
                "status": {"replicas": 0, "observedGeneration": 1},
            }
            self._put(REPLICASETS, new_rs, "ADDED")
            return new_rs, "created"
        ann = new_rs["metadata"].setdefault("annotations", {})
        old_rev = int(ann.get(REVISION, "0"))
        if old_rev < max_rev:  # an old template came back: it becomes the newest revision
            history = [h for h in ann.get(REVISION_HISTORY, "").split(",") if h]
            ann[REVISION_HISTORY] = ",".join([*history, str(old_rev)])
            ann[REVISION] = str(max_rev + 1)
            # Like the real controller, the annotations of the deployment follow the RS (change-cause).
            if "kubernetes.io/change-cause" in d_ann:
                ann["kubernetes.io/change-cause"] = d_ann["kubernetes.io/change-cause"]
            self._put(REPLICASETS, new_rs, "MODIFIED")
            return new_rs, "found"
        return new_rs, ""

    def _reconcile(self, namespace: str, name: str) -> None:
        d = self.objects.get((DEPLOYMENTS, namespace, name))
        if d is None:
            return
        new_rs, how = self._new_replicaset(d)
        desired = int(d["spec"]["replicas"])
        olds = sorted((rs for rs in self._owned_replicasets(d) if rs["metadata"]["name"] != new_rs["metadata"]["name"]),
                      key=_revision)
        rollout = self._rollouts.get((namespace, name))
        if rollout is None:
            self._scale_rs(new_rs, desired, d)
            for pod in self._rs_pods(new_rs):  # left over from a paced rollout: ready at once
                if pod["metadata"]["uid"] in self._starting:
                    self._make_ready(pod)
            for rs in olds:
                self._scale_rs(rs, 0, d)
        else:
            self._paced(d, new_rs, olds, rollout)
        # Cleanup beyond revisionHistoryLimit: old, scaled-down ReplicaSets go first.
        idle = [rs for rs in olds if not rs["spec"]["replicas"] and not self._rs_pods(rs)]
        for rs in idle[: max(0, len(olds) - int(d["spec"].get("revisionHistoryLimit", 10)))]:
            self._delete(REPLICASETS, namespace, rs["metadata"]["name"])
        self._deployment_status(d, new_rs, how)

    def _paced(self, d: Obj, new_rs: Obj, olds: list[Obj], rollout: _Rollout) -> None:
        """One pass of the rolling-update controller (rolling.go), with pod readiness paced."""
        now = time.monotonic()
        if rollout.mode == "steps" and now >= rollout.next_at:
            starting = sorted((p for p in self._rs_pods(new_rs) if p["metadata"]["uid"] in self._starting),
                              key=lambda p: self._pod_seq.get(p["metadata"]["uid"], 0))
            if starting:
                self._make_ready(starting[0])
                rollout.next_at = now + rollout.step_seconds
        state = "starting" if rollout.mode == "steps" else "stuck"
        desired = int(d["spec"]["replicas"])
        recreate = (d["spec"].get("strategy") or {}).get("type") == "Recreate"
        for _ in range(4 * (desired + len(olds)) + 4):  # until nothing more can be done now
            changed = False
            if recreate:
                for rs in olds:
                    if rs["spec"]["replicas"]:
                        self._scale_rs(rs, 0, d)
                        changed = True
                if new_rs["spec"]["replicas"] != desired:
                    self._scale_rs(new_rs, desired, d, state=state)
                    changed = True
            else:
                changed = self._roll_new(d, new_rs, olds, state) | self._roll_old(d, new_rs, olds)
            if not changed:
                break
        if rollout.mode == "steps" and rollout.next_at <= now and any(
                p["metadata"]["uid"] in self._starting for p in self._rs_pods(new_rs)):
            rollout.next_at = now + rollout.step_seconds

    def _roll_new(self, d: Obj, new_rs: Obj, olds: list[Obj], state: str) -> bool:
        desired, current = int(d["spec"]["replicas"]), int(new_rs["spec"]["replicas"])
        if current == desired:
            return False
        if current > desired:
            self._scale_rs(new_rs, desired, d)
            return True
        surge, _ = _surge_and_unavailable(d)
        total = current + sum(int(rs["spec"]["replicas"]) for rs in olds)
        if total >= desired + surge:
            return False
        self._scale_rs(new_rs, current + min(desired + surge - total, desired - current), d, state=state)
        return True

    def _roll_old(self, d: Obj, new_rs: Obj, olds: list[Obj]) -> bool:
        old_total = sum(int(rs["spec"]["replicas"]) for rs in olds)
        if not old_total:
            return False
        desired = int(d["spec"]["replicas"])
        _, unavailable = _surge_and_unavailable(d)
        min_available = desired - unavailable
        new_unavailable = int(new_rs["spec"]["replicas"]) - self._available(new_rs)
        max_down = old_total + int(new_rs["spec"]["replicas"]) - min_available - new_unavailable
        if max_down <= 0:
            return False
        changed = False
        for rs in olds:  # unhealthy old replicas go first
            unhealthy = int(rs["spec"]["replicas"]) - self._available(rs)
            if max_down <= 0:
                break
            if unhealthy > 0:
                down = min(max_down, unhealthy)
                self._scale_rs(rs, int(rs["spec"]["replicas"]) - down, d)
                max_down -= down
                changed = True
        to_remove = sum(self._available(rs) for rs in [new_rs, *olds]) - min_available
        for rs in olds:
            if to_remove <= 0:
                break
            have = int(rs["spec"]["replicas"])
            if have:
                down = min(have, to_remove)
                self._scale_rs(rs, have - down, d)
                to_remove -= down
                changed = True
        return changed

    def _deployment_status(self, d: Obj, new_rs: Obj, how: str) -> None:
        namespace, name = d["metadata"]["namespace"], d["metadata"]["name"]
        owned = self._owned_replicasets(d)
        for rs in owned:
            self._refresh_rs(rs)
        desired = int(d["spec"]["replicas"])
        replicas = sum(len(self._rs_pods(rs)) for rs in owned)
        updated = len(self._rs_pods(new_rs))
        available = sum(self._available(rs) for rs in owned)
        unavailable = max(0, sum(int(rs["spec"]["replicas"]) for rs in owned) - available)
        old: Obj = d.get("status") or {}
        status: Obj = {"observedGeneration": d["metadata"]["generation"]}
        for field, value in (("replicas", replicas), ("updatedReplicas", updated), ("readyReplicas", available),
                             ("availableReplicas", available), ("unavailableReplicas", unavailable)):
            if value:
                status[field] = value
        conditions = {c["type"]: c for c in old.get("conditions") or []}
        now, mono, key = _now(), time.monotonic(), (namespace, name)

        def condition(kind: str, state: str, reason: str, message: str, *, progressed: bool = False) -> None:
            prev = conditions.get(kind)
            if progressed:
                self._progress_at[key] = mono
            if prev and prev["status"] == state and prev["reason"] == reason and not progressed:
                return
            conditions[kind] = {"type": kind, "status": state, "lastUpdateTime": now,
                                "lastTransitionTime": prev["lastTransitionTime"] if prev and prev["status"] == state else now,
                                "reason": reason, "message": message}

        if available >= desired - _max_unavailable(d):
            condition("Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
        else:
            condition("Available", "False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability.")
        rs_name = new_rs["metadata"]["name"]
        if how == "created":
            condition("Progressing", "True", "NewReplicaSetCreated", f'Created new replica set "{rs_name}"', progressed=True)
        elif how == "found":
            condition("Progressing", "True", "FoundNewReplicaSet", f'Found new replica set "{rs_name}"', progressed=True)
        progressing = conditions.get("Progressing")
        done_before = replicas == updated and progressing is not None and progressing["reason"] == "NewReplicaSetAvailable"
        if not done_before:
            deadline = d["spec"].get("progressDeadlineSeconds")
            if updated == desired and replicas == desired and available == desired:
                condition("Progressing", "True", "NewReplicaSetAvailable", f'ReplicaSet "{rs_name}" has successfully progressed.',
                          progressed=True)
            elif (status.get("updatedReplicas", 0) > old.get("updatedReplicas", 0)
                  or replicas - updated < old.get("replicas", 0) - old.get("updatedReplicas", 0)
                  or available > old.get("readyReplicas", 0) or available > old.get("availableReplicas", 0)):
                condition("Progressing", "True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.', progressed=True)
            elif progressing is not None and deadline is not None and (
                    progressing["reason"] == "ProgressDeadlineExceeded"
                    or mono - self._progress_at.setdefault(key, mono) > int(deadline)):
                condition("Progressing", "False", "ProgressDeadlineExceeded", f'ReplicaSet "{rs_name}" has timed out progressing.')
        status["conditions"] = [conditions[k] for k in ("Available", "Progressing") if k in conditions]
        d_ann = d["metadata"].setdefault("annotations", {})
        if d_ann.get(REVISION) != str(_revision(new_rs)) or old != status:
            d_ann[REVISION] = str(_revision(new_rs))
            d["status"] = status
            self._put(DEPLOYMENTS, d, "MODIFIED")

    def _refresh_rs(self, rs: Obj) -> None:
        pods = self._rs_pods(rs)
        ready = sum(1 for p in pods if _pod_ready(p))
        status: Obj = {"replicas": len(pods)}
        if pods:
            status["fullyLabeledReplicas"] = len(pods)
        if ready:
            status.update(readyReplicas=ready, availableReplicas=ready)
        status["observedGeneration"] = rs["metadata"]["generation"]
        if rs.get("status") != status:
            rs["status"] = status
            self._put(REPLICASETS, rs, "MODIFIED")

    def _scale_rs(self, rs: Obj, replicas: int, d: Obj | None = None, *, state: str = "ready") -> None:
        """Scale a ReplicaSet (the replicaset controller creating or deleting pods at once); with the
        deployment ``d``, as its controller, with the ``ScalingReplicaSet`` event."""
        before = int(rs["spec"]["replicas"])
        pods = self._rs_pods(rs)

        def doomed_first(p: Obj) -> tuple[int, int, int, int]:  # controller.ActivePods: who goes first
            phase = {"Pending": 0, "Unknown": 1}.get(p["status"].get("phase", ""), 2)
            restarts = sum(int(c.get("restartCount", 0)) for c in p["status"].get("containerStatuses") or [])
            return phase, int(_pod_ready(p)), -restarts, -self._pod_seq.get(p["metadata"]["uid"], 0)

        for pod in sorted(pods, key=doomed_first)[: max(0, len(pods) - replicas)]:
            self._delete(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
        for _ in range(replicas - len(pods)):
            self._create_pod(rs, rs["spec"]["template"], state=state)
        if before != replicas:
            rs["spec"]["replicas"] = replicas
            self._put(REPLICASETS, rs, "MODIFIED")
            if d is not None:
                direction = "up" if replicas > before else "down"
                self._emit(d, "Normal", "ScalingReplicaSet",
                           f"Scaled {direction} replica set {rs['metadata']['name']} to {replicas} from {before}",
                           component="deployment-controller")
        self._refresh_rs(rs)

    # -- pods

    def _create_pod(self, owner: Obj, template: Obj, *, state: str, labels: dict[str, str] | None = None) -> Obj:
        """A pod of ``owner`` (a ReplicaSet or a Job), scheduled on the one node, in ``state``:
        ready, starting (ContainerCreating), stuck (ImagePullBackOff), succeeded or failed."""
        template = copy.deepcopy(template)
        meta = template.get("metadata") or {}
        namespace = owner["metadata"]["namespace"]
        spec = dict(template.get("spec") or {})
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("priority", 0)
        spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
        spec.setdefault("tolerations", [
            {"key": f"node.kubernetes.io/{t}", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            for t in ("not-ready", "unreachable")])
        spec["nodeName"] = NODE_NAME
        name = f"{owner['metadata']['name']}-{_suffix()}"
        while (PODS, namespace, name) in self.objects:
            name = f"{owner['metadata']['name']}-{_suffix()}"
        pod: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "generateName": f"{owner['metadata']['name']}-",
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _now(),
                "labels": dict(meta.get("labels") or {}) | (labels or {}),
                "ownerReferences": [_owner_ref(owner)],
            },
            "spec": spec,
            "status": {"phase": "Pending", "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}], "startTime": _now(),
                       "qosClass": "BestEffort", "conditions": [], "containerStatuses": []},
        }
        if meta.get("annotations"):
            pod["metadata"]["annotations"] = dict(meta["annotations"])
        self._seq += 1
        self._pod_seq[pod["metadata"]["uid"]] = self._seq
        statuses = []
        for c in spec.get("containers") or []:
            cs: Obj = {"name": c["name"], "image": _image_ref(str(c.get("image", ""))), "imageID": "", "ready": False,
                       "restartCount": 0, "started": False, "lastState": {}}
            if state == "ready":
                cs.update(imageID=_image_id(str(c.get("image", ""))), containerID=_container_id(), ready=True, started=True,
                          state={"running": {"startedAt": _now()}})
            elif state == "starting":
                cs["state"] = {"waiting": {"reason": "ContainerCreating"}}
            elif state == "stuck":
                cs["state"] = {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{c.get("image", "")}"'}}
            else:  # succeeded / failed: a job's pod that ran to its end
                ok = state == "succeeded"
                cs.update(imageID=_image_id(str(c.get("image", ""))), containerID=_container_id(),
                          state={"terminated": {"exitCode": 0 if ok else 1, "reason": "Completed" if ok else "Error",
                                                "startedAt": _now(), "finishedAt": _now()}})
                cs["state"]["terminated"]["containerID"] = cs["containerID"]
            statuses.append(cs)
        pod["status"]["containerStatuses"] = statuses
        if state != "starting":
            self._assign_ip(pod)
        if state in ("starting", "stuck"):  # not ready until the rollout says so
            self._starting.add(pod["metadata"]["uid"])
        self._pod_conditions(pod)
        self._put(PODS, pod, "ADDED")
        if state == "stuck":
            for c in spec.get("containers") or []:
                image = c.get("image", "")
                where = f"spec.containers{{{c['name']}}}"
                self._emit(pod, "Warning", "Failed", f'Failed to pull image "{image}": rpc error: code = NotFound desc = '
                           f'failed to pull and unpack image "{_image_ref(image)}": not found', field_path=where)
                self._emit(pod, "Normal", "BackOff", f'Back-off pulling image "{image}"', field_path=where)
        return pod

    def _assign_ip(self, pod: Obj) -> None:
        if not pod["status"].get("podIP"):
            self._ips += 1
            ip = f"10.244.{(self._ips // 250) % 250}.{self._ips % 250 + 2}"
            pod["status"].update(podIP=ip, podIPs=[{"ip": ip}])

    def _pod_conditions(self, pod: Obj) -> None:
        """Phase and conditions from the container statuses (what the kubelet reports)."""
        st = pod["status"]
        statuses = st.get("containerStatuses") or []
        states = [next(iter(cs.get("state") or {"waiting": {}})) for cs in statuses]
        if statuses and all(s == "terminated" for s in states):
            ok = all((cs["state"]["terminated"].get("exitCode") == 0) for cs in statuses)
            st["phase"] = "Succeeded" if ok else "Failed"
        elif any(s == "running" for s in states) or any(cs.get("restartCount") or cs.get("lastState") for cs in statuses):
            st["phase"] = "Running"
        else:
            st["phase"] = "Pending"
        ready = bool(statuses) and all(cs.get("ready") for cs in statuses)
        unready = [cs["name"] for cs in statuses if not cs.get("ready")]
        done = st["phase"] in ("Succeeded", "Failed")
        old = {c["type"]: c for c in st.get("conditions") or []}
        now = _now()

        def cond(kind: str, ok: bool, reason: str = "", message: str = "") -> Obj:
            state = "True" if ok else "False"
            prev = old.get(kind)
            c: Obj = {"type": kind, "status": state, "lastProbeTime": None,
                      "lastTransitionTime": prev["lastTransitionTime"] if prev and prev["status"] == state else now}
            if reason:
                c["reason"] = reason
            if message:
                c["message"] = message
            return c

        not_ready = ("PodCompleted", "") if done else ("ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]")
        st["conditions"] = [
            cond("PodReadyToStartContainers", bool(st.get("podIP")) and not done),
            cond("Initialized", True, *(("PodCompleted",) if done else ())),
            cond("Ready", ready, *(() if ready else not_ready)),
            cond("ContainersReady", ready, *(() if ready else not_ready)),
            cond("PodScheduled", True),
        ]

    def _make_ready(self, pod: Obj) -> None:
        self._starting.discard(pod["metadata"]["uid"])
        for cs, c in zip(pod["status"]["containerStatuses"], pod["spec"].get("containers") or [], strict=False):
            cs.update(imageID=_image_id(str(c.get("image", ""))), containerID=_container_id(), ready=True, started=True,
                      state={"running": {"startedAt": _now()}})
        self._assign_ip(pod)
        self._pod_conditions(pod)
        self._put(PODS, pod, "MODIFIED")

    def _pod_changed(self, pod: Obj) -> None:
        """A pod's readiness changed: its owners' statuses follow."""
        self._pod_conditions(pod)
        self._put(PODS, pod, "MODIFIED")
        namespace = pod["metadata"]["namespace"]
        for ref in pod["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "ReplicaSet":
                rs = self.objects.get((REPLICASETS, namespace, ref["name"]))
                if rs is None:
                    continue
                self._refresh_rs(rs)
                for dref in rs["metadata"].get("ownerReferences") or []:
                    if dref.get("kind") == "Deployment":
                        self._reconcile(namespace, dref["name"])

    def _container_status(self, pod: Obj, container: str | None) -> Obj:
        statuses = pod["status"].get("containerStatuses") or []
        if container is None:
            if not statuses:
                raise ValueError(f"pod {pod['metadata']['name']} has no containers")
            first: Obj = statuses[0]
            return first
        for cs in statuses:
            if cs["name"] == container:
                found: Obj = cs
                return found
        raise ValueError(f"pod {pod['metadata']['name']} has no container {container!r}")

    def pods_of(self, namespace: str, deployment_name: str) -> list[Obj]:
        """Copies of the pods of every ReplicaSet of the deployment, by name."""
        with self.lock:
            d = self._obj(DEPLOYMENTS, namespace, deployment_name)
            pods = [p for rs in self._owned_replicasets(d) for p in self._rs_pods(rs)]
            return [copy.deepcopy(p) for p in sorted(pods, key=lambda p: p["metadata"]["name"])]

    def crash_pod(self, namespace: str, pod_name: str, *, container: str | None = None, reason: str = "Error",
                  exit_code: int = 1, back_off: bool = True) -> Obj:
        """The container (the pod's first when not named) exits: restartCount + 1, ``lastState``
        terminated with this reason and exit code. With ``back_off`` (the default) it then waits in
        ``CrashLoopBackOff`` (not ready, a ``BackOff`` Warning event); without, it is running (and
        ready) again at once. Current logs become the previous container's. Returns the pod."""
        with self.lock:
            pod = self._obj(PODS, namespace, pod_name)
            cs = self._container_status(pod, container)
            running = (cs.get("state") or {}).get("running")
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if running is None and waiting.get("reason") != "CrashLoopBackOff":
                raise ValueError(f"container {cs['name']} of pod {pod_name} is not running")
            now = _now()
            if running is not None:
                ended, started = cs.get("containerID") or _container_id(), running.get("startedAt", now)
            else:  # it was restarted after its back-off, and died again
                ended, started = _container_id(), now
            cs["lastState"] = {"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": started,
                                              "finishedAt": now, "containerID": ended}}
            cs["restartCount"] = int(cs.get("restartCount", 0)) + 1
            cs["containerID"] = ended
            if back_off:
                cs.update(ready=False, started=False, state={"waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {min(10 * 2 ** (cs['restartCount'] - 1), 300)}s restarting failed "
                               f"container={cs['name']} pod={pod_name}_{namespace}({pod['metadata']['uid']})"}})
                self._emit(pod, "Warning", "BackOff", f"Back-off restarting failed container {cs['name']} in pod "
                           f"{pod_name}_{namespace}({pod['metadata']['uid']})", field_path=f"spec.containers{{{cs['name']}}}")
            else:
                cs.update(containerID=_container_id(), ready=True, started=True, state={"running": {"startedAt": now}})
            self._pod_changed(pod)
            return copy.deepcopy(pod)

    def recover_pod(self, namespace: str, pod_name: str, *, container: str | None = None) -> Obj:
        """A container in CrashLoopBackOff starts again (a new container instance) and is ready."""
        with self.lock:
            pod = self._obj(PODS, namespace, pod_name)
            cs = self._container_status(pod, container)
            if ((cs.get("state") or {}).get("waiting") or {}).get("reason") != "CrashLoopBackOff":
                raise ValueError(f"container {cs['name']} of pod {pod_name} is not in CrashLoopBackOff")
            cs.update(containerID=_container_id(), ready=True, started=True, state={"running": {"startedAt": _now()}})
            self._pod_changed(pod)
            return copy.deepcopy(pod)

    # -- logs

    @staticmethod
    def _log_source(pod: Obj, cs: Obj, previous: bool) -> str:
        """The containerID whose logs are read, or the kubelet's refusal (validateContainerLogStatus)."""
        name, pod_name = cs["name"], pod["metadata"]["name"]
        last = (cs.get("lastState") or {}).get("terminated")
        state = cs.get("state") or {}
        if previous:
            if not last or not last.get("containerID"):
                raise _bad_request(f'previous terminated container "{name}" in pod "{pod_name}" not found')
            return str(last["containerID"])
        if "running" in state:
            return str(cs["containerID"])
        if "terminated" in state:
            cid = state["terminated"].get("containerID") or (last or {}).get("containerID")
            if not cid:
                raise _bad_request(f'container "{name}" in pod "{pod_name}" is terminated')
            return str(cid)
        if last and last.get("containerID"):
            return str(last["containerID"])
        reason = (state.get("waiting") or {}).get("reason")
        if reason == "ErrImagePull":
            raise _bad_request(f'container "{name}" in pod "{pod_name}" is waiting to start: image can\'t be pulled')
        if reason == "ImagePullBackOff":
            raise _bad_request(f'container "{name}" in pod "{pod_name}" is waiting to start: trying and failing to pull image')
        if reason:
            raise _bad_request(f'container "{name}" in pod "{pod_name}" is waiting to start: {reason}')
        raise _bad_request(f'container "{name}" in pod "{pod_name}" is waiting to start - no logs yet')

    def append_log(self, namespace: str, pod: str, lines: str | Iterable[str], *, container: str | None = None,
                   previous: bool = False, at: datetime | None = None) -> None:
        """Log lines (a string is split into lines) written at ``at`` (default now) by the container
        instance that ``kubectl logs`` reads, or with ``previous`` by the one ``--previous`` reads
        (there is one only after ``crash_pod``). ``container``: the pod's first when not named."""
        when = at or datetime.now(UTC)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        with self.lock:
            p = self._obj(PODS, namespace, pod)
            cs = self._container_status(p, container)
            try:
                cid = self._log_source(p, cs, previous)
            except ApiError as err:
                raise ValueError(err.message) from None
            text = lines.splitlines() if isinstance(lines, str) else list(lines)
            self.logs.setdefault(cid, []).extend((when, line) for line in text)

    def read_log(self, namespace: str, pod: str, *, container: str | None = None, previous: bool = False,
                 since_seconds: int | None = None, since_time: str | None = None, tail_lines: int | None = None,
                 timestamps: bool = False, limit_bytes: int | None = None) -> bytes:
        """What ``GET …/pods/{pod}/log`` answers, or the ApiError a real server gives."""
        kind = f'PodLogOptions "{pod}" is invalid'
        if since_seconds is not None and since_seconds < 1:
            raise ApiError(422, "Invalid", f"{kind}: sinceSeconds: Invalid value: {since_seconds}: must be greater than 0")
        if since_seconds is not None and since_time is not None:
            raise ApiError(422, "Invalid", f"{kind}: sinceSeconds: Forbidden: at most one of `sinceTime` or `sinceSeconds` "
                           "may be specified")
        if tail_lines is not None and tail_lines < 0:
            raise ApiError(422, "Invalid", f"{kind}: tailLines: Invalid value: {tail_lines}: must be greater than or equal to 0")
        if limit_bytes is not None and limit_bytes < 1:
            raise ApiError(422, "Invalid", f"{kind}: limitBytes: Invalid value: {limit_bytes}: must be greater than 0")
        with self.lock:
            p = self._obj(PODS, namespace, pod)
            names = [c["name"] for c in p["spec"].get("containers") or []]
            init = [c["name"] for c in p["spec"].get("initContainers") or []]
            if container is None:
                if len(names) == 1:
                    container = names[0]
                elif not names:
                    raise _bad_request(f"a container name must be specified for pod {pod}")
                else:
                    message = f"a container name must be specified for pod {pod}, choose one of: [{' '.join(names)}]"
                    if init:
                        message += f" or one of the init containers: [{' '.join(init)}]"
                    raise _bad_request(message)
            elif container not in names + init:
                raise _bad_request(f"container {container} is not valid for pod {pod}")
            cs = next((c for c in p["status"].get("containerStatuses") or [] if c["name"] == container), None)
            if cs is None:
                raise _bad_request(f'container "{container}" in pod "{pod}" is not available')
            lines = list(self.logs.get(self._log_source(p, cs, previous), []))
        cutoff = datetime.now(UTC) - timedelta(seconds=since_seconds) if since_seconds else _parse_time(since_time)
        if cutoff is not None:
            lines = [(t, line) for t, line in lines if t >= cutoff]
        if tail_lines is not None:
            lines = lines[len(lines) - tail_lines:] if tail_lines else []
        data = "".join((f"{_nano(t)} " if timestamps else "") + line + "\n" for t, line in lines).encode()
        return data[:limit_bytes] if limit_bytes else data

    # -- events

    def _event_body(self, involved: Obj, type_: str, reason: str, message: str, *, component: str, count: int,
                    at: datetime, field_path: str | None) -> Obj:
        meta = involved["metadata"]
        namespace = meta.get("namespace") or "default"
        base = int(at.timestamp() * 1e9)
        name = f"{meta['name']}.{base:x}"
        while (EVENTS, namespace, name) in self.objects:
            base += 1
            name = f"{meta['name']}.{base:x}"
        ref: Obj = {"kind": involved.get("kind", ""), "namespace": namespace, "name": meta["name"], "uid": meta.get("uid", ""),
                    "apiVersion": involved.get("apiVersion", ""), "resourceVersion": meta.get("resourceVersion", "")}
        if field_path:
            ref["fieldPath"] = field_path
        host = NODE_NAME if component == "kubelet" else ""
        source: Obj = {"component": component}
        if host:
            source["host"] = host
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "creationTimestamp": _stamp(at)},
            "involvedObject": ref,
            "reason": reason,
            "message": message,
            "source": source,
            "firstTimestamp": _stamp(at),
            "lastTimestamp": _stamp(at),
            "count": count,
            "type": type_,
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": host,
        }

    def _store_event(self, event: Obj) -> Obj:
        namespace = event["metadata"]["namespace"]
        self.namespaces.add(namespace)
        self._put(EVENTS, event, "ADDED")
        over = len(self.objects.placed.get((EVENTS, namespace), {})) - MAX_EVENTS
        if over > 0:  # (the oldest go: at the cap, one per new event, found without sorting them all)
            mine = self._all(EVENTS, namespace)

            def age(e: Obj) -> tuple[str, int]:
                return e.get("lastTimestamp") or "", int(e["metadata"]["resourceVersion"])

            for old in [min(mine, key=age)] if over == 1 else sorted(mine, key=age)[:over]:
                self._delete(EVENTS, namespace, old["metadata"]["name"])
        return event

    def _emit(self, involved: Obj, type_: str, reason: str, message: str, *, component: str | None = None,
              field_path: str | None = None) -> None:
        """An event from a controller or the kubelet; a repeat of the same one counts up (as the
        event recorder aggregates)."""
        component = component or _COMPONENTS.get(involved.get("kind", ""), "kubelet")
        uid = involved["metadata"].get("uid")
        namespace = involved["metadata"].get("namespace") or "default"
        for event in self.objects.events_about(uid, namespace) if uid else self._all(EVENTS, namespace):
            if (event["involvedObject"].get("uid") == uid and event["reason"] == reason and event["message"] == message
                    and event["type"] == type_ and event["source"].get("component") == component):
                event["count"] = int(event.get("count", 1)) + 1
                event["lastTimestamp"] = _now()
                self._put(EVENTS, event, "MODIFIED")
                return
        self._store_event(self._event_body(involved, type_, reason, message, component=component, count=1,
                                           at=datetime.now(UTC), field_path=field_path))

    def add_event(self, namespace: str, involved: Obj, *, type: str = "Normal", reason: str, message: str,
                  count: int = 1, at: datetime | None = None, component: str | None = None,
                  field_path: str | None = None) -> Obj:
        """A core/v1 Event about ``involved`` (any object with kind, apiVersion and metadata), as
        its usual reporter (kubelet for pods, deployment-controller …) would write it."""
        if type not in ("Normal", "Warning"):
            raise ValueError("type must be Normal or Warning")
        when = at or datetime.now(UTC)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        with self.lock:
            involved = copy.deepcopy(involved)
            involved["metadata"].setdefault("namespace", namespace)
            event = self._event_body(involved, type, reason, message, count=count, at=when, field_path=field_path,
                                     component=component or _COMPONENTS.get(involved.get("kind", ""), "kubelet"))
            return copy.deepcopy(self._store_event(event))

    # -- HPAs, Jobs and CronJobs: generic create / update / delete

    def create_object(self, resource: str, namespace: str, body: Obj) -> Obj:
        """POST semantics for HPAs, Jobs, CronJobs: defaulting, validation, status reset, then
        the controller (the answer is the object as created, before the controller acted)."""
        kind = _KINDS[resource]
        with self.lock:
            obj = copy.deepcopy(body)
            if not isinstance(obj, dict):
                raise _bad_request("the body of the request was not an object")
            obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{_suffix()}"
            name = meta.get("name")
            if not name:
                raise _invalid(resource, "", "metadata.name", "Required value: name or generateName is required")
            if meta.get("namespace", namespace) != namespace:
                raise _bad_request("the namespace of the provided object does not match the namespace sent on the request")
            if (resource, namespace, name) in self.objects:
                raise _already_exists(resource, name)
            meta.pop("resourceVersion", None)
            if resource in _SCHEMA_OF:
                drop_empty_fields(_SCHEMA_OF[resource], obj)
            meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            if resource == JOBS:
                self._prepare_job(obj)
            _DEFAULTERS[resource](obj)
            _VALIDATORS[resource](obj)
            obj["status"] = {"desiredReplicas": 0} if resource == HPAS else {}
            self.namespaces.add(namespace)
            self._put(resource, obj, "ADDED")
            created = copy.deepcopy(obj)
            if resource == HPAS:
                self._autoscale(obj)
            elif resource == JOBS:
                self._run_job(obj)
            return created

    def update_object(self, resource: str, namespace: str, name: str, new: Obj, *, subresource: str = "") -> Obj:
        """PUT/PATCH semantics for HPAs, Jobs, CronJobs (see update_deployment); a write that
        changes nothing is not stored again (the resourceVersion stays)."""
        with self.lock:
            current = self.get(resource, namespace, name)
            new = copy.deepcopy(new)
            if not isinstance(new, dict):
                raise _bad_request("the body of the request was not an object")
            meta = new.setdefault("metadata", {})
            rv = meta.get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                raise _conflict(resource, name)
            if meta.get("name", name) != name:
                raise _bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})")
            for key in ("uid", "creationTimestamp", "namespace", "generation", "resourceVersion"):
                meta[key] = current["metadata"].get(key)
            meta["name"] = name
            kind = _KINDS[resource]
            new["apiVersion"], new["kind"] = kind.api_version, kind.kind
            if subresource == "status":
                current["status"] = new.get("status", {})
                new = current
            else:
                if resource in _SCHEMA_OF:
                    drop_empty_fields(_SCHEMA_OF[resource], new)
                new["status"] = current.get("status", {})
                _DEFAULTERS[resource](new)
                _VALIDATORS[resource](new)
                if resource == JOBS:
                    for field in ("selector", "template", "completions", "completionMode"):
                        if new["spec"].get(field) != current["spec"].get(field):
                            raise _invalid(JOBS, name, f"spec.{field}", "Invalid value: field is immutable")
                if new["spec"] != current["spec"]:
                    meta["generation"] = int(current["metadata"]["generation"]) + 1
            if new == current:
                return current
            self._put(resource, new, "MODIFIED")
            result = self.get(resource, namespace, name)
            if resource == HPAS:
                self._autoscale(self.objects[(HPAS, namespace, name)])
            return result

    def delete_object(self, resource: str, namespace: str, name: str) -> Obj:
        with self.lock:
            self._obj(resource, namespace, name)
            obj = self._delete_cascade(resource, namespace, name)
            if resource == HPAS:
                self._utilization.pop((namespace, name), None)
            return obj

    # -- the HPA controller

    def create_hpa(self, namespace: str, body: Obj) -> Obj:
        return self.create_object(HPAS, namespace, body)

    def replace_hpa(self, namespace: str, name: str, body: Obj) -> Obj:
        """PUT semantics (what someone editing the HPA does): a new resourceVersion, and the HPA
        acts on its bounds at once. A stale ``metadata.resourceVersion`` in ``body`` is a 409."""
        return self.update_object(HPAS, namespace, name, body)

    def set_hpa_utilization(self, namespace: str, name: str, percent: int | None) -> Obj:
        """The cpu utilisation (percent of requests) the metrics would report for the HPA's pods;
        None: no metrics. The HPA acts on it at once. Returns the HPA."""
        with self.lock:
            hpa = self._obj(HPAS, namespace, name)
            if percent is None:
                self._utilization.pop((namespace, name), None)
            else:
                self._utilization[(namespace, name)] = int(percent)
            self._autoscale(hpa)
            return copy.deepcopy(hpa)

    def _autoscale_target(self, namespace: str, kind: str, name: str) -> None:
        for hpa in self._all(HPAS, namespace):
            ref = hpa["spec"].get("scaleTargetRef") or {}
            if ref.get("kind") == kind and ref.get("name") == name:
                self._autoscale(hpa)

    def _autoscale(self, hpa: Obj) -> None:
        """One sync of the HPA controller (podautoscaler/horizontal.go reconcileAutoscaler)."""
        namespace, name = hpa["metadata"]["namespace"], hpa["metadata"]["name"]
        spec, old = hpa["spec"], hpa.get("status") or {}
        ref = spec.get("scaleTargetRef") or {}
        lo, hi = int(spec.get("minReplicas", 1)), int(spec["maxReplicas"])
        conditions = {c["type"]: c for c in old.get("conditions") or []}
        now = _now()

        def condition(kind: str, ok: bool, reason: str, message: str) -> None:
            state = "True" if ok else "False"
            prev = conditions.get(kind)
            transition = prev["lastTransitionTime"] if prev and prev["status"] == state else now
            conditions[kind] = {"type": kind, "status": state, "lastTransitionTime": transition, "reason": reason, "message": message}

        status: Obj = {k: v for k, v in old.items() if k in ("lastScaleTime",)}
        status["observedGeneration"] = hpa["metadata"]["generation"]
        d = self.objects.get((DEPLOYMENTS, namespace, ref.get("name", ""))) if ref.get("kind") == "Deployment" else None
        if d is None:
            condition("AbleToScale", False, "FailedGetScale", f"the HPA controller was unable to get the target's current scale: "
                      f'{ref.get("kind", "").lower()}s/scale.apps "{ref.get("name", "")}" not found')
            status.update(currentReplicas=old.get("currentReplicas", 0), desiredReplicas=old.get("desiredReplicas", 0))
        else:
            current = int(d["spec"]["replicas"])
            util, target = self._utilization.get((namespace, name)), _cpu_target(hpa)
            reason, rescale = "", True
            if current == 0 and lo != 0:
                desired, rescale = 0, False
                condition("ScalingActive", False, "ScalingDisabled", "scaling is disabled since the replica count of the target is zero")
            elif current > hi:
                desired, reason = hi, "Current number of replicas above Spec.MaxReplicas"
            elif current < lo:
                desired, reason = lo, "Current number of replicas below Spec.MinReplicas"
            elif util is None or target is None:
                desired = current
                condition("ScalingActive", False, "FailedGetResourceMetric",
                          "the HPA was unable to compute the replica count: failed to get cpu utilization: unable to get "
                          "metrics for resource cpu: no metrics returned from resource metrics API")
            else:
                ready = sum(1 for rs in self._owned_replicasets(d) for p in self._rs_pods(rs) if _pod_ready(p)) or current
                ratio = util / target
                proposal = current if abs(ratio - 1.0) <= 0.1 else math.ceil(ratio * ready)
                condition("ScalingActive", True, "ValidMetricFound",
                          "the HPA was able to successfully calculate a replica count from cpu resource utilization "
                          "(percentage of request)")
                if proposal > hi:
                    desired = hi
                    condition("ScalingLimited", True, "TooManyReplicas", "the desired replica count is more than the maximum replica count")
                elif proposal < lo:
                    desired = lo
                    condition("ScalingLimited", True, "TooFewReplicas", "the desired replica count is less than the minimum replica count")
                else:
                    desired = proposal
                    condition("ScalingLimited", False, "DesiredWithinRange", "the desired count is within the acceptable range")
                reason = f"cpu resource utilization (percentage of request) {'above' if desired > current else 'below'} target"
            if rescale and desired != current:
                d["spec"]["replicas"] = desired
                d["metadata"]["generation"] = int(d["metadata"]["generation"]) + 1
                self._put(DEPLOYMENTS, d, "MODIFIED")
                self._reconcile(namespace, d["metadata"]["name"])
                condition("AbleToScale", True, "SucceededRescale", f"the HPA controller was able to update the target scale to {desired}")
                self._emit(hpa, "Normal", "SuccessfulRescale", f"New size: {desired}; reason: {reason}")
                status["lastScaleTime"] = now
            else:
                condition("AbleToScale", True, "ReadyForNewScale", "recommended size matches current size")
            status["currentReplicas"] = int((d.get("status") or {}).get("replicas", 0))
            status["desiredReplicas"] = desired
            if util is not None:
                status["currentMetrics"] = [{"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": util}}}]
        status["conditions"] = [conditions[k] for k in ("AbleToScale", "ScalingActive", "ScalingLimited") if k in conditions]
        if status.get("currentReplicas") == 0:
            status.pop("currentReplicas")
        if old != status:
            hpa["status"] = status
            self._put(HPAS, hpa, "MODIFIED")

    # -- the job controller

    def create_cronjob(self, namespace: str, body: Obj) -> Obj:
        return self.create_object(CRONJOBS, namespace, body)

    def create_job(self, namespace: str, body: Obj) -> Obj:
        return self.create_object(JOBS, namespace, body)

    @staticmethod
    def _prepare_job(job: Obj) -> None:
        """The Job strategy's PrepareForCreate: a generated selector and the labels that go with it."""
        uid, name = job["metadata"]["uid"], job["metadata"]["name"]
        spec = job.setdefault("spec", {})
        if not spec.get("manualSelector"):
            template_labels = spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {})
            generated = {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                         "controller-uid": uid, "job-name": name}
            template_labels.update(generated)
            spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
            if not job["metadata"].get("labels"):
                job["metadata"]["labels"] = dict(template_labels)

    def _run_job(self, job: Obj) -> None:
        spec = job["spec"]
        if spec.get("suspend"):
            now = _now()
            job["status"] = {"conditions": [{"type": "Suspended", "status": "True", "lastProbeTime": now,
                                             "lastTransitionTime": now, "reason": "JobSuspended", "message": "Job suspended"}]}
            self._put(JOBS, job, "MODIFIED")
            return
        behaviour = self.job_behaviour
        if behaviour not in JOB_BEHAVIOURS:
            raise ValueError(f"job_behaviour must be one of {', '.join(JOB_BEHAVIOURS)}, not {behaviour!r}")
        job["status"] = {"startTime": _now(), "active": 0, "ready": 0, "terminating": 0, "uncountedTerminatedPods": {}}
        if behaviour == "running":
            pod = self._create_pod(job, spec["template"], state="ready")
            self._emit(job, "Normal", "SuccessfulCreate", f"Created pod: {pod['metadata']['name']}")
            job["status"].update(active=1, ready=1)
            self._put(JOBS, job, "MODIFIED")
            return
        self._finish(job, succeeded=behaviour == "complete")

    def _finish(self, job: Obj, *, succeeded: bool) -> None:
        spec, status, now = job["spec"], job["status"], _now()
        count = int(spec.get("completions") or 1) if succeeded else int(spec.get("backoffLimit", 6)) + 1
        running = [p for _, p in self.objects.controlled(job["metadata"]["uid"], job["metadata"]["namespace"], PODS)
                   if _owned_by(p, job["metadata"]["uid"])]
        for pod in running:  # the pods that ran end where they are
            for cs in pod["status"].get("containerStatuses") or []:
                started = ((cs.get("state") or {}).get("running") or {}).get("startedAt", now)
                cs.update(ready=False, started=False, state={"terminated": {
                    "exitCode": 0 if succeeded else 1, "reason": "Completed" if succeeded else "Error", "startedAt": started,
                    "finishedAt": now, "containerID": cs.get("containerID") or _container_id()}})
            self._pod_conditions(pod)
            self._put(PODS, pod, "MODIFIED")
        for _ in range(max(0, min(count, 20) - len(running))):
            pod = self._create_pod(job, spec["template"], state="succeeded" if succeeded else "failed")
            self._emit(job, "Normal", "SuccessfulCreate", f"Created pod: {pod['metadata']['name']}")
        status.update(active=0, ready=0)
        if succeeded:
            status.update(succeeded=count, completionTime=now)
            why = {"reason": "CompletionsReached", "message": "Reached expected number of succeeded pods"}
            kinds = ("SuccessCriteriaMet", "Complete")
            self._emit(job, "Normal", "Completed", "Job completed")
        else:
            status["failed"] = count
            why = {"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}
            kinds = ("FailureTarget", "Failed")
            self._emit(job, "Warning", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        status.pop("active")
        status["conditions"] = [{"type": k, "status": "True", "lastProbeTime": now, "lastTransitionTime": now, **why} for k in kinds]
        self._put(JOBS, job, "MODIFIED")

    def finish_job(self, namespace: str, name: str, *, succeeded: bool = True) -> Obj:
        """End a Job left running (``job_behaviour = "running"``): complete, or failed."""
        with self.lock:
            job = self._obj(JOBS, namespace, name)
            if any(c.get("type") in ("Complete", "Failed") for c in job["status"].get("conditions") or []):
                raise ValueError(f"job {name} has already finished")
            self._finish(job, succeeded=succeeded)
            return copy.deepcopy(job)


_COMPONENTS = {"Pod": "kubelet", "Deployment": "deployment-controller", "ReplicaSet": "replicaset-controller",
               "HorizontalPodAutoscaler": "horizontal-pod-autoscaler", "Job": "job-controller", "CronJob": "cronjob-controller"}


def _validate_hpa(h: Obj) -> None:
    name, spec = h["metadata"]["name"], h["spec"]
    ref = spec.get("scaleTargetRef") or {}
    for field in ("kind", "name"):
        if not ref.get(field):
            raise _invalid(HPAS, name, f"spec.scaleTargetRef.{field}", "Required value")
    lo, hi = spec.get("minReplicas"), spec.get("maxReplicas")
    if not isinstance(hi, int) or hi < 1:
        raise _invalid(HPAS, name, "spec.maxReplicas", f"Invalid value: {hi}: must be greater than 0")
    if not isinstance(lo, int) or lo < 1:
        raise _invalid(HPAS, name, "spec.minReplicas", f"Invalid value: {lo}: must be greater than or equal to 1")
    if hi < lo:
        raise _invalid(HPAS, name, "spec.maxReplicas", f"Invalid value: {hi}: must be greater than or equal to `minReplicas`")


def _validate_pod_template_for_job(resource: str, name: str, template: Obj, prefix: str) -> None:
    tspec = template.get("spec") or {}
    if not tspec.get("containers"):
        raise _invalid(resource, name, f"{prefix}.spec.containers", "Required value")
    policy = tspec.get("restartPolicy")
    if policy not in ("OnFailure", "Never"):
        raise _invalid(resource, name, f"{prefix}.spec.restartPolicy",
                       f'Unsupported value: "{policy}": supported values: "OnFailure", "Never"')


def _validate_job(j: Obj) -> None:
    _validate_pod_template_for_job(JOBS, j["metadata"]["name"], j["spec"].get("template") or {}, "spec.template")


def _validate_cronjob(c: Obj) -> None:
    name, spec = c["metadata"]["name"], c["spec"]
    schedule = str(spec.get("schedule") or "")
    if not schedule:
        raise _invalid(CRONJOBS, name, "spec.schedule", "Required value")
    fields = schedule.split()
    if not (schedule.startswith("@") and schedule in _CRON_MACROS) and len(fields) != 5:
        raise _invalid(CRONJOBS, name, "spec.schedule",
                       f'Invalid value: "{schedule}": expected exactly 5 fields, found {len(fields)}: {schedule}')
    template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
    _validate_pod_template_for_job(CRONJOBS, name, template, "spec.jobTemplate.spec.template")


_SCHEMA_OF = {JOBS: "batch.Job", CRONJOBS: "batch.CronJob"}  # the protobuf schema messages (at the end of the file)
_DEFAULTERS = {HPAS: default_hpa, JOBS: default_job, CRONJOBS: default_cronjob}
_VALIDATORS = {HPAS: _validate_hpa, JOBS: _validate_job, CRONJOBS: _validate_cronjob}


# --------------------------------------------------------------------------- server-side printing (as=Table)


def _col(name: str, description: str, *, priority: int = 0, type_: str = "string", fmt: str = "") -> Obj:
    return {"name": name, "type": type_, "format": fmt, "description": description, "priority": priority}


_NAME_COL = _col("Name", "Name must be unique within a namespace. Is required when creating resources, although some "
                 "resources may allow a client to request the generation of an appropriate name automatically.", fmt="name")
_AGE_COL = _col("Age", "CreationTimestamp is a timestamp representing the server time when this object was created.")
_WORKLOAD_COLS = [
    _col("Containers", "Names of each container in the template.", priority=1),
    _col("Images", "Images referenced by each container in the template.", priority=1),
    _col("Selector", "Label selector for pods.", priority=1),
]


def _containers_images(pod_spec: Obj) -> list[str]:
    containers = pod_spec.get("containers") or []
    return [",".join(c.get("name", "") for c in containers), ",".join(c.get("image", "") for c in containers)]


def _pod_row(p: Obj, now: datetime) -> list[Any]:
    """printPod (pkg/printers/internalversion/printers.go)."""
    st = p.get("status") or {}
    reason = st.get("reason") or st.get("phase") or ""
    ready = restarts = 0
    last_restart: datetime | None = None
    has_running = False
    for cs in reversed(st.get("containerStatuses") or []):
        restarts += int(cs.get("restartCount", 0))
        finished = _parse_time(((cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt"))
        if finished and (last_restart is None or finished > last_restart):
            last_restart = finished
        state = cs.get("state") or {}
        waiting, terminated = state.get("waiting"), state.get("terminated")
        if waiting and waiting.get("reason"):
            reason = waiting["reason"]
        elif terminated and terminated.get("reason"):
            reason = terminated["reason"]
        elif terminated is not None:
            reason = f"Signal:{terminated['signal']}" if terminated.get("signal") else f"ExitCode:{terminated.get('exitCode', 0)}"
        elif cs.get("ready") and "running" in state:
            has_running = True
            ready += 1
    if reason == "Completed" and has_running:
        reason = "Running" if _pod_ready(p) else "NotReady"
    if p["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    restarts_cell = str(restarts)
    if restarts and last_restart:
        restarts_cell = f"{restarts} ({human_duration((now - last_restart).total_seconds())} ago)"
    spec = p.get("spec") or {}
    ip = ((st.get("podIPs") or [{}])[0]).get("ip") or "<none>"
    gates = spec.get("readinessGates") or []
    if gates:
        true = {c["type"] for c in st.get("conditions") or [] if c.get("status") == "True"}
        gates_cell = f"{sum(1 for g in gates if g.get('conditionType') in true)}/{len(gates)}"
    else:
        gates_cell = "<none>"
    return [p["metadata"]["name"], f"{ready}/{len(spec.get('containers') or [])}", reason, restarts_cell,
            _since(p["metadata"].get("creationTimestamp"), now), ip, spec.get("nodeName") or "<none>",
            st.get("nominatedNodeName") or "<none>", gates_cell]


def _deployment_row(d: Obj, now: datetime) -> list[Any]:
    st = d.get("status") or {}
    return [d["metadata"]["name"], f"{st.get('readyReplicas', 0)}/{d['spec'].get('replicas', 0)}", st.get("updatedReplicas", 0),
            st.get("availableReplicas", 0), _since(d["metadata"].get("creationTimestamp"), now),
            *_containers_images(d["spec"]["template"].get("spec") or {}), _match_labels_selector(d["spec"].get("selector") or {})]


def _replicaset_row(rs: Obj, now: datetime) -> list[Any]:
    st = rs.get("status") or {}
    return [rs["metadata"]["name"], rs["spec"].get("replicas", 0), st.get("replicas", 0), st.get("readyReplicas", 0),
            _since(rs["metadata"].get("creationTimestamp"), now), *_containers_images(rs["spec"]["template"].get("spec") or {}),
            _match_labels_selector(rs["spec"].get("selector") or {})]


def _event_row(e: Obj, now: datetime) -> list[Any]:
    io = e.get("involvedObject") or {}
    target = f"{str(io.get('kind', '')).lower()}/{io['name']}" if io.get("name") else str(io.get("kind", "")).lower()
    source = e.get("source") or {}
    component = source.get("component") or e.get("reportingComponent") or ""
    instance = source.get("host") or e.get("reportingInstance") or ""
    return [_since(e.get("lastTimestamp") or e.get("eventTime"), now), e.get("type", ""), e.get("reason", ""), target,
            io.get("fieldPath", ""), f"{component}, {instance}" if instance else component, str(e.get("message", "")).strip(),
            _since(e.get("firstTimestamp") or e.get("eventTime"), now), int(e.get("count") or 1), e["metadata"]["name"]]


def hpa_targets(hpa: Obj) -> str:
    """formatHPAMetrics: what kubectl shows in the TARGETS column ("cpu: 45%/80%")."""
    specs, statuses = hpa["spec"].get("metrics") or [], (hpa.get("status") or {}).get("currentMetrics") or []
    if not specs:
        return "<none>"
    shown: list[str] = []
    for i, metric in enumerate(specs):
        current = (statuses[i].get("resource") or {}).get("current") or {} if i < len(statuses) else {}
        if metric.get("type") == "Resource":
            res = metric.get("resource") or {}
            target = res.get("target") or {}
            if target.get("averageValue") is not None:
                shown.append(f"{res.get('name')}: {current.get('averageValue', '<unknown>')}/{target['averageValue']}")
            else:
                now_ = f"{current['averageUtilization']}%" if current.get("averageUtilization") is not None else "<unknown>"
                want = f"{target['averageUtilization']}%" if target.get("averageUtilization") is not None else "<auto>"
                shown.append(f"{res.get('name')}: {now_}/{want}")
        else:
            shown.append("<unknown>/<unknown>")
        if len(shown) > 2:
            return ", ".join(shown) + f" + {len(specs) - i - 1} more..." if i < len(specs) - 1 else ", ".join(shown)
    return ", ".join(shown)


def _hpa_row(h: Obj, now: datetime) -> list[Any]:
    ref = h["spec"].get("scaleTargetRef") or {}
    lo = h["spec"].get("minReplicas")
    return [h["metadata"]["name"], f"{ref.get('kind', '')}/{ref.get('name', '')}", hpa_targets(h),
            "<unset>" if lo is None else str(lo), h["spec"].get("maxReplicas", 0),
            (h.get("status") or {}).get("currentReplicas", 0), _since(h["metadata"].get("creationTimestamp"), now)]


def _job_row(j: Obj, now: datetime) -> list[Any]:
    spec, st = j.get("spec") or {}, j.get("status") or {}
    kinds = {c.get("type") for c in st.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in kinds:
        status = "Complete"
    elif "Failed" in kinds:
        status = "Failed"
    elif j["metadata"].get("deletionTimestamp"):
        status = "Terminating"
    elif "Suspended" in kinds:
        status = "Suspended"
    elif "FailureTarget" in kinds:
        status = "FailureTarget"
    else:
        status = "Running"
    if spec.get("completions") is not None:
        completions = f"{st.get('succeeded', 0)}/{spec['completions']}"
    elif int(spec.get("parallelism") or 0) > 1:
        completions = f"{st.get('succeeded', 0)}/1 of {spec['parallelism']}"
    else:
        completions = f"{st.get('succeeded', 0)}/1"
    start, end = _parse_time(st.get("startTime")), _parse_time(st.get("completionTime"))
    duration = "" if start is None else human_duration(((end or now) - start).total_seconds())
    return [j["metadata"]["name"], status, completions, duration, _since(j["metadata"].get("creationTimestamp"), now),
            *_containers_images((spec.get("template") or {}).get("spec") or {}), _match_labels_selector(spec.get("selector") or {})]


def _cronjob_row(c: Obj, now: datetime) -> list[Any]:
    spec, st = c.get("spec") or {}, c.get("status") or {}
    suspend = spec.get("suspend")
    job_spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    selector = _match_labels_selector(job_spec.get("selector") or {}) or "<none>"
    return [c["metadata"]["name"], spec.get("schedule", ""), spec.get("timeZone") or "<none>",
            "<unset>" if suspend is None else str(bool(suspend)), len(st.get("active") or []),
            _since(st["lastScheduleTime"], now) if st.get("lastScheduleTime") else "<none>",
            _since(c["metadata"].get("creationTimestamp"), now),
            *_containers_images((job_spec.get("template") or {}).get("spec") or {}), selector]


def _namespace_row(n: Obj, now: datetime) -> list[Any]:
    return [n["metadata"]["name"], (n.get("status") or {}).get("phase", ""), _since(n["metadata"].get("creationTimestamp"), now)]


_PRINTERS: dict[str, tuple[list[Obj], Any]] = {
    PODS: ([_NAME_COL, _col("Ready", "The aggregate readiness state of this pod for accepting traffic."),
            _col("Status", "The aggregate status of the containers in this pod."),
            _col("Restarts", "The number of times the containers in this pod have been restarted and when the last container "
                 "in this pod has restarted."), _AGE_COL,
            _col("IP", "IP address allocated to the pod.", priority=1), _col("Node", "Name of the node the pod runs on.", priority=1),
            _col("Nominated Node", "Name of the node the pod is nominated to.", priority=1),
            _col("Readiness Gates", "Pod readiness gates.", priority=1)], _pod_row),
    DEPLOYMENTS: ([_NAME_COL, _col("Ready", "Number of the pod with ready state"),
                   _col("Up-to-date", "Total number of non-terminated pods targeted by this deployment that have the desired "
                        "template spec.", type_="integer"),
                   _col("Available", "Total number of available pods (ready for at least minReadySeconds) targeted by this "
                        "deployment.", type_="integer"), _AGE_COL, *_WORKLOAD_COLS], _deployment_row),
    REPLICASETS: ([_NAME_COL, _col("Desired", "Replicas is the number of desired replicas.", type_="integer"),
                   _col("Current", "Replicas is the most recently observed number of replicas.", type_="integer"),
                   _col("Ready", "The number of ready replicas for this replica set.", type_="integer"), _AGE_COL,
                   *_WORKLOAD_COLS], _replicaset_row),
    EVENTS: ([_col("Last Seen", "The time at which the most recent occurrence of this event was recorded."),
              _col("Type", "Type of this event (Normal, Warning), new types could be added in the future."),
              _col("Reason", "This should be a short, machine understandable string that gives the reason for the transition "
                   "into the object's current status."),
              _col("Object", "The object that this event is about."),
              _col("Subobject", "The subobject that this event is about.", priority=1),
              _col("Source", "The component reporting this event. Should be a short machine understandable string.", priority=1),
              _col("Message", "A human-readable description of the status of this operation."),
              _col("First Seen", "The time at which the event was first recorded.", priority=1),
              _col("Count", "The number of times this event has occurred.", priority=1, type_="integer"),
              _col("Name", "Name must be unique within a namespace.", priority=1, fmt="name")], _event_row),
    HPAS: ([_NAME_COL, _col("Reference", "Reference to the scaled object."),
            _col("Targets", "The current and target values of the metrics the autoscaler uses."),
            _col("MinPods", "Lower limit for the number of pods that can be set by the autoscaler, default 1."),
            _col("MaxPods", "Upper limit for the number of pods that can be set by the autoscaler.", type_="integer"),
            _col("Replicas", "Current number of replicas of pods managed by this autoscaler.", type_="integer"), _AGE_COL], _hpa_row),
    JOBS: ([_NAME_COL, _col("Status", "Status of the job."),
            _col("Completions", "The number of pods which reached phase Succeeded."),
            _col("Duration", "Time required to complete the job."), _AGE_COL, *_WORKLOAD_COLS], _job_row),
    CRONJOBS: ([_NAME_COL, _col("Schedule", "The schedule in Cron format."), _col("Timezone", "The time zone name."),
                _col("Suspend", "This flag tells the controller to suspend subsequent executions.", type_="boolean"),
                _col("Active", "A list of pointers to currently running jobs.", type_="integer"),
                _col("Last Schedule", "Information when was the last time the job was successfully scheduled."), _AGE_COL,
                *_WORKLOAD_COLS], _cronjob_row),
    "v1/namespaces": ([_NAME_COL, _col("Status", "The status of the namespace"), _AGE_COL], _namespace_row),
}


def as_table(resource: str, objs: list[Obj], *, resource_version: str, include: str = "Metadata") -> Obj:
    """A meta.k8s.io/v1 Table of these objects, as the API server's table convertor makes it."""
    columns, row = _PRINTERS[resource]
    now = datetime.now(UTC)
    rows = []
    for o in objs:
        r: Obj = {"cells": row(o, now)}
        if include == "Object":
            r["object"] = o
        elif include != "None":
            r["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}
        rows.append(r)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": copy.deepcopy(columns), "rows": rows}


# --------------------------------------------------------------------------- faults

# The `reason` a real API server puts in its Status for these codes.
_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 422: "Invalid",
            429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}


@dataclass
class Fault:
    method: str | None
    path_re: re.Pattern[str]
    status: int | None
    hang: float
    times: int | None
    message: str | None

    def error(self) -> ApiError:
        assert self.status is not None
        phrase = HTTPStatus(self.status).phrase
        reason = _REASONS.get(self.status, phrase.replace(" ", ""))
        return ApiError(self.status, reason, self.message or f"{phrase} (a fault injected by the emulator)")


class Faults:
    """Failures to inject (see the module docstring). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._release = threading.Event()

    def add(self, *, method: str | None = None, path_re: str = "", status: int | None = None, hang: float = 0.0,
            times: int | None = None, message: str | None = None) -> Fault:
        if status is None and not hang:
            raise ValueError("a fault needs a status, a hang, or both")
        fault = Fault(method.upper() if method else None, re.compile(path_re), status, hang, times, message)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            release, self._release = self._release, threading.Event()
        release.set()

    def take(self, method: str, path: str) -> Fault | None:
        """The fault for this request, counted as used; None when there is none."""
        with self._lock:
            for fault in self._faults:
                if (fault.method is None or fault.method == method) and fault.path_re.search(path):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def hang(self, seconds: float) -> None:
        with self._lock:
            release = self._release
        release.wait(seconds)



# --------------------------------------------------------------------------- RBAC


def rbac_allows(rules: list[Obj], verb: str, group: str, resource: str, name: str | None) -> bool:
    """Whether these ClusterRole rules grant the request (rbac's RuleAllows)."""
    for rule in rules:
        if not any(g in ("*", group) for g in rule.get("apiGroups") or []):
            continue
        if not any(r in ("*", resource) for r in rule.get("resources") or []):
            continue
        if not any(v in ("*", verb) for v in rule.get("verbs") or []):
            continue
        names = rule.get("resourceNames") or []
        if names and name not in names:
            continue
        return True
    return False


def _forbidden(user: str, verb: str, group: str, resource: str, namespace: str | None, name: str | None) -> ApiError:
    plural = resource.split("/", 1)[0]
    target = f"{plural}.{group}" if group else plural
    if name:
        target += f' "{name}"'
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return ApiError(403, "Forbidden", f'{target} is forbidden: User "{user}" cannot {verb} resource "{resource}" in API group '
                    f'"{group}" {scope}', {"name": name or "", "group": group, "kind": plural})


# --------------------------------------------------------------------------- HTTP

_APPS_RESOURCES = [
    {"name": "deployments", "singularName": "deployment", "namespaced": True, "kind": "Deployment",
     "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
     "shortNames": ["deploy"], "categories": ["all"]},
    {"name": "deployments/scale", "singularName": "", "namespaced": True, "group": "autoscaling", "version": "v1",
     "kind": "Scale", "verbs": ["get", "patch", "update"]},
    {"name": "deployments/status", "singularName": "", "namespaced": True, "kind": "Deployment",
     "verbs": ["get", "patch", "update"]},
    {"name": "replicasets", "singularName": "replicaset", "namespaced": True, "kind": "ReplicaSet",
     "verbs": ["get", "list", "watch"], "shortNames": ["rs"], "categories": ["all"]},
]
_CORE_RESOURCES = [
    {"name": "events", "singularName": "event", "namespaced": True, "kind": "Event",
     "verbs": ["get", "list", "watch"], "shortNames": ["ev"]},
    {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace",
     "verbs": ["get", "list"], "shortNames": ["ns"]},
    {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
     "verbs": ["get", "list", "watch"], "shortNames": ["po"], "categories": ["all"]},
    {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]},
]
_WRITABLE = ["create", "delete", "get", "list", "patch", "update", "watch"]
_AUTOSCALING_RESOURCES = [
    {"name": "horizontalpodautoscalers", "singularName": "horizontalpodautoscaler", "namespaced": True,
     "kind": "HorizontalPodAutoscaler", "verbs": _WRITABLE, "shortNames": ["hpa"], "categories": ["all"]},
    {"name": "horizontalpodautoscalers/status", "singularName": "", "namespaced": True, "kind": "HorizontalPodAutoscaler",
     "verbs": ["get", "patch", "update"]},
]
_BATCH_RESOURCES = [
    {"name": "cronjobs", "singularName": "cronjob", "namespaced": True, "kind": "CronJob", "verbs": _WRITABLE,
     "shortNames": ["cj"], "categories": ["all"]},
    {"name": "cronjobs/status", "singularName": "", "namespaced": True, "kind": "CronJob", "verbs": ["get", "patch", "update"]},
    {"name": "jobs", "singularName": "job", "namespaced": True, "kind": "Job", "verbs": _WRITABLE, "categories": ["all"]},
    {"name": "jobs/status", "singularName": "", "namespaced": True, "kind": "Job", "verbs": ["get", "patch", "update"]},
]
_DISCOVERY = {"apps/v1": _APPS_RESOURCES, "autoscaling/v2": _AUTOSCALING_RESOURCES, "batch/v1": _BATCH_RESOURCES}
_GROUPS = {"api/v1": "", "apis/apps/v1": "apps", "apis/autoscaling/v2": "autoscaling", "apis/batch/v1": "batch"}
_ROUTES = {("", "pods"): PODS, ("", "events"): EVENTS, ("", "namespaces"): "v1/namespaces", ("apps", "deployments"): DEPLOYMENTS,
           ("apps", "replicasets"): REPLICASETS, ("autoscaling", "horizontalpodautoscalers"): HPAS, ("batch", "jobs"): JOBS,
           ("batch", "cronjobs"): CRONJOBS}
_SUBRESOURCES = {PODS: ("log",), DEPLOYMENTS: ("scale", "status"), HPAS: ("status",), JOBS: ("status",), CRONJOBS: ("status",)}
_GENERIC = (HPAS, JOBS, CRONJOBS)

_PATH = re.compile(
    r"^/(?P<prefix>api/v1|apis/[^/]+/[^/]+)"
    r"(?:/namespaces/(?P<ns>[^/]+))?"
    r"/(?P<resource>[^/]+)"
    r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)
_TRUE, _FALSE = ("1", "t", "T", "TRUE", "true", "True"), ("0", "f", "F", "FALSE", "false", "False")


def _bool_param(query: dict[str, str], key: str) -> bool:
    value = query.get(key)
    if value is None or value == "":
        return False
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _bad_request(f'strconv.ParseBool: parsing "{value}": invalid syntax')


def _int_param(query: dict[str, str], key: str) -> int | None:
    value = query.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise _bad_request(f'strconv.ParseInt: parsing "{value}": invalid syntax') from None


_BOOTED = _now()  # the namespaces' creationTimestamp


class _Handler(BaseHTTPRequestHandler):
    server: KubeApiServer
    protocol_version = "HTTP/1.1"
    _raw: bytes | None = None

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _raw_body(self) -> bytes:
        # Read once per request: an error answered before the body was parsed must still consume
        # it, or its bytes would be taken for the next request on this keep-alive connection.
        if self._raw is None:
            length = int(self.headers.get("Content-Length") or 0)
            self._raw = self.rfile.read(length) if length else b""
        return self._raw

    def _body(self) -> Any:
        raw = self._raw_body()
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() == _PROTOBUF:
            return decode_protobuf(raw)
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the body of the request was in an unknown format: {exc}") from exc

    def _wants_table(self) -> bool:
        return "as=Table" in (self.headers.get("Accept") or "")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        low, high = self.server.latency
        if high > 0:
            time.sleep(random.uniform(low, high))
        try:
            self._serve(method)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. while a fault hung)
            self.close_connection = True

    def _serve(self, method: str) -> None:
        cluster = self.server.cluster
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self._raw = None  # one handler serves every request on a keep-alive connection
        self._raw_body()
        with cluster.lock:
            cluster.requests.append((method, url.path, self.headers.get("Content-Type", "")))
        fault = self.server.faults.take(method, url.path)
        if fault is not None:
            if fault.hang:
                self.server.faults.hang(fault.hang)
            if fault.status is not None:
                self._send(fault.status, fault.error().status())
                return
        if self.server.require_token and self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self._send(401, ApiError(401, "Unauthorized", "Unauthorized").status())
            return
        try:
            body = self._route(method, url.path, query)
        except ApiError as err:
            self._send(err.code, err.status())
            return
        if isinstance(body, bytes):
            self._send_text(200, body)
        elif body is not None:
            self._send(201 if method == "POST" else 200, body)

    def _route(self, method: str, path: str, query: dict[str, str]) -> Obj | bytes | None:
        cluster = self.server.cluster
        if path in ("/version", "/version/"):  # the Python client asks for the latter
            return {"major": "1", "minor": "32", "gitVersion": "v1.32.0-opsbot-emulator", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.server.address}]}
        if path == "/apis":
            groups = []
            for gv in _DISCOVERY:
                version = {"groupVersion": gv, "version": gv.split("/")[1]}
                groups.append({"name": gv.split("/")[0], "versions": [version], "preferredVersion": version})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        if path == "/api/v1":
            return {"kind": "APIResourceList", "groupVersion": "v1", "resources": _CORE_RESOURCES}
        if path.startswith("/apis/") and path[len("/apis/"):] in _DISCOVERY:
            gv = path[len("/apis/"):]
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": _DISCOVERY[gv]}
        if path in ("/healthz", "/readyz", "/livez"):
            return b"ok"
        m = _PATH.match(path)
        group = _GROUPS.get(m.group("prefix")) if m else None
        resource = _ROUTES.get((group, m.group("resource"))) if m and group is not None else None
        if m is None or group is None or resource is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        ns, name, sub = m.group("ns", "name", "sub")
        if sub and (name is None or sub not in _SUBRESOURCES.get(resource, ())):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        watch = method == "GET" and name is None and _bool_param(query, "watch")
        verb = {"GET": "get" if name else ("watch" if watch else "list"), "POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection"}[method]
        plural = m.group("resource")
        if self.server.rbac is not None and not rbac_allows(self.server.rbac, verb, group, f"{plural}/{sub}" if sub else plural, name):
            raise _forbidden(self.server.rbac_user, verb, group, f"{plural}/{sub}" if sub else plural, ns, name)
        if query.get("dryRun"):
            raise _bad_request("dryRun is not supported by this emulator")
        if resource == "v1/namespaces":
            return self._namespaces(method, ns, name)
        if name is None:
            if watch:
                self._watch(resource, ns, query)
                return None
            if method == "GET":
                items = cluster.list_objects(resource, ns, query.get("labelSelector", ""), query.get("fieldSelector", ""))
                if self._wants_table():
                    return as_table(resource, items, resource_version=str(cluster.rv), include=query.get("includeObject", "Metadata"))
                kind = _KINDS[resource]
                return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                        "metadata": {"resourceVersion": str(cluster.rv)}, "items": items}
            if method == "POST" and ns and resource == DEPLOYMENTS:
                return cluster.create_deployment(ns, self._body())
            if method == "POST" and ns and resource in _GENERIC:
                return cluster.create_object(resource, ns, self._body())
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {plural}")
        if ns is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if resource == PODS and sub == "log" and method == "GET":
            return cluster.read_log(ns, name, container=query.get("container") or None, previous=_bool_param(query, "previous"),
                                    since_seconds=_int_param(query, "sinceSeconds"), since_time=query.get("sinceTime") or None,
                                    tail_lines=_int_param(query, "tailLines"), timestamps=_bool_param(query, "timestamps"),
                                    limit_bytes=_int_param(query, "limitBytes"))
        if resource == DEPLOYMENTS:
            answer = self._deployment(method, ns, name, sub or "")
        elif resource in _GENERIC:
            answer = self._generic(resource, method, ns, name, sub or "")
        elif method == "GET" and not sub:
            answer = cluster.get(resource, ns, name)
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {plural}")
        if method == "GET" and not sub and self._wants_table():
            return as_table(resource, [answer], resource_version=answer["metadata"]["resourceVersion"],
                            include=query.get("includeObject", "Metadata"))
        return answer

    def _namespaces(self, method: str, ns: str | None, name: str | None) -> Obj:
        cluster = self.server.cluster
        if method != "GET" or ns:
            raise ApiError(405, "MethodNotAllowed", "namespaces are read-only here")

        def obj(n: str) -> Obj:
            return {"kind": "Namespace", "apiVersion": "v1",
                    "metadata": {"name": n, "resourceVersion": "1", "creationTimestamp": _BOOTED, "labels": {
                        "kubernetes.io/metadata.name": n}}, "status": {"phase": "Active"}}

        if name:
            if name not in cluster.namespaces:
                raise _not_found("namespaces", name)
            found = obj(name)
            return as_table("v1/namespaces", [found], resource_version="1") if self._wants_table() else found
        items = [obj(n) for n in sorted(cluster.namespaces)]
        if self._wants_table():
            return as_table("v1/namespaces", items, resource_version=str(cluster.rv))
        return {"kind": "NamespaceList", "apiVersion": "v1", "metadata": {}, "items": items}

    def _deployment(self, method: str, ns: str, name: str, sub: str) -> Obj:
        cluster = self.server.cluster
        with cluster.lock:
            if method == "DELETE" and not sub:
                cluster.delete_deployment(ns, name)
                return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                        "details": {"name": name, "group": "apps", "kind": "deployments"}}
            current = cluster.get(DEPLOYMENTS, ns, name)
            if sub == "scale":
                if method == "GET":
                    return cluster.scale_of(current)
                scale = cluster.scale_of(current)
                new_scale = self._body() if method == "PUT" else self._patched(scale)
                if not isinstance((new_scale.get("spec") or {}).get("replicas"), int):
                    raise ApiError(422, "Invalid", "Scale.autoscaling is invalid: spec.replicas: Required value")
                want_rv = (new_scale.get("metadata") or {}).get("resourceVersion")
                current["spec"]["replicas"] = new_scale["spec"]["replicas"]
                current["metadata"]["resourceVersion"] = want_rv or current["metadata"]["resourceVersion"]
                return cluster.scale_of(cluster.update_deployment(ns, name, current))
            if method == "GET":
                return current
            if method == "PUT":
                return cluster.update_deployment(ns, name, self._body(), subresource=sub)
            if method == "PATCH":
                return cluster.update_deployment(ns, name, self._patched(current), subresource=sub)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on deployments/{sub}")

    def _generic(self, resource: str, method: str, ns: str, name: str, sub: str) -> Obj:
        cluster = self.server.cluster
        with cluster.lock:
            if method == "DELETE" and not sub:
                cluster.delete_object(resource, ns, name)
                group, plural, _ = _words(resource)
                return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                        "details": {"name": name, "group": group, "kind": plural, "uid": ""}}
            current = cluster.get(resource, ns, name)
            if method == "GET":
                return current
            if method == "PUT":
                return cluster.update_object(resource, ns, name, self._body(), subresource=sub)
            if method == "PATCH":
                return cluster.update_object(resource, ns, name, self._patched(current), subresource=sub)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {resource}")

    def _patched(self, current: Obj) -> Obj:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        body = self._body()
        if ctype == "application/json-patch+json":
            if not isinstance(body, list):
                raise ApiError(400, "BadRequest", "json patch must be a list of operations")
            result = json_patch(current, body)
        elif ctype == "application/merge-patch+json":
            result = json_merge_patch(current, body)
        elif ctype == "application/strategic-merge-patch+json":
            result = strategic_merge_patch(current, body)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted media types include: "
                           "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json "
                           f"(got {ctype!r})")
        if not isinstance(result, dict):
            raise ApiError(422, "Invalid", "patch did not produce an object")
        return result

    def _watch(self, resource: str, ns: str | None, query: dict[str, str]) -> None:
        """A chunked stream of watch events, ended after timeoutSeconds (or 30 s)."""
        cluster = self.server.cluster
        terms = parse_field_selector(resource, query.get("fieldSelector", ""))  # a bad selector is a 400, before the stream
        with cluster.lock:
            since = int(query.get("resourceVersion") or 0) or cluster.rv
            # Without a resourceVersion (or with "0") a watch starts with the current state: an
            # ADDED event per matching object, then the changes after it.
            initial = [] if int(query.get("resourceVersion") or 0) else [
                (since, resource, "ADDED", o) for o in cluster.list_objects(resource, ns, query.get("labelSelector", ""),
                                                                          query.get("fieldSelector", ""))]
        deadline = time.monotonic() + min(float(query.get("timeoutSeconds", 30)), 300)
        table = self._wants_table()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        try:
            while time.monotonic() < deadline and not self.server.stopping:
                with cluster.lock:
                    pending, initial = initial + [e for e in cluster.events if e[0] > since and e[1] == resource], []
                    if not pending:
                        cluster.changed.wait(timeout=0.2)
                        continue
                for rv, _, kind, obj in pending:
                    since = rv
                    if ns and obj["metadata"].get("namespace") != ns:
                        continue
                    if not label_selector_matches(query.get("labelSelector", ""), obj["metadata"].get("labels") or {}):
                        continue
                    if not all((_field_value(obj, path) == value) != neg for path, neg, value in terms):
                        continue
                    shown = as_table(resource, [obj], resource_version=str(rv)) if table else obj
                    chunk(json.dumps({"type": kind, "object": shown}).encode() + b"\n")
            chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


class KubeApiServer(ThreadingHTTPServer):
    """``with KubeApiServer() as api: api.kubeconfig(path)``; binds 127.0.0.1 on an ephemeral port.
    While started, the cluster's controller thread runs paced rollouts."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, port: int = 0, *, token: str = "emulator-token", require_token: bool = False) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.cluster = Cluster()
        self.faults = Faults()
        self.token, self.require_token = token, require_token
        self.rbac: list[Obj] | None = None  # ClusterRole rules; None allows every request
        self.rbac_user = "system:serviceaccount:opsbot:opsbot"
        # Seconds each request waits before it is served, drawn uniformly from (low, high): a real API
        # server answers in ~5–30 ms (etcd, admission, the network), this one in well under 1 ms. A
        # bench knob (bench/workers_e2e.py --kube-latency): the wait costs no CPU, so scaling measured
        # with it shows what opsbot itself serialises rather than how busy the machine is.
        self.latency: tuple[float, float] = (0.0, 0.0)
        self.stopping = False
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> KubeApiServer:
        self.cluster.start_controller()
        self._thread = threading.Thread(target=self.serve_forever, name="kube-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.faults.clear()
        self.cluster.stop_controller()
        self.shutdown()
        self.server_close()

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, path: str, *, context: str = "emulator", namespace: str = "default") -> str:
        """Write a kubeconfig that points both kubectl and the Python client at this server."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace}}],
            "current-context": context,
        }
        with open(path, "w") as fh:
            json.dump(config, fh)
        return path


def deployment_manifest(name: str, image: str, *, replicas: int = 1, namespace: str = "default",
                        containers: list[Obj] | None = None, app_label: str | None = None) -> Obj:
    """A Deployment as a user would write it (no defaults): what ``kubectl create`` sends."""
    label = app_label or name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": label}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": label}},
            "template": {
                "metadata": {"labels": {"app": label}},
                "spec": {"containers": containers or [{"name": name, "image": image, "ports": [{"containerPort": 8080}]}]},
            },
        },
    }


def hpa_manifest(name: str, deployment: str, *, min_replicas: int = 1, max_replicas: int = 10, cpu_percent: int = 80,
                 namespace: str = "default") -> Obj:
    """An autoscaling/v2 HPA on a Deployment's cpu utilisation, as a user would write it."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization",
                                                                                    "averageUtilization": cpu_percent}}}],
        },
    }


def cronjob_manifest(name: str, image: str, *, schedule: str = "0 3 * * *", namespace: str = "default",
                     command: list[str] | None = None) -> Obj:
    """A batch/v1 CronJob as a user would write it."""
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "schedule": schedule,
            "jobTemplate": {
                "metadata": {"labels": {"app": name}},
                "spec": {"template": {"metadata": {"labels": {"app": name}}, "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [{"name": name, "image": image, "command": command or ["/bin/sh", "-c", "backup"]}],
                }}},
            },
        },
    }


# --------------------------------------------------------------------------- protobuf request bodies

# kubectl's typed clients (``kubectl create job --from=…``, ``kubectl create deployment``) send
# built-in objects as ``application/vnd.kubernetes.protobuf``: the bytes ``k8s\\0`` and a
# runtime.Unknown wrapping the object's message. A real API server takes that, so this one decodes
# it to the JSON the same client would have sent, from the wire schema below.
#
# The schema was generated from the Go types of k8s.io/api and k8s.io/apimachinery v0.32.9 (the
# kubectl here is 1.32): every message reachable from batch/v1 Job, batch/v1 CronJob and apps/v1
# Deployment, as ``Message field=number[:type][/flags]`` with type s(tring, the default), i(nt),
# b(ool), y (bytes), d(ouble) or a message; flags r (repeated), m (map, string keys), k (keep a
# zero value: the Go field is a pointer or not omitempty, so the JSON would carry it), i (an inline
# struct whose fields belong to the parent). Fields a newer client knows and this table does not are
# dropped, as a real server's decoder drops unknown protobuf fields.
_PROTOBUF = "application/vnd.kubernetes.protobuf"
_PROTOBUF_KINDS = {"Job": "batch.Job", "CronJob": "batch.CronJob", "Deployment": "apps.Deployment"}
_PROTOBUF_SCHEMA = """
apps.Deployment metadata=1:meta.ObjectMeta spec=2:apps.DeploymentSpec status=3:apps.DeploymentStatus
apps.DeploymentCondition type=1/k status=2/k reason=4 message=5 lastUpdateTime=6:meta.Time lastTransitionTime=7:meta.Time
apps.DeploymentSpec replicas=1:i/k selector=2:meta.LabelSelector/k template=3:core.PodTemplateSpec/k
  strategy=4:apps.DeploymentStrategy minReadySeconds=5:i revisionHistoryLimit=6:i/k paused=7:b progressDeadlineSeconds=9:i/k
apps.DeploymentStatus observedGeneration=1:i replicas=2:i updatedReplicas=3:i availableReplicas=4:i unavailableReplicas=5:i
  conditions=6:apps.DeploymentCondition/r readyReplicas=7:i collisionCount=8:i/k
apps.DeploymentStrategy type=1 rollingUpdate=2:apps.RollingUpdateDeployment/k
apps.RollingUpdateDeployment maxUnavailable=1:intstr.IntOrString/k maxSurge=2:intstr.IntOrString/k
batch.CronJob metadata=1:meta.ObjectMeta spec=2:batch.CronJobSpec status=3:batch.CronJobStatus
batch.CronJobSpec schedule=1/k startingDeadlineSeconds=2:i/k concurrencyPolicy=3 suspend=4:b/k
  jobTemplate=5:batch.JobTemplateSpec/k successfulJobsHistoryLimit=6:i/k failedJobsHistoryLimit=7:i/k timeZone=8/k
batch.CronJobStatus active=1:core.ObjectReference/r lastScheduleTime=4:meta.Time/k lastSuccessfulTime=5:meta.Time/k
batch.Job metadata=1:meta.ObjectMeta spec=2:batch.JobSpec status=3:batch.JobStatus
batch.JobCondition type=1/k status=2/k lastProbeTime=3:meta.Time lastTransitionTime=4:meta.Time reason=5 message=6
batch.JobSpec parallelism=1:i/k completions=2:i/k activeDeadlineSeconds=3:i/k selector=4:meta.LabelSelector/k manualSelector=5:b/k
  template=6:core.PodTemplateSpec/k backoffLimit=7:i/k ttlSecondsAfterFinished=8:i/k completionMode=9/k suspend=10:b/k
  podFailurePolicy=11:batch.PodFailurePolicy/k backoffLimitPerIndex=12:i/k maxFailedIndexes=13:i/k podReplacementPolicy=14/k
  managedBy=15/k successPolicy=16:batch.SuccessPolicy/k
batch.JobStatus conditions=1:batch.JobCondition/r startTime=2:meta.Time/k completionTime=3:meta.Time/k active=4:i succeeded=5:i
  failed=6:i completedIndexes=7 uncountedTerminatedPods=8:batch.UncountedTerminatedPods/k ready=9:i/k failedIndexes=10/k
  terminating=11:i/k
batch.JobTemplateSpec metadata=1:meta.ObjectMeta spec=2:batch.JobSpec
batch.PodFailurePolicy rules=1:batch.PodFailurePolicyRule/r
batch.PodFailurePolicyOnExitCodesRequirement containerName=1/k operator=2/k values=3:i/r
batch.PodFailurePolicyOnPodConditionsPattern type=1/k status=2/k
batch.PodFailurePolicyRule action=1/k onExitCodes=2:batch.PodFailurePolicyOnExitCodesRequirement/k
  onPodConditions=3:batch.PodFailurePolicyOnPodConditionsPattern/r
batch.SuccessPolicy rules=1:batch.SuccessPolicyRule/r
batch.SuccessPolicyRule succeededIndexes=1/k succeededCount=2:i/k
batch.UncountedTerminatedPods succeeded=1/r failed=2/r
core.AWSElasticBlockStoreVolumeSource volumeID=1/k fsType=2 partition=3:i readOnly=4:b
core.Affinity nodeAffinity=1:core.NodeAffinity/k podAffinity=2:core.PodAffinity/k podAntiAffinity=3:core.PodAntiAffinity/k
core.AppArmorProfile type=1/k localhostProfile=2/k
core.AzureDiskVolumeSource diskName=1/k diskURI=2/k cachingMode=3/k fsType=4/k readOnly=5:b/k kind=6/k
core.AzureFileVolumeSource secretName=1/k shareName=2/k readOnly=3:b
core.CSIVolumeSource driver=1/k readOnly=2:b/k fsType=3/k volumeAttributes=4/m nodePublishSecretRef=5:core.LocalObjectReference/k
core.Capabilities add=1/r drop=2/r
core.CephFSVolumeSource monitors=1/r path=2 user=3 secretFile=4 secretRef=5:core.LocalObjectReference/k readOnly=6:b
core.CinderVolumeSource volumeID=1/k fsType=2 readOnly=3:b secretRef=4:core.LocalObjectReference/k
core.ClusterTrustBundleProjection name=1/k signerName=2/k labelSelector=3:meta.LabelSelector/k path=4/k optional=5:b/k
core.ConfigMapEnvSource localObjectReference=1:core.LocalObjectReference/i optional=2:b/k
core.ConfigMapKeySelector localObjectReference=1:core.LocalObjectReference/i key=2/k optional=3:b/k
core.ConfigMapProjection localObjectReference=1:core.LocalObjectReference/i items=2:core.KeyToPath/r optional=4:b/k
core.ConfigMapVolumeSource localObjectReference=1:core.LocalObjectReference/i items=2:core.KeyToPath/r defaultMode=3:i/k
  optional=4:b/k
core.Container name=1/k image=2 command=3/r args=4/r workingDir=5 ports=6:core.ContainerPort/r env=7:core.EnvVar/r
  resources=8:core.ResourceRequirements volumeMounts=9:core.VolumeMount/r livenessProbe=10:core.Probe/k
  readinessProbe=11:core.Probe/k lifecycle=12:core.Lifecycle/k terminationMessagePath=13 imagePullPolicy=14
  securityContext=15:core.SecurityContext/k stdin=16:b stdinOnce=17:b tty=18:b envFrom=19:core.EnvFromSource/r
  terminationMessagePolicy=20 volumeDevices=21:core.VolumeDevice/r startupProbe=22:core.Probe/k
  resizePolicy=23:core.ContainerResizePolicy/r restartPolicy=24/k
core.ContainerPort name=1 hostPort=2:i containerPort=3:i/k protocol=4 hostIP=5
core.ContainerResizePolicy resourceName=1/k restartPolicy=2/k
core.DownwardAPIProjection items=1:core.DownwardAPIVolumeFile/r
core.DownwardAPIVolumeFile path=1/k fieldRef=2:core.ObjectFieldSelector/k resourceFieldRef=3:core.ResourceFieldSelector/k
  mode=4:i/k
core.DownwardAPIVolumeSource items=1:core.DownwardAPIVolumeFile/r defaultMode=2:i/k
core.EmptyDirVolumeSource medium=1 sizeLimit=2:res.Quantity/k
core.EnvFromSource prefix=1 configMapRef=2:core.ConfigMapEnvSource/k secretRef=3:core.SecretEnvSource/k
core.EnvVar name=1/k value=2 valueFrom=3:core.EnvVarSource/k
core.EnvVarSource fieldRef=1:core.ObjectFieldSelector/k resourceFieldRef=2:core.ResourceFieldSelector/k
  configMapKeyRef=3:core.ConfigMapKeySelector/k secretKeyRef=4:core.SecretKeySelector/k
core.EphemeralContainer ephemeralContainerCommon=1:core.EphemeralContainerCommon/i targetContainerName=2
core.EphemeralContainerCommon name=1/k image=2 command=3/r args=4/r workingDir=5 ports=6:core.ContainerPort/r env=7:core.EnvVar/r
  resources=8:core.ResourceRequirements volumeMounts=9:core.VolumeMount/r livenessProbe=10:core.Probe/k
  readinessProbe=11:core.Probe/k lifecycle=12:core.Lifecycle/k terminationMessagePath=13 imagePullPolicy=14
  securityContext=15:core.SecurityContext/k stdin=16:b stdinOnce=17:b tty=18:b envFrom=19:core.EnvFromSource/r
  terminationMessagePolicy=20 volumeDevices=21:core.VolumeDevice/r startupProbe=22:core.Probe/k
  resizePolicy=23:core.ContainerResizePolicy/r restartPolicy=24/k
core.EphemeralVolumeSource volumeClaimTemplate=1:core.PersistentVolumeClaimTemplate/k
core.ExecAction command=1/r
core.FCVolumeSource targetWWNs=1/r lun=2:i/k fsType=3 readOnly=4:b wwids=5/r
core.FlexVolumeSource driver=1/k fsType=2 secretRef=3:core.LocalObjectReference/k readOnly=4:b options=5/m
core.FlockerVolumeSource datasetName=1 datasetUUID=2
core.GCEPersistentDiskVolumeSource pdName=1/k fsType=2 partition=3:i readOnly=4:b
core.GRPCAction port=1:i/k service=2/k
core.GitRepoVolumeSource repository=1/k revision=2 directory=3
core.GlusterfsVolumeSource endpoints=1/k path=2/k readOnly=3:b
core.HTTPGetAction path=1 port=2:intstr.IntOrString/k host=3 scheme=4 httpHeaders=5:core.HTTPHeader/r
core.HTTPHeader name=1/k value=2/k
core.HostAlias ip=1/k hostnames=2/r
core.HostPathVolumeSource path=1/k type=2/k
core.ISCSIVolumeSource targetPortal=1/k iqn=2/k lun=3:i/k iscsiInterface=4 fsType=5 readOnly=6:b portals=7/r chapAuthDiscovery=8:b
  secretRef=10:core.LocalObjectReference/k chapAuthSession=11:b initiatorName=12/k
core.ImageVolumeSource reference=1 pullPolicy=2
core.KeyToPath key=1/k path=2/k mode=3:i/k
core.Lifecycle postStart=1:core.LifecycleHandler/k preStop=2:core.LifecycleHandler/k
core.LifecycleHandler exec=1:core.ExecAction/k httpGet=2:core.HTTPGetAction/k tcpSocket=3:core.TCPSocketAction/k
  sleep=4:core.SleepAction/k
core.LocalObjectReference name=1
core.NFSVolumeSource server=1/k path=2/k readOnly=3:b
core.NodeAffinity requiredDuringSchedulingIgnoredDuringExecution=1:core.NodeSelector/k
  preferredDuringSchedulingIgnoredDuringExecution=2:core.PreferredSchedulingTerm/r
core.NodeSelector nodeSelectorTerms=1:core.NodeSelectorTerm/r
core.NodeSelectorRequirement key=1/k operator=2/k values=3/r
core.NodeSelectorTerm matchExpressions=1:core.NodeSelectorRequirement/r matchFields=2:core.NodeSelectorRequirement/r
core.ObjectFieldSelector apiVersion=1 fieldPath=2/k
core.ObjectReference kind=1 namespace=2 name=3 uid=4 apiVersion=5 resourceVersion=6 fieldPath=7
core.PersistentVolumeClaimSpec accessModes=1/r resources=2:core.VolumeResourceRequirements volumeName=3
  selector=4:meta.LabelSelector/k storageClassName=5/k volumeMode=6/k dataSource=7:core.TypedLocalObjectReference/k
  dataSourceRef=8:core.TypedObjectReference/k volumeAttributesClassName=9/k
core.PersistentVolumeClaimTemplate metadata=1:meta.ObjectMeta spec=2:core.PersistentVolumeClaimSpec/k
core.PersistentVolumeClaimVolumeSource claimName=1/k readOnly=2:b
core.PhotonPersistentDiskVolumeSource pdID=1/k fsType=2
core.PodAffinity requiredDuringSchedulingIgnoredDuringExecution=1:core.PodAffinityTerm/r
  preferredDuringSchedulingIgnoredDuringExecution=2:core.WeightedPodAffinityTerm/r
core.PodAffinityTerm labelSelector=1:meta.LabelSelector/k namespaces=2/r topologyKey=3/k namespaceSelector=4:meta.LabelSelector/k
  matchLabelKeys=5/r mismatchLabelKeys=6/r
core.PodAntiAffinity requiredDuringSchedulingIgnoredDuringExecution=1:core.PodAffinityTerm/r
  preferredDuringSchedulingIgnoredDuringExecution=2:core.WeightedPodAffinityTerm/r
core.PodDNSConfig nameservers=1/r searches=2/r options=3:core.PodDNSConfigOption/r
core.PodDNSConfigOption name=1 value=2/k
core.PodOS name=1/k
core.PodReadinessGate conditionType=1/k
core.PodResourceClaim name=1/k resourceClaimName=3/k resourceClaimTemplateName=4/k
core.PodSchedulingGate name=1/k
core.PodSecurityContext seLinuxOptions=1:core.SELinuxOptions/k runAsUser=2:i/k runAsNonRoot=3:b/k supplementalGroups=4:i/r
  fsGroup=5:i/k runAsGroup=6:i/k sysctls=7:core.Sysctl/r windowsOptions=8:core.WindowsSecurityContextOptions/k
  fsGroupChangePolicy=9/k seccompProfile=10:core.SeccompProfile/k appArmorProfile=11:core.AppArmorProfile/k
  supplementalGroupsPolicy=12/k seLinuxChangePolicy=13/k
core.PodSpec volumes=1:core.Volume/r containers=2:core.Container/r restartPolicy=3 terminationGracePeriodSeconds=4:i/k
  activeDeadlineSeconds=5:i/k dnsPolicy=6 nodeSelector=7/m serviceAccountName=8 serviceAccount=9 nodeName=10 hostNetwork=11:b
  hostPID=12:b hostIPC=13:b securityContext=14:core.PodSecurityContext/k imagePullSecrets=15:core.LocalObjectReference/r
  hostname=16 subdomain=17 affinity=18:core.Affinity/k schedulerName=19 initContainers=20:core.Container/r
  automountServiceAccountToken=21:b/k tolerations=22:core.Toleration/r hostAliases=23:core.HostAlias/r priorityClassName=24
  priority=25:i/k dnsConfig=26:core.PodDNSConfig/k shareProcessNamespace=27:b/k readinessGates=28:core.PodReadinessGate/r
  runtimeClassName=29/k enableServiceLinks=30:b/k preemptionPolicy=31/k overhead=32:res.Quantity/m
  topologySpreadConstraints=33:core.TopologySpreadConstraint/r ephemeralContainers=34:core.EphemeralContainer/r
  setHostnameAsFQDN=35:b/k os=36:core.PodOS/k hostUsers=37:b/k schedulingGates=38:core.PodSchedulingGate/r
  resourceClaims=39:core.PodResourceClaim/r resources=40:core.ResourceRequirements/k
core.PodTemplateSpec metadata=1:meta.ObjectMeta spec=2:core.PodSpec
core.PortworxVolumeSource volumeID=1/k fsType=2 readOnly=3:b
core.PreferredSchedulingTerm weight=1:i/k preference=2:core.NodeSelectorTerm/k
core.Probe handler=1:core.ProbeHandler/i initialDelaySeconds=2:i timeoutSeconds=3:i periodSeconds=4:i successThreshold=5:i
  failureThreshold=6:i terminationGracePeriodSeconds=7:i/k
core.ProbeHandler exec=1:core.ExecAction/k httpGet=2:core.HTTPGetAction/k tcpSocket=3:core.TCPSocketAction/k
  grpc=4:core.GRPCAction/k
core.ProjectedVolumeSource sources=1:core.VolumeProjection/r defaultMode=2:i/k
core.QuobyteVolumeSource registry=1/k volume=2/k readOnly=3:b user=4 group=5 tenant=6
core.RBDVolumeSource monitors=1/r image=2/k fsType=3 pool=4 user=5 keyring=6 secretRef=7:core.LocalObjectReference/k readOnly=8:b
core.ResourceClaim name=1/k request=2
core.ResourceFieldSelector containerName=1 resource=2/k divisor=3:res.Quantity
core.ResourceRequirements limits=1:res.Quantity/m requests=2:res.Quantity/m claims=3:core.ResourceClaim/r
core.SELinuxOptions user=1 role=2 type=3 level=4
core.ScaleIOVolumeSource gateway=1/k system=2/k secretRef=3:core.LocalObjectReference/k sslEnabled=4:b protectionDomain=5
  storagePool=6 storageMode=7 volumeName=8 fsType=9 readOnly=10:b
core.SeccompProfile type=1/k localhostProfile=2/k
core.SecretEnvSource localObjectReference=1:core.LocalObjectReference/i optional=2:b/k
core.SecretKeySelector localObjectReference=1:core.LocalObjectReference/i key=2/k optional=3:b/k
core.SecretProjection localObjectReference=1:core.LocalObjectReference/i items=2:core.KeyToPath/r optional=4:b/k
core.SecretVolumeSource secretName=1 items=2:core.KeyToPath/r defaultMode=3:i/k optional=4:b/k
core.SecurityContext capabilities=1:core.Capabilities/k privileged=2:b/k seLinuxOptions=3:core.SELinuxOptions/k runAsUser=4:i/k
  runAsNonRoot=5:b/k readOnlyRootFilesystem=6:b/k allowPrivilegeEscalation=7:b/k runAsGroup=8:i/k procMount=9/k
  windowsOptions=10:core.WindowsSecurityContextOptions/k seccompProfile=11:core.SeccompProfile/k
  appArmorProfile=12:core.AppArmorProfile/k
core.ServiceAccountTokenProjection audience=1 expirationSeconds=2:i/k path=3/k
core.SleepAction seconds=1:i/k
core.StorageOSVolumeSource volumeName=1 volumeNamespace=2 fsType=3 readOnly=4:b secretRef=5:core.LocalObjectReference/k
core.Sysctl name=1/k value=2/k
core.TCPSocketAction port=1:intstr.IntOrString/k host=2
core.Toleration key=1 operator=2 value=3 effect=4 tolerationSeconds=5:i/k
core.TopologySpreadConstraint maxSkew=1:i/k topologyKey=2/k whenUnsatisfiable=3/k labelSelector=4:meta.LabelSelector/k
  minDomains=5:i/k nodeAffinityPolicy=6/k nodeTaintsPolicy=7/k matchLabelKeys=8/r
core.TypedLocalObjectReference apiGroup=1/k kind=2/k name=3/k
core.TypedObjectReference apiGroup=1/k kind=2/k name=3/k namespace=4/k
core.Volume name=1/k volumeSource=2:core.VolumeSource/i
core.VolumeDevice name=1/k devicePath=2/k
core.VolumeMount name=1/k readOnly=2:b mountPath=3/k subPath=4 mountPropagation=5/k subPathExpr=6 recursiveReadOnly=7/k
core.VolumeProjection secret=1:core.SecretProjection/k downwardAPI=2:core.DownwardAPIProjection/k
  configMap=3:core.ConfigMapProjection/k serviceAccountToken=4:core.ServiceAccountTokenProjection/k
  clusterTrustBundle=5:core.ClusterTrustBundleProjection/k
core.VolumeResourceRequirements limits=1:res.Quantity/m requests=2:res.Quantity/m
core.VolumeSource hostPath=1:core.HostPathVolumeSource/k emptyDir=2:core.EmptyDirVolumeSource/k
  gcePersistentDisk=3:core.GCEPersistentDiskVolumeSource/k awsElasticBlockStore=4:core.AWSElasticBlockStoreVolumeSource/k
  gitRepo=5:core.GitRepoVolumeSource/k secret=6:core.SecretVolumeSource/k nfs=7:core.NFSVolumeSource/k
  iscsi=8:core.ISCSIVolumeSource/k glusterfs=9:core.GlusterfsVolumeSource/k
  persistentVolumeClaim=10:core.PersistentVolumeClaimVolumeSource/k rbd=11:core.RBDVolumeSource/k
  flexVolume=12:core.FlexVolumeSource/k cinder=13:core.CinderVolumeSource/k cephfs=14:core.CephFSVolumeSource/k
  flocker=15:core.FlockerVolumeSource/k downwardAPI=16:core.DownwardAPIVolumeSource/k fc=17:core.FCVolumeSource/k
  azureFile=18:core.AzureFileVolumeSource/k configMap=19:core.ConfigMapVolumeSource/k
  vsphereVolume=20:core.VsphereVirtualDiskVolumeSource/k quobyte=21:core.QuobyteVolumeSource/k
  azureDisk=22:core.AzureDiskVolumeSource/k photonPersistentDisk=23:core.PhotonPersistentDiskVolumeSource/k
  portworxVolume=24:core.PortworxVolumeSource/k scaleIO=25:core.ScaleIOVolumeSource/k projected=26:core.ProjectedVolumeSource/k
  storageos=27:core.StorageOSVolumeSource/k csi=28:core.CSIVolumeSource/k ephemeral=29:core.EphemeralVolumeSource/k
  image=30:core.ImageVolumeSource/k
core.VsphereVirtualDiskVolumeSource volumePath=1/k fsType=2 storagePolicyName=3 storagePolicyID=4
core.WeightedPodAffinityTerm weight=1:i/k podAffinityTerm=2:core.PodAffinityTerm/k
core.WindowsSecurityContextOptions gmsaCredentialSpecName=1/k gmsaCredentialSpec=2/k runAsUserName=3/k hostProcess=4:b/k
meta.LabelSelector matchLabels=1/m matchExpressions=2:meta.LabelSelectorRequirement/r
meta.LabelSelectorRequirement key=1/k operator=2/k values=3/r
meta.ManagedFieldsEntry manager=1 operation=2 apiVersion=3 time=4:meta.Time/k fieldsType=6 fieldsV1=7:meta.FieldsV1/k
  subresource=8
meta.ObjectMeta name=1 generateName=2 namespace=3 selfLink=4 uid=5 resourceVersion=6 generation=7:i creationTimestamp=8:meta.Time
  deletionTimestamp=9:meta.Time/k deletionGracePeriodSeconds=10:i/k labels=11/m annotations=12/m
  ownerReferences=13:meta.OwnerReference/r finalizers=14/r managedFields=17:meta.ManagedFieldsEntry/r
meta.OwnerReference kind=1/k name=3/k uid=4/k apiVersion=5/k controller=6:b/k blockOwnerDeletion=7:b/k
"""
_pb_schema: dict[str, dict[int, tuple[str, str, str]]] = {}


def _protobuf_schema() -> dict[str, dict[int, tuple[str, str, str]]]:
    if not _pb_schema:
        for entry in re.split(r"\n(?! )", _PROTOBUF_SCHEMA.strip()):
            name, *tokens = entry.split()
            fields: dict[int, tuple[str, str, str]] = {}
            for token in tokens:
                m = re.fullmatch(r"(\w+)=(\d+)(?::([\w.]+))?(?:/(\w+))?", token)
                assert m, token
                fields[int(m.group(2))] = (m.group(1), m.group(3) or "s", m.group(4) or "")
            _pb_schema[name] = fields
    return _pb_schema


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _pb_fields(data: bytes) -> Iterable[tuple[int, int, Any]]:
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        wire: int = key & 7
        value: Any
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i:i + size], i + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(data):
            raise ValueError("truncated field")
        yield key >> 3, wire, value


def _go_duration(ns: int) -> str:
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    hours, rest = divmod(ns, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    seconds = f"{rest / 1e9:.9f}".rstrip("0").rstrip(".")
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{seconds}s"
    return sign + text


def _pb_value(kind: str, wire: int, raw: Any) -> Any:
    if kind == "s":
        return bytes(raw).decode()
    if kind == "i":
        return raw - (1 << 64) if raw >= 1 << 63 else raw
    if kind == "b":
        return bool(raw)
    if kind == "y":
        return base64.b64encode(bytes(raw)).decode()
    if kind == "d":
        return struct.unpack("<d" if len(raw) == 8 else "<f", bytes(raw))[0]
    if kind in ("meta.Time", "meta.MicroTime"):
        parts = {num: v for num, _, v in _pb_fields(bytes(raw))}
        if not parts:
            return None  # the zero time, which JSON writes as null
        seconds = parts.get(1, 0)
        seconds = seconds - (1 << 64) if seconds >= 1 << 63 else seconds
        t = datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=parts.get(2, 0) // 1000)
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if kind == "meta.MicroTime" else _stamp(t)
    if kind == "meta.Duration":
        ns = dict((num, v) for num, _, v in _pb_fields(bytes(raw))).get(1, 0)
        return _go_duration(ns - (1 << 64) if ns >= 1 << 63 else ns)
    if kind in ("meta.FieldsV1", "runtime.RawExtension"):
        inner = dict((num, v) for num, _, v in _pb_fields(bytes(raw))).get(1, b"")
        return json.loads(bytes(inner)) if inner else None
    if kind == "res.Quantity":
        return bytes(dict((num, v) for num, _, v in _pb_fields(bytes(raw))).get(1, b"")).decode()
    if kind == "intstr.IntOrString":
        parts = {num: v for num, _, v in _pb_fields(bytes(raw))}
        return bytes(parts.get(3, b"")).decode() if parts.get(1) else _pb_value("i", 0, parts.get(2, 0))
    return _pb_message(kind, bytes(raw))


def _pb_message(name: str, data: bytes) -> Obj:
    schema = _protobuf_schema()[name]
    out: Obj = {}
    for num, wire, raw in _pb_fields(data):
        field = schema.get(num)
        if field is None:
            continue
        jname, kind, flags = field
        if "m" in flags:
            entry = {n: v for n, _, v in _pb_fields(bytes(raw))}
            value = _pb_value(kind, 2, entry[2]) if 2 in entry else ("" if kind == "s" else {})
            out.setdefault(jname, {})[bytes(entry.get(1, b"")).decode()] = value
        elif "r" in flags:
            if wire == 2 and kind in ("i", "b"):  # packed
                i, packed = 0, bytes(raw)
                while i < len(packed):
                    item, i = _varint(packed, i)
                    out.setdefault(jname, []).append(_pb_value(kind, 0, item))
            else:
                out.setdefault(jname, []).append(_pb_value(kind, wire, raw))
        elif "i" in flags:
            out.update(_pb_message(kind, bytes(raw)))
        else:
            out[jname] = _pb_value(kind, wire, raw)
    for jname, kind, flags in schema.values():  # gogo writes every non-pointer scalar; omitempty JSON would not
        if kind in ("s", "i", "b", "d", "y") and not set(flags) & {"k", "r", "m"} and out.get(jname, None) in ("", 0, False):
            out.pop(jname, None)
    return out


_pb_names: dict[str, dict[str, tuple[str, str]]] = {}


def _json_fields(name: str) -> dict[str, tuple[str, str]]:
    """json name -> (type, flags) of a message, its inline structs' fields included."""
    if name not in _pb_names:
        names: dict[str, tuple[str, str]] = {}
        for jname, kind, flags in _protobuf_schema()[name].values():
            if "i" in flags:
                names.update(_json_fields(kind))
            else:
                names[jname] = (kind, flags)
        _pb_names[name] = names
    return _pb_names[name]


def drop_empty_fields(name: str, obj: Any) -> Any:
    """What a real API server's JSON round trip through its Go types does to a written object:
    scalar fields at their zero value that are ``omitempty`` (and not pointers) disappear, so
    ``{"stdin": false, "value": ""}`` is stored as ``{}``. ``name``: a message of the schema above."""
    if not isinstance(obj, dict):
        return obj
    fields = _json_fields(name)
    for key in list(obj):
        spec = fields.get(key)
        if spec is None:
            continue
        kind, flags, value = spec[0], spec[1], obj[key]
        if kind in ("s", "i", "b", "d", "y"):
            if not set(flags) & {"k", "r", "m"} and value in ("", 0, False) and not isinstance(value, float | dict | list):
                del obj[key]
            continue
        if kind not in _protobuf_schema():
            continue
        if "m" in flags and isinstance(value, dict):
            for k in value:
                value[k] = drop_empty_fields(kind, value[k])
        elif "r" in flags and isinstance(value, list):
            obj[key] = [drop_empty_fields(kind, item) for item in value]
        else:
            obj[key] = drop_empty_fields(kind, value)
    return obj


def decode_protobuf(body: bytes) -> Obj:
    """A ``application/vnd.kubernetes.protobuf`` request body as the JSON object it stands for."""
    if not body.startswith(b"k8s\x00"):
        raise _bad_request("the body of the request was in an unknown format: missing the protobuf magic prefix")
    try:
        unknown = {num: v for num, _, v in _pb_fields(body[4:])}
        type_meta = {num: bytes(v).decode() for num, _, v in _pb_fields(bytes(unknown.get(1, b"")))}
        kind = type_meta.get(2, "")
        if kind not in _PROTOBUF_KINDS:
            raise ApiError(415, "UnsupportedMediaType", f"the emulator decodes protobuf only for {', '.join(_PROTOBUF_KINDS)}, "
                           f"not {kind or 'this object'}: send application/json")
        obj = _pb_message(_PROTOBUF_KINDS[kind], bytes(unknown.get(2, b"")))
    except (ValueError, KeyError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise _bad_request(f"the body of the request was in an unknown format: {exc}") from exc
    return {"apiVersion": type_meta.get(1, ""), "kind": kind, **obj}
