"""The chart against the real control plane (tests/cluster): install, RBAC, upgrade, uninstall.

RBAC is proven under the chart ServiceAccount's own token (SelfSubjectAccessReview, the API
behind `kubectl auth can-i`, plus real requests), not by reading the Role objects back.

The namespace-scoped release runs the operator pod for real: the node agent runs the chart's
container (command overridden by `operator.command`, since there is no image) with the pod's
ServiceAccount token, and kopf's /healthz must answer on the pod IP.
The cluster-wide release runs 0 replicas: an operator watching every namespace would act on
other tests' jobs in this shared control plane.

The happy-path test takes a FineTuneJob from apply to a Ready inference Deployment with the
operator authenticated only by a TokenRequest token of the chart's ServiceAccount: the chart's
own container (command, args and env read back from the installed Deployment) runs as a local
process, so its log and lifetime stay in the test's hands. Every request it makes is authorized
by the chart's RBAC, so the job finishing proves that RBAC sufficient.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.helm import CHART, helm, helm_env
from tests.cluster.controlplane import ControlPlane, free_port, wait_for, write_kubeconfig
from tests.e2e.conftest import SECRET, Operator, chat_job, condition, get_job, wait_phase

pytestmark = pytest.mark.cluster

CRD = "finetunejobs.kubetune.io"
MONITORING_CRDS = {
    "servicemonitors": "ServiceMonitor",
    "podmonitors": "PodMonitor",
    "prometheusrules": "PrometheusRule",
}


class Helm:
    """helm bound to the control plane's kubeconfig, with private cache/config dirs."""

    def __init__(self, cp: ControlPlane, home: Path) -> None:
        self.cp = cp
        self.env = helm_env(home)

    def __call__(self, *args: str, check: bool = True, timeout: float = 180) -> str:
        proc = helm(
            *args,
            "--kubeconfig",
            str(self.cp.kubeconfig),
            check=check,
            timeout=timeout,
            env=self.env,
        )
        return proc.stdout + proc.stderr


@pytest.fixture
def helm_cp(control_plane: ControlPlane, tmp_path: Path) -> Helm:
    return Helm(control_plane, tmp_path / "helm")


@pytest.fixture
def extra_namespaces(control_plane: ControlPlane, namespace: str) -> Iterator[list[str]]:
    """Two watched namespaces and one unwatched one, deleted afterwards."""
    names = [control_plane.create_namespace(f"{namespace[:50]}-{s}") for s in ("w1", "w2", "u")]
    yield names
    for ns in names:
        control_plane.delete_namespace(ns)


def adopt_crd(cp: ControlPlane, release: str, namespace: str) -> None:
    """Let this release own a FineTuneJob CRD applied earlier (by kubectl or another release).

    The chart keeps the CRD on uninstall, and other tests apply crds/ directly; Helm refuses
    objects without its ownership metadata, so mark the existing one as this release's.
    """
    if cp.kubectl("get", "crd", CRD, check=False).returncode != 0:
        return
    cp.kubectl("label", "--overwrite", "crd", CRD, "app.kubernetes.io/managed-by=Helm")
    cp.kubectl(
        "annotate",
        "--overwrite",
        "crd",
        CRD,
        f"meta.helm.sh/release-name={release}",
        f"meta.helm.sh/release-namespace={namespace}",
    )


@pytest.fixture
def monitoring_crds(control_plane: ControlPlane) -> Iterator[None]:
    """Minimal monitoring.coreos.com CRDs (the Prometheus Operator's kinds), if missing."""
    created = []
    for plural, kind in MONITORING_CRDS.items():
        name = f"{plural}.monitoring.coreos.com"
        if control_plane.kubectl("get", "crd", name, check=False).returncode == 0:
            continue
        control_plane.apply(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": name},
                "spec": {
                    "group": "monitoring.coreos.com",
                    "scope": "Namespaced",
                    "names": {"kind": kind, "plural": plural, "listKind": f"{kind}List"},
                    "versions": [
                        {
                            "name": "v1",
                            "served": True,
                            "storage": True,
                            "schema": {
                                "openAPIV3Schema": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    ],
                },
            }
        )
        created.append(name)
    for name in created:
        control_plane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    yield
    for name in created:
        control_plane.kubectl("delete", "crd", name, "--wait=false", check=False)


def can(
    cp: ControlPlane,
    token: str,
    verb: str,
    resource: str,
    namespace: str = "",
    group: str = "",
    subresource: str = "",
) -> bool:
    """SelfSubjectAccessReview under ``token``: what `kubectl auth can-i` asks."""
    attrs: dict[str, Any] = {"verb": verb, "resource": resource, "group": group}
    if namespace:
        attrs["namespace"] = namespace
    if subresource:
        attrs["subresource"] = subresource
    status, body = cp.request(
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attrs},
        },
        token=token,
    )
    assert status == 201, body
    return bool(body["status"].get("allowed"))


def labelled(cp: ControlPlane, kind: str, release: str, namespace: str | None) -> list[str]:
    ns = ["-n", namespace] if namespace else []
    out = cp.kubectl(
        "get",
        kind,
        *ns,
        "-l",
        f"app.kubernetes.io/instance={release}",
        "-o",
        "name",
        check=False,
    )
    if out.returncode != 0:
        # Only a kind that is not served (a CRD removed meanwhile) means "none"; any other
        # error must not pass for an empty list.
        assert "the server doesn't have a resource type" in out.stderr, out.stderr
        return []
    return out.stdout.split()


def assert_nothing_left(cp: ControlPlane, release: str, namespaces: list[str]) -> None:
    namespaced = [
        "deployments",
        "replicasets",
        "pods",
        "services",
        "configmaps",
        "serviceaccounts",
        "roles",
        "rolebindings",
        "kopfpeerings.kopf.dev",
        *MONITORING_CRDS,
    ]

    def leftovers() -> list[str]:
        found = [
            f"{ns}/{name}"
            for ns in namespaces
            for kind in namespaced
            for name in labelled(cp, kind, release, ns)
        ]
        for kind in (
            "clusterroles",
            "clusterrolebindings",
            "clusterkopfpeerings.kopf.dev",
            "priorityclasses.scheduling.k8s.io",
        ):
            found += labelled(cp, kind, release, None)
        return found

    # Pods go through graceful deletion first; everything else is gone when uninstall returns.
    wait_for("no objects of the release left", lambda: not leftovers(), 120, 1)
    crd = cp.get_json(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD}")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_namespaced_install_rbac_upgrade_uninstall(
    control_plane: ControlPlane,
    helm_cp: Helm,
    namespace: str,
    extra_namespaces: list[str],
    monitoring_crds: None,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    cp = control_plane
    w1, w2, unwatched = extra_namespaces
    release = "kt"
    health_port, metrics_port = free_port(), free_port()
    values: dict[str, Any] = {
        "watchNamespaces": [w1, w2],
        "operator": {
            # No image here: the node agent runs the command from the venv (its bin is first on
            # PATH), exactly what the image's ENTRYPOINT runs.
            "command": ["kopf", "run", "-m", "kubetune_operator.main"],
            # Bind the pod IP: several operators (and tests) share this host's ports.
            "bindAddress": "$(POD_IP)",
            "healthPort": health_port,
            "metricsPort": metrics_port,
            "livenessProbe": {"initialDelaySeconds": 30, "periodSeconds": 10},
        },
    }
    adopt_crd(cp, release, namespace)
    # Uninstalled even when an assertion fails: the release owns cluster-scoped objects (its
    # PriorityClasses) that would block every later install of the chart.
    request.addfinalizer(lambda: helm_cp("uninstall", release, "-n", namespace, check=False))
    helm_cp("install", release, str(CHART), "-n", namespace, "-f", values_file(tmp_path, values))
    sa = "kt-kubetune"

    # --- the objects exist
    cp.get_json(f"/apis/apps/v1/namespaces/{namespace}/deployments/kt-kubetune-operator")
    cp.get_json(f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}")
    cp.get_json(f"/api/v1/namespaces/{namespace}/services/kt-kubetune-operator-metrics")
    for ns in (w1, w2):
        cp.get_json(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/kt-kubetune")
        cp.get_json(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings/kt-kubetune")
        cp.get_json(f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings/kubetune")
    assert labelled(cp, "deployments", release, namespace)  # the label selector finds them
    assert labelled(cp, "kopfpeerings.kopf.dev", release, w1)
    assert not labelled(cp, "roles", release, unwatched)
    assert sorted(labelled(cp, "clusterroles", release, None)) == [
        "clusterrole.rbac.authorization.k8s.io/kt-kubetune-discovery",
        "clusterrole.rbac.authorization.k8s.io/kt-kubetune-nodes",
    ]
    # The chart's PriorityClasses (cluster-scoped, owned by this release).
    assert sorted(labelled(cp, "priorityclasses.scheduling.k8s.io", release, None)) == [
        f"priorityclass.scheduling.k8s.io/kubetune-{c}" for c in ("default", "low", "urgent")
    ]
    urgent = cp.get_json("/apis/scheduling.k8s.io/v1/priorityclasses/kubetune-urgent")
    assert urgent["value"] == 100000 and not urgent.get("globalDefault")  # false is omitted
    assert urgent["description"].startswith("kubetune: ")
    crd = cp.get_json(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD}")
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == release

    # --- RBAC under the operator's own token
    token = cp.service_account_token(namespace, sa)
    for ns in (w1, w2):
        assert can(cp, token, "create", "pods", ns)
        assert can(cp, token, "delete", "pods", ns)
        assert can(cp, token, "get", "pods", ns, subresource="log")
        assert can(cp, token, "patch", "finetunejobs", ns, "kubetune.io", "status")
        assert can(cp, token, "watch", "finetunejobs", ns, "kubetune.io")
        assert can(cp, token, "create", "deployments", ns, "apps")
        assert can(cp, token, "create", "events", ns)
        assert can(cp, token, "list", "events", ns)  # the scheduler's Preempted events
        assert can(cp, token, "watch", "events", ns)
        assert can(cp, token, "patch", "kopfpeerings", ns, "kopf.dev")
        assert can(cp, token, "get", "secrets", ns)  # namespace-scoped: get only, here only
        assert not can(cp, token, "list", "secrets", ns)
        assert not can(cp, token, "watch", "secrets", ns)
        assert not can(cp, token, "create", "roles", ns, "rbac.authorization.k8s.io")
        assert not can(cp, token, "create", "rolebindings", ns, "rbac.authorization.k8s.io")
    assert not can(cp, token, "get", "secrets", unwatched)
    assert not can(cp, token, "create", "pods", unwatched)
    assert not can(cp, token, "list", "events", unwatched)
    # Nodes are cluster-scoped: read through the -nodes ClusterRole, never written.
    for verb in ("get", "list", "watch"):
        assert can(cp, token, verb, "nodes"), verb
    assert cp.request("GET", "/api/v1/nodes", token=token)[0] == 200
    assert not can(cp, token, "list", "secrets")  # cluster-wide
    assert can(cp, token, "watch", "namespaces")  # read-only discovery for kopf
    assert not can(cp, token, "delete", "namespaces")
    assert not can(cp, token, "get", "secrets", namespace)  # its own namespace is not watched
    assert not can(cp, token, "update", "nodes")
    assert not can(cp, token, "patch", "nodes")
    assert not can(cp, token, "create", "clusterrolebindings", group="rbac.authorization.k8s.io")
    assert not can(cp, token, "create", "clusterroles", group="rbac.authorization.k8s.io")
    assert cp.request("GET", "/api/v1/secrets", token=token)[0] == 403
    assert cp.request("GET", f"/api/v1/namespaces/{unwatched}/secrets", token=token)[0] == 403

    # --- the operator pod runs under that ServiceAccount and kopf answers /healthz
    def running_pod() -> dict[str, Any] | None:
        for pod in cp.pods(namespace, "app.kubernetes.io/component=operator"):
            if pod["status"].get("phase") == "Running" and pod["status"].get("podIP"):
                return pod
        return None

    pod = wait_for("operator pod Running", running_pod, 120, 1)
    assert pod["spec"]["serviceAccountName"] == sa

    def healthy() -> bool:
        url = f"http://{pod['status']['podIP']}:{health_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return bool(resp.status == 200)

    try:
        wait_for("kopf /healthz of the chart's operator", healthy, 90, 1)
    except TimeoutError as exc:
        log = cp.pod_log(namespace, pod["metadata"]["name"])
        raise AssertionError(f"{exc}\noperator log:\n{log[-4000:]}") from exc

    # kopf got past its startup scan and heartbeats into each watched namespace's peering.
    def heartbeats() -> bool:
        return all(
            cp.get_json(f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings/kubetune").get("status")
            for ns in (w1, w2)
        )

    log = ""
    try:
        wait_for("operator heartbeats in the KopfPeerings", heartbeats, 60, 1)
    finally:
        log = cp.pod_log(namespace, pod["metadata"]["name"])
    assert "APIForbiddenError" not in log, log[-4000:]  # the chart's RBAC covers kopf's startup

    # --- upgrade: monitoring on, one namespace fewer
    values["watchNamespaces"] = [w1]
    values["monitoring"] = {
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    }
    helm_cp("upgrade", release, str(CHART), "-n", namespace, "-f", values_file(tmp_path, values))
    dep = cp.get_json(f"/apis/apps/v1/namespaces/{namespace}/deployments/kt-kubetune-operator")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--namespace={w1}" in args and f"--namespace={w2}" not in args
    assert not labelled(cp, "roles", release, w2)  # the dropped namespace loses its access
    assert not can(cp, token, "create", "pods", w2)
    assert not can(cp, token, "get", "secrets", w2)
    assert can(cp, token, "create", "pods", w1)
    for plural in MONITORING_CRDS:
        assert labelled(cp, f"{plural}.monitoring.coreos.com", release, namespace), plural
    cp.get_json(f"/api/v1/namespaces/{namespace}/configmaps/kt-kubetune-dashboard")
    history = json.loads(helm_cp("history", release, "-n", namespace, "-o", "json").split("\n")[0])
    assert [h["revision"] for h in history] == [1, 2]

    # --- uninstall: nothing of the release left, except the CRD (kept on purpose)
    helm_cp("uninstall", release, "-n", namespace, "--wait")
    assert_nothing_left(cp, release, [namespace, w1, w2, unwatched])


def test_cluster_wide_rbac(
    control_plane: ControlPlane, helm_cp: Helm, namespace: str, tmp_path: Path
) -> None:
    cp = control_plane
    release = "ktc"
    other = cp.create_namespace(f"{namespace[:50]}-o")
    try:
        adopt_crd(cp, release, namespace)
        # PriorityClasses are cluster-scoped: test_namespaced_install_rbac_upgrade_uninstall
        # checks them; a second owner here would only collide with a leftover release.
        values = {"operator": {"replicas": 0}, "priorityClasses": {"create": False}}
        helm_cp(
            "install", release, str(CHART), "-n", namespace, "-f", values_file(tmp_path, values)
        )
        sa = "ktc-kubetune"
        cp.get_json("/apis/rbac.authorization.k8s.io/v1/clusterroles/ktc-kubetune")
        cp.get_json("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/ktc-kubetune")
        cp.get_json("/apis/kopf.dev/v1/clusterkopfpeerings/kubetune")
        token = cp.service_account_token(namespace, sa)
        for ns in (namespace, other):
            assert can(cp, token, "create", "pods", ns)
            assert can(cp, token, "patch", "finetunejobs", ns, "kubetune.io", "status")
            assert can(cp, token, "delete", "finetunejobs", ns, "kubetune.io")
            assert can(cp, token, "create", "services", ns)
            assert can(cp, token, "create", "configmaps", ns)
            assert can(cp, token, "list", "events", ns)
            assert not can(cp, token, "get", "secrets", ns)  # no Secret access at all
            assert not can(cp, token, "create", "roles", ns, "rbac.authorization.k8s.io")
        assert can(cp, token, "watch", "namespaces")
        assert can(cp, token, "watch", "nodes")
        assert cp.request("GET", "/api/v1/nodes", token=token)[0] == 200
        assert not labelled(cp, "priorityclasses.scheduling.k8s.io", release, None)
        assert can(cp, token, "patch", "clusterkopfpeerings", group="kopf.dev")
        assert not can(cp, token, "list", "secrets")
        assert not can(cp, token, "update", "nodes")
        assert not can(cp, token, "delete", "nodes")
        assert not can(cp, token, "create", "clusterroles", group="rbac.authorization.k8s.io")
        assert not can(cp, token, "bind", "clusterroles", group="rbac.authorization.k8s.io")
        assert not can(
            cp, token, "delete", "customresourcedefinitions", group="apiextensions.k8s.io"
        )
        assert cp.request("GET", "/api/v1/secrets", token=token)[0] == 403
        helm_cp("uninstall", release, "-n", namespace, "--wait")
        assert_nothing_left(cp, release, [namespace, other])
    finally:
        helm_cp("uninstall", release, "-n", namespace, check=False)
        cp.delete_namespace(other)


# --------------------------------------------------------------------------- happy path

TRAIN_TIMEOUT = 420
# What the apiserver answers when RBAC denies a request, in any of the ways kopf, the
# kubernetes client and the operator log it.
FORBIDDEN = re.compile(r"\b403\b|Forbidden")


def token_request(cp: ControlPlane, namespace: str, sa: str) -> str:
    """A bound token for ``namespace/sa`` (TokenRequest), like the kubelet mounts into a pod."""
    status, body = cp.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        },
    )
    assert status == 201, body
    return str(body["status"]["token"])


class ChartOperator(Operator):
    """The installed Deployment's operator container as a local process, as its ServiceAccount.

    argv and env come from the Deployment the chart rendered (only the image's interpreter is
    this venv's), and the only credentials are the kubeconfig with the ServiceAccount token.
    """

    def __init__(
        self, cp: ControlPlane, deployment: dict[str, Any], kubeconfig: Path, log_path: Path
    ) -> None:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        namespaces = [a.split("=", 1)[1] for a in args if a.startswith("--namespace=")]
        super().__init__(cp, ",".join(namespaces), log_path)
        command = list(container["command"])
        assert command[0] == "kopf", command
        self.argv = [str(Path(sys.executable).parent / "kopf"), *command[1:], *args]
        self.env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        assert not any("$(" in v for v in self.env.values()), self.env  # nothing left to expand
        self.kubeconfig = kubeconfig

    def start(self) -> None:
        # No in-cluster or admin credentials may leak in from this process's environment.
        drop = {"KUBETUNE_KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"}
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(self.env, KUBECONFIG=str(self.kubeconfig))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=str(CHART.parents[1]),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()


def test_happy_path_under_the_chart_service_account(
    control_plane: ControlPlane,
    helm_cp: Helm,
    namespace: str,
    s3: dict[str, str],
    tmp_path: Path,
) -> None:
    """Namespace-scoped release in its own namespace, watching the job namespace (``namespace``,
    where the s3 fixture put the credentials Secret): the narrowest RBAC the chart renders."""
    cp, jobs = control_plane, namespace
    release = "ktop"
    system = cp.create_namespace(f"{namespace[:50]}-sys")
    health_port, metrics_port = free_port(), free_port()
    values: dict[str, Any] = {
        "watchNamespaces": [jobs],
        "operator": {
            # Run below as a local process instead: the test needs its log and a say over its
            # lifetime (the job's finalizer must come off before the namespace goes).
            "replicas": 0,
            "command": ["kopf", "run", "-m", "kubetune_operator.main"],
            "bindAddress": "127.0.0.1",
            "healthPort": health_port,
            "metricsPort": metrics_port,
            "extraEnv": [{"name": "KUBETUNE_RESTART_BACKOFF_SECONDS", "value": "2"}],
        },
        "trainer": {"image": {"repository": "kubetune/trainer", "tag": "test"}},
    }
    op: ChartOperator | None = None
    try:
        adopt_crd(cp, release, system)
        helm_cp("install", release, str(CHART), "-n", system, "-f", values_file(tmp_path, values))
        cp.kubectl("wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=60s")
        sa = f"{release}-kubetune"
        token = token_request(cp, system, sa)
        kubeconfig = tmp_path / "operator.kubeconfig"
        write_kubeconfig(
            kubeconfig, cp.server, cp.pki / "ca.crt", token, f"system:serviceaccount:{system}:{sa}"
        )

        # --- the token the operator runs with cannot read Secrets cluster-wide
        assert cp.request("GET", "/api/v1/secrets", token=token)[0] == 403
        assert not can(cp, token, "list", "secrets")
        assert not can(cp, token, "get", "secrets")
        assert cp.request("GET", f"/api/v1/namespaces/{system}/secrets", token=token)[0] == 403
        # ... nor list them where it works, only get the one a job names.
        assert cp.request("GET", f"/api/v1/namespaces/{jobs}/secrets", token=token)[0] == 403
        secret = f"/api/v1/namespaces/{jobs}/secrets/{SECRET}"
        assert cp.request("GET", secret, token=token)[0] == 200

        dep = cp.get_json(
            f"/apis/apps/v1/namespaces/{system}/deployments/{release}-kubetune-operator"
        )
        op = ChartOperator(cp, dep, kubeconfig, tmp_path / "operator.log")
        assert op.namespace == jobs
        assert op.env["KUBETUNE_TRAINER_IMAGE"] == "kubetune/trainer:test"
        op.start()

        def healthy() -> bool:
            if op is not None and op.proc is not None and op.proc.poll() is not None:
                raise AssertionError(f"operator exited {op.proc.returncode}:\n{op.log()[-3000:]}")
            url = f"http://127.0.0.1:{health_port}/healthz"
            with urllib.request.urlopen(url, timeout=5) as resp:
                return bool(resp.status == 200)

        wait_for("kopf /healthz of the operator", healthy, 90, 0.5)

        # --- the happy path: trained, evaluated, gates pass, served
        job = chat_job(
            "happy",
            s3,
            evaluation={"gates": [{"metric": "loss", "op": "<", "value": 100.0}]},
            inference={"enabled": True, "resources": {"cpu": "1", "memory": "2Gi"}},
        )
        cp.apply(job, jobs)
        done = wait_phase(cp, op, jobs, "happy", {"Succeeded", "Failed"}, TRAIN_TIMEOUT)
        status = done["status"]
        assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
        for type_ in ("Validated", "Launched", "Trained", "Evaluated", "Serving"):
            cond = condition(done, type_)
            assert cond is not None and cond["status"] == "True", (type_, cond)
        assert status["evalSummary"].endswith("PASS")
        assert status["endpoint"] == f"http://happy-serve.{jobs}.svc:8080"
        assert status["restarts"] == 0

        rank = cp.pod(jobs, "happy-rank-0")
        assert rank["spec"]["containers"][0]["image"] == "kubetune/trainer:test"  # from values
        serve = cp.get_json(f"/apis/apps/v1/namespaces/{jobs}/deployments/happy-serve")
        assert serve["status"].get("readyReplicas") == serve["spec"]["replicas"] == 1
        pods = cp.pods(jobs, "kubetune.io/job=happy,kubetune.io/role=serve")
        assert len(pods) == 1
        url = f"http://{pods[0]['status']['podIP']}:8080/readyz"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
        events = cp.get_json(f"/api/v1/namespaces/{jobs}/events")["items"]
        reasons = {e["reason"] for e in events if e["involvedObject"].get("name") == "happy"}
        assert {"Launched", "Evaluated"} <= reasons, reasons

        # --- deletion: kopf (its timer holds a finalizer) lets go under the same token
        assert "kubetune.io/finalizer" in get_job(cp, jobs, "happy")["metadata"]["finalizers"]
        cp.kubectl("delete", "-n", jobs, "finetunejob", "happy", "--wait=false")
        wait_for(
            "the job deleted (finalizer removed)",
            lambda: (
                cp.request(
                    "GET", f"/apis/kubetune.io/v1alpha1/namespaces/{jobs}/finetunejobs/happy"
                )[0]
                == 404
            ),
            60,
            0.5,
        )
    finally:
        if op is not None:
            op.stop()
            print(f"---- operator log (tail) ----\n{op.log()[-6000:]}")
        helm_cp("uninstall", release, "-n", system, "--wait", check=False)
        cp.delete_namespace(system)

    assert op is not None
    log = op.log()
    forbidden = [line for line in log.splitlines() if FORBIDDEN.search(line)]
    assert not forbidden, "\n".join(forbidden[:20])
