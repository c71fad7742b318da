"""RBAC and Pod Security: the operator's ServiceAccount is refused outside its rights, and every
pod the operator creates meets the Pod Security Standard "restricted", field by field.

RBAC: the chart is installed with the project's pinned helm (namespace-scoped, watching the
job namespace; and cluster-wide), and every check is a real request made with a TokenRequest
token of the chart's ServiceAccount, not a reading of the Role objects. Writes go with
``dryRun=All``: authorization comes first, so a refusal is a 403 either way, and a wrongly
allowed write changes nothing in the shared cluster. A few calls the operator needs must
succeed, so a broken token cannot pass for a refusal.

Pod Security: one tiny-llama job (trained, gated, served) under the operator; then every pod in
the job's namespace (rank pods and inference pods, as admitted) and the inference Deployment's
pod template are checked against each restricted-profile control. The test cluster's
kube-apiserver is v1.20, which has no PodSecurity admission; on 1.25+ the namespace would also
carry ``pod-security.kubernetes.io/enforce=restricted`` so that admission enforces it too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.chart.helm import CHART
from tests.chart.test_chart_cluster import (
    CRD,
    Helm,
    adopt_crd,
    can,
    token_request,
    values_file,
)
from tests.chart.test_chart_cluster import helm_cp as helm_cp  # the fixture, used by name
from tests.cluster.controlplane import ControlPlane, wait_for
from tests.e2e.conftest import SECRET, Operator, chat_job, condition, wait_phase
from tests.reliability.record import record

pytestmark = pytest.mark.cluster

MERGE = "application/merge-patch+json"
DRY = "dryRun=All"
TRAIN_TIMEOUT = 420


# --------------------------------------------------------------------------- RBAC


@dataclass(frozen=True)
class Call:
    what: str
    method: str
    path: str
    body: Any = None
    content_type: str = "application/json"


def _pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }


def _secret(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}}


def _binding(kind: str, name: str, sa_ns: str, sa: str, ns: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if ns:
        meta["namespace"] = ns
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "cluster-admin",
        },
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": sa_ns}],
    }


def refused_calls(
    jobs: str, other: str, system: str, sa: str, own_role: str | None, node: str
) -> list[Call]:
    """What the operator must never be able to do, in either install mode."""
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    crd = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD}"
    rule = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}
    calls = [
        # --- Secrets: never enumerable, never outside the watched namespace, never written
        Call("list Secrets cluster-wide", "GET", "/api/v1/secrets"),
        Call("watch Secrets cluster-wide", "GET", "/api/v1/secrets?watch=1&timeoutSeconds=1"),
        Call("list Secrets in the job namespace", "GET", f"/api/v1/namespaces/{jobs}/secrets"),
        Call(
            "watch Secrets in the job namespace",
            "GET",
            f"/api/v1/namespaces/{jobs}/secrets?watch=1&timeoutSeconds=1",
        ),
        Call(
            "get a Secret in another namespace",
            "GET",
            f"/api/v1/namespaces/{other}/secrets/other-secret",
        ),
        Call("list Secrets in another namespace", "GET", f"/api/v1/namespaces/{other}/secrets"),
        Call("list Secrets in its own namespace", "GET", f"/api/v1/namespaces/{system}/secrets"),
        Call("list Secrets in kube-system", "GET", "/api/v1/namespaces/kube-system/secrets"),
        Call(
            "create a Secret in the job namespace",
            "POST",
            f"/api/v1/namespaces/{jobs}/secrets?{DRY}",
            _secret("stolen"),
        ),
        Call(
            "patch the credentials Secret",
            "PATCH",
            f"/api/v1/namespaces/{jobs}/secrets/{SECRET}?{DRY}",
            {"stringData": {"AWS_SECRET_ACCESS_KEY": "x"}},
            MERGE,
        ),
        Call(
            "delete the credentials Secret",
            "DELETE",
            f"/api/v1/namespaces/{jobs}/secrets/{SECRET}?{DRY}",
        ),
        Call(
            "create a Secret in another namespace",
            "POST",
            f"/api/v1/namespaces/{other}/secrets?{DRY}",
            _secret("stolen"),
        ),
        # --- nodes: no writes (reads are allowed: dead-node clean-up, GPU-per-node checks)
        Call(
            "create a node",
            "POST",
            f"/api/v1/nodes?{DRY}",
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "evil-node"}},
        ),
        Call(
            "label a node",
            "PATCH",
            f"/api/v1/nodes/{node}?{DRY}",
            {"metadata": {"labels": {"evil": "true"}}},
            MERGE,
        ),
        Call(
            "taint a node",
            "PATCH",
            f"/api/v1/nodes/{node}?{DRY}",
            {"spec": {"taints": [{"key": "evil", "effect": "NoSchedule"}]}},
            MERGE,
        ),
        Call(
            "write a node's status",
            "PATCH",
            f"/api/v1/nodes/{node}/status?{DRY}",
            {"status": {"capacity": {"nvidia.com/gpu": "64"}}},
            MERGE,
        ),
        Call("delete a node", "DELETE", f"/api/v1/nodes/{node}?{DRY}"),
        Call(
            "evict a pod in kube-system",
            "POST",
            f"/api/v1/namespaces/kube-system/pods/x/eviction?{DRY}",
            {"apiVersion": "policy/v1beta1", "kind": "Eviction", "metadata": {"name": "x"}},
        ),
        # --- RBAC objects: no way to grant itself more
        Call(
            "create a Role in the job namespace",
            "POST",
            f"{rbac}/namespaces/{jobs}/roles?{DRY}",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "evil"},
                "rules": [rule],
            },
        ),
        Call(
            "bind cluster-admin in the job namespace",
            "POST",
            f"{rbac}/namespaces/{jobs}/rolebindings?{DRY}",
            _binding("RoleBinding", "evil", system, sa, jobs),
        ),
        Call(
            "create a ClusterRole",
            "POST",
            f"{rbac}/clusterroles?{DRY}",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "kubetune-evil"},
                "rules": [rule],
            },
        ),
        Call(
            "bind cluster-admin cluster-wide",
            "POST",
            f"{rbac}/clusterrolebindings?{DRY}",
            _binding("ClusterRoleBinding", "kubetune-evil", system, sa),
        ),
        Call("list ClusterRoles", "GET", f"{rbac}/clusterroles"),
        Call(
            "list RoleBindings in the job namespace",
            "GET",
            f"{rbac}/namespaces/{jobs}/rolebindings",
        ),
        # --- its own CRD and cluster-level machinery
        Call("delete the FineTuneJob CRD", "DELETE", f"{crd}?{DRY}"),
        Call(
            "patch the FineTuneJob CRD",
            "PATCH",
            f"{crd}?{DRY}",
            {"metadata": {"labels": {"evil": "true"}}},
            MERGE,
        ),
        Call(
            "create a CRD",
            "POST",
            f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions?{DRY}",
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": "evils.example.com"},
            },
        ),
        Call(
            "create a validating webhook",
            "POST",
            f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations?{DRY}",
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingWebhookConfiguration",
                "metadata": {"name": "evil"},
            },
        ),
        Call(
            "create a namespace",
            "POST",
            f"/api/v1/namespaces?{DRY}",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "evil"}},
        ),
        Call("delete the job namespace", "DELETE", f"/api/v1/namespaces/{jobs}?{DRY}"),
        Call(
            "create a PersistentVolume (hostPath)",
            "POST",
            f"/api/v1/persistentvolumes?{DRY}",
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": "evil"},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "hostPath": {"path": "/"},
                },
            },
        ),
        Call(
            "create a CertificateSigningRequest",
            "POST",
            f"/apis/certificates.k8s.io/v1/certificatesigningrequests?{DRY}",
            {
                "apiVersion": "certificates.k8s.io/v1",
                "kind": "CertificateSigningRequest",
                "metadata": {"name": "evil"},
            },
        ),
        Call(
            "create a PriorityClass",
            "POST",
            f"/apis/scheduling.k8s.io/v1/priorityclasses?{DRY}",
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": "evil"},
                "value": 1000000,
            },
        ),
        # --- reaching into pods and identities instead of creating its own children
        Call(
            "exec into a pod",
            "POST",
            f"/api/v1/namespaces/{jobs}/pods/x/exec?command=sh&stdout=true",
        ),
        Call("attach to a pod", "POST", f"/api/v1/namespaces/{jobs}/pods/x/attach?stdout=true"),
        Call("port-forward to a pod", "POST", f"/api/v1/namespaces/{jobs}/pods/x/portforward"),
        Call("proxy to a pod", "GET", f"/api/v1/namespaces/{jobs}/pods/x/proxy/"),
        Call(
            "mint a token for another ServiceAccount",
            "POST",
            f"/api/v1/namespaces/{jobs}/serviceaccounts/default/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
        ),
        Call(
            "create a ServiceAccount",
            "POST",
            f"/api/v1/namespaces/{jobs}/serviceaccounts?{DRY}",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "evil"}},
        ),
        Call(
            "create a DaemonSet",
            "POST",
            f"/apis/apps/v1/namespaces/{jobs}/daemonsets?{DRY}",
            {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "evil"}},
        ),
        Call(
            "create a batch Job",
            "POST",
            f"/apis/batch/v1/namespaces/{jobs}/jobs?{DRY}",
            {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "evil"}},
        ),
    ]
    if own_role:
        calls += [
            Call(
                "widen its own Role",
                "PATCH",
                f"{rbac}/namespaces/{jobs}/roles/{own_role}?{DRY}",
                {"rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]},
                MERGE,
            ),
            Call(
                "delete its own RoleBinding",
                "DELETE",
                f"{rbac}/namespaces/{jobs}/rolebindings/{own_role}?{DRY}",
            ),
        ]
    return calls


def allowed_calls(jobs: str) -> list[Call]:
    """What the operator needs: these must succeed, or the refusals above prove nothing."""
    return [
        Call(
            "list FineTuneJobs in the job namespace",
            "GET",
            f"/apis/kubetune.io/v1alpha1/namespaces/{jobs}/finetunejobs",
        ),
        Call("list pods in the job namespace", "GET", f"/api/v1/namespaces/{jobs}/pods"),
        Call(
            "create a pod in the job namespace",
            "POST",
            f"/api/v1/namespaces/{jobs}/pods?{DRY}",
            _pod("kt-rbac-probe"),
        ),
        Call(
            "create a ConfigMap in the job namespace",
            "POST",
            f"/api/v1/namespaces/{jobs}/configmaps?{DRY}",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kt-rbac-probe"}},
        ),
        Call("list namespaces (kopf's discovery)", "GET", "/api/v1/namespaces"),
        # Ranks stuck on lost nodes, the largest GPU node, prices per node label (issue 13).
        Call("list nodes", "GET", "/api/v1/nodes"),
        # Who took a rank away (the scheduler's Preempted event).
        Call("list Events in the job namespace", "GET", f"/api/v1/namespaces/{jobs}/events"),
    ]


# Refusals that only a namespace-scoped install makes (a cluster-wide one works everywhere).
def namespaced_only(other: str) -> list[Call]:
    return [
        Call(
            "create a pod in an unwatched namespace",
            "POST",
            f"/api/v1/namespaces/{other}/pods?{DRY}",
            _pod("evil"),
        ),
        Call(
            "create a pod in kube-system",
            "POST",
            f"/api/v1/namespaces/kube-system/pods?{DRY}",
            _pod("evil"),
        ),
        Call(
            "list FineTuneJobs in an unwatched namespace",
            "GET",
            f"/apis/kubetune.io/v1alpha1/namespaces/{other}/finetunejobs",
        ),
        Call("list ConfigMaps in kube-system", "GET", "/api/v1/namespaces/kube-system/configmaps"),
        Call(
            "create a Deployment in an unwatched namespace",
            "POST",
            f"/apis/apps/v1/namespaces/{other}/deployments?{DRY}",
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "evil"}},
        ),
    ]


def cluster_only(jobs: str) -> list[Call]:
    # Cluster-wide: no Secret access at all, not even `get` by name.
    return [
        Call("get the credentials Secret", "GET", f"/api/v1/namespaces/{jobs}/secrets/{SECRET}")
    ]


# SelfSubjectAccessReview for what a plain request cannot show (impersonation, bind, escalate).
SSAR_REFUSED = [
    ("impersonate", "users", "", ""),
    ("impersonate", "groups", "", ""),
    ("impersonate", "serviceaccounts", "", ""),
    ("bind", "clusterroles", "rbac.authorization.k8s.io", ""),
    ("escalate", "clusterroles", "rbac.authorization.k8s.io", ""),
    ("escalate", "roles", "rbac.authorization.k8s.io", "JOBS"),
    ("bind", "roles", "rbac.authorization.k8s.io", "JOBS"),
    ("approve", "signers", "certificates.k8s.io", ""),
]


@pytest.fixture
def other_namespace(control_plane: ControlPlane, namespace: str) -> Iterator[str]:
    """An unwatched namespace holding a Secret the operator must not read."""
    name = control_plane.create_namespace(f"{namespace[:50]}-o")
    control_plane.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "other-secret"},
            "stringData": {"password": "not-for-the-operator"},
        },
        name,
    )
    yield name
    control_plane.delete_namespace(name)


@pytest.mark.parametrize("mode", ["namespaced", "cluster-wide"])
def test_operator_service_account_is_refused_outside_its_rights(
    control_plane: ControlPlane,
    helm_cp: Helm,
    namespace: str,
    other_namespace: str,
    canary_s3: dict[str, str],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    mode: str,
) -> None:
    cp, jobs, other = control_plane, namespace, other_namespace
    release = "ktrs" if mode == "namespaced" else "ktrc"
    system = cp.create_namespace(f"{namespace[:50]}-sys")
    values: dict[str, Any] = {"operator": {"replicas": 0}}
    if mode == "namespaced":
        values["watchNamespaces"] = [jobs]
    try:
        adopt_crd(cp, release, system)
        helm_cp("install", release, str(CHART), "-n", system, "-f", values_file(tmp_path, values))
        cp.kubectl("wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=60s")
        sa = f"{release}-kubetune"
        token = token_request(cp, system, sa)
        node = cp.nodes[0]

        def run(call: Call) -> int:
            status, _ = cp.request(
                call.method, call.path, call.body, token=token, content_type=call.content_type
            )
            return status

        # --- the calls it needs go through (so the token works and 403 means "refused")
        allowed = allowed_calls(jobs)
        if mode == "namespaced":
            allowed.append(
                Call(
                    "get the credentials Secret",
                    "GET",
                    f"/api/v1/namespaces/{jobs}/secrets/{SECRET}",
                )
            )
        for call in allowed:
            status = run(call)
            assert status in (200, 201), f"{mode}: {call.what} -> {status}"

        # --- everything else is refused
        own_role = f"{release}-kubetune" if mode == "namespaced" else None
        calls = refused_calls(jobs, other, system, sa, own_role, node)
        calls += namespaced_only(other) if mode == "namespaced" else cluster_only(jobs)
        results = [(call.what, run(call)) for call in calls]
        for verb, resource, group, ns in SSAR_REFUSED:
            ns = jobs if ns == "JOBS" else ns
            ok = can(cp, token, verb, resource, ns, group)
            results.append((f"SSAR {verb} {resource} {ns}".strip(), 200 if ok else 403))
    finally:
        helm_cp("uninstall", release, "-n", system, "--wait", check=False)
        cp.delete_namespace(system)

    wrongly = [(what, status) for what, status in results if status != 403]
    print(f"\n{mode}: {len(allowed)} needed calls allowed; refusals:")
    for what, status in results:
        print(f"  {'ok  ' if status == 403 else 'FAIL'} {status} {what}")
    print(f"RBAC ({mode}): {len(results)} refusals checked, {len(wrongly)} wrongly allowed")
    record(request.node.nodeid, rbac_refusals_checked=len(results), rbac_violations=len(wrongly))
    assert not wrongly, wrongly


# --------------------------------------------------------------------------- Pod Security

# Pod Security Standards, "restricted" (which includes "baseline"), as of Kubernetes 1.30.
ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t"}
SECCOMP_OK = {"RuntimeDefault", "Localhost"}
APPARMOR_PREFIX = "container.apparmor.security.beta.kubernetes.io/"


class Audit:
    """Counts every (object, field) checked and every violation found."""

    def __init__(self) -> None:
        self.checked = 0
        self.violations: list[str] = []
        self.per_object: dict[str, int] = {}

    def check(self, where: str, field: str, ok: bool, got: Any) -> None:
        self.checked += 1
        self.per_object[where] = self.per_object.get(where, 0) + 1
        if not ok:
            self.violations.append(f"{where}: {field} = {json.dumps(got)}")


def audit_pod_spec(audit: Audit, where: str, meta: dict[str, Any], spec: dict[str, Any]) -> None:
    psc = spec.get("securityContext") or {}
    # baseline: host namespaces, host paths, host ports, privileged, capabilities, /proc,
    # seccomp, SELinux, AppArmor, sysctls, Windows HostProcess
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        audit.check(where, f"spec.{key}", not spec.get(key), spec.get(key))
    for vol in spec.get("volumes") or []:
        kinds = [k for k in vol if k != "name"]
        audit.check(where, f"volumes[{vol['name']}].hostPath", "hostPath" not in vol, kinds)
        audit.check(where, f"volumes[{vol['name']}] type", set(kinds) <= ALLOWED_VOLUMES, kinds)
    sysctls = [s.get("name") for s in psc.get("sysctls") or []]
    audit.check(where, "securityContext.sysctls", set(sysctls) <= SAFE_SYSCTLS, sysctls)
    pod_selinux = psc.get("seLinuxOptions") or {}
    audit.check(
        where,
        "securityContext.seLinuxOptions",
        pod_selinux.get("type", "") in SELINUX_TYPES
        and not pod_selinux.get("user")
        and not pod_selinux.get("role"),
        pod_selinux,
    )
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    audit.check(
        where, "securityContext.seccompProfile", pod_seccomp in (None, *SECCOMP_OK), pod_seccomp
    )
    audit.check(
        where,
        "securityContext.windowsOptions.hostProcess",
        not (psc.get("windowsOptions") or {}).get("hostProcess"),
        psc.get("windowsOptions"),
    )
    # restricted, pod level: never root
    audit.check(where, "securityContext.runAsUser", psc.get("runAsUser") != 0, psc.get("runAsUser"))
    for key, value in (meta.get("annotations") or {}).items():
        if key.startswith(APPARMOR_PREFIX):
            ok = value == "runtime/default" or value.startswith("localhost/")
            audit.check(where, f"annotations[{key}]", ok, value)
    pod_apparmor = (psc.get("appArmorProfile") or {}).get("type")
    audit.check(
        where, "securityContext.appArmorProfile", pod_apparmor != "Unconfined", pod_apparmor
    )

    containers = [
        (kind, c)
        for kind in ("initContainers", "containers", "ephemeralContainers")
        for c in spec.get(kind) or []
    ]
    assert containers, f"{where}: no containers"
    for kind, c in containers:
        at = f"{where} {kind}[{c['name']}]"
        sc = c.get("securityContext") or {}
        audit.check(
            at, "securityContext.privileged", not sc.get("privileged"), sc.get("privileged")
        )
        ports = [p.get("hostPort") for p in c.get("ports") or [] if p.get("hostPort")]
        audit.check(at, "ports[].hostPort", not ports, ports)
        caps = sc.get("capabilities") or {}
        added = caps.get("add") or []
        audit.check(at, "capabilities.add", set(added) <= {"NET_BIND_SERVICE"}, added)
        audit.check(at, "capabilities.drop", "ALL" in (caps.get("drop") or []), caps.get("drop"))
        audit.check(
            at, "procMount", sc.get("procMount", "Default") == "Default", sc.get("procMount")
        )
        selinux = sc.get("seLinuxOptions") or {}
        audit.check(
            at,
            "seLinuxOptions",
            selinux.get("type", "") in SELINUX_TYPES
            and not selinux.get("user")
            and not selinux.get("role"),
            selinux,
        )
        audit.check(
            at,
            "windowsOptions.hostProcess",
            not (sc.get("windowsOptions") or {}).get("hostProcess"),
            sc.get("windowsOptions"),
        )
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        audit.check(at, "appArmorProfile", apparmor != "Unconfined", apparmor)
        # restricted
        audit.check(
            at,
            "allowPrivilegeEscalation",
            sc.get("allowPrivilegeEscalation") is False,
            sc.get("allowPrivilegeEscalation"),
        )
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        audit.check(at, "runAsNonRoot (container or pod)", non_root is True, non_root)
        audit.check(at, "runAsUser", sc.get("runAsUser") != 0, sc.get("runAsUser"))
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        audit.check(at, "seccompProfile (container or pod)", seccomp in SECCOMP_OK, seccomp)


# Breaks each control once: the audit must find every one (so a pass means something).
EVIL_POD: dict[str, Any] = {
    "hostNetwork": True,
    "hostPID": True,
    "hostIPC": True,
    "securityContext": {
        "runAsUser": 0,
        "seccompProfile": {"type": "Unconfined"},
        "sysctls": [{"name": "kernel.msgmax", "value": "1"}],
        "seLinuxOptions": {"type": "spc_t"},
        "windowsOptions": {"hostProcess": True},
    },
    "volumes": [{"name": "root", "hostPath": {"path": "/"}}, {"name": "n", "nfs": {}}],
    "containers": [
        {
            "name": "c",
            "ports": [{"containerPort": 80, "hostPort": 80}],
            "securityContext": {
                "privileged": True,
                "allowPrivilegeEscalation": True,
                "runAsNonRoot": False,
                "runAsUser": 0,
                "procMount": "Unmasked",
                "capabilities": {"add": ["SYS_ADMIN"]},
                "appArmorProfile": {"type": "Unconfined"},
                "seLinuxOptions": {"user": "system_u"},
            },
        }
    ],
}
EVIL_VIOLATIONS = 23


def _server_minor(cp: ControlPlane) -> int:
    version = cp.get_json("/version")
    return int("".join(ch for ch in str(version["minor"]) if ch.isdigit()))


def test_every_operator_pod_meets_pod_security_restricted(
    control_plane: ControlPlane,
    namespace: str,
    canary_s3: dict[str, str],
    operator: Operator,
    request: pytest.FixtureRequest,
) -> None:
    cp, ns = control_plane, namespace
    evil = Audit()
    evil_meta = {"annotations": {f"{APPARMOR_PREFIX}c": "unconfined"}}
    audit_pod_spec(evil, "evil", evil_meta, EVIL_POD)
    assert len(evil.violations) == EVIL_VIOLATIONS, "\n".join(evil.violations)
    minor = _server_minor(cp)
    if minor >= 25:  # PodSecurity admission (GA in 1.25) enforces the same on top
        cp.kubectl(
            "label", "--overwrite", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted"
        )
    else:
        print(f"kube-apiserver v1.{minor}: no PodSecurity admission; checking the fields only")
    job = chat_job(
        "psa",
        canary_s3,
        evaluation={"gates": [{"metric": "loss", "op": "<", "value": 100.0}]},
        inference={"enabled": True, "resources": {"cpu": "1", "memory": "2Gi"}},
    )
    started = time.monotonic()
    cp.apply(job, ns)
    try:
        done = wait_phase(cp, operator, ns, "psa", {"Succeeded", "Failed"}, TRAIN_TIMEOUT)
        assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
        serving = condition(done, "Serving")
        assert serving is not None and serving["status"] == "True", serving

        audit = Audit()
        pods = cp.pods(ns)
        roles = sorted(p["metadata"].get("labels", {}).get("kubetune.io/role", "?") for p in pods)
        print(f"job Succeeded in {time.monotonic() - started:.0f}s; pods: {roles}")
        assert "rank" in roles and "serve" in roles, roles
        for pod in pods:
            meta = pod["metadata"]
            # Every pod here is the operator's (the operator itself runs outside the cluster).
            assert meta.get("labels", {}).get("kubetune.io/job") == "psa", meta
            audit_pod_spec(audit, f"pod/{meta['name']}", meta, pod["spec"])
        dep = cp.get_json(f"/apis/apps/v1/namespaces/{ns}/deployments/psa-serve")
        template = dep["spec"]["template"]
        audit_pod_spec(
            audit, "deployment/psa-serve template", template["metadata"], template["spec"]
        )
    finally:
        # Delete the job while the operator runs, so kopf's finalizer comes off with it.
        cp.kubectl("delete", "-n", ns, "finetunejob", "psa", "--wait=false", check=False)
        wait_for(
            "the job deleted",
            lambda: (
                cp.request("GET", f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs/psa")[0]
                == 404
            ),
            60,
            0.5,
        )

    for where, n in audit.per_object.items():
        print(f"  {where}: {n} fields")
    for v in audit.violations:
        print(f"  VIOLATION {v}")
    print(
        f"Pod Security restricted: {len(pods)} pods + 1 pod template, "
        f"{audit.checked} fields checked, {len(audit.violations)} violations"
    )
    record(
        request.node.nodeid,
        pod_security_fields_checked=audit.checked,
        pod_security_violations=len(audit.violations),
        jobs_run=1,
        jobs_succeeded=1,
    )
    assert not audit.violations, audit.violations
