"""Run the reliability suite and print one table of what it tried and what it saw.

    python -m tests.reliability.report [extra pytest args]

Runs ``pytest -m cluster tests/reliability`` with a fresh results file, sums the figures every
test recorded (tests/reliability/record.py), and ends with ``RELIABILITY: PASS`` only when
pytest passed, every test recorded its figures, and every must-be-zero figure is zero.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.reliability.record import FIGURES, load, totals

ROOT = Path(__file__).resolve().parents[2]


def render(figures: dict[str, int], pytest_rc: int, tests: int) -> tuple[str, bool]:
    lines = [f"{'figure':<52}{'value':>8}  check"]
    ok = pytest_rc == 0 and tests > 0
    for key, (label, must_be_zero) in FIGURES.items():
        value = figures[key]
        verdict = ""
        if must_be_zero:
            verdict = "ok" if value == 0 else "FAIL"
            ok = ok and value == 0
        lines.append(f"{label:<52}{value:>8}  {verdict}")
    if figures["inputs_tried"] and figures["inputs_rejected"] != figures["inputs_tried"]:
        ok = False
        lines.append("not every bad input was rejected with a clear error: FAIL")
    lines.append(f"{'tests recording figures':<52}{tests:>8}")
    lines.append(f"{'pytest exit status':<52}{pytest_rc:>8}  {'ok' if pytest_rc == 0 else 'FAIL'}")
    return "\n".join(lines), ok


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="kubetune-reliability-") as tmp:
        results = Path(tmp) / "results.jsonl"
        env = {**os.environ, "KUBETUNE_RELIABILITY_RESULTS": str(results)}
        cmd = [sys.executable, "-m", "pytest", "-m", "cluster", "tests/reliability", *argv]
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        rows = load(results)
    table, ok = render(totals(rows), rc, len({r["test"] for r in rows}))
    print()
    print(table)
    print(f"RELIABILITY: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
