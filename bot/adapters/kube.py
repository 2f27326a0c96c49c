"""Kubernetes through the official ``kubernetes`` client. The only module that imports it.

One ApiClient per environment (``environments.<name>.kube_context`` in the kubeconfig, or the
in-cluster service account when there is no kubeconfig). The client is synchronous (urllib3), so
every call runs in a thread; responses are read raw (``_preload_content=False``) so that no field
is lost to model classes older or newer than the cluster, which matters when a pod template is
copied back during a rollback.

Why the calls look the way they do:

* **The kubeconfig is loaded off the event loop.** Loading it reads and parses the file and may
  write the certificates it holds to temporary files: ~300 ms the first time, which used to stall
  every request in the process (the first `status` ack took 300 ms). ``load`` reads every
  environment's at start-up in the client threads, and a call only ever touches it from a client
  thread (``_ClientOf``), so a kubeconfig that could not be read at start is read there later.
* **Their own threads.** The calls run in a small ``ThreadPoolExecutor`` of their own (threads
  named ``kube_…``), not in asyncio's default executor: that one also runs aiohttp's DNS lookups
  and every ``asyncio.to_thread``, so a hung API server used to starve unrelated replies (``/ops
  help`` took 12 s while ``status`` calls hung). A hung cluster can now occupy at most these
  threads.
* **A deadline per call**, slightly above the connect+read timeouts urllib3 already enforces.
  urllib3's timeouts do not cover everything (a name lookup, a server that trickles bytes), and a
  call queued behind hung threads has not even started: the deadline bounds the wait in every case.
  A queued call that reaches its deadline is cancelled before it sends anything.
* **Reads are retried, writes never are.** A GET/list that meets 500/502/503/504 or a connection
  error is tried again a couple of times within the same deadline. A PATCH is sent once: after a
  5xx, a reset connection or a timeout the write may well have been applied, and only a human who
  looks at the deployment can tell, so the error says the outcome is unknown (``OutcomeUnknown``).
  Only a write that provably never left (connection refused, still queued) is reported as the
  cluster being unavailable.
* **Logs are text; the kubelet's 400s are answers.** ``read_pod_log`` returns the body as text. A
  400 from it ("previous terminated container … not found", "a container name must be specified
  …", "… is waiting to start") is ``NotFound`` carrying the cluster's words: it tells the user what
  there is no log of, it is not opsbot failing.
* **Refusals name what is missing.** Each call carries the RBAC verb, resource and namespace it
  needs, so a 403 says exactly which rule to add to ``manifests/managed-namespace/role.yaml``; nothing is
  parsed out of the server's message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import urllib3

from bot.config import Config
from bot.errors import BackendUnavailable, Conflict, ExecutionError, NotFound, OpsbotError, OutcomeUnknown
from bot.ports import Obj

if TYPE_CHECKING:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)
CLUSTER = "the Kubernetes API"
RBAC_FILE = "manifests/managed-namespace/role.yaml"
_RETRYABLE = frozenset({500, 502, 503, 504})
# An attempt is not started with less time than this left before the deadline: it could not get
# an answer, and a write sent that late would turn "nothing was sent" into "outcome unknown".
_LEAST_TIME = 0.1
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Call:
    """One API call, in the words RBAC uses (verb, resource, namespace) and in plain words (``what``)."""

    what: str  # "scale deployment nova/nova-worker"
    environment: str
    verb: str  # get, list, patch
    resource: str  # deployments, deployments/scale, replicasets, /version
    namespace: str | None
    bad_request_is_not_found: bool = False  # a 400 answers a question about the target (pod logs), not a bug

    @property
    def write(self) -> bool:
        return self.verb not in ("get", "list", "watch")

    @property
    def look_at(self) -> str:
        """What a human should look at when this write's outcome is unknown."""
        return {"jobs": f"the jobs in namespace {self.namespace}", "horizontalpodautoscalers": "the HorizontalPodAutoscaler"}.get(
            self.resource, "the deployment")

    @property
    def where(self) -> str:
        return f" in namespace {self.namespace}" if self.namespace else ""


class _Expired(Exception):
    """The deadline passed before the request was sent (the call waited for a free thread)."""


def _status_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _json_object(data: bytes) -> Obj:
    body: Obj = json.loads(data)
    return body


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _never_sent(exc: BaseException) -> bool:
    """Errors that happen before a byte of the request reaches the server (no connection, no name).
    urllib3's ``NewConnectionError`` and ``NameResolutionError`` are ``ConnectTimeoutError``s."""
    return isinstance(exc, urllib3.exceptions.ConnectTimeoutError | ConnectionRefusedError)


def _k8s() -> ModuleType:
    """The ``kubernetes`` package, imported on first use rather than with this module: it imports
    every model class, google-auth, oauthlib and YAML (~0.4 s, most of ``import bot.runtime``), which
    `opsbot policy check`, `audit verify` and the tests that never touch a cluster do not need.
    ``KubeAdapter.load`` imports it at start-up, in a client thread."""
    import kubernetes.client
    import kubernetes.config

    return kubernetes


def _warm_apis() -> None:
    """``kubernetes.client`` imports each API module on first access; the apps one alone took
    ~2.5 s of a loaded worker's first job (py-spy, bench/workers_e2e.py). Done at start-up instead,
    in a client thread, with the rest of ``KubeAdapter.load``."""
    k8s = _k8s().client
    for api in ("AppsV1Api", "CoreV1Api", "AutoscalingV2Api", "BatchV1Api"):
        getattr(k8s, api)


def _api_exception() -> type[ApiException]:
    exc: type[ApiException] = _k8s().client.exceptions.ApiException
    return exc


class _ClientOf:
    """Stands in for an environment's ``ApiClient`` in the generated API classes (``AppsV1Api`` …),
    which only ever call methods on it, and only from inside a call, in a client thread: the first
    such use builds the real client (loading the kubeconfig) there, never on the event loop."""

    def __init__(self, adapter: KubeAdapter, environment: str) -> None:
        self._adapter, self._environment = adapter, environment

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter._api_client(self._environment), name)


class KubeAdapter:
    def __init__(self, config: Config, *, kubeconfig: str | None, connect_timeout: float = 3.05, read_timeout: float = 15.0,
                 deadline: float = 20.0, threads: int = 8, read_retries: int = 2, retry_backoff: float = 0.2) -> None:
        """``connect_timeout``/``read_timeout`` are urllib3's, per attempt; ``deadline`` bounds a
        whole call (waiting for a thread, every attempt and the pauses between them); a hung cluster
        holds at most ``threads`` threads. Tests shorten these; production keeps the defaults."""
        self._config = config
        self._kubeconfig = kubeconfig
        self._clients: dict[str, client.ApiClient] = {}
        self._lock = threading.Lock()
        self._connect_timeout, self._read_timeout, self._deadline = connect_timeout, read_timeout, deadline
        self._read_retries, self._retry_backoff = read_retries, retry_backoff
        self._threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")

    def _api_client(self, environment: str) -> client.ApiClient:
        with self._lock:
            api = self._clients.get(environment)
            if api is None:
                env = self._config.environments.get(environment)
                context = env.kube_context if env else None
                k8s = _k8s()
                cfg = k8s.client.Configuration()
                try:
                    if self._kubeconfig:
                        k8s.config.load_kube_config(config_file=self._kubeconfig, context=context, client_configuration=cfg)
                    else:
                        k8s.config.load_incluster_config(client_configuration=cfg)
                except (k8s.config.ConfigException, OSError) as exc:
                    raise BackendUnavailable(f"the Kubernetes cluster for {environment}", f"no usable kubeconfig: {exc}") from exc
                cfg.retries = False  # retries are decided here, per verb, not by urllib3
                api = k8s.client.ApiClient(cfg)
                self._clients[environment] = api
        return api

    def load(self, *, timeout: float = 10.0) -> Awaitable[None]:
        """Load every environment's kubeconfig now, in the client threads (at start-up, before the
        process says it is ready). One that cannot be loaded is reported by the calls that need it.
        (A plain method returning the awaitable: the adapter's public coroutines are its API calls,
        each of which tests/unit/test_kube_rbac.py checks against the Role; this one calls nothing.)"""
        return self._load(timeout)

    async def _load(self, timeout: float) -> None:
        futures: list[Future[Any]] = [self._executor.submit(self._api_client, env)
                                      for env in self._config.environments]
        if not futures:
            return
        futures.append(self._executor.submit(_warm_apis))
        done, pending = await asyncio.wait([asyncio.wrap_future(f) for f in futures], timeout=timeout)
        for f in pending:
            f.cancel()  # still loading (a slow disk, an exec plugin): the first call waits for it instead
        for f in done:
            if f.exception() is not None:
                log.warning("Kubernetes client not ready at start: %s", f.exception())

    def _apps(self, environment: str) -> client.AppsV1Api:
        api: client.AppsV1Api = _k8s().client.AppsV1Api(_ClientOf(self, environment))
        return api

    def _core(self, environment: str) -> client.CoreV1Api:
        api: client.CoreV1Api = _k8s().client.CoreV1Api(_ClientOf(self, environment))
        return api

    def _autoscaling(self, environment: str) -> client.AutoscalingV2Api:
        api: client.AutoscalingV2Api = _k8s().client.AutoscalingV2Api(_ClientOf(self, environment))
        return api

    def _batch(self, environment: str) -> client.BatchV1Api:
        api: client.BatchV1Api = _k8s().client.BatchV1Api(_ClientOf(self, environment))
        return api

    async def _call(self, call: _Call, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        """A call whose answer is a JSON object."""
        return await self._request(call, _json_object, fn, *args, **kwargs)

    async def _call_text(self, call: _Call, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
        """A call whose answer is text (pod logs)."""
        return await self._request(call, _text, fn, *args, **kwargs)

    async def _request(self, call: _Call, decode: Callable[[bytes], _T], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> _T:
        start = time.monotonic()
        deadline = start + self._deadline
        attempts = 1 + (0 if call.write else self._read_retries)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(call, start, decode, fn, *args, **kwargs)
            except (_api_exception(), urllib3.exceptions.HTTPError, OSError) as exc:
                # A read that timed out is not tried again: the server is hung, not flapping, and
                # another attempt would only spend the rest of the deadline the same way.
                retry = exc.status in _RETRYABLE if isinstance(exc, _api_exception()) else (
                    not isinstance(exc, urllib3.exceptions.ReadTimeoutError))
                pause = self._retry_backoff * 2 ** (attempt - 1)
                if not retry or attempt >= attempts or time.monotonic() + pause + _LEAST_TIME >= deadline:
                    raise self._error(call, exc, attempts=attempt, waited=min(time.monotonic() - start, self._deadline)) from exc
            await asyncio.sleep(pause)

    async def _attempt(self, call: _Call, start: float, decode: Callable[[bytes], _T], fn: Callable[..., Any], *args: Any,
                       **kwargs: Any) -> _T:
        deadline = start + self._deadline

        def run() -> _T:
            left = deadline - time.monotonic()
            if left < _LEAST_TIME:
                raise _Expired
            timeout = (min(self._connect_timeout, left), min(self._read_timeout, left))
            resp = fn(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
            return decode(resp.data)

        try:
            work = self._executor.submit(run)
        except RuntimeError as exc:  # the executor was shut down: opsbot is stopping
            raise BackendUnavailable(CLUSTER, f"{call.what}: opsbot is shutting down") from exc
        waiting = asyncio.wrap_future(work)
        try:
            done, _ = await asyncio.wait({waiting}, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            work.cancel()  # a call still queued never runs; one already sent finishes in its thread
            waiting.cancel()
            raise
        if done:
            if waiting.cancelled():  # close() dropped it from the queue
                raise BackendUnavailable(CLUSTER, f"{call.what}: opsbot is shutting down (nothing was sent)")
            try:
                return waiting.result()
            except _Expired:
                raise self._timeout(call, started=False, waited=self._deadline) from None
        started = not work.cancel()  # False: it was still queued, and now never runs
        waiting.cancel()  # whatever the thread ends with later is dropped, not logged as "never retrieved"
        raise self._timeout(call, started=started, waited=self._deadline)

    def _timeout(self, call: _Call, *, started: bool, waited: float) -> OpsbotError:
        within = f"did not answer within {round(waited, 1):g} s"
        if not started:
            return BackendUnavailable(CLUSTER, f"{call.what} {within}: all {self._threads} Kubernetes client threads were busy "
                                               "with earlier calls, so nothing was sent")
        if call.write:
            return OutcomeUnknown(f"Kubernetes {within} to {call.what}. The write may or may not have been applied, "
                                  f"so opsbot did not retry it: look at {call.look_at} before trying again.")
        return BackendUnavailable(CLUSTER, f"{call.what} {within}")

    def _error(self, call: _Call, exc: BaseException, *, attempts: int, waited: float) -> OpsbotError:
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        if isinstance(exc, _api_exception()):
            status, message = int(exc.status or 0), _status_message(exc)
            if status == 0:  # the client's own failures, e.g. TLS
                return BackendUnavailable(CLUSTER, f"{call.what}: {message}")
            if status == 404 or (status == 400 and call.bad_request_is_not_found):
                return NotFound(f"Kubernetes: {message}")
            if status == 409:
                return Conflict(f"Kubernetes refused the write: {message}")
            if status == 401:
                return ExecutionError(f"Kubernetes rejected opsbot's credentials for {call.environment} ({_status_line(401)}): "
                                      "the token or client certificate in the kubeconfig (or the in-cluster service account "
                                      "token) is wrong or expired.")
            if status == 403:
                return ExecutionError(f"Kubernetes denied opsbot's service account: it may not {call.verb} {call.resource}"
                                      f"{call.where} ({_status_line(403)}). Grant it in {RBAC_FILE}")
            if call.write and status >= 500:
                return OutcomeUnknown(f"Kubernetes answered {_status_line(status)} to {call.what}: {message}. The write may or "
                                      f"may not have been applied, so opsbot did not retry it: look at {call.look_at} before "
                                      "trying again.")
            return ExecutionError(f"Kubernetes answered {_status_line(status)} to {call.what}{tries}: {message}",
                                  temporary=status >= 500 or status == 429)
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
            return self._timeout(call, started=True, waited=waited)
        if call.write and not _never_sent(exc):
            return OutcomeUnknown(f"the connection to Kubernetes failed during {call.what} ({type(exc).__name__}: {exc}). The "
                                  f"write may or may not have been applied, so opsbot did not retry it: look at {call.look_at} "
                                  "before trying again.")
        return BackendUnavailable(CLUSTER, f"{call.what}{tries}: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Stop taking calls; queued ones are cancelled. Threads stuck on a hung server are not
        waited for (urllib3's timeouts end them)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:  # a load still running in a client thread may be adding one
            apis = list(self._clients.values())
        for api in apis:
            api.close()

    async def ping(self, environment: str) -> None:
        # GET /version: every authenticated identity may read it (system:public-info-viewer), so a
        # ping needs no RBAC beyond what manifests/managed-namespace/role.yaml grants.
        version = _k8s().client.VersionApi(_ClientOf(self, environment))
        await self._call(_Call("read the API server's version", environment, "get", "/version", None), version.get_code)

    async def read_deployment(self, environment: str, namespace: str, name: str) -> Obj:
        call = _Call(f"read deployment {namespace}/{name}", environment, "get", "deployments", namespace)
        return await self._call(call, self._apps(environment).read_namespaced_deployment, name, namespace)

    async def list_replicasets(self, environment: str, namespace: str, selector: str) -> list[Obj]:
        call = _Call(f"list replicasets in {namespace}", environment, "list", "replicasets", namespace)
        body = await self._call(call, self._apps(environment).list_namespaced_replica_set, namespace, label_selector=selector)
        return list(body.get("items") or [])

    async def scale_deployment(self, environment: str, namespace: str, name: str, *, replicas: int, resource_version: str) -> Obj:
        # A merge patch of the scale subresource, as `kubectl scale` sends; the resourceVersion in the
        # body is a precondition (409 if the deployment changed since we read it).
        body = {"metadata": {"resourceVersion": resource_version}, "spec": {"replicas": replicas}}
        call = _Call(f"scale deployment {namespace}/{name}", environment, "patch", "deployments/scale", namespace)
        return await self._call(call, self._apps(environment).patch_namespaced_deployment_scale, name, namespace, body,
                                _content_type="application/merge-patch+json")

    async def replace_pod_template(self, environment: str, namespace: str, name: str, *, template: Obj, resource_version: str) -> Obj:
        # What `kubectl rollout undo` sends (a JSON patch replacing spec.template), plus the
        # resourceVersion read before: the API server applies the patch and then refuses the write
        # with 409 if the object moved on in between.
        ops = [
            {"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version},
            {"op": "replace", "path": "/spec/template", "value": template},
        ]
        call = _Call(f"roll back deployment {namespace}/{name}", environment, "patch", "deployments", namespace)
        return await self._call(call, self._apps(environment).patch_namespaced_deployment, name, namespace, ops,
                                _content_type="application/json-patch+json")

    async def restart_deployment(self, environment: str, namespace: str, name: str, *, restarted_at: str,
                                 resource_version: str) -> Obj:
        # What `kubectl rollout restart` sends (a strategic merge patch of the template annotation),
        # plus the resourceVersion read before: 409 if the deployment changed in between.
        body = {"metadata": {"resourceVersion": resource_version},
                "spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": restarted_at}}}}}
        call = _Call(f"restart deployment {namespace}/{name}", environment, "patch", "deployments", namespace)
        return await self._call(call, self._apps(environment).patch_namespaced_deployment, name, namespace, body,
                                _content_type="application/strategic-merge-patch+json")

    async def list_pods(self, environment: str, namespace: str, selector: str) -> list[Obj]:
        call = _Call(f"list pods in {namespace}", environment, "list", "pods", namespace)
        body = await self._call(call, self._core(environment).list_namespaced_pod, namespace, label_selector=selector)
        return list(body.get("items") or [])

    async def read_pod_log(self, environment: str, namespace: str, pod: str, *, container: str | None,
                           since_seconds: int | None, tail_lines: int | None, previous: bool, limit_bytes: int) -> str:
        # A 400 here is the kubelet saying what there is no log of ("previous terminated container
        # … not found", "a container name must be specified …", "… is waiting to start"): NotFound
        # with its words, for the user, not an error of opsbot.
        call = _Call(f"read the logs of pod {namespace}/{pod}", environment, "get", "pods/log", namespace,
                     bad_request_is_not_found=True)
        options: dict[str, Any] = {"previous": previous, "limit_bytes": limit_bytes}
        if container is not None:
            options["container"] = container
        if since_seconds is not None:
            options["since_seconds"] = since_seconds
        if tail_lines is not None:
            options["tail_lines"] = tail_lines
        return await self._call_text(call, self._core(environment).read_namespaced_pod_log, pod, namespace, **options)

    async def list_events(self, environment: str, namespace: str, *, field_selector: str) -> list[Obj]:
        call = _Call(f"list events in {namespace}", environment, "list", "events", namespace)
        body = await self._call(call, self._core(environment).list_namespaced_event, namespace, field_selector=field_selector)
        return list(body.get("items") or [])

    async def find_hpa(self, environment: str, namespace: str, deployment_name: str) -> Obj | None:
        """The HPA whose scaleTargetRef is this Deployment (the first by name if, wrongly, several are)."""
        call = _Call(f"list horizontalpodautoscalers in {namespace}", environment, "list", "horizontalpodautoscalers", namespace)
        body = await self._call(call, self._autoscaling(environment).list_namespaced_horizontal_pod_autoscaler, namespace)
        for hpa in sorted(body.get("items") or [], key=lambda h: str(h.get("metadata", {}).get("name", ""))):
            ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
            group = str(ref.get("apiVersion") or "apps/v1").split("/")[0]
            if ref.get("kind") == "Deployment" and ref.get("name") == deployment_name and group == "apps":
                found: Obj = hpa
                return found
        return None

    async def patch_hpa_bounds(self, environment: str, namespace: str, name: str, *, min_replicas: int, max_replicas: int,
                               resource_version: str) -> Obj:
        # A merge patch carrying the resourceVersion read before: the API server refuses it with 409
        # if the HPA changed since (a JSON patch `test` op would fail with 422 instead).
        body = {"metadata": {"resourceVersion": resource_version}, "spec": {"minReplicas": min_replicas, "maxReplicas": max_replicas}}
        call = _Call(f"set the bounds of horizontalpodautoscaler {namespace}/{name}", environment, "patch",
                     "horizontalpodautoscalers", namespace)
        return await self._call(call, self._autoscaling(environment).patch_namespaced_horizontal_pod_autoscaler, name, namespace,
                                body, _content_type="application/merge-patch+json")

    async def read_cronjob(self, environment: str, namespace: str, name: str) -> Obj:
        call = _Call(f"read cronjob {namespace}/{name}", environment, "get", "cronjobs", namespace)
        return await self._call(call, self._batch(environment).read_namespaced_cron_job, name, namespace)

    async def create_job(self, environment: str, namespace: str, body: Obj) -> Obj:
        # A write: sent once. A Job of that name already there is a 409 AlreadyExists → Conflict.
        what = (body.get("metadata") or {}).get("name") or (body.get("metadata") or {}).get("generateName") or "(unnamed)"
        call = _Call(f"create job {namespace}/{what}", environment, "create", "jobs", namespace)
        return await self._call(call, self._batch(environment).create_namespaced_job, namespace, body)

    async def read_job(self, environment: str, namespace: str, name: str) -> Obj:
        call = _Call(f"read job {namespace}/{name}", environment, "get", "jobs", namespace)
        return await self._call(call, self._batch(environment).read_namespaced_job, name, namespace)
