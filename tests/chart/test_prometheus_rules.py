"""The chart's alerts, run by Prometheus' own rule engine: `promtool test rules`.

The rule groups come from the rendered chart (`helm template`, PrometheusRule enabled with every
group on), are written to a plain Prometheus rules file, and the promtool test files in
tests/chart/rules/ run against it (they name it in `rule_files`). Every alert in the chart needs
at least one case where it must fire and one where it must not; a new alert without both fails
test_every_alert_has_firing_and_quiet_cases.

promtool comes from Debian's prometheus package: `bash scripts/install-prometheus.sh`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.helm import ROOT, VALUES_DIR, Obj, of_kind, render

RULE_TESTS = Path(__file__).resolve().parent / "rules"
# The name every test file lists in rule_files; the fixture writes the rendered rules there.
RULES_FILE = "kubetune-rules.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_BASE = "https://github.com/kubetune/kubetune/blob/main/docs/runbook.md"
ALL_GROUPS = [
    "monitoring.prometheusRule.enabled=true",
    "monitoring.prometheusRule.serving.enabled=true",
]
SEVERITIES = {"critical", "warning", "info"}
# Alerts on operator metrics: kubetune_operator_jobs is by phase only and the gang-restart
# counter by namespace only, so these alerts cannot carry the FineTuneJob's name.
NO_JOB_LABEL = {
    "KubetuneJobFailed": set(),
    "KubetuneJobQueuedTooLong": set(),
    "KubetuneRestartsClimbing": {"namespace"},
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run `bash scripts/install-prometheus.sh` (needs root)")
    return path


def _groups(values: list[Path] | None = None) -> list[Obj]:
    (rule,) = of_kind(render(values or [], sets=ALL_GROUPS), "PrometheusRule")
    groups: list[Obj] = rule["spec"]["groups"]
    return groups


def _alerts(groups: list[Obj]) -> dict[str, Obj]:
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def _test_files() -> list[Path]:
    return sorted(RULE_TESTS.glob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


@pytest.fixture(scope="module")
def groups() -> list[Obj]:
    return _groups()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, groups: list[Obj]) -> Path:
    """A folder with the rendered rules file and a copy of every promtool test file."""
    work = tmp_path_factory.mktemp("promtool")
    (work / RULES_FILE).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    for path in _test_files():
        shutil.copy(path, work / path.name)
    return work


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("values", ["default", "monitoring"])
def test_rendered_rules_pass_promtool_check(values: str, tmp_path: Path) -> None:
    files = [VALUES_DIR / "monitoring.yaml"] if values == "monitoring" else []
    rules = tmp_path / RULES_FILE
    rules.write_text(yaml.safe_dump({"groups": _groups(files)}, sort_keys=False))
    proc = _run("check", "rules", str(rules), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rule_test_files_exist() -> None:
    assert _test_files(), f"no promtool test files in {RULE_TESTS}"
    for path in _test_files():
        assert _load(path).get("rule_files") == [RULES_FILE], f"{path.name}: rule_files"


@pytest.mark.parametrize("name", [p.name for p in _test_files()])
def test_promtool_rule_tests(name: str, workdir: Path) -> None:
    proc = _run("test", "rules", name, cwd=workdir)
    assert proc.returncode == 0, f"promtool test rules {name}:\n{proc.stdout}{proc.stderr}"


def _cases() -> dict[str, dict[str, list[Obj]]]:
    """alertname -> {"firing": [exp_alerts entries...], "quiet": [test cases...]}."""
    cases: dict[str, dict[str, list[Obj]]] = {}
    for path in _test_files():
        for group in _load(path).get("tests") or []:
            for case in group.get("alert_rule_test") or []:
                entry = cases.setdefault(case["alertname"], {"firing": [], "quiet": []})
                expected = case.get("exp_alerts") or []
                if expected:
                    entry["firing"].extend(expected)
                else:
                    entry["quiet"].append(case)
    return cases


def test_every_alert_has_firing_and_quiet_cases(groups: list[Obj]) -> None:
    alerts, cases = set(_alerts(groups)), _cases()
    missing = [
        f"{name}: no {kind} case"
        for name in sorted(alerts)
        for kind in ("firing", "quiet")
        if not cases.get(name, {}).get(kind)
    ]
    assert not missing, missing
    # An alertname the chart does not have passes `exp_alerts: []` trivially: a stale test.
    unknown = sorted(set(cases) - alerts)
    assert not unknown, f"rule tests for alerts the chart does not have: {unknown}"


def test_firing_alerts_name_the_job() -> None:
    for name, entry in _cases().items():
        needed = NO_JOB_LABEL.get(name, {"namespace", "job"})
        for alert in entry["firing"]:
            labels = alert.get("exp_labels") or {}
            assert needed <= set(labels), f"{name}: {labels} lacks {sorted(needed - set(labels))}"
            assert labels.get("severity") in SEVERITIES, f"{name}: {labels}"


def _runbook_anchors() -> set[str]:
    """GitHub's anchors of the runbook's headings (lower case, punctuation dropped)."""
    anchors = set()
    for line in RUNBOOK.read_text().splitlines():
        if m := re.match(r"^#{1,6}\s+(.+?)\s*$", line):
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return anchors


def test_alerts_have_severity_and_runbook(groups: list[Obj]) -> None:
    anchors = _runbook_anchors()
    for name, rule in _alerts(groups).items():
        assert rule["labels"]["severity"] in SEVERITIES, name
        url = rule["annotations"]["runbook_url"]
        assert url == f"{RUNBOOK_BASE}#{name.lower()}", url
        assert name.lower() in anchors, f"docs/runbook.md has no section '## {name}'"
        assert rule["annotations"].get("summary") and rule["annotations"].get("description")
    # The base URL is a value; an alert label in alertLabels never duplicates severity.
    (rule,) = of_kind(
        render(
            sets=[
                *ALL_GROUPS,
                "monitoring.prometheusRule.runbookBaseUrl=https://wiki.example.com/kubetune",
                "monitoring.prometheusRule.alertLabels.severity=page",
            ]
        ),
        "PrometheusRule",
    )
    for name, r in _alerts(rule["spec"]["groups"]).items():
        assert (
            r["annotations"]["runbook_url"] == f"https://wiki.example.com/kubetune#{name.lower()}"
        )
        assert r["labels"]["severity"] in SEVERITIES


def test_serving_group_is_opt_in() -> None:
    (rule,) = of_kind(render(sets=["monitoring.prometheusRule.enabled=true"]), "PrometheusRule")
    assert [g["name"] for g in rule["spec"]["groups"]] == [
        "kubetune",
        "kubetune-training",
        "kubetune-usage",
    ]


def _records(groups: list[Obj]) -> dict[str, Obj]:
    return {r["record"]: r for g in groups for r in g["rules"] if "record" in r}


def test_every_recording_rule_is_tested(groups: list[Obj]) -> None:
    """Each recorded series is checked by at least one promql_expr_test (by its name)."""
    records = _records(groups)
    assert "namespace:kubetune_job_gpu_seconds:sum" in records
    tested = " ".join(
        case["expr"]
        for path in _test_files()
        for group in _load(path).get("tests") or []
        for case in group.get("promql_expr_test") or []
    )
    untested = sorted(name for name in records if name not in tested)
    assert not untested, f"recording rules without a promql_expr_test: {untested}"


def _exported_metric_names() -> set[str]:
    """Sample names the operator, the trainer and the inference server really export."""
    from kubetune_operator import metrics as operator_metrics
    from kubetune_trainer.serve.metrics import ServeMetrics
    from kubetune_trainer.telemetry.prometheus import TrainerMetrics

    names: set[str] = set()
    registries = [
        operator_metrics.registry,
        TrainerMetrics(job="j", namespace="ns").registry,
        ServeMetrics().registry,
    ]
    for registry in registries:
        for family in registry.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
            if family.type == "counter":  # <name>_total exists before the first labelled sample
                names.add(f"{family.name}_total")
            if family.type == "histogram":  # _bucket/_sum/_count before the first child
                names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
    return names


def test_rules_use_exported_metrics(groups: list[Obj]) -> None:
    used = set(re.findall(r"\b(kubetune_[a-z_]+)\b", yaml.safe_dump(groups)))
    unknown = used - _exported_metric_names()
    assert not unknown, f"metrics not exported by the operator, trainer or server: {unknown}"
