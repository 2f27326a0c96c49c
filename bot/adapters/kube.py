"""Kubernetes through the official ``kubernetes`` client. The only module that imports it.

One ApiClient per environment (``environments.<name>.kube_context`` in the kubeconfig, or the
in-cluster service account when there is no kubeconfig). The client is synchronous (urllib3), so
every call runs in a thread; responses are read raw (``_preload_content=False``) so that no field
is lost to model classes older or newer than the cluster, which matters when a pod template is
copied back during a rollback.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import urllib3
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from bot.config import Config
from bot.errors import BackendUnavailable, Conflict, ExecutionError, NotFound
from bot.ports import Obj

_TIMEOUT = (3.05, 15)  # connect, read: a dead cluster must fail fast, never hang a request


def _status_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)


class KubeAdapter:
    def __init__(self, config: Config, *, kubeconfig: str | None) -> None:
        self._config = config
        self._kubeconfig = kubeconfig
        self._clients: dict[str, client.ApiClient] = {}
        self._lock = threading.Lock()

    def _api(self, environment: str) -> client.AppsV1Api:
        with self._lock:
            api = self._clients.get(environment)
            if api is None:
                env = self._config.environments.get(environment)
                context = env.kube_context if env else None
                cfg = client.Configuration()
                try:
                    if self._kubeconfig:
                        kube_config.load_kube_config(config_file=self._kubeconfig, context=context, client_configuration=cfg)
                    else:
                        kube_config.load_incluster_config(client_configuration=cfg)
                except (kube_config.ConfigException, OSError) as exc:
                    raise BackendUnavailable(f"the Kubernetes cluster for {environment}", f"no usable kubeconfig: {exc}") from exc
                cfg.retries = False
                api = client.ApiClient(cfg)
                self._clients[environment] = api
        return client.AppsV1Api(api)

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Obj:
        def run() -> Obj:
            resp = fn(*args, _preload_content=False, _request_timeout=_TIMEOUT, **kwargs)
            body: Obj = json.loads(resp.data)
            return body

        try:
            return await asyncio.to_thread(run)
        except ApiException as exc:
            message = _status_message(exc)
            if exc.status == 404:
                raise NotFound(f"Kubernetes: {message}") from exc
            if exc.status == 409:
                raise Conflict(f"Kubernetes refused the write: {message}") from exc
            if exc.status in (401, 403):
                raise ExecutionError(f"Kubernetes denied opsbot's service account ({exc.status}): {message}") from exc
            raise ExecutionError(f"Kubernetes answered {exc.status} to {what}: {message}", temporary=exc.status >= 500) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendUnavailable("the Kubernetes API", f"{what}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        for api in self._clients.values():
            api.close()

    async def ping(self, environment: str) -> None:
        await self._call("list namespaces", lambda **kw: client.CoreV1Api(self._api(environment).api_client).list_namespace(limit=1, **kw))

    async def read_deployment(self, environment: str, namespace: str, name: str) -> Obj:
        return await self._call(f"read deployment {namespace}/{name}", self._api(environment).read_namespaced_deployment, name, namespace)

    async def list_replicasets(self, environment: str, namespace: str, selector: str) -> list[Obj]:
        body = await self._call(f"list replicasets in {namespace}", self._api(environment).list_namespaced_replica_set,
                                namespace, label_selector=selector)
        return list(body.get("items") or [])

    async def scale_deployment(self, environment: str, namespace: str, name: str, *, replicas: int, resource_version: str) -> Obj:
        # A merge patch of the scale subresource, as `kubectl scale` sends; the resourceVersion in the
        # body is a precondition (409 if the deployment changed since we read it).
        body = {"metadata": {"resourceVersion": resource_version}, "spec": {"replicas": replicas}}
        api = self._api(environment)
        return await self._call(f"scale deployment {namespace}/{name}", api.patch_namespaced_deployment_scale, name, namespace, body,
                                _content_type="application/merge-patch+json")

    async def replace_pod_template(self, environment: str, namespace: str, name: str, *, template: Obj, resource_version: str) -> Obj:
        # What `kubectl rollout undo` sends (a JSON patch replacing spec.template), plus the
        # resourceVersion read before: the API server applies the patch and then refuses the write
        # with 409 if the object moved on in between.
        ops = [
            {"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version},
            {"op": "replace", "path": "/spec/template", "value": template},
        ]
        api = self._api(environment)
        return await self._call(f"roll back deployment {namespace}/{name}", api.patch_namespaced_deployment, name, namespace, ops,
                                _content_type="application/json-patch+json")
