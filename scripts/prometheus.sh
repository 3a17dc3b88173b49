#!/usr/bin/env bash
# Run a real Prometheus server: `bash scripts/prometheus.sh --config.file=... --storage.tsdb.path=...`. Only the
# dashboard snapshot (`python -m tests.dashboard_snapshot`, README "Operate") uses it; CI does not.
# Built once from the Go module proxy, like scripts/promtool.sh and at the same module version
# (`go install github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE_VERSION`, several minutes on 2
# cores), into ${XDG_CACHE_HOME:-$HOME/.cache}/rerank-worker/prometheus-$PROMETHEUS_MODULE_VERSION/; later calls exec
# the cached binary. Tag remove_all_sd leaves out the cloud service discoveries (static targets are all it needs);
# without the builtinassets tag the web UI's files are not embedded: the HTTP API, which the snapshot queries, is.
set -euo pipefail
PROMETHEUS_MODULE_VERSION=${PROMETHEUS_MODULE_VERSION:-v0.316.0}
cache_dir=${XDG_CACHE_HOME:-$HOME/.cache}/rerank-worker/prometheus-$PROMETHEUS_MODULE_VERSION
prometheus=$cache_dir/prometheus

if [ ! -x "$prometheus" ]; then
  if ! command -v go >/dev/null 2>&1; then
    echo "prometheus.sh: Prometheus is not cached at $prometheus and Go is not installed to build it" >&2
    exit 1
  fi
  mkdir -p "$cache_dir"
  exec 9>"$cache_dir/.lock"
  flock 9
  if [ ! -x "$prometheus" ]; then
    echo "prometheus.sh: building Prometheus ($PROMETHEUS_MODULE_VERSION) from the Go module proxy; once" >&2
    start=$SECONDS
    build_dir=$(mktemp -d "$cache_dir/.build.XXXXXX")
    trap 'rm -rf "$build_dir"' EXIT
    if ! GOBIN=$build_dir CGO_ENABLED=0 GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod" \
      go install -trimpath -tags remove_all_sd -ldflags "-s -w" \
      "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE_VERSION" >"$build_dir/build.log" 2>&1; then
      cat "$build_dir/build.log" >&2
      echo "prometheus.sh: go install github.com/prometheus/prometheus/cmd/prometheus failed" >&2
      exit 1
    fi
    mv -f "$build_dir/prometheus" "$prometheus"
    rm -rf "$build_dir"
    trap - EXIT
    echo "prometheus.sh: built $prometheus in $((SECONDS - start)) s" >&2
  fi
  exec 9>&-
fi
exec "$prometheus" "$@"
