"""Integration tests that run against the real test control plane (``cluster`` marker)."""
