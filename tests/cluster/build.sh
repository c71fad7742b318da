#!/usr/bin/env bash
# Build (once) and cache the Kubernetes control-plane binaries the cluster tests use.
#
# Why: only Debian apt is reachable, so we build kube-apiserver, kube-controller-manager,
# kube-scheduler and kubectl from Debian's kubernetes 1.20.2 source (with vendor/), patched
# with reflect2 1.0.2 (1.0.1 panics under Go >= 1.18 on every custom-resource create).
# The cache lives outside the work tree, keyed by version; a second run is a fast no-op.
#
# Usage: bash tests/cluster/build.sh        (env: KUBETUNE_CACHE, default ~/.cache/kubetune)
set -euo pipefail

K8S_VERSION=1.20.2
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
DEST="$CACHE/k8s-v$K8S_VERSION"
BIN="$DEST/bin"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
# Bump when the patches below change: cached binaries with another stamp are rebuilt.
PATCH_STAMP="reflect2-1.0.2 loopback-endpoints-1"

STEP="start"
log() { echo "[build.sh] $*" >&2; }
fail() { log "FAILED at step: $STEP (exit $1). See output above."; exit "$1"; }
trap 'fail $?' ERR
step() { STEP="$1"; log "== $1"; }

have_all() {
  for b in "${BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
  [[ "$(cat "$BIN/.patches" 2>/dev/null)" == "$PATCH_STAMP" ]]
}

step "check apt prerequisites (golang-go rsync etcd-server openssl)"
need=()
for p in golang-go rsync etcd-server openssl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
  step "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The etcd-server package may try to start its service; forbid that (we run etcd ourselves).
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1
  fi
  # Wait for the dpkg lock (another apt run, e.g. unattended upgrades) instead of failing.
  lock=(-o DPkg::Lock::Timeout=600)
  apt-get "${lock[@]}" install -y --no-install-recommends "${need[@]}" || {
    apt-get "${lock[@]}" update && apt-get "${lock[@]}" install -y --no-install-recommends "${need[@]}"; }
  ((created_policy)) && rm -f "$policy"
  # If a packaged etcd got started anyway, stop it: it would hold 2379/2380.
  if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
fi

if have_all; then
  log "cached binaries present in $BIN; nothing to build"
  ls -l "$BIN" >&2
  exit 0
fi

WORK="$DEST/src"
mkdir -p "$WORK" "$BIN"

step "fetch Debian kubernetes $K8S_VERSION source (private deb-src list)"
APT_DIR="$WORK/apt"
mkdir -p "$APT_DIR/lists/partial"
echo "deb-src http://deb.debian.org/debian bookworm main" >"$APT_DIR/sources.list"
APT_OPTS=(-o "Dir::Etc::SourceList=$APT_DIR/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$APT_DIR/lists")
cd "$WORK"
if ! ls kubernetes_*.dsc >/dev/null 2>&1; then
  apt-get "${APT_OPTS[@]}" update
  apt-get "${APT_OPTS[@]}" source --download-only kubernetes
fi

step "unpack source"
SRC="$WORK/kubernetes-$K8S_VERSION"
if [[ ! -d $SRC ]]; then
  dsc=$(ls kubernetes_*.dsc | head -n1)
  dpkg-source --no-check -x "$dsc" "$SRC.tmp"
  mv "$SRC.tmp" "$SRC"
fi
grep -q "v$K8S_VERSION\|$K8S_VERSION" "$SRC/debian/changelog" || { log "unexpected source version"; false; }

step "replace vendored reflect2 1.0.1 with Debian's 1.0.2 (Go >= 1.18 fix)"
R2="$WORK/reflect2"
if [[ ! -d $R2/usr ]]; then
  mkdir -p "$R2"
  (cd "$R2" && apt-get download golang-github-modern-go-reflect2-dev && dpkg -x ./*.deb .)
fi
R2SRC="$R2/usr/share/gocode/src/github.com/modern-go/reflect2"
[[ -f $R2SRC/reflect2.go ]] || { log "reflect2 source not found in $R2SRC"; false; }
rm -rf "$SRC/vendor/github.com/modern-go/reflect2"
mkdir -p "$SRC/vendor/github.com/modern-go/reflect2"
cp -a "$R2SRC/." "$SRC/vendor/github.com/modern-go/reflect2/"
find "$SRC/vendor/github.com/modern-go/reflect2" -name '*_test.go' -delete

step "patch: allow loopback IPs in Endpoints (test pods get 127.x addresses)"
VAL="$SRC/pkg/apis/core/validation/validation.go"
if ! grep -q "kubetune: loopback allowed" "$VAL"; then
  sed -i 's|^\tif ip.IsLoopback() {$|\tif false \&\& ip.IsLoopback() { // kubetune: loopback allowed|' "$VAL"
fi
grep -q "kubetune: loopback allowed" "$VAL" || { log "loopback patch did not apply to $VAL"; false; }

step "go build ${BINARIES[*]} (takes ~10 min cold on 2 cores)"
cd "$SRC"
mkdir -p .go/src/k8s.io
[[ -L .go/src/k8s.io/kubernetes ]] || ln -s ../../.. .go/src/k8s.io/kubernetes
export GOPATH="$SRC/.go" CGO_ENABLED=0 GO111MODULE=off GOFLAGS=-mod=vendor
export KUBE_GIT_VERSION="v$K8S_VERSION" KUBE_GIT_TREE_STATE=clean
log "$(go version)"
t0=$(date +%s)
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubectl"
log "go build took $(( $(date +%s) - t0 ))s"

step "install binaries into $BIN"
for b in "${BINARIES[@]}"; do
  f=$(find "$SRC/_output" -type f -name "$b" -perm -u+x | head -n1)
  [[ -n $f ]] || { log "built binary $b not found under _output"; false; }
  install -m 0755 "$f" "$BIN/$b.tmp" && mv "$BIN/$b.tmp" "$BIN/$b"
done
"$BIN/kubectl" version --client --short >&2 || "$BIN/kubectl" version --client >&2
echo "$PATCH_STAMP" >"$BIN/.patches"

step "done"
log "binaries cached in $BIN (source tree kept in $WORK; delete it to save space)"
