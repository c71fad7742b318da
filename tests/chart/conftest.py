"""Fixtures shared with the operator end-to-end tests (tests/e2e/conftest.py).

Imported, not copied: the chart's happy-path test uses the same S3 data and credentials
Secret as tests/e2e, so both describe one job the same way.
"""

from __future__ import annotations

from tests.e2e.conftest import s3  # noqa: F401  (pytest fixture, used by name)
