"""Helm for the chart tests: the pinned binary (scripts/fetch-helm.sh) and rendering helpers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
VALUES_DIR = Path(__file__).resolve().parent / "values"
HELM_VERSION = "v3.19.0"

Obj = dict[str, Any]


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")


def helm_binary() -> Path:
    """The pinned helm, fetched once by scripts/fetch-helm.sh (idempotent)."""
    path = cache_dir() / f"helm-{HELM_VERSION}" / "helm"
    if not path.exists():
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "fetch-helm.sh")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/fetch-helm.sh failed:\n{proc.stderr}{proc.stdout}")
    return path


def helm_env(home: Path | None = None) -> dict[str, str]:
    """Process env for helm; with ``home``, helm's cache/config/data dirs live under it."""
    env = dict(os.environ)
    if home is not None:
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            env[var] = str(home / var.lower())
    return env


def helm(
    *args: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(helm_binary()), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def template_args(
    values: Sequence[Path | str] = (), sets: Sequence[str] = (), namespace: str = "kubetune"
) -> list[str]:
    args = ["template", "kt", str(CHART), "--namespace", namespace]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    return args


def render(
    values: Sequence[Path | str] = (), sets: Sequence[str] = (), namespace: str = "kubetune"
) -> list[Obj]:
    """`helm template` -> the list of rendered objects (templates only, no crds/)."""
    out = helm(*template_args(values, sets, namespace)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def of_kind(docs: Sequence[Obj], kind: str) -> list[Obj]:
    return [d for d in docs if d.get("kind") == kind]
