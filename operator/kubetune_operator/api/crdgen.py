"""Generate the FineTuneJob CRD from the pydantic models.

    python -m kubetune_operator.api.crdgen --write   # rewrite crds/ and the chart template
    python -m kubetune_operator.api.crdgen --check   # exit 1 when the committed YAML is stale

The output is a structural schema: every $ref inlined, nullable instead of anyOf-null, a
description on every field (so `kubectl explain` helps), and defaults described in the text
rather than set by the apiserver (the models apply them; one source of truth).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from kubetune_operator.api.models import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
CRD_PATH = REPO_ROOT / "crds" / f"{GROUP}_{PLURAL}.yaml"
CHART_CRD_PATH = REPO_ROOT / "charts" / "kubetune" / "templates" / "crds" / f"{PLURAL}.yaml"
FIX_COMMAND = "python -m kubetune_operator.api.crdgen --write"

_DROP_KEYS = {"title", "default", "$defs", "discriminator"}


class SchemaError(ValueError):
    """The models produced something a structural schema cannot express."""


def _describe_default(default: Any) -> str | None:
    if default is None or (isinstance(default, dict | list) and not default):
        return None
    return f"Default: {json.dumps(default)}."


def _structural(node: Any, defs: dict[str, Any], path: str) -> Any:
    """Rewrite one JSON-schema node (pydantic output) into an OpenAPI v3 structural node."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        ref = node.pop("$ref").rsplit("/", 1)[-1]
        target = dict(defs[ref])
        # A field's own description wins over its model's docstring.
        if "description" in node:
            target["description"] = node["description"]
        target.update({k: v for k, v in node.items() if k != "description"})
        node = target
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v != {"type": "null"}]
        if len(variants) != 1:
            raise SchemaError(f"{path}: unions other than Optional[X] are not structural")
        merged = _structural({**variants[0], **node}, defs, path)
        merged["nullable"] = True
        return merged
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        kinds = {type(v) for v in node["enum"]}
        node["type"] = "integer" if kinds == {int} else "string"
    default_text = _describe_default(node.get("default")) if "default" in node else None
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs, f"{path}.{k}") for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value, defs, f"{path}[]")
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        else:
            out[key] = value
    if "properties" in out:
        # Structural schemas forbid additionalProperties beside properties; pruning drops extras.
        out.pop("additionalProperties", None)
    elif out.get("type") == "object":
        extra = out.get("additionalProperties")
        if extra is True or extra == {} or extra is None:
            out.pop("additionalProperties", None)
            out["x-kubernetes-preserve-unknown-fields"] = True
    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise SchemaError(f"{path}: no type (structural schemas need one)")
    if default_text:
        out["description"] = f"{out.get('description', '').rstrip()} {default_text}".strip()
    if not out.get("description") and not path.endswith("[]"):
        raise SchemaError(f"{path}: no description; add Field(description=...) to the model")
    return out


def openapi_schema(model: type[Any], path: str) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    result: dict[str, Any] = _structural(raw, defs, path)
    return result


def build_crd() -> dict[str, Any]:
    spec = openapi_schema(FineTuneJobSpec, "spec")
    status = openapi_schema(FineTuneJobStatus, "status")
    version = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "subresources": {"status": {}},
        "additionalPrinterColumns": [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {
                "name": "Progress",
                "type": "integer",
                "jsonPath": ".status.progress.percent",
                "description": "Training progress in percent",
            },
            {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
            {"name": "Eval", "type": "string", "jsonPath": ".status.evalSummary"},
            {"name": "GPU-h", "type": "number", "jsonPath": ".status.usage.gpuHours"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "description": "A fine-tuning job: base model + task data in, an evaluated "
                "(and optionally served) fine-tuned model out.",
                "required": ["spec"],
                "properties": {
                    "apiVersion": {"type": "string", "description": "kubetune.io/v1alpha1"},
                    "kind": {"type": "string", "description": "FineTuneJob"},
                    "metadata": {"type": "object"},
                    "spec": spec,
                    "status": status,
                },
            }
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["kubetune"],
            },
            "versions": [version],
        },
    }


_HEADER = f"# GENERATED by `{FIX_COMMAND}` from the pydantic models. Do not edit.\n"


def render_crd_yaml() -> str:
    return _HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def render_chart_template() -> str:
    """The chart's copy: installed only with crds.install, kept on uninstall with crds.keep."""
    body = yaml.safe_dump(build_crd(), sort_keys=False, width=100)
    annotations = (
        "  annotations:\n"
        "    {{- if .Values.crds.keep }}\n"
        "    helm.sh/resource-policy: keep\n"
        "    {{- end }}\n"
        "  labels:\n"
        '    {{- include "kubetune.labels" . | nindent 4 }}\n'
    )
    body = body.replace("metadata:\n  name:", "metadata:\n" + annotations + "  name:", 1)
    return "{{- if .Values.crds.install }}\n" + _HEADER + body + "{{- end }}\n"


def outputs() -> dict[Path, str]:
    return {CRD_PATH: render_crd_yaml(), CHART_CRD_PATH: render_chart_template()}


def _show(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crdgen", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write the generated CRD files")
    mode.add_argument("--check", action="store_true", help="fail when committed files are stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {_show(path)}")
        elif not path.exists() or path.read_text() != text:
            stale.append(_show(path))
    if stale:
        print(
            f"CRD out of date with the models: {', '.join(stale)}. Run `{FIX_COMMAND}`.",
            file=sys.stderr,
        )
        return 1
    if args.check:
        print("CRD files match the models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
