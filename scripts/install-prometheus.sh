#!/usr/bin/env bash
# Install Debian's `prometheus` package for its `promtool` (tests/chart/test_prometheus_rules.py
# runs `promtool check rules` and `promtool test rules` on the chart's alerts).
#
# Why Debian's package: apt is one of the few registries reachable here, and bookworm's
# prometheus (2.42) carries promtool at /usr/bin/promtool. The package's service is never
# started: a temporary /usr/sbin/policy-rc.d that exits 101 forbids it during the install.
#
# Usage: bash scripts/install-prometheus.sh     prints the path of promtool on the last line
# Idempotent: a no-op when promtool is already installed. Needs root when it has to install.
set -euo pipefail

say() { echo "[install-prometheus] $*" >&2; }
die() { echo "[install-prometheus] ERROR: $*" >&2; exit 1; }

if command -v promtool >/dev/null 2>&1 && promtool --version >/dev/null 2>&1; then
  say "promtool already installed: $(promtool --version 2>&1 | head -n 1)"
  command -v promtool
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "promtool is missing and installing it needs root (apt-get install prometheus)"
command -v apt-get >/dev/null 2>&1 || die "promtool is missing and there is no apt-get to install it"

export DEBIAN_FRONTEND=noninteractive
# Wait for the dpkg lock (another apt run, e.g. the cluster tests' build.sh) instead of failing.
lock=(-o DPkg::Lock::Timeout=600)

# The package would start prometheus.service: forbid it for the duration of the install.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

say "apt-get install prometheus (for promtool)"
if ! apt-get "${lock[@]}" install -y --no-install-recommends prometheus; then
  say "install failed; apt-get update and retry"
  apt-get "${lock[@]}" update
  apt-get "${lock[@]}" install -y --no-install-recommends prometheus
fi

command -v promtool >/dev/null 2>&1 || die "prometheus installed but promtool is not on PATH"
say "installed: $(promtool --version 2>&1 | head -n 1)"
command -v promtool
