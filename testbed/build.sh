#!/usr/bin/env bash
# Build (or reuse) the test bed's binaries from pinned, published Go modules.
#
#   bash testbed/build.sh          # prints the bin directory on the last line
#   bash testbed/build.sh --batch  # the Kueue and JobSet controller managers (issue 15)
#
# Binaries land in ${LMMR1_CACHE:-~/.cache/lmmr1}/testbed/<key>/bin, where <key> is derived
# from testbed/versions.env and the tool module's go.sum; a second run with the same key
# builds nothing. Each binary is built into a temp name and renamed, so an interrupted
# build never leaves a half-written binary that a later run would trust.
set -euo pipefail

# Only shell builtins until the prerequisites are checked, so a bare PATH gets the clear line.
here="$(cd "${BASH_SOURCE[0]%/*}" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "testbed: '$1' not found: $2" >&2; exit 127; }
}
need go "install Go >= 1.26 (https://go.dev/doc/install)"
for tool in sha256sum cut cat mktemp; do need "$tool" "install coreutils"; done
need flock "install util-linux"

export GOFLAGS="${GOFLAGS:--trimpath}"
export CGO_ENABLED=0
log() { echo "testbed: $*" >&2; }

build_into() { # name, then a command that writes the binary to $out
  local name="$1"; shift
  if [[ -x "$bin/$name" ]]; then log "$name: cached"; return; fi
  local start=$SECONDS
  out="$bin/.$name.tmp.$$"
  log "$name: building ..."
  "$@"
  mv -f "$out" "$bin/$name"
  log "$name: built in $((SECONDS - start))s"
}

go_install() { # module@version: built in a throwaway GOBIN, then moved into place
  local gobin; gobin="$(mktemp -d)"
  GOBIN="$gobin" go install -ldflags "-s -w $2" "$1"
  mv -f "$gobin"/* "$out"; rm -rf "$gobin"
}

locked_bin_dir() { # key: makes <cache>/testbed/<key>/bin, takes its build lock, sets $bin
  bin="${LMMR1_CACHE:-$HOME/.cache/lmmr1}/testbed/$1/bin"
  mkdir -p "$bin"
  # One build at a time: pytest starts one in the background while the unit tests run, and
  # the test bed's own call then waits here and finds every binary built.
  exec 9>"$bin/../.build.lock"
  flock 9
}

if [[ "${1:-}" == "--batch" ]]; then
  # shellcheck source=batch-versions.env
  source "$here/batch-versions.env"
  locked_bin_dir "kueue-${KUEUE_VERSION}_jobset-${JOBSET_VERSION}_$(cat "$here/batch-versions.env" "$here/gomod/jobset/go.mod" "$here/gomod/jobset/go.sum" | sha256sum | cut -c1-12)"
  build_into kueue go_install "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION" \
    "-X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
  build_into jobset bash -c "cd '$here/gomod/jobset' && go build -ldflags '-s -w -X sigs.k8s.io/jobset/pkg/version.GitVersion=$JOBSET_VERSION' -o '$bin/.jobset.tmp.$$' sigs.k8s.io/jobset"
  # Their CRDs and webhook manifests ship in the module sources; the test bed installs
  # them from here (and so does not need the Go module cache at run time).
  manifests="$bin/../manifests"
  if [[ ! -d "$manifests" ]]; then
    modcache="$(go env GOMODCACHE)"
    kueue_src="$modcache/sigs.k8s.io/kueue@$KUEUE_VERSION"
    jobset_src="$modcache/sigs.k8s.io/jobset@$JOBSET_VERSION"
    [[ -d "$kueue_src" ]] || (cd "$(mktemp -d)" && go mod download "sigs.k8s.io/kueue@$KUEUE_VERSION")
    [[ -d "$jobset_src" ]] || (cd "$here/gomod/jobset" && go mod download sigs.k8s.io/jobset)
    rm -rf "$manifests.tmp"
    mkdir -p "$manifests.tmp/kueue-crds" "$manifests.tmp/jobset-crds"
    cp "$kueue_src"/config/components/crd/bases/*.yaml "$manifests.tmp/kueue-crds/"
    cp "$jobset_src"/config/components/crd/bases/*.yaml "$manifests.tmp/jobset-crds/"
    cp "$kueue_src"/config/components/webhook/manifests.yaml "$manifests.tmp/kueue-webhooks.yaml"
    cp "$jobset_src"/config/components/webhook/manifests.yaml "$manifests.tmp/jobset-webhooks.yaml"
    chmod -R u+w "$manifests.tmp"
    mv "$manifests.tmp" "$manifests"
  fi
  log "batch controllers ready in $bin"
  echo "$bin"
  exit 0
fi

key="k8s-${KUBERNETES_VERSION}_helm-${HELM_VERSION}_kwok-${KWOK_VERSION}_vgw-${VERSITYGW_VERSION}_$(cat "$here/versions.env" "$here/gomod/k8s/go.mod" "$here/gomod/k8s/go.sum" | sha256sum | cut -c1-12)"
locked_bin_dir "$key"

k8s_ldflags() {
  local v="${KUBERNETES_VERSION#v}" major minor
  major="${v%%.*}"; minor="${v#*.}"; minor="${minor%%.*}"
  local flags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}

k8s_build() { (cd "$here/gomod/k8s" && go build -ldflags "$(k8s_ldflags)" -o "$out" "$1"); }
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build_into "$cmd" k8s_build "k8s.io/kubernetes/cmd/$cmd"
done
build_into etcd bash -c "cd '$here/gomod/k8s' && go build -ldflags '-s -w' -o '$bin/.etcd.tmp.$$' go.etcd.io/etcd/server/v3"

build_into helm go_install "helm.sh/helm/${HELM_VERSION%%.*}/cmd/helm@$HELM_VERSION" \
  "-X helm.sh/helm/${HELM_VERSION%%.*}/internal/version.version=$HELM_VERSION"
build_into kwok go_install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" \
  "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
build_into versitygw go_install "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION" ""

# kwok's stock stages ship in its module source; copy the ones the test bed uses.
if [[ ! -d "$bin/../kwok-stages" ]]; then
  kwok_src="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION"
  [[ -d "$kwok_src" ]] || (cd "$(mktemp -d)" && go mod download "sigs.k8s.io/kwok@$KWOK_VERSION")
  mkdir -p "$bin/../kwok-stages.tmp"
  cp "$kwok_src"/kustomize/stage/node/fast/node-initialize.yaml \
     "$kwok_src"/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
     "$bin/../kwok-stages.tmp/"
  chmod -R u+w "$bin/../kwok-stages.tmp"
  mv "$bin/../kwok-stages.tmp" "$bin/../kwok-stages"
fi
log "all binaries ready in $bin"
echo "$bin"
