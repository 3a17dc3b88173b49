#!/usr/bin/env bash
# Run kubeconform (Kubernetes manifest validation): `bash scripts/kubeconform.sh -strict -summary FILE...`.
# It is not packaged here, so the first call builds it from source through the Go module proxy
# (`go install github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION`, well under a minute) into
# ${XDG_CACHE_HOME:-$HOME/.cache}/rerank-worker/kubeconform-$KUBECONFORM_VERSION/kubeconform; later calls exec the
# cached binary. Its default schema location is on GitHub: pass local ones instead, from
# `.venv/bin/python scripts/kubeconform_schemas.py` (Kubernetes schemas of kubernetes-validate, CRD schemas of the
# pinned KEDA and prometheus-operator modules).
# Needs Go >= 1.26 and GOPROXY reaching proxy.golang.org (or a mirror), for the first build only.
set -euo pipefail
KUBECONFORM_VERSION=${KUBECONFORM_VERSION:-v0.8.0}
cache_dir=${XDG_CACHE_HOME:-$HOME/.cache}/rerank-worker/kubeconform-$KUBECONFORM_VERSION
kubeconform=$cache_dir/kubeconform

cached() {
  [ -x "$kubeconform" ] && [ "$("$kubeconform" -v 2>/dev/null)" = "$KUBECONFORM_VERSION" ]
}

if ! cached; then
  if ! command -v go >/dev/null 2>&1; then
    echo "kubeconform.sh: kubeconform $KUBECONFORM_VERSION is not cached at $kubeconform and Go is not installed to build it" >&2
    exit 1
  fi
  mkdir -p "$cache_dir"
  # One build at a time: concurrent callers wait for the first, then find the binary.
  exec 9>"$cache_dir/.lock"
  flock 9
  if ! cached; then
    echo "kubeconform.sh: building kubeconform $KUBECONFORM_VERSION from the Go module proxy ($(go env GOPROXY)); once" >&2
    start=$SECONDS
    build_dir=$(mktemp -d "$cache_dir/.build.XXXXXX")
    trap 'rm -rf "$build_dir"' EXIT
    # The version its release build stamps (goreleaser: -X main.version), so `kubeconform -v` names it.
    # CGO off: a static binary, no C toolchain needed. -mod=mod: resolve from the module proxy, never a vendor dir.
    if ! GOBIN=$build_dir CGO_ENABLED=0 GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod" \
      go install -trimpath -ldflags "-s -w -X main.version=$KUBECONFORM_VERSION" \
      "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" >"$build_dir/build.log" 2>&1; then
      cat "$build_dir/build.log" >&2
      echo "kubeconform.sh: go install github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION failed" >&2
      exit 1
    fi
    mv -f "$build_dir/kubeconform" "$kubeconform"
    rm -rf "$build_dir"
    trap - EXIT
    echo "kubeconform.sh: built $kubeconform ($KUBECONFORM_VERSION) in $((SECONDS - start)) s" >&2
  fi
  exec 9>&-
fi

exec "$kubeconform" "$@"
