"""Node agent: the kubelet's stand-in for the test cluster.

Why: tests need pods that really run (operator, trainers, torchrun rendezvous) without
containers, images or root-level networking.  The agent registers fake GPU nodes, keeps them
Ready (Lease renewals + status heartbeats), watches pods bound to them and runs every
container's ``command + args`` as a local process group in this Python environment (the
venv's ``bin`` first on ``PATH``).  Images are recorded, never pulled; a container without a
``command`` uses ``image_entrypoints`` from the config (fnmatch on the image) or its ``args``.

How a pod is mapped onto the host (``DIR/pods/<namespace>_<pod>/``):

* ``<container>.log``   stdout+stderr of each container (appended across restarts).
* ``<container>.pid``   pid (= process group) of the running container, for fault injection.
* ``termination/<container>``  the termination-message file; the env var
  ``KUBETUNE_TERMINATION_LOG`` points at it and ``terminationMessagePath`` is rewritten to it.
* ``volumes/<volume>/`` configMap, secret, downwardAPI, projected and emptyDir volumes;
  ``persistentVolumeClaim`` volumes live in ``DIR/pvcs/<namespace>_<claim>`` (shared between
  pods, so checkpoints survive pod restarts) and ``hostPath`` volumes are the host path.
* ``work/``             the process working directory.

Mount paths cannot be bind-mounted, so they are **rewritten**: every ``volumeMounts[].mountPath``
(and ``terminationMessagePath``) that appears as a path prefix in ``command``, ``args`` or env
values is replaced with the materialised per-pod path (longest mount first; a ``subPath``
points inside the volume).  Programs that hard-code a path elsewhere will not see the volume.
``$(VAR)`` references are expanded as the kubelet does.

Networking: each pod gets its own loopback IP from ``pod_cidr`` (e.g. 127.0.1.x), reported in
``status.podIP`` and given to the process as env ``POD_IP`` only (processes bind to it if they
want).  ``<hostname>.<subdomain>[.<ns>[.svc[.cluster.local]]]`` of pods and
``<service>.<ns>[.svc[.cluster.local]]`` of Services (first ready endpoint; port must equal
targetPort) are written to ``/etc/hosts`` between marker comments tagged with the cluster id
and removed when the pod ends or the agent stops.

Status follows the kubelet: phase Pending -> Running -> Succeeded/Failed, container states,
restartCount, termination messages, Ready from readiness probes (httpGet, tcpSocket, exec),
liveness probes, restartPolicy with back-off, and graceful deletion (SIGTERM to the process
group, SIGKILL after the grace period, then the pod is deleted with grace 0).  Pods using the
ServiceAccount token volume get ``KUBECONFIG`` pointing at a kubeconfig with that token (the
in-cluster token path cannot be rewritten inside client libraries).  ``kubectl logs`` works
through a small HTTPS endpoint registered as the nodes' kubelet port.

Benchmarks: ``"run_pods": false`` in the config keeps the nodes registered and Ready but
never runs (or even watches) pods: bound pods stay Pending, so thousands of them cost nothing
but API objects.  Such pods are only removed by a force delete (``gracePeriodSeconds=0``).

Fault control (files under ``DIR/agent/control/``, polled every 0.2 s; see
``tests/cluster/faults.py``):

* ``<node>.notready`` stops that node's heartbeats and reports it NotReady; its pods are
  still run and synced.
* ``<node>.frozen`` (JSON ``{"token": ...}``) freezes the node as behind a network partition:
  no node status, no Lease renewal, and none of its pods is synced - no status updates, no
  SIGTERM/SIGKILL on deletion, no finishing of deletions, no start of newly bound pods, no
  restarts or probes.  Processes keep running (exits are only reaped locally).  A pod deleted
  from the API server meanwhile is remembered, not killed.  Removing the file thaws the node;
  the agent first reads ``<node>.unfreeze`` (JSON ``{"token": ..., "kill_orphans": bool}``,
  default kill) and reconciles like a kubelet after a partition: processes of pods that are
  gone from the API are killed (or, with ``kill_orphans: false``, left running unmanaged until
  they exit by themselves), every pod's status is pushed again, heartbeats resume at once.
* ``<node>.state`` is the agent's acknowledgement, written atomically once a freeze or thaw is
  in effect: ``{"frozen": bool, "token": ...}`` (the token of the request it applied).

The agent survives apiserver restarts: every API call is retried and the pod watch re-lists
with back-off.

Not supported: kubectl exec/port-forward/attach, resource limits, image pulls, init container
sidecars, startup probes, lifecycle hooks.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import fcntl
import fnmatch
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("nodeagent")

Obj = dict[str, Any]
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
HOSTS_LOCK = "/tmp/kubetune-etc-hosts.lock"
MAX_TERMINATION_MESSAGE = 4096


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def find_log(dir: Path | str, namespace: str, pod: str, container: str | None = None) -> Path:
    """Path of a container's log under the agent's DIR (first container if none given)."""
    pod_dir = Path(dir) / "pods" / f"{namespace}_{pod}"
    if container is None:
        meta = pod_dir / "containers.json"
        if meta.exists():
            names = json.loads(meta.read_text())
            container = names[0] if names else None
    if container is None:
        logs = sorted(pod_dir.glob("*.log"))
        return logs[0] if logs else pod_dir / "missing.log"
    return pod_dir / f"{container}.log"


# --------------------------------------------------------------------------- API access


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Kube:
    """Raw-JSON access through ``kubernetes.client.ApiClient`` (auth, TLS, pooling).

    Why raw: dicts are simpler than the generated models for status patches and survive
    fields the models validate too strictly.
    """

    def __init__(self, kubeconfig: str) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        load: Any = config.load_kube_config  # untyped upstream
        load(config_file=kubeconfig, client_configuration=cfg)
        self.api = client.ApiClient(cfg)

    def _call(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None,
        body: Any,
        content_type: str,
        timeout: float | tuple[float, float],
    ) -> Any:
        m, url, headers, body_, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        return self.api.call_api(
            m, url, header_params=headers, body=body_, _request_timeout=timeout
        )

    def request(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 10.0,
    ) -> Obj:
        resp = self._call(method, path, query, body, content_type, timeout)
        data = resp.read()
        if not 200 <= resp.status < 300:
            raise ApiError(resp.status, data.decode(errors="replace"))
        return dict(json.loads(data)) if data else {}

    def get(self, path: str, **query: Any) -> Obj:
        return self.request("GET", path, query or None)

    def merge_patch(self, path: str, body: Obj) -> Obj:
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    def watch(self, path: str, query: dict[str, Any]) -> Iterator[Obj]:
        """Yield watch events (dicts) until the server closes the stream."""
        q = dict(query, watch="true", allowWatchBookmarks="true")
        timeout = float(q.get("timeoutSeconds", 300)) + 30
        resp = self._call("GET", path, q, None, "application/json", (5, timeout))
        if not 200 <= resp.status < 300:
            raise ApiError(resp.status, resp.read().decode(errors="replace"))
        buf = b""
        try:
            for chunk in resp.response.stream(amt=None, decode_content=False):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield dict(json.loads(line))
        finally:
            resp.response.release_conn()


# --------------------------------------------------------------------------- /etc/hosts


class HostsFile:
    """Owns the lines of /etc/hosts between markers tagged with this cluster's id.

    The file is rewritten atomically (temp file + rename; in-place if rename is refused,
    e.g. for a bind mount) under a lock, keeping every other line untouched.
    """

    def __init__(self, path: str, tag: str) -> None:
        self.path = Path(path)
        self.begin = f"# BEGIN kubetune-nodeagent {tag}"
        self.end = f"# END kubetune-nodeagent {tag}"
        self.current: list[tuple[str, list[str]]] | None = None

    def set(self, entries: list[tuple[str, list[str]]]) -> None:
        if entries == self.current:
            return
        with open(HOSTS_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            text = self.path.read_text() if self.path.exists() else ""
            kept, inside = [], False
            for line in text.splitlines():
                if line == self.begin:
                    inside = True
                elif line == self.end:
                    inside = False
                elif not inside:
                    kept.append(line)
            if entries:
                kept.append(self.begin)
                kept += [f"{ip}\t{' '.join(names)}" for ip, names in entries]
                kept.append(self.end)
            new = "\n".join(kept) + "\n"
            if new != text:
                self._write(new)
        self.current = list(entries)

    def _write(self, text: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.kubetune.{os.getpid()}")
        try:
            tmp.write_text(text)
            with contextlib.suppress(OSError):
                st = self.path.stat()
                os.chmod(tmp, st.st_mode & 0o7777)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            with open(self.path, "r+") as f:
                f.seek(0)
                f.write(text)
                f.truncate()


# --------------------------------------------------------------------------- helpers


_EXPAND = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubelet-style ``$(VAR)`` expansion; ``$$`` escapes, unknown refs stay as written."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _EXPAND.sub(repl, value)


def rewrite_paths(value: str, mounts: list[tuple[str, str]]) -> str:
    """Replace mount-path prefixes with their local directories (see module docstring)."""
    for mount, local in mounts:
        pat = r"(?<![\w./-])" + re.escape(mount.rstrip("/")) + r"(?=/|$|[^\w.-])"
        value = re.sub(pat, local.replace("\\", "\\\\"), value)
    return value


def field_path(pod: Obj, path: str, ip: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": ip,
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    m = re.fullmatch(r"metadata\.(labels|annotations)(?:\['(.+)'\])?", path)
    if m:
        items = meta.get(m.group(1)) or {}
        if m.group(2) is not None:
            return str(items.get(m.group(2), ""))
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ValueError(f"unsupported fieldRef {path}")


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class ConfigError(Exception):
    """A referenced ConfigMap/Secret/key is missing: the container waits, like the kubelet."""


# --------------------------------------------------------------------------- containers


class Container:
    """One container of a pod: its spec, current process and kubelet-style status."""

    def __init__(self, spec: Obj, init: bool) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.proc: subprocess.Popen[bytes] | None = None
        self.restart_count = 0
        self.state: Obj = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: Obj = {}
        self.started_at = ""
        self.next_start = 0.0
        self.ready = False
        self.probe_ok = 0
        self.probe_fail = 0
        self.next_probe = 0.0
        self.live_fail = 0
        self.next_live = 0.0
        self.done = False  # terminated and will not be restarted

    @property
    def running(self) -> bool:
        return self.proc is not None

    def status(self, pod_uid: str) -> Obj:
        st: Obj = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": f"kubetune-local://{self.spec.get('image', '')}",
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.running,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.started_at:
            st["containerID"] = f"kubetune://{pod_uid}/{self.name}/{self.restart_count}"
        return st


class PodWorker:
    """Runs one pod: materialises volumes, starts/probes/restarts containers, builds status."""

    def __init__(self, agent: Agent, pod: Obj) -> None:
        self.agent = agent
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.ns: str = meta["namespace"]
        self.name: str = meta["name"]
        self.key = f"{self.ns}/{self.name}"
        self.node: str = pod["spec"].get("nodeName", "")
        # Deleted from the API server while the node was frozen: handled when it thaws.
        self.gone = False
        spec = pod["spec"]
        self.init_containers = [Container(c, True) for c in spec.get("initContainers") or []]
        self.containers = [Container(c, False) for c in spec.get("containers") or []]
        self.ip = ""
        self.start_time = ""
        self.prepared = False
        self.prepare_error = ""
        self.next_prepare = 0.0
        self.mounts: dict[str, list[tuple[str, str]]] = {}
        self.terminating_deadline: float | None = None
        self.terminal = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
        self.finished = False  # processes gone, pod deleted (or terminal) - nothing to do
        self.conditions_since: dict[str, tuple[str, str]] = {}
        self.last_sent: str = ""
        self.dir = agent.dir / "pods" / f"{self.ns}_{self.name}"
        self.lock = threading.Lock()

    # ----- setup
    def _make_dir(self) -> None:
        uid_file = self.dir / ".uid"
        if self.dir.exists() and uid_file.exists() and uid_file.read_text() != self.uid:
            old = uid_file.read_text()[:8]
            shutil.move(str(self.dir), f"{self.dir}.{old}")
        for sub in ("volumes", "termination", "work"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        uid_file.write_text(self.uid)
        names = [c.name for c in self.containers]
        (self.dir / "containers.json").write_text(json.dumps(names))
        with contextlib.suppress(OSError):
            # A stale pid file from a previous incarnation must not be killed by faults.py.
            for p in self.dir.glob("*.pid"):
                p.unlink()

    def _items(
        self, data: dict[str, bytes], items: list[Obj] | None, optional: bool, what: str
    ) -> dict[str, bytes]:
        if not items:
            return data
        out = {}
        for it in items:
            if it["key"] not in data:
                if optional:
                    continue
                raise ConfigError(f"key {it['key']} not found in {what}")
            out[it["path"]] = data[it["key"]]
        return out

    def _configmap(self, name: str, optional: bool) -> dict[str, bytes] | None:
        try:
            cm = self.agent.kube.get(f"/api/v1/namespaces/{self.ns}/configmaps/{name}")
        except ApiError as e:
            if e.status == 404:
                if optional:
                    return None
                raise ConfigError(f'configmap "{name}" not found') from None
            raise
        data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        return data

    def _secret(self, name: str, optional: bool) -> dict[str, bytes] | None:
        try:
            sec = self.agent.kube.get(f"/api/v1/namespaces/{self.ns}/secrets/{name}")
        except ApiError as e:
            if e.status == 404:
                if optional:
                    return None
                raise ConfigError(f'secret "{name}" not found') from None
            raise
        return {k: base64.b64decode(v) for k, v in (sec.get("data") or {}).items()}

    def _volume_files(self, vol: Obj) -> dict[str, bytes] | None:
        """Files of a configMap/secret/downwardAPI/projected volume; None for directories."""
        if "configMap" in vol:
            src = vol["configMap"]
            opt = bool(src.get("optional"))
            data = self._configmap(src["name"], opt) or {}
            return self._items(data, src.get("items"), opt, f"configmap {src['name']}")
        if "secret" in vol:
            src = vol["secret"]
            opt = bool(src.get("optional"))
            data = self._secret(src["secretName"], opt) or {}
            return self._items(data, src.get("items"), opt, f"secret {src['secretName']}")
        if "downwardAPI" in vol:
            return {
                it["path"]: field_path(self.pod, it["fieldRef"]["fieldPath"], self.ip).encode()
                for it in vol["downwardAPI"].get("items") or []
                if "fieldRef" in it
            }
        if "projected" in vol:
            files: dict[str, bytes] = {}
            for src in vol["projected"].get("sources") or []:
                if "serviceAccountToken" in src:
                    tok = self._request_token(src["serviceAccountToken"])
                    files[src["serviceAccountToken"]["path"]] = tok.encode()
                else:
                    part = self._volume_files(src)
                    files.update(part or {})
            return files
        return None

    def _request_token(self, src: Obj) -> str:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [src["audience"]] if src.get("audience") else None,
                "expirationSeconds": src.get("expirationSeconds", 3600),
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": self.name,
                    "uid": self.uid,
                },
            },
        }
        res = self.agent.kube.request(
            "POST", f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body=body
        )
        return str(res["status"]["token"])

    def _prepare(self) -> None:
        """Materialise volumes (retried while referenced objects are missing)."""
        self._make_dir()
        vol_dirs: dict[str, Path] = {}
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                path = self.agent.dir / "pvcs" / f"{self.ns}_{claim}"
                path.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
                if vol["hostPath"].get("type") in ("DirectoryOrCreate",):
                    path.mkdir(parents=True, exist_ok=True)
            else:
                path = self.dir / "volumes" / name
                files = self._volume_files(vol)
                tmp = self.dir / "volumes" / f".{name}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                for rel, content in (files or {}).items():
                    f = tmp / rel
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_bytes(content)
                if files is not None or not path.exists():
                    shutil.rmtree(path, ignore_errors=True)
                    tmp.rename(path)
                else:
                    shutil.rmtree(tmp, ignore_errors=True)
            vol_dirs[name] = path
        for c in self.init_containers + self.containers:
            mounts: list[tuple[str, str]] = []
            for vm in c.spec.get("volumeMounts") or []:
                base = vol_dirs.get(vm["name"])
                if base is None:
                    raise ConfigError(f"volume {vm['name']} not found")
                local = base / vm["subPath"] if vm.get("subPath") else base
                mounts.append((vm["mountPath"], str(local)))
            term = self.dir / "termination" / c.name
            mounts.append(
                (c.spec.get("terminationMessagePath") or "/dev/termination-log", str(term))
            )
            mounts.sort(key=lambda m: len(m[0]), reverse=True)
            self.mounts[c.name] = mounts
        self._write_pod_kubeconfig()

    def _write_pod_kubeconfig(self) -> None:
        """If the SA token is mounted, give the pod a kubeconfig with that identity."""
        for c in self.containers:
            for mount, local in self.mounts.get(c.name, []):
                if mount.rstrip("/") == SA_MOUNT and (Path(local) / "token").exists():
                    token = (Path(local) / "token").read_text().strip()
                    ca = Path(local) / "ca.crt"
                    kc = self.dir / "kubeconfig"
                    kc.write_text(
                        json.dumps(
                            {
                                "apiVersion": "v1",
                                "kind": "Config",
                                "clusters": [
                                    {
                                        "name": "c",
                                        "cluster": {
                                            "server": self.agent.server,
                                            "certificate-authority": str(ca),
                                        },
                                    }
                                ],
                                "users": [{"name": "sa", "user": {"token": token}}],
                                "contexts": [
                                    {
                                        "name": "c",
                                        "context": {
                                            "cluster": "c",
                                            "user": "sa",
                                            "namespace": self.ns,
                                        },
                                    }
                                ],
                                "current-context": "c",
                            }
                        )
                    )
                    return

    def _env(self, c: Container) -> dict[str, str]:
        """Process env: agent env + kubelet-provided vars + the container's env/envFrom."""
        spec = c.spec
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("KUBECONFIG", "PYTHONPATH") and not k.startswith("KUBERNETES_")
        }
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = f"{venv_bin}:{env.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
        env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
        env.update(self.agent.pod_env)
        host = self.pod["spec"].get("hostname") or self.name
        server = urllib.parse.urlparse(self.agent.server)
        env.update(
            {
                "HOSTNAME": host,
                "POD_IP": self.ip,
                "KUBERNETES_SERVICE_HOST": server.hostname or "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(server.port or 443),
                "KUBETUNE_TERMINATION_LOG": str(self.dir / "termination" / c.name),
                "KUBETUNE_POD_DIR": str(self.dir),
            }
        )
        if (self.dir / "kubeconfig").exists():
            env["KUBECONFIG"] = str(self.dir / "kubeconfig")
        container_env: dict[str, str] = {}
        for src in spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                ref = src["configMapRef"]
                data = self._configmap(ref["name"], bool(ref.get("optional"))) or {}
            else:
                ref = src["secretRef"]
                data = self._secret(ref["name"], bool(ref.get("optional"))) or {}
            container_env.update({prefix + k: v.decode() for k, v in data.items()})
        for e in spec.get("env") or []:
            name = e["name"]
            if "value" in e or "valueFrom" not in e:
                container_env[name] = expand(e.get("value", ""), {**env, **container_env})
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                container_env[name] = field_path(self.pod, vf["fieldRef"]["fieldPath"], self.ip)
            elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
                is_secret = "secretKeyRef" in vf
                ref = vf["secretKeyRef"] if is_secret else vf["configMapKeyRef"]
                opt = bool(ref.get("optional"))
                found = (self._secret if is_secret else self._configmap)(ref["name"], opt)
                if found is None or ref["key"] not in found:
                    if opt:
                        continue
                    kind = "secret" if is_secret else "configmap"
                    raise ConfigError(f"couldn't find key {ref['key']} in {kind} {ref['name']}")
                container_env[name] = found[ref["key"]].decode()
            elif "resourceFieldRef" in vf:
                container_env[name] = "0"
        mounts = self.mounts.get(c.name, [])
        env.update({k: rewrite_paths(v, mounts) for k, v in container_env.items()})
        if "MASTER_PORT" in env and "MASTER_ADDR" in env:
            # Pods here share the host's network namespace, so two gangs rendezvousing on the
            # same fixed port would collide (EADDRINUSE), which pod network namespaces never
            # do. Each gang (its MASTER_ADDR and attempt) gets a port of its own, the same for
            # all of its ranks.
            meta = self.pod["metadata"]
            attempt = (meta.get("labels") or {}).get("kubetune.io/attempt", "")
            key = f"{meta.get('namespace')}/{env['MASTER_ADDR']}/{attempt}"
            digest = hashlib.sha256(key.encode()).digest()
            env["MASTER_PORT"] = str(30000 + int.from_bytes(digest[:2], "big") % 20000)
        return env

    def _argv(self, c: Container, env: dict[str, str]) -> list[str]:
        spec = c.spec
        command = list(spec.get("command") or [])
        args = list(spec.get("args") or [])
        if not command:
            image = spec.get("image", "")
            for pattern, entry in self.agent.image_entrypoints.items():
                if fnmatch.fnmatch(image, pattern):
                    command = list(entry)
                    break
        argv = command + args
        if not argv:
            raise ConfigError(
                f"container {c.name} has no command and image {spec.get('image')!r} has no "
                "entry in image_entrypoints (images are not run by the node agent)"
            )
        mounts = self.mounts.get(c.name, [])
        return [rewrite_paths(expand(a, env), mounts) for a in argv]

    # ----- process control
    def _start(self, c: Container, now: float) -> None:
        try:
            env = self._env(c)
            argv = self._argv(c, env)
        except ConfigError as e:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
            c.next_start = now + 2
            return
        term = self.dir / "termination" / c.name
        term.write_text("")
        workdir = c.spec.get("workingDir")
        cwd = Path(rewrite_paths(workdir, self.mounts.get(c.name, []))) if workdir else None
        if cwd is None or not cwd.is_dir():
            cwd = self.dir / "work"
        logf = open(self.dir / f"{c.name}.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            c.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            c.proc = None
            c.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": str(e),
                    "startedAt": now_iso(),
                    "finishedAt": now_iso(),
                    "containerID": f"kubetune://{self.uid}/{c.name}/{c.restart_count}",
                }
            }
            c.started_at = now_iso()
            self._after_exit(c, 128, now)
            return
        finally:
            logf.close()
        (self.dir / f"{c.name}.pid").write_text(str(c.proc.pid))
        c.started_at = now_iso()
        c.state = {"running": {"startedAt": c.started_at}}
        c.ready = False
        c.probe_ok = c.probe_fail = c.live_fail = 0
        rp = c.spec.get("readinessProbe") or {}
        lp = c.spec.get("livenessProbe") or {}
        c.next_probe = now + float(rp.get("initialDelaySeconds", 0))
        c.next_live = now + float(lp.get("initialDelaySeconds", 0))
        log.info("started %s/%s pid %d: %s", self.key, c.name, c.proc.pid, argv)

    def _termination_message(self, c: Container, code: int) -> str:
        term = self.dir / "termination" / c.name
        msg = ""
        with contextlib.suppress(OSError):
            msg = term.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(errors="replace")
        if (
            not msg
            and code != 0
            and c.spec.get("terminationMessagePolicy") == ("FallbackToLogsOnError")
        ):
            with contextlib.suppress(OSError):
                lines = (self.dir / f"{c.name}.log").read_bytes().splitlines()[-80:]
                msg = b"\n".join(lines)[-2048:].decode(errors="replace")
        return msg

    def _reap(self, c: Container, now: float) -> None:
        assert c.proc is not None
        rc = c.proc.poll()
        if rc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(c.proc.pid, signal.SIGKILL)  # orphans of the container die with it
        code = exit_code(rc)
        with contextlib.suppress(OSError):
            (self.dir / f"{c.name}.pid").unlink()
        term: Obj = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": c.started_at,
            "finishedAt": now_iso(),
            "containerID": f"kubetune://{self.uid}/{c.name}/{c.restart_count}",
        }
        msg = self._termination_message(c, code)
        if msg:
            term["message"] = msg
        if code != 0 and rc < 0:
            term["signal"] = -rc
        c.proc = None
        c.ready = False
        c.state = {"terminated": term}
        log.info("%s/%s exited with %d", self.key, c.name, code)
        self._after_exit(c, code, now)

    def _after_exit(self, c: Container, code: int, now: float) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if c.init:
            policy = "Never" if policy == "Never" else "OnFailure"
        restart = self.terminating_deadline is None and (
            policy == "Always" or (policy == "OnFailure" and code != 0)
        )
        if restart:
            delay = min(self.agent.backoff_base * 2**c.restart_count, self.agent.backoff_max)
            c.last_state = c.state
            c.restart_count += 1
            c.next_start = now + delay
            c.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {delay:.0f}s restarting failed "
                    f"container={c.name} pod={self.name}",
                }
            }
        else:
            c.done = True

    def reap_only(self) -> None:
        """While the node is frozen: collect exit statuses (no zombies), change nothing else.

        The exits are turned into container states by the first ``sync`` after the thaw.
        """
        with self.lock:
            for c in self.init_containers + self.containers:
                if c.proc is not None:
                    c.proc.poll()

    def processes(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        return [(c.name, c.proc) for c in self.init_containers + self.containers if c.proc]

    def kill(self, sig: int) -> None:
        for c in self.init_containers + self.containers:
            if c.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, sig)

    # ----- probes
    def _probe(self, c: Container, probe: Obj) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        host = self.ip or "127.0.0.1"

        def port_of(p: Any) -> int:
            if isinstance(p, int) or (isinstance(p, str) and p.isdigit()):
                return int(p)
            for cp in c.spec.get("ports") or []:
                if cp.get("name") == p:
                    return int(cp["containerPort"])
            raise ValueError(f"unknown port {p}")

        try:
            if "httpGet" in probe:
                hg = probe["httpGet"]
                conn_cls = (
                    http.client.HTTPSConnection
                    if hg.get("scheme") == "HTTPS"
                    else http.client.HTTPConnection
                )
                kw: dict[str, Any] = {"timeout": timeout}
                if conn_cls is http.client.HTTPSConnection:
                    kw["context"] = ssl._create_unverified_context()
                conn = conn_cls(hg.get("host") or host, port_of(hg["port"]), **kw)
                try:
                    headers = {h["name"]: h["value"] for h in hg.get("httpHeaders") or []}
                    conn.request("GET", hg.get("path") or "/", headers=headers)
                    status = conn.getresponse().status
                finally:
                    conn.close()
                return 200 <= status < 400
            if "tcpSocket" in probe:
                import socket

                ts = probe["tcpSocket"]
                with socket.create_connection(
                    (ts.get("host") or host, port_of(ts["port"])), timeout=timeout
                ):
                    return True
            if "exec" in probe:
                env = self._env(c)
                argv = self._argv(
                    Container(
                        {"name": c.name, "command": probe["exec"].get("command") or []}, False
                    ),
                    env,
                )
                r = subprocess.run(
                    argv,
                    env=env,
                    cwd=self.dir / "work",
                    timeout=timeout,
                    capture_output=True,
                    check=False,
                )
                return r.returncode == 0
        except Exception:
            return False
        return True

    def _run_probes(self, c: Container, now: float) -> None:
        rp = c.spec.get("readinessProbe")
        if rp is None:
            c.ready = True
        elif now >= c.next_probe:
            c.next_probe = now + float(rp.get("periodSeconds", 10))
            if self._probe(c, rp):
                c.probe_ok, c.probe_fail = c.probe_ok + 1, 0
                if c.probe_ok >= int(rp.get("successThreshold", 1)):
                    c.ready = True
            else:
                c.probe_ok, c.probe_fail = 0, c.probe_fail + 1
                if c.probe_fail >= int(rp.get("failureThreshold", 3)) or not c.ready:
                    c.ready = False
        lp = c.spec.get("livenessProbe")
        if lp is not None and now >= c.next_live and c.proc is not None:
            c.next_live = now + float(lp.get("periodSeconds", 10))
            if self._probe(c, lp):
                c.live_fail = 0
            else:
                c.live_fail += 1
                if c.live_fail >= int(lp.get("failureThreshold", 3)):
                    log.info("%s/%s failed liveness; killing", self.key, c.name)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(c.proc.pid, signal.SIGKILL)

    # ----- main step
    def sync(self, now: float) -> None:
        """Advance the pod one step; cheap and non-blocking apart from probes."""
        with self.lock:
            self._sync(now)

    def _sync(self, now: float) -> None:
        if self.finished or self.terminal:
            return
        meta = self.pod["metadata"]
        if meta.get("deletionTimestamp") and self.terminating_deadline is None:
            grace = float(meta.get("deletionGracePeriodSeconds", 30))
            self.terminating_deadline = now + grace
            log.info("%s deleted; SIGTERM, grace %.0fs", self.key, grace)
            self.kill(signal.SIGTERM)
        all_c = self.init_containers + self.containers
        for c in all_c:
            if c.proc is not None:
                self._reap(c, now)
        if self.terminating_deadline is not None:
            if any(c.proc is not None for c in all_c):
                if now >= self.terminating_deadline:
                    self.kill(signal.SIGKILL)
                return
            self._finish_deletion()
            return
        if not self.ip:
            host_net = self.pod["spec"].get("hostNetwork")
            self.ip = "127.0.0.1" if host_net else self.agent.allocate_ip(self.uid)
            self.start_time = now_iso()
            self.agent.hosts_dirty.set()
        if not self.prepared:
            if now < self.next_prepare:
                return
            try:
                self._prepare()
                self.prepared = True
                self.prepare_error = ""
            except (ConfigError, ApiError, OSError, ValueError) as e:
                self.prepare_error = str(e)
                self.next_prepare = now + 2
                for c in all_c:
                    c.state = {"waiting": {"reason": "ContainerCreating", "message": str(e)}}
                return
        # Init containers: one at a time, in order.
        for c in self.init_containers:
            if c.done and "terminated" in c.state and c.state["terminated"]["exitCode"] == 0:
                continue
            if c.done:
                self._check_terminal()
                return
            if c.proc is None and now >= c.next_start:
                self._start(c, now)
            return
        for c in self.containers:
            if c.proc is None and not c.done and now >= c.next_start:
                self._start(c, now)
            if c.proc is not None:
                self._run_probes(c, now)
        self._check_terminal()

    def _check_terminal(self) -> None:
        if all(c.done for c in self.containers) or any(
            c.done and c.state.get("terminated", {}).get("exitCode", 0) != 0
            for c in self.init_containers
        ):
            self.terminal = True
            self.kill(signal.SIGKILL)
            self.agent.release_ip(self.uid)

    def _finish_deletion(self) -> None:
        """All processes are gone: delete the pod object for good (the kubelet's last act)."""
        try:
            self.agent.kube.request(
                "DELETE",
                f"/api/v1/namespaces/{self.ns}/pods/{self.name}",
                body={
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": self.uid},
                },
            )
        except ApiError as e:
            if e.status not in (404, 409):
                raise
        self.finished = True
        self.agent.release_ip(self.uid)

    # ----- status
    def phase(self) -> str:
        if self.terminal:
            inits_failed = any(
                c.state.get("terminated", {}).get("exitCode", 0) != 0 and c.done
                for c in self.init_containers
            )
            if inits_failed:
                return "Failed"
            codes = [c.state.get("terminated", {}).get("exitCode", 0) for c in self.containers]
            return "Succeeded" if all(code == 0 for code in codes) else "Failed"
        if any(c.proc is not None or c.restart_count > 0 or c.done for c in self.containers):
            return "Running"
        return "Pending"

    def _condition(self, ctype: str, ok: bool, reason: str = "") -> Obj:
        status = "True" if ok else "False"
        prev = self.conditions_since.get(ctype)
        if prev is None or prev[0] != status:
            self.conditions_since[ctype] = (status, now_iso())
        cond: Obj = {
            "type": ctype,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": self.conditions_since[ctype][1],
        }
        if reason and not ok:
            cond["reason"] = reason
        return cond

    def status(self) -> Obj:
        with self.lock:
            phase = self.phase()
            inits_ok = all(
                c.done and c.state.get("terminated", {}).get("exitCode") == 0
                for c in self.init_containers
            )
            ready = (
                phase == "Running"
                and self.terminating_deadline is None
                and all(c.ready and c.proc is not None for c in self.containers)
            )
            conds = [
                self._condition("Initialized", inits_ok, "ContainersNotInitialized"),
                self._condition("Ready", ready, "ContainersNotReady"),
                self._condition("ContainersReady", ready, "ContainersNotReady"),
            ]
            for cond in self.pod.get("status", {}).get("conditions") or []:
                if cond["type"] == "PodScheduled":
                    conds.append(cond)
            st: Obj = {
                "phase": phase,
                "conditions": conds,
                "hostIP": "127.0.0.1",
                "containerStatuses": [c.status(self.uid) for c in self.containers],
            }
            if self.init_containers:
                st["initContainerStatuses"] = [c.status(self.uid) for c in self.init_containers]
            if self.ip:
                st["podIP"] = self.ip
                st["podIPs"] = [{"ip": self.ip}]
            if self.start_time:
                st["startTime"] = self.start_time
            return st

    def push_status(self) -> None:
        if self.finished:
            return
        st = self.status()
        body = json.dumps(st, sort_keys=True)
        if body == self.last_sent:
            return
        try:
            self.agent.kube.merge_patch(
                f"/api/v1/namespaces/{self.ns}/pods/{self.name}/status", {"status": st}
            )
            self.last_sent = body
        except ApiError as e:
            if e.status == 404:
                self.last_sent = body
            else:
                raise

    def hosts_entries(self) -> list[tuple[str, list[str]]]:
        spec = self.pod["spec"]
        if not self.ip or self.terminal or self.finished:
            return []
        host = spec.get("hostname")
        sub = spec.get("subdomain")
        if not host or not sub:
            return []
        base = f"{host}.{sub}"
        return [
            (
                self.ip,
                [
                    f"{base}.{self.ns}.svc.cluster.local",
                    f"{base}.{self.ns}.svc",
                    f"{base}.{self.ns}",
                    base,
                ],
            )
        ]


# --------------------------------------------------------------------------- agent


class Agent:
    """Registers the nodes, heartbeats them, runs their pods and serves their logs."""

    def __init__(self, cfg: Obj) -> None:
        self.cfg = cfg
        self.dir = Path(cfg["dir"])
        self.kube = Kube(cfg["kubeconfig"])
        self.nodes: list[str] = list(cfg["nodes"])
        self.server: str = cfg["server"]
        self.pod_env: dict[str, str] = dict(cfg.get("pod_env") or {})
        self.image_entrypoints: dict[str, list[str]] = dict(cfg.get("image_entrypoints") or {})
        self.backoff_base = float(cfg.get("backoff_base", 1.0))
        self.backoff_max = float(cfg.get("backoff_max", 20.0))
        self.heartbeat = float(cfg.get("heartbeat_seconds", 5.0))
        self.run_pods = bool(cfg.get("run_pods", True))
        self.control = self.dir / "agent" / "control"
        self.control.mkdir(parents=True, exist_ok=True)
        self.workers: dict[str, PodWorker] = {}
        self.workers_lock = threading.Lock()
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.hosts_dirty = threading.Event()
        net = ipaddress.ip_network(cfg["pod_cidr"])
        self.ip_pool = [str(ip) for ip in net.hosts()][1:]
        self.ip_next = 0
        self.ips: dict[str, str] = {}
        self.ip_lock = threading.Lock()
        self.hosts = HostsFile(cfg.get("hosts_file", "/etc/hosts"), cfg["cluster_id"])
        self.service_hosts: list[tuple[str, list[str]]] = []
        self.hosts_denied = False
        self.node_ready: dict[str, bool] = {}
        self._node_conditions: dict[str, list[Obj]] = {}
        # Freeze state per node (token of the applied request), guarded by the node's lock:
        # every API call on behalf of a node or its pods is made holding that lock, so once
        # a freeze is acknowledged nothing more is sent for the node.
        self.frozen: dict[str, str] = {}
        self.node_locks: dict[str, threading.RLock] = {n: threading.RLock() for n in self.nodes}
        # Processes of pods force-deleted while their node was frozen, thawed with
        # kill_orphans=False: (pod key, container, process, pid file); reaped by pod_loop.
        self.orphans: list[tuple[str, str, subprocess.Popen[bytes], Path]] = []

    # ----- IPs
    def allocate_ip(self, uid: str) -> str:
        with self.ip_lock:
            if uid in self.ips:
                return self.ips[uid]
            used = set(self.ips.values())
            for _ in range(len(self.ip_pool)):
                ip = self.ip_pool[self.ip_next % len(self.ip_pool)]
                self.ip_next += 1
                if ip not in used:
                    self.ips[uid] = ip
                    return ip
            raise RuntimeError("pod IP pool exhausted")

    def release_ip(self, uid: str) -> None:
        with self.ip_lock:
            self.ips.pop(uid, None)
        self.hosts_dirty.set()

    # ----- nodes
    def _node_body(self, name: str) -> Obj:
        gpus = str(self.cfg.get("gpus_per_node", 8))
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "beta.kubernetes.io/os": "linux",
                    "beta.kubernetes.io/arch": "amd64",
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": self.cfg.get("gpu_product", "NVIDIA-H100-80GB-HBM3"),
                    "nvidia.com/gpu.count": gpus,
                    "nvidia.com/gpu.memory": "81559",
                    "node.kubernetes.io/instance-type": "kubetune-fake-gpu",
                },
            },
            "spec": {},
        }

    def _node_status(self, name: str, ready: bool) -> Obj:
        gpus = str(self.cfg.get("gpus_per_node", 8))
        res = {
            "cpu": "64",
            "memory": "512Gi",
            "pods": "110",
            "ephemeral-storage": "1Ti",
            "nvidia.com/gpu": gpus,
            "hugepages-1Gi": "0",
            "hugepages-2Mi": "0",
        }
        now = now_iso()
        prev = {c["type"]: c for c in self._node_conditions.get(name, [])}

        def cond(ctype: str, status: str, reason: str, msg: str) -> Obj:
            old = prev.get(ctype)
            since = old["lastTransitionTime"] if old and old["status"] == status else now
            return {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": msg,
                "lastHeartbeatTime": now,
                "lastTransitionTime": since,
            }

        conds = [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
            cond("Ready", "True", "KubeletReady", "kubetune node agent is posting ready status")
            if ready
            else cond("Ready", "False", "KubeletNotReady", "kubetune fault: node marked NotReady"),
        ]
        self._node_conditions[name] = conds
        return {
            "status": {
                "capacity": res,
                "allocatable": res,
                "conditions": conds,
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": name},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": int(self.cfg.get("port", 0))}},
                "nodeInfo": {
                    "machineID": name,
                    "systemUUID": name,
                    "bootID": self.cfg["cluster_id"],
                    "kernelVersion": os.uname().release,
                    "osImage": "kubetune fake GPU node",
                    "containerRuntimeVersion": "kubetune-nodeagent://1.0",
                    "kubeletVersion": "v1.20.2",
                    "kubeProxyVersion": "v1.20.2",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            }
        }

    def register_nodes(self) -> None:
        for name in self.nodes:
            try:
                self.kube.request("POST", "/api/v1/nodes", body=self._node_body(name))
            except ApiError as e:
                if e.status != 409:
                    raise
                self.kube.merge_patch(
                    f"/api/v1/nodes/{name}", {"metadata": self._node_body(name)["metadata"]}
                )
            log.info("registered node %s", name)

    def _renew_lease(self, name: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now_micro()}
        try:
            self.kube.merge_patch(path, {"spec": spec})
        except ApiError as e:
            if e.status != 404:
                raise
            self.kube.request(
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                body={
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name, "namespace": "kube-node-lease"},
                    "spec": spec,
                },
            )

    def _untaint(self, name: str) -> None:
        """Drop not-ready/unreachable taints at once (the lifecycle controller is slower)."""
        node = self.kube.get(f"/api/v1/nodes/{name}")
        taints = node["spec"].get("taints") or []
        keep = [
            t
            for t in taints
            if t["key"] not in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
        ]
        if len(keep) != len(taints):
            try:
                self.kube.merge_patch(
                    f"/api/v1/nodes/{name}",
                    {
                        "metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
                        "spec": {"taints": keep or None},
                    },
                )
            except ApiError as e:
                if e.status != 409:  # raced with the lifecycle controller: next beat retries
                    raise

    def heartbeat_loop(self) -> None:
        registered = False
        last_error = ""
        next_services = 0.0
        next_beat: dict[str, float] = {}
        while not self.stop.is_set():
            try:
                if not registered:
                    self.register_nodes()
                    registered = True
                now = time.monotonic()
                for name in self.nodes:
                    with self.node_locks[name]:
                        if name in self.frozen:
                            continue
                        ready = not (self.control / f"{name}.notready").exists()
                        changed = self.node_ready.get(name) != ready
                        if not changed and now < next_beat.get(name, 0):
                            continue
                        if ready:
                            self._renew_lease(name)
                        if ready or changed:
                            self.kube.merge_patch(
                                f"/api/v1/nodes/{name}/status", self._node_status(name, ready)
                            )
                        if ready:
                            self._untaint(name)
                        if changed:
                            log.info("node %s ready=%s", name, ready)
                        self.node_ready[name] = ready
                        next_beat[name] = now + self.heartbeat
                if now >= next_services:
                    next_services = now + 2.0
                    self._sync_service_hosts()
            except Exception as e:
                msg = str(e)[:300]
                if msg != last_error:  # one line per outage, not one per second
                    log.warning("heartbeat: %s", msg)
                    last_error = msg
                self.stop.wait(1.0)
                continue
            if last_error:
                log.info("heartbeat: recovered")
                last_error = ""
            self.stop.wait(0.5)

    def _sync_service_hosts(self) -> None:
        """``<svc>.<ns>.svc`` -> first ready endpoint IP that is one of our pods."""
        eps = self.kube.get("/api/v1/endpoints")["items"]
        with self.ip_lock:
            ours = set(self.ips.values())
        entries = []
        for ep in eps:
            meta = ep["metadata"]
            ip = next(
                (
                    a["ip"]
                    for s in ep.get("subsets") or []
                    for a in s.get("addresses") or []
                    if a["ip"] in ours
                ),
                None,
            )
            if ip:
                svc = f"{meta['name']}.{meta['namespace']}"
                entries.append((ip, [f"{svc}.svc.cluster.local", f"{svc}.svc", svc]))
        if entries != self.service_hosts:
            self.service_hosts = entries
            self.hosts_dirty.set()

    # ----- pods
    def _is_ours(self, pod: Obj) -> bool:
        return pod.get("spec", {}).get("nodeName") in self.nodes

    def _upsert(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        with self.workers_lock:
            w = self.workers.get(uid)
            if w is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and not pod[
                    "metadata"
                ].get("deletionTimestamp"):
                    return  # finished before we (re)started; nothing to run
                w = PodWorker(self, pod)
                self.workers[uid] = w
                log.info("pod %s assigned to %s", w.key, pod["spec"]["nodeName"])
            else:
                with w.lock:
                    w.pod = pod
        self.wake.set()

    def _node_lock(self, node: str) -> threading.RLock | contextlib.nullcontext[None]:
        lock = self.node_locks.get(node)
        return lock if lock is not None else contextlib.nullcontext()

    def _forget(self, uid: str) -> None:
        """The pod is gone from the API server: kill its processes and drop it, unless its
        node is frozen (a partitioned kubelet never hears of it; the thaw reconciles)."""
        with self.workers_lock:
            w = self.workers.get(uid)
        if w is None:
            return
        with self._node_lock(w.node):
            if w.node in self.frozen:
                if not w.gone:
                    log.info("pod %s gone from the API while %s is frozen", w.key, w.node)
                w.gone = True
                return
            with self.workers_lock:
                if self.workers.pop(uid, None) is None:
                    return
            w.kill(signal.SIGKILL)
        for c in w.init_containers + w.containers:
            if c.proc is not None:
                with contextlib.suppress(Exception):
                    c.proc.wait(timeout=5)
        self.release_ip(uid)
        log.info("pod %s gone", w.key)

    def watch_loop(self) -> None:
        """List+watch pods bound to any node, filter to ours; re-list with back-off."""
        backoff = 0.5
        query = {"fieldSelector": "spec.nodeName!="}
        while not self.stop.is_set():
            try:
                lst = self.kube.get("/api/v1/pods", **query)
                seen = set()
                for pod in lst["items"]:
                    if self._is_ours(pod):
                        seen.add(pod["metadata"]["uid"])
                        self._upsert(pod)
                with self.workers_lock:
                    gone = [uid for uid in self.workers if uid not in seen]
                for uid in gone:
                    self._forget(uid)
                rv = lst["metadata"]["resourceVersion"]
                backoff = 0.5
                while not self.stop.is_set():
                    for ev in self.kube.watch(
                        "/api/v1/pods", dict(query, resourceVersion=rv, timeoutSeconds=300)
                    ):
                        obj = ev["object"]
                        if ev["type"] == "ERROR":
                            raise ApiError(int(obj.get("code", 500)), json.dumps(obj))
                        rv = obj["metadata"]["resourceVersion"]
                        if ev["type"] == "BOOKMARK" or not self._is_ours(obj):
                            continue
                        if ev["type"] == "DELETED":
                            self._forget(obj["metadata"]["uid"])
                        else:
                            self._upsert(obj)
            except Exception as e:
                if self.stop.is_set():
                    return
                if backoff < 5.0:
                    log.warning("pod watch: %s; re-listing in %.1fs", str(e)[:300], backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def pod_loop(self) -> None:
        while not self.stop.is_set():
            self.wake.wait(0.25)
            self.wake.clear()
            now = time.monotonic()
            with self.workers_lock:
                workers = list(self.workers.values())
            for w in workers:
                try:
                    with self._node_lock(w.node):
                        if w.node in self.frozen:
                            w.reap_only()
                            continue
                        w.sync(now)
                        w.push_status()
                except Exception as e:
                    log.warning("pod %s: %s", w.key, e)
            self._reap_orphans()
            if self.hosts_dirty.is_set():
                self.hosts_dirty.clear()
                self._write_hosts(workers)

    def _write_hosts(self, workers: list[PodWorker]) -> None:
        entries: list[tuple[str, list[str]]] = []
        for w in workers:
            entries += w.hosts_entries()
        entries += self.service_hosts
        try:
            self.hosts.set(entries)
        except PermissionError as e:
            if not self.hosts_denied:
                log.error(
                    "cannot write %s (%s): pod/service host names will not resolve; "
                    "run the agent as root",
                    self.hosts.path,
                    e,
                )
            self.hosts_denied = True
        except OSError as e:
            log.warning("cannot update %s: %s", self.hosts.path, e)
            self.hosts_dirty.set()

    # ----- fault control (freeze / thaw)
    def _write_state(self, node: str, frozen: bool, token: str) -> None:
        path = self.control / f"{node}.state"
        tmp = self.control / f".{node}.state.{os.getpid()}"
        tmp.write_text(json.dumps({"frozen": frozen, "token": token}))
        os.replace(tmp, path)

    @staticmethod
    def _read_request(path: Path) -> Obj | None:
        """A control request file's JSON (None if absent; {} if empty or unreadable)."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text) if text.strip() else {}
        except ValueError:
            data = {}
        return data if isinstance(data, dict) else {}

    def poll_control(self, initial: bool = False) -> None:
        """Apply freeze/thaw requests found in the control dir (see the module docstring)."""
        for name in self.nodes:
            req = self._read_request(self.control / f"{name}.frozen")
            if req is not None:
                token = str(req.get("token", ""))
                if self.frozen.get(name) != token:
                    with self.node_locks[name]:
                        was = name in self.frozen
                        self.frozen[name] = token
                    if not was:
                        log.info("node %s frozen", name)
                    self._write_state(name, True, token)
            elif name in self.frozen:
                opts = self._read_request(self.control / f"{name}.unfreeze") or {}
                kill_orphans = bool(opts.get("kill_orphans", True))
                with self.node_locks[name]:
                    del self.frozen[name]
                    self._thaw(name, kill_orphans)
                self._write_state(name, False, str(opts.get("token", "")))
            elif initial:
                self._write_state(name, False, "")

    def _thaw(self, node: str, kill_orphans: bool) -> None:
        """Reconcile after a partition (called holding the node's lock, already unfrozen)."""
        log.info("node %s thawed (kill_orphans=%s)", node, kill_orphans)
        # Heartbeat at once, with fresh condition transition times.
        self.node_ready.pop(node, None)
        self._node_conditions.pop(node, None)
        with self.workers_lock:
            workers = [w for w in self.workers.values() if w.node == node]
        for w in workers:
            w.last_sent = ""  # the API's copy may have been changed meanwhile: push again
            if not w.gone:
                continue
            if kill_orphans:
                self._forget(w.uid)
                continue
            with self.workers_lock:
                self.workers.pop(w.uid, None)
            for cname, proc in w.processes():
                log.info("orphan %s/%s pid %d left running", w.key, cname, proc.pid)
                self.orphans.append((w.key, cname, proc, w.dir / f"{cname}.pid"))
            self.release_ip(w.uid)
        self.wake.set()

    def _reap_orphans(self) -> None:
        for entry in list(self.orphans):
            key, cname, proc, pid_file = entry
            rc = proc.poll()
            if rc is None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own children die with it
            with contextlib.suppress(OSError, ValueError):
                if int(pid_file.read_text()) == proc.pid:
                    pid_file.unlink()
            self.orphans.remove(entry)
            log.info("orphan %s/%s exited with %d", key, cname, exit_code(rc))

    def control_loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.poll_control()
            except Exception as e:
                log.warning("control: %s", e)
            self.stop.wait(0.2)

    # ----- kubectl logs
    def serve_logs(self) -> ThreadingHTTPServer | None:
        port = int(self.cfg.get("port") or 0)
        if not port or not self.cfg.get("tls_cert"):
            return None
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                q = urllib.parse.parse_qs(url.query)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs is served by the kubetune agent")
                    return
                _, ns, pod, container = parts
                path = agent.dir / "pods" / f"{ns}_{pod}" / f"{container}.log"
                if not path.exists():
                    self.send_error(404, f"no log for {ns}/{pod}/{container}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                data = path.read_bytes()
                if "tailLines" in q:
                    n = int(q["tailLines"][0])
                    data = b"\n".join(data.splitlines()[-n:]) + b"\n" if n else b""
                self.wfile.write(data)
                if q.get("follow", ["false"])[0] != "true":
                    return
                pos = path.stat().st_size
                while not agent.stop.is_set():
                    size = path.stat().st_size
                    if size > pos:
                        with open(path, "rb") as f:
                            f.seek(pos)
                            self.wfile.write(f.read(size - pos))
                            self.wfile.flush()
                        pos = size
                    elif not (path.parent / f"{container}.pid").exists():
                        return
                    time.sleep(0.3)

        srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        srv.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cfg["tls_cert"], self.cfg["tls_key"])
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, name="logs", daemon=True).start()
        return srv

    # ----- lifecycle
    def run(self) -> None:
        srv = self.serve_logs()
        self.poll_control(initial=True)
        loops = [self.control_loop, self.heartbeat_loop]
        if self.run_pods:
            loops += [self.watch_loop, self.pod_loop]
        threads = [threading.Thread(target=t, name=t.__name__, daemon=True) for t in loops]
        for t in threads:
            t.start()
        self.stop.wait()
        log.info("stopping: killing pod processes")
        with self.workers_lock:
            workers = list(self.workers.values())
        for w in workers:
            w.kill(signal.SIGTERM)
        orphans = [p for _, _, p, _ in self.orphans]
        for p in orphans:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        procs = [p for w in workers for _, p in w.processes()] + orphans
        deadline = time.monotonic() + 5
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        with contextlib.suppress(OSError):
            self.hosts.current = None
            self.hosts.set([])
        if srv is not None:
            srv.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="agent.json written by ControlPlane")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s"
    )
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # retries while the apiserver is down
    cfg = json.loads(Path(args.config).read_text())
    agent = Agent(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    agent.run()


if __name__ == "__main__":
    main()
