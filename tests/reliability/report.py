"""Run the reliability suite and print one table of what it tried and what it saw.

    python -m tests.reliability.report [--json PATH] [extra pytest args]

Runs ``pytest -m cluster tests/reliability`` with a fresh results file, sums the figures every
test recorded (tests/reliability/record.py), and ends with ``RELIABILITY: PASS`` only when
pytest passed, every test in ``EXPECTED_TESTS`` recorded its figures, every must-be-zero figure
is zero, every bad input was rejected, and the suite did at least ``MINIMUMS`` of the work
(faults injected, places scanned for the canary, fuzz requests, bad inputs). The same verdict
and figures are written as JSON to ``--json PATH`` (default: ``report.json`` beside the default
results file, under the system temp dir).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.reliability.record import FIGURES, load, totals

ROOT = Path(__file__).resolve().parents[2]

# Every test that calls record(...) (directly or through the canary_s3 fixture), by node id.
EXPECTED_TESTS: frozenset[str] = frozenset(
    {
        "tests/reliability/test_bad_specs.py::test_generated_bad_specs_are_rejected",
        "tests/reliability/test_bad_trainer_input.py"
        "::test_corrupt_data_fails_the_job_with_invalid_data",
        "tests/reliability/test_bad_trainer_input.py"
        "::test_trainer_cli_exits_3_with_an_invalid_data_termination_log",
        "tests/reliability/test_faults.py::test_rank_killed_three_times",
        "tests/reliability/test_faults.py::test_operator_killed_mid_reconcile",
        "tests/reliability/test_faults.py::test_apiserver_restart_mid_run",
        "tests/reliability/test_faults.py::test_s3_unavailable_for_30s",
        "tests/reliability/test_faults.py::test_node_not_ready",
        "tests/reliability/test_rbac_pod_security.py"
        "::test_operator_service_account_is_refused_outside_its_rights[namespaced]",
        "tests/reliability/test_rbac_pod_security.py"
        "::test_operator_service_account_is_refused_outside_its_rights[cluster-wide]",
        "tests/reliability/test_rbac_pod_security.py"
        "::test_every_operator_pod_meets_pod_security_restricted",
        "tests/reliability/test_server_fuzz.py"
        "::test_fuzzed_requests_get_no_5xx_and_memory_stays_bounded[causal-lm]",
        "tests/reliability/test_server_fuzz.py"
        "::test_fuzzed_requests_get_no_5xx_and_memory_stays_bounded[classifier]",
    }
)

# The least work a run must show for its zeros to mean anything.
MINIMUMS: dict[str, int] = {
    "faults_injected": 1,
    "secret_places_scanned": 1,
    "server_requests": 600,  # two servers, 300+ requests each (the fuzz test's own floor)
    "inputs_tried": 200,
}


def judge(
    figures: dict[str, int], pytest_rc: int, tests: set[str] | frozenset[str]
) -> tuple[bool, list[str]]:
    """The verdict, and why it fails (empty when it passes). Pure: no I/O."""
    reasons: list[str] = []
    if pytest_rc != 0:
        reasons.append(f"pytest exited {pytest_rc}")
    missing = sorted(EXPECTED_TESTS - set(tests))
    if missing:
        reasons.append(f"tests that recorded no figures: {missing}")
    for key, (label, must_be_zero) in FIGURES.items():
        if must_be_zero and figures.get(key, 0) != 0:
            reasons.append(f"{label}: {figures.get(key, 0)} (must be 0)")
    for key, least in MINIMUMS.items():
        if figures.get(key, 0) < least:
            reasons.append(f"{FIGURES[key][0]}: {figures.get(key, 0)} (at least {least})")
    if figures.get("inputs_rejected", 0) != figures.get("inputs_tried", 0):
        reasons.append("not every bad input was rejected with a clear error")
    return not reasons, reasons


def render(
    figures: dict[str, int], pytest_rc: int, tests: set[str] | frozenset[str]
) -> tuple[str, bool]:
    """The table and the verdict (from ``judge``)."""
    ok, reasons = judge(figures, pytest_rc, tests)
    lines = [f"{'figure':<52}{'value':>8}  check"]
    for key, (label, must_be_zero) in FIGURES.items():
        value = figures.get(key, 0)
        verdict = ""
        if must_be_zero:
            verdict = "ok" if value == 0 else "FAIL"
        elif key in MINIMUMS:
            verdict = f">= {MINIMUMS[key]} " + ("ok" if value >= MINIMUMS[key] else "FAIL")
        lines.append(f"{label:<52}{value:>8}  {verdict}")
    recorded = len(set(tests) & EXPECTED_TESTS)
    complete = "ok" if recorded == len(EXPECTED_TESTS) else "FAIL"
    label = "expected tests recording figures"
    lines.append(f"{label:<52}{recorded:>8}  of {len(EXPECTED_TESTS)} {complete}")
    lines.append(f"{'pytest exit status':<52}{pytest_rc:>8}  {'ok' if pytest_rc == 0 else 'FAIL'}")
    lines += [f"FAIL: {r}" for r in reasons]
    return "\n".join(lines), ok


def report_json(
    figures: dict[str, int], pytest_rc: int, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    tests = {r["test"] for r in rows}
    ok, reasons = judge(figures, pytest_rc, tests)
    return {
        "verdict": "PASS" if ok else "FAIL",
        "reasons": reasons,
        "pytest_rc": pytest_rc,
        "figures": figures,
        "must_be_zero": [k for k, (_, zero) in FIGURES.items() if zero],
        "minimums": MINIMUMS,
        "expected_tests": sorted(EXPECTED_TESTS),
        "missing_tests": sorted(EXPECTED_TESTS - tests),
        "rows": rows,
    }


def main(argv: list[str]) -> int:
    json_path = Path(tempfile.gettempdir()) / "kubetune-reliability" / "report.json"
    if "--json" in argv:
        i = argv.index("--json")
        json_path = Path(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    with tempfile.TemporaryDirectory(prefix="kubetune-reliability-") as tmp:
        results = Path(tmp) / "results.jsonl"
        env = {**os.environ, "KUBETUNE_RELIABILITY_RESULTS": str(results)}
        cmd = [sys.executable, "-m", "pytest", "-m", "cluster", "tests/reliability", *argv]
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        rows = load(results)
    figures = totals(rows)
    table, ok = render(figures, rc, {r["test"] for r in rows})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report_json(figures, rc, rows), indent=1) + "\n")
    print()
    print(table)
    print(f"(JSON report: {json_path})")
    print(f"RELIABILITY: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
