"""A Kubernetes API server emulator, served over real HTTP.

Only the slice of the API that opsbot (and ``kubectl rollout``/``kubectl scale``) touches is
emulated, but that slice behaves the way a real API server plus the deployment controller does,
because the real clients (the ``kubernetes`` Python package and the ``kubectl`` binary) talk to it:

* discovery: ``/version``, ``/api``, ``/apis``, ``/api/v1``, ``/apis/apps/v1`` (kubectl needs these
  before it will send anything else);
* Deployments: get, list (label and field selectors), watch, create, replace, delete, and PATCH in
  the three content types clients send (JSON patch, merge patch, strategic merge patch), plus the
  ``scale`` and ``status`` subresources;
* ReplicaSets created the way the deployment controller does it: a template change makes a new
  ReplicaSet named ``<deployment>-<pod-template-hash>`` with the next
  ``deployment.kubernetes.io/revision``; going back to an old template re-uses that ReplicaSet and
  gives it the next revision (its old number lands in ``revision-history``), owner references set
  so that ``kubectl rollout history`` finds them;
* Pods per ReplicaSet, listed by label selector;
* ``resourceVersion`` preconditions (409 Conflict) and 404s shaped as ``Status`` objects;
* the API server's defaulting of pod templates on write. Without it a template copied back from a
  ReplicaSet never compares equal to the one in the Deployment, and ``kubectl rollout undo`` would
  misbehave exactly where a real cluster does not.

The controller is instantaneous: every rollout completes at once (all replicas updated, ready and
available), which is what a test of the bot wants to observe.

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
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

Obj = dict[str, Any]

REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
HASH_LABEL = "pod-template-hash"
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

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


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def _not_found(resource: str, name: str) -> ApiError:
    group, _, kind = resource.rpartition("/")
    full = f"{kind}.{group}" if group else kind
    return ApiError(404, "NotFound", f'{full} "{name}" not found', {"name": name, "group": group, "kind": kind})


def _conflict(resource: str, name: str) -> ApiError:
    group, _, kind = resource.rpartition("/")
    full = f"{kind}.{group}" if group else kind
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {full} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        {"name": name, "group": group, "kind": kind},
    )


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


def field_selector_matches(selector: str, obj: Obj) -> bool:
    for term in _split_selector(selector or ""):
        neg = "!=" in term
        key, value = (s.strip() for s in term.replace("==", "=").replace("!=", "=").split("=", 1))
        node: Any = obj
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if (str(node) == value) == neg:
            return False
    return True


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


# --------------------------------------------------------------------------- the store


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


class Cluster:
    """The objects and the instantaneous deployment controller. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.rv = 1000
        self.objects: dict[tuple[str, str, str], Obj] = {}  # (resource, namespace, name) -> object
        self.events: list[tuple[int, str, str, Obj]] = []  # (rv, resource, type, object)
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content-type) for tests
        self.namespaces: set[str] = {"default", "kube-system"}

    # -- persistence (`opsbot dev` keeps the sandbox cluster in its data directory)

    def snapshot(self) -> Obj:
        with self.lock:
            return {"rv": self.rv, "namespaces": sorted(self.namespaces),
                    "objects": [{"resource": r, "object": copy.deepcopy(o)} for (r, _, _), o in sorted(self.objects.items())]}

    def restore(self, state: Obj) -> None:
        with self.lock:
            self.rv = int(state["rv"])
            self.namespaces = set(state["namespaces"])
            self.objects = {(e["resource"], e["object"]["metadata"]["namespace"], e["object"]["metadata"]["name"]): e["object"]
                            for e in state["objects"]}
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
        obj = self.objects.pop((resource, namespace, name))
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._record(resource, "DELETED", obj)
        return obj

    def get(self, resource: str, namespace: str, name: str) -> Obj:
        with self.lock:
            obj = self.objects.get((resource, namespace, name))
            if obj is None:
                raise _not_found(resource, name)
            return copy.deepcopy(obj)

    def list_objects(self, resource: str, namespace: str | None, label_selector: str = "", field_selector: str = "") -> list[Obj]:
        with self.lock:
            items = [
                copy.deepcopy(o)
                for (res, ns, _), o in sorted(self.objects.items())
                if res == resource
                and (namespace is None or ns == namespace)
                and label_selector_matches(label_selector, o["metadata"].get("labels") or {})
                and field_selector_matches(field_selector, o)
            ]
            return items

    # -- deployments

    def create_deployment(self, namespace: str, body: Obj) -> Obj:
        with self.lock:
            d = copy.deepcopy(body)
            d["apiVersion"], d["kind"] = "apps/v1", "Deployment"
            meta = d.setdefault("metadata", {})
            name = meta.get("name")
            if not name:
                raise ApiError(422, "Invalid", "Deployment.apps is invalid: metadata.name: Required value")
            if ("apps/deployments", namespace, name) in self.objects:
                raise ApiError(409, "AlreadyExists", f'deployments.apps "{name}" already exists',
                               {"name": name, "group": "apps", "kind": "deployments"})
            self.namespaces.add(namespace)
            meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            meta.setdefault("annotations", {})
            default_deployment(d)
            self._validate_deployment(d)
            d["status"] = {}
            self._put("apps/deployments", d, "ADDED")
            self._reconcile(namespace, name)
            return self.get("apps/deployments", namespace, name)

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
        generation bump on spec change, then the controller."""
        with self.lock:
            current = self.get("apps/deployments", namespace, name)
            new = copy.deepcopy(new)
            meta = new.setdefault("metadata", {})
            rv = meta.get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                raise _conflict("apps/deployments", name)
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
                new["status"] = current.get("status", {})
                default_deployment(new)
                self._validate_deployment(new)
                if current.get("spec", {}).get("selector") != new["spec"].get("selector"):
                    raise ApiError(422, "Invalid", f'Deployment.apps "{name}" is invalid: spec.selector: '
                                   "Invalid value: field is immutable")
                if new["spec"] != current["spec"]:
                    meta["generation"] = int(current["metadata"]["generation"]) + 1
            self._put("apps/deployments", new, "MODIFIED")
            self._reconcile(namespace, name)
            return self.get("apps/deployments", namespace, name)

    def delete_deployment(self, namespace: str, name: str) -> Obj:
        with self.lock:
            d = self.get("apps/deployments", namespace, name)
            for rs in self._owned_replicasets(d):
                self._scale_rs(rs, 0)
                self._delete("apps/replicasets", namespace, rs["metadata"]["name"])
            return self._delete("apps/deployments", namespace, name)

    def scale_of(self, d: Obj) -> Obj:
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {k: d["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")},
            "spec": {"replicas": d["spec"]["replicas"]},
            "status": {"replicas": d["status"].get("replicas", 0), "selector": _match_labels_selector(d["spec"]["selector"])},
        }

    # -- the deployment controller

    def _owned_replicasets(self, d: Obj) -> list[Obj]:
        uid = d["metadata"]["uid"]
        return [
            rs for (res, ns, _), rs in self.objects.items()
            if res == "apps/replicasets" and ns == d["metadata"]["namespace"]
            and any(o.get("uid") == uid and o.get("controller") for o in rs["metadata"].get("ownerReferences") or [])
        ]

    def _reconcile(self, namespace: str, name: str) -> None:
        d = self.objects[("apps/deployments", namespace, name)]
        owned = self._owned_replicasets(d)
        template = d["spec"]["template"]
        new_rs = next((rs for rs in owned if _without_hash(rs["spec"]["template"]) == _without_hash(template)), None)
        max_rev = max((int(rs["metadata"].get("annotations", {}).get(REVISION, "0")) for rs in owned), default=0)
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
                    "ownerReferences": [{
                        "apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                        "uid": d["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True,
                    }],
                },
                "spec": {"replicas": 0, "selector": selector, "template": rs_template},
                "status": {"replicas": 0, "observedGeneration": 1},
            }
            self._put("apps/replicasets", new_rs, "ADDED")
            new_rev = max_rev + 1
        else:
            ann = new_rs["metadata"].setdefault("annotations", {})
            old_rev = int(ann.get(REVISION, "0"))
            if old_rev < max_rev:  # an old template came back: it becomes the newest revision
                history = [h for h in ann.get(REVISION_HISTORY, "").split(",") if h]
                ann[REVISION_HISTORY] = ",".join([*history, str(old_rev)])
                ann[REVISION] = str(max_rev + 1)
                # Like the real controller, the annotations of the deployment follow the RS (change-cause).
                if "kubernetes.io/change-cause" in d_ann:
                    ann["kubernetes.io/change-cause"] = d_ann["kubernetes.io/change-cause"]
                self._put("apps/replicasets", new_rs, "MODIFIED")
            new_rev = int(ann[REVISION])
        for rs in self._owned_replicasets(d):
            want = d["spec"]["replicas"] if rs["metadata"]["name"] == new_rs["metadata"]["name"] else 0
            self._scale_rs(rs, want)
        # Cleanup beyond revisionHistoryLimit: old, scaled-down ReplicaSets go first.
        old = sorted(
            (rs for rs in self._owned_replicasets(d) if rs["metadata"]["name"] != new_rs["metadata"]["name"]),
            key=lambda rs: int(rs["metadata"]["annotations"].get(REVISION, "0")),
        )
        for rs in old[: max(0, len(old) - int(d["spec"].get("revisionHistoryLimit", 10)))]:
            self._delete("apps/replicasets", namespace, rs["metadata"]["name"])
        replicas = d["spec"]["replicas"]
        status = {
            "observedGeneration": d["metadata"]["generation"],
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                 "message": "Deployment has minimum availability.", "lastUpdateTime": _now(), "lastTransitionTime": _now()},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                 "message": f'ReplicaSet "{new_rs["metadata"]["name"]}" has successfully progressed.',
                 "lastUpdateTime": _now(), "lastTransitionTime": _now()},
            ],
        }
        if not replicas:
            for key in ("readyReplicas", "availableReplicas", "updatedReplicas", "replicas"):
                status.pop(key)
        if d_ann.get(REVISION) != str(new_rev) or d.get("status") != status:
            d_ann[REVISION] = str(new_rev)
            d["status"] = status
            self._put("apps/deployments", d, "MODIFIED")

    def _scale_rs(self, rs: Obj, replicas: int) -> None:
        ns, _rs_name = rs["metadata"]["namespace"], rs["metadata"]["name"]
        pods = [p for (res, pns, _), p in list(self.objects.items())
                if res == "v1/pods" and pns == ns
                and any(o.get("uid") == rs["metadata"]["uid"] for o in p["metadata"].get("ownerReferences") or [])]
        for pod in pods[replicas:]:
            self._delete("v1/pods", ns, pod["metadata"]["name"])
        for _ in range(replicas - len(pods)):
            self._put("v1/pods", self._pod_for(rs), "ADDED")
        ready = max(replicas, 0)
        if rs["spec"]["replicas"] != replicas or rs["status"].get("replicas") != ready:
            rs["spec"]["replicas"] = replicas
            rs["status"] = {"replicas": ready, "fullyLabeledReplicas": ready, "readyReplicas": ready,
                            "availableReplicas": ready, "observedGeneration": rs["metadata"]["generation"]}
            if not ready:
                rs["status"] = {"replicas": 0, "observedGeneration": rs["metadata"]["generation"]}
            self._put("apps/replicasets", rs, "MODIFIED")

    def _pod_for(self, rs: Obj) -> Obj:
        template = copy.deepcopy(rs["spec"]["template"])
        suffix = "".join(secrets.choice(_HASH_ALPHABET) for _ in range(5))
        meta = template.get("metadata") or {}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{rs['metadata']['name']}-{suffix}",
                "namespace": rs["metadata"]["namespace"],
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _now(),
                "labels": dict(meta.get("labels") or {}),
                "annotations": dict(meta.get("annotations") or {}),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs["metadata"]["name"],
                                     "uid": rs["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": dict(template.get("spec") or {}, nodeName="emulated-node"),
            "status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": _now()}],
                "containerStatuses": [
                    {"name": c["name"], "image": c.get("image", ""), "ready": True, "restartCount": 0,
                     "started": True, "state": {"running": {"startedAt": _now()}}, "imageID": "", "containerID": ""}
                    for c in (template.get("spec") or {}).get("containers") or []
                ],
                "startTime": _now(),
            },
        }


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
    {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace",
     "verbs": ["get", "list"], "shortNames": ["ns"]},
    {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
     "verbs": ["get", "list", "watch"], "shortNames": ["po"], "categories": ["all"]},
]

_PATH = re.compile(
    r"^/(?P<prefix>api/v1|apis/apps/v1)"
    r"(?:/namespaces/(?P<ns>[^/]+))?"
    r"/(?P<resource>deployments|replicasets|pods|namespaces)"
    r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>scale|status))?$"
)


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

    def _raw_body(self) -> bytes:
        # Read once per request: an error answered before the body was parsed must still consume
        # it, or its bytes would be taken for the next request on this keep-alive connection.
        if self._raw is None:
            length = int(self.headers.get("Content-Length") or 0)
            self._raw = self.rfile.read(length) if length else b""
        return self._raw

    def _body(self) -> Any:
        raw = self._raw_body()
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the body of the request was in an unknown format: {exc}") from exc

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
        if body is not None:
            self._send(201 if method == "POST" else 200, body)

    def _route(self, method: str, path: str, query: dict[str, str]) -> Obj | None:
        cluster = self.server.cluster
        if path in ("/version", "/version/"):  # the Python client asks for the latter
            return {"major": "1", "minor": "32", "gitVersion": "v1.32.0-opsbot-emulator", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.server.address}]}
        if path == "/apis":
            gv = {"groupVersion": "apps/v1", "version": "v1"}
            return {"kind": "APIGroupList", "apiVersion": "v1",
                    "groups": [{"name": "apps", "versions": [gv], "preferredVersion": gv}]}
        if path == "/api/v1":
            return {"kind": "APIResourceList", "groupVersion": "v1", "resources": _CORE_RESOURCES}
        if path == "/apis/apps/v1":
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apps/v1", "resources": _APPS_RESOURCES}
        if path in ("/healthz", "/readyz", "/livez"):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
            return None
        m = _PATH.match(path)
        if not m:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        prefix, ns, res, name, sub = m.group("prefix", "ns", "resource", "name", "sub")
        resource = ("apps/" if prefix == "apis/apps/v1" else "v1/") + res
        if resource in ("apps/pods", "apps/namespaces", "v1/deployments", "v1/replicasets"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if res == "namespaces":
            return self._namespaces(method, ns, name)
        if name is None:
            if method == "GET" and query.get("watch") in ("true", "1"):
                self._watch(resource, ns, query)
                return None
            if method == "GET":
                items = cluster.list_objects(resource, ns, query.get("labelSelector", ""), query.get("fieldSelector", ""))
                kind = {"apps/deployments": "DeploymentList", "apps/replicasets": "ReplicaSetList", "v1/pods": "PodList"}[resource]
                return {"kind": kind, "apiVersion": prefix.replace("apis/", "").replace("api/", ""),
                        "metadata": {"resourceVersion": str(cluster.rv)}, "items": items}
            if method == "POST" and resource == "apps/deployments" and ns:
                return cluster.create_deployment(ns, self._body())
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {res}")
        assert ns is not None
        if resource != "apps/deployments":
            if method == "GET" and not sub:
                return cluster.get(resource, ns, name)
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {res}")
        return self._deployment(method, ns, name, sub or "")

    def _namespaces(self, method: str, ns: str | None, name: str | None) -> Obj:
        cluster = self.server.cluster
        if method != "GET" or ns:
            raise ApiError(405, "MethodNotAllowed", "namespaces are read-only here")

        def obj(n: str) -> Obj:
            return {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": n}, "status": {"phase": "Active"}}

        if name:
            if name not in cluster.namespaces:
                raise _not_found("namespaces", name)
            return obj(name)
        return {"kind": "NamespaceList", "apiVersion": "v1", "metadata": {}, "items": [obj(n) for n in sorted(cluster.namespaces)]}

    def _deployment(self, method: str, ns: str, name: str, sub: str) -> Obj:
        cluster = self.server.cluster
        with cluster.lock:
            if method == "DELETE" and not sub:
                cluster.delete_deployment(ns, name)
                return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                        "details": {"name": name, "group": "apps", "kind": "deployments"}}
            current = cluster.get("apps/deployments", ns, name)
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
        since = int(query.get("resourceVersion") or 0) or cluster.rv
        deadline = time.monotonic() + min(float(query.get("timeoutSeconds", 30)), 300)
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
                    pending = [e for e in cluster.events if e[0] > since and e[1] == resource]
                    if not pending:
                        cluster.changed.wait(timeout=0.2)
                        continue
                for rv, _, kind, obj in pending:
                    since = rv
                    if ns and obj["metadata"].get("namespace") != ns:
                        continue
                    if not label_selector_matches(query.get("labelSelector", ""), obj["metadata"].get("labels") or {}):
                        continue
                    if not field_selector_matches(query.get("fieldSelector", ""), obj):
                        continue
                    chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


class KubeApiServer(ThreadingHTTPServer):
    """``with KubeApiServer() as api: api.kubeconfig(path)``; binds 127.0.0.1 on an ephemeral port."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, port: int = 0, *, token: str = "emulator-token", require_token: bool = False) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.cluster = Cluster()
        self.faults = Faults()
        self.token, self.require_token = token, require_token
        self.stopping = False
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> KubeApiServer:
        self._thread = threading.Thread(target=self.serve_forever, name="kube-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.faults.clear()
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
