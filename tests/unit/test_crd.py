"""The committed CRD matches the models, and is a structural schema."""

from __future__ import annotations

from typing import Any

import yaml

from kubetune_operator.api import crdgen


def test_committed_crd_matches_the_models() -> None:
    for path, text in crdgen.outputs().items():
        assert path.exists(), f"{path} missing: run `{crdgen.FIX_COMMAND}`"
        assert path.read_text() == text, (
            f"{path.name} is out of date with the models: run `{crdgen.FIX_COMMAND}`"
        )


def test_check_mode_exit_codes(tmp_path: Any, monkeypatch: Any) -> None:
    assert crdgen.main(["--check"]) == 0
    stale = tmp_path / "crd.yaml"
    stale.write_text("old")
    monkeypatch.setattr(crdgen, "CRD_PATH", stale)
    assert crdgen.main(["--check"]) == 1


def walk(node: Any, path: str, problems: list[str]) -> None:
    if not isinstance(node, dict):
        return
    for banned in ("$ref", "anyOf", "oneOf", "allOf", "$defs", "title"):
        if banned in node:
            problems.append(f"{path}: {banned}")
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties")
    for key, child in node.get("properties", {}).items():
        if not child.get("description"):
            problems.append(f"{path}.{key}: no description")
        walk(child, f"{path}.{key}", problems)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            walk(node[key], f"{path}[]", problems)


def test_crd_is_structural_and_described() -> None:
    crd = yaml.safe_load(crdgen.CRD_PATH.read_text())
    version = crd["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    problems: list[str] = []
    walk(root["properties"]["spec"], "spec", problems)
    walk(root["properties"]["status"], "status", problems)
    assert not problems
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Progress",
        "Loss",
        "Eval",
        "GPU-h",
        "Age",
    ]
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    spec = root["properties"]["spec"]["properties"]
    assert spec["model"]["properties"]["revision"]["nullable"] is True
    assert "Default: 2e-05" in spec["hyperparameters"]["properties"]["learningRate"]["description"]


def test_chart_copy_is_gated_and_kept() -> None:
    text = crdgen.CHART_CRD_PATH.read_text()
    assert text.startswith("{{- if .Values.crds.install }}")
    assert "helm.sh/resource-policy: keep" in text
