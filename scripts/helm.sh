#!/usr/bin/env bash
# Run the real Helm CLI: `bash scripts/helm.sh lint deploy/helm/rerank-worker`, `... template ...`, any helm command.
# Helm is not packaged here, so the first call builds it from source through the Go module proxy
# (`go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION`, about 1.5 minutes on 2 cores with empty Go caches) into
# ${XDG_CACHE_HOME:-$HOME/.cache}/rerank-worker/helm-$HELM_VERSION/helm; later calls exec the cached binary.
# The build sets the same version ldflags as Helm's release Makefile: `helm version` reports $HELM_VERSION, and the
# default Kubernetes version of `helm template`/`lint` follows the bundled client-go (not the fallback v1.20).
# Needs Go >= 1.24 and GOPROXY reaching proxy.golang.org (or a mirror), for the first build only.
set -euo pipefail
HELM_VERSION=${HELM_VERSION:-v3.22.0}
cache_dir=${XDG_CACHE_HOME:-$HOME/.cache}/rerank-worker/helm-$HELM_VERSION
helm=$cache_dir/helm

cached() {
  [ -x "$helm" ] && [ "$("$helm" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]
}

if ! cached; then
  if ! command -v go >/dev/null 2>&1; then
    echo "helm.sh: Helm $HELM_VERSION is not cached at $helm and Go is not installed to build it" >&2
    exit 1
  fi
  mkdir -p "$cache_dir"
  # One build at a time: concurrent callers (test.sh, pytest) wait for the first, then find the binary.
  exec 9>"$cache_dir/.lock"
  flock 9
  if ! cached; then
    echo "helm.sh: building Helm $HELM_VERSION from the Go module proxy ($(go env GOPROXY)); once" >&2
    start=$SECONDS
    build_dir=$(mktemp -d "$cache_dir/.build.XXXXXX")
    trap 'rm -rf "$build_dir"' EXIT
    # Kubernetes version for Capabilities and deprecation lint: client-go v0.N.x is Kubernetes 1.N (Helm's Makefile).
    if ! go_mod=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" 2>"$build_dir/download.log" |
      sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p'); then
      cat "$build_dir/download.log" >&2
      echo "helm.sh: go mod download helm.sh/helm/v3@$HELM_VERSION failed" >&2
      exit 1
    fi
    k8s_minor=$(awk '$1 == "k8s.io/client-go" { split($2, v, "."); print v[2]; exit }' "$go_mod")
    case $k8s_minor in '' | *[!0-9]*)
      echo "helm.sh: cannot read the client-go version from $go_mod" >&2
      exit 1
      ;;
    esac
    ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.metadata="
    for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
      ldflags="$ldflags -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
    done
    # CGO off: a static binary, no C toolchain needed. -mod=mod: resolve from the module proxy, never a vendor dir.
    if ! GOBIN=$build_dir CGO_ENABLED=0 GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod" \
      go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >"$build_dir/build.log" 2>&1; then
      cat "$build_dir/build.log" >&2
      echo "helm.sh: go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION failed" >&2
      exit 1
    fi
    mv -f "$build_dir/helm" "$helm"
    rm -rf "$build_dir"
    trap - EXIT
    echo "helm.sh: built $helm ($HELM_VERSION, Kubernetes 1.$k8s_minor) in $((SECONDS - start)) s" >&2
  fi
  exec 9>&-
fi

exec "$helm" "$@"
