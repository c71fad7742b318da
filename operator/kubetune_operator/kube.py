"""The one module that talks to the API server (raw JSON through the kubernetes client).

Why raw JSON: builders produce plain dicts, status patches are merge patches, and one generic
`apply` covers every kind the operator owns.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from typing import Any

from kubetune_operator.api.models import API_VERSION, KIND, PLURAL

log = logging.getLogger(__name__)

Obj = dict[str, Any]
MERGE = "application/merge-patch+json"
COMPONENT = "kubetune-operator"

_lock = threading.Lock()
_client: Any = None


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


def configure(kubeconfig: str | None = None, context: str | None = None) -> None:
    """Load credentials once: in-cluster first, then the kubeconfig (KUBECONFIG or ~/.kube)."""
    global _client
    from kubernetes import client, config

    cfg = client.Configuration()
    loader: Any = config
    try:
        if kubeconfig is not None:
            raise config.ConfigException("explicit kubeconfig")
        loader.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        loader.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    with _lock:
        _client = client.ApiClient(cfg)


def configure_from_env() -> None:
    """Credentials for the operator process: in-cluster, or $KUBECONFIG when outside."""
    configure(os.environ.get("KUBETUNE_KUBECONFIG"))


def _api() -> Any:
    with _lock:
        ready = _client is not None
    if not ready:
        configure()
    return _client


def request(
    method: str,
    path: str,
    *,
    query: dict[str, Any] | None = None,
    body: Any = None,
    content_type: str = "application/json",
    raw: bool = False,
    timeout: float = 30.0,
) -> Any:
    api = _api()
    m, url, headers, body_, _ = api.param_serialize(
        method=method,
        resource_path=path,
        query_params=list((query or {}).items()) or None,
        header_params={"Accept": "application/json, */*", "Content-Type": content_type},
        body=body,
        auth_settings=["BearerToken"],
    )
    resp = api.call_api(m, url, header_params=headers, body=body_, _request_timeout=timeout)
    data = resp.read()
    if not 200 <= resp.status < 300:
        raise ApiError(resp.status, data.decode(errors="replace"))
    if raw:
        return data.decode(errors="replace")
    return json.loads(data) if data else {}


# --------------------------------------------------------------------------- paths

_CORE = {
    "Pod": "pods",
    "Service": "services",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Event": "events",
}
_APPS = {"Deployment": "deployments"}


def collection_path(kind: str, namespace: str) -> str:
    if kind in _CORE:
        return f"/api/v1/namespaces/{namespace}/{_CORE[kind]}"
    if kind in _APPS:
        return f"/apis/apps/v1/namespaces/{namespace}/{_APPS[kind]}"
    if kind == KIND:
        return f"/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
    raise ValueError(f"kind {kind!r} is not handled by kubetune")


def object_path(kind: str, namespace: str, name: str) -> str:
    return f"{collection_path(kind, namespace)}/{name}"


# --------------------------------------------------------------------------- generic


def get(kind: str, namespace: str, name: str) -> Obj | None:
    try:
        result: Obj = request("GET", object_path(kind, namespace, name))
    except ApiError as err:
        if err.status == 404:
            return None
        raise
    return result


def apply(obj: Obj) -> Obj:
    """Create, or merge-patch what exists (409). Idempotent: children have fixed names.

    Pods are not patched (their spec is immutable): an existing pod is returned as is.
    """
    kind, meta = obj["kind"], obj["metadata"]
    ns, name = meta["namespace"], meta["name"]
    try:
        created: Obj = request("POST", collection_path(kind, ns), body=obj)
        return created
    except ApiError as err:
        if err.status != 409:
            raise
    if kind == "Pod":
        existing = get(kind, ns, name)
        return existing or {}
    patched: Obj = request("PATCH", object_path(kind, ns, name), body=obj, content_type=MERGE)
    return patched


def delete(kind: str, namespace: str, name: str, grace: int | None = None) -> bool:
    # Background: dependents go through the garbage collector without blocking this call.
    # The grace goes in the body too: with a body, the API server ignores query options.
    body: dict[str, Any] = {"propagationPolicy": "Background"}
    if grace is not None:
        body["gracePeriodSeconds"] = grace
    try:
        request("DELETE", object_path(kind, namespace, name), body=body)
    except ApiError as err:
        if err.status == 404:
            return False
        raise
    return True


def list_objects(kind: str, namespace: str, selector: str) -> list[Obj]:
    result = request("GET", collection_path(kind, namespace), query={"labelSelector": selector})
    return list(result.get("items") or [])


def delete_by_label(kind: str, namespace: str, selector: str, grace: int | None = None) -> int:
    count = 0
    for item in list_objects(kind, namespace, selector):
        if item["metadata"].get("deletionTimestamp"):
            continue
        count += delete(kind, namespace, item["metadata"]["name"], grace)
    return count


def patch(kind: str, namespace: str, name: str, body: Obj, *, missing_ok: bool = False) -> Obj:
    """Merge patch; with missing_ok an object that does not exist is left alone ({})."""
    try:
        result: Obj = request(
            "PATCH", object_path(kind, namespace, name), body=body, content_type=MERGE
        )
    except ApiError as err:
        if err.status == 404 and missing_ok:
            return {}
        raise
    return result


# --------------------------------------------------------------------------- FineTuneJobs


def get_job(namespace: str, name: str) -> Obj | None:
    return get(KIND, namespace, name)


def patch_job_status(namespace: str, name: str, status: Obj) -> Obj:
    """Merge patch of the status subresource (lists such as conditions are replaced whole)."""
    path = object_path(KIND, namespace, name) + "/status"
    result: Obj = request("PATCH", path, body={"status": status}, content_type=MERGE)
    return result


def annotate_job(namespace: str, name: str, annotations: dict[str, str | None]) -> Obj:
    return patch(KIND, namespace, name, {"metadata": {"annotations": annotations}})


def list_jobs(namespace: str | None) -> list[Obj]:
    path = collection_path(KIND, namespace) if namespace else f"/apis/{API_VERSION}/{PLURAL}"
    return list(request("GET", path).get("items") or [])


# --------------------------------------------------------------------------- pods, secrets


def list_pods(namespace: str, selector: str) -> list[Obj]:
    return list_objects("Pod", namespace, selector)


def pod_log(namespace: str, pod: str, container: str | None = None, tail: int | None = None) -> str:
    query: dict[str, Any] = {}
    if container:
        query["container"] = container
    if tail is not None:
        query["tailLines"] = tail
    text: str = request("GET", object_path("Pod", namespace, pod) + "/log", query=query, raw=True)
    return text


def secret_keys(namespace: str, name: str) -> set[str] | None:
    """Key names in a Secret (never values); None when the operator may not read Secrets.

    Raises ApiError(404) when the Secret does not exist.
    """
    try:
        secret = request("GET", object_path("Secret", namespace, name))
    except ApiError as err:
        if err.status == 403:
            log.info("no permission to read Secret %s/%s: skipping the key check", namespace, name)
            return None
        raise
    return set((secret.get("data") or {}).keys()) | set((secret.get("stringData") or {}).keys())


# --------------------------------------------------------------------------- events


def emit_event(job: Obj, type_: str, reason: str, message: str) -> None:
    """A core/v1 Event on the job. Failures are logged, never raised: events are best effort."""
    meta = job["metadata"]
    ns = meta["namespace"]
    now = datetime.now(UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": ns},
        "involvedObject": {
            "apiVersion": job.get("apiVersion", API_VERSION),
            "kind": KIND,
            "name": meta["name"],
            "namespace": ns,
            "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    try:
        request("POST", collection_path("Event", ns), body=event)
    except Exception as exc:
        log.warning("could not post event %s on %s/%s: %s", reason, ns, meta["name"], exc)


def list_events(namespace: str, name: str, kind: str = KIND) -> list[Obj]:
    result = request(
        "GET",
        collection_path("Event", namespace),
        query={"fieldSelector": f"involvedObject.name={name},involvedObject.kind={kind}"},
    )
    return list(result.get("items") or [])


def list_nodes() -> list[Obj]:
    return list(request("GET", "/api/v1/nodes").get("items") or [])
