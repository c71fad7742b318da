#!/usr/bin/env bash
# The project's test command: install, lint, type-check, build the control plane, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== ruff"
ruff check operator trainer tests benchmarks examples scripts
echo "== mypy --strict"
mypy --strict operator/kubetune_operator trainer/kubetune_trainer
echo "== layer contracts (import-linter; see docs/architecture.md)"
lint-imports --no-cache
echo "== CRD in sync with the models"
python -m kubetune_operator.api.crdgen --check

if [ -f tests/cluster/build.sh ]; then
  echo "== control-plane binaries (built once, then cached)"
  bash tests/cluster/build.sh
fi

if [ -f scripts/fetch-helm.sh ]; then
  echo "== helm (cached)"
  bash scripts/fetch-helm.sh
fi

echo "== promtool (Debian's prometheus package, for the alert rule tests)"
bash scripts/install-prometheus.sh

echo "== pytest"
# Default: everything except tests marked slow (none are today: the e2e, chart, reliability and
# model-conversion tests all run in CI); pass -m slow to run only those.
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(-m "not slow")
set +e
python -m pytest --durations=25 "${args[@]}"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
