"""The layer contracts in pyproject.toml hold, and each one can fail.

`lint-imports` checks the real tree (scripts/test.sh runs it too). Then, for each contract, a
copy of the source roots gets one import that crosses that layer, and lint-imports must report
that contract broken: a contract that cannot fail would check nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

# contract id -> (module file under the copy, an import that crosses the layer)
VIOLATIONS = {
    "trainer-no-kubernetes": ("trainer/kubetune_trainer/store.py", "import kopf"),
    "contract-torch-free": ("trainer/kubetune_trainer/errors.py", "import kubetune_trainer.store"),
    "pure-operator-core": (
        "operator/kubetune_operator/reconcile/plan.py",
        "import kopf",
    ),
    "operator-no-trainer-runtime": (
        "operator/kubetune_operator/cli/validate.py",
        "from kubetune_operator.cli import run",
    ),
    "server-not-training": (
        "trainer/kubetune_trainer/serve/schemas.py",
        "from kubetune_trainer.train import engine",
    ),
}


def lint(cwd: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{cwd / 'operator'}{os.pathsep}{cwd / 'trainer'}"}
    only = [arg for c in contracts for arg in ("--contract", c)]
    return subprocess.run(
        [str(LINT), "--no-cache", *only, str(cwd / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_contracts_hold_on_the_tree() -> None:
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Contracts: {len(VIOLATIONS)} kept, 0 broken." in out.stdout, out.stdout


@pytest.mark.parametrize("contract", sorted(VIOLATIONS))
def test_each_contract_can_fail(tmp_path: Path, contract: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for root in ("operator", "trainer"):
        shutil.copytree(ROOT / root, tmp_path / root, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    rel, line = VIOLATIONS[contract]
    target = tmp_path / rel
    target.write_text(target.read_text() + f"\n{line}  # injected by test_layers\n")
    # The injected import breaks its own contract (contracts overlap: `config` is under the
    # pure core too, so others may break as well), and the copy is what was checked.
    out = lint(tmp_path, contract)
    assert out.returncode == 1, f"{contract}: {out.stdout}{out.stderr}"
    assert "BROKEN" in out.stdout
    assert "injected" not in (ROOT / rel).read_text()
