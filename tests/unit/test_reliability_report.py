"""The reliability report's verdict (tests/reliability/report.py), without running the suite."""

from __future__ import annotations

from typing import Any

import pytest

from tests.reliability.record import FIGURES
from tests.reliability.report import EXPECTED_TESTS, MINIMUMS, judge, render, report_json


def passing() -> dict[str, int]:
    figures = dict.fromkeys(FIGURES, 0)
    figures.update(
        faults_injected=7,
        secret_places_scanned=500,
        server_requests=800,
        inputs_tried=250,
        inputs_rejected=250,
        valid_requests_answered=20,
    )
    return figures


def test_a_full_clean_run_passes() -> None:
    ok, reasons = judge(passing(), 0, EXPECTED_TESTS)
    assert ok and reasons == []
    table, ok = render(passing(), 0, EXPECTED_TESTS)
    assert ok and "FAIL" not in table


def test_extra_tests_do_not_hurt() -> None:
    assert judge(passing(), 0, EXPECTED_TESTS | {"tests/reliability/x.py::test_new"})[0]


def test_a_missing_expected_test_fails() -> None:
    gone = sorted(EXPECTED_TESTS)[0]
    ok, reasons = judge(passing(), 0, EXPECTED_TESTS - {gone})
    assert not ok and any(gone in r for r in reasons)


def test_no_tests_at_all_fails() -> None:
    assert not judge(passing(), 0, set())[0]


@pytest.mark.parametrize("key", sorted(MINIMUMS))
def test_too_little_work_fails(key: str) -> None:
    figures = passing()
    figures[key] = MINIMUMS[key] - 1
    if key == "inputs_tried":
        figures["inputs_rejected"] = figures[key]
    ok, reasons = judge(figures, 0, EXPECTED_TESTS)
    assert not ok and any(FIGURES[key][0] in r for r in reasons), reasons


def test_zero_faults_fails() -> None:
    figures = passing()
    figures["faults_injected"] = 0
    assert not judge(figures, 0, EXPECTED_TESTS)[0]


def test_too_few_fuzz_requests_fails() -> None:
    figures = passing()
    figures["server_requests"] = 10
    assert not judge(figures, 0, EXPECTED_TESTS)[0]


@pytest.mark.parametrize("key", [k for k, (_, zero) in FIGURES.items() if zero])
def test_a_non_zero_must_be_zero_figure_fails(key: str) -> None:
    figures = passing()
    figures[key] = 1
    ok, reasons = judge(figures, 0, EXPECTED_TESTS)
    assert not ok and any(FIGURES[key][0] in r for r in reasons)
    table, ok = render(figures, 0, EXPECTED_TESTS)
    assert not ok and "FAIL" in table


@pytest.mark.parametrize("rc", [1, 2, 5, -9])
def test_a_failed_pytest_fails(rc: int) -> None:
    ok, reasons = judge(passing(), rc, EXPECTED_TESTS)
    assert not ok and any("pytest" in r for r in reasons)


def test_a_bad_input_not_rejected_fails() -> None:
    figures = passing()
    figures["inputs_rejected"] -= 1
    assert not judge(figures, 0, EXPECTED_TESTS)[0]


def test_json_report_carries_the_verdict() -> None:
    rows: list[dict[str, Any]] = [{"test": t} for t in sorted(EXPECTED_TESTS)]
    out = report_json(passing(), 0, rows)
    assert out["verdict"] == "PASS" and out["missing_tests"] == []
    out = report_json(passing(), 0, rows[1:])
    assert out["verdict"] == "FAIL" and out["missing_tests"] == [rows[0]["test"]]
