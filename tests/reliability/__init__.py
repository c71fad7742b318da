"""Reliability and security suite (issue #8): faults, bad input, secrets, RBAC, pod security."""
