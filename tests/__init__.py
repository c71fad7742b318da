"""kubetune test suite (a package so ``python -m tests.cluster`` works)."""
