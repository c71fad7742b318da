"""`kubetune validate` on the shipped examples and the deliberately invalid ones."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VALID = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))


def kubetune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune_operator.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_all_examples_are_valid() -> None:
    assert len(VALID) >= 4
    result = kubetune("validate", *map(str, VALID))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_examples_fail_with_their_field(path: Path) -> None:
    expect = re.search(r"^# expect: (.+)$", path.read_text(), re.MULTILINE)
    assert expect, f"{path.name} must say what error it expects in a '# expect:' line"
    result = kubetune("validate", str(path))
    assert result.returncode == 1
    assert expect.group(1).strip() in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_file_and_not_a_mapping(tmp_path: Path) -> None:
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    binary = tmp_path / "garbage.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    result = kubetune("validate", str(tmp_path / "nope.yaml"), str(scalar), str(binary))
    assert result.returncode == 1
    assert "file not found" in result.stdout
    assert "expected a mapping" in result.stdout
    assert "not UTF-8" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_progress_bar_of_kubetune_status() -> None:
    from kubetune_operator.cli.cluster import progress_bar

    assert progress_bar(50, 10) == "[#####-----]  50%"
    assert progress_bar(0, 4) == "[----]   0%"
    assert progress_bar(130, 4) == "[####] 130%"  # clamped bar, honest number
