#!/usr/bin/env bash
# Run the real promtool: `bash scripts/promtool.sh check rules deploy/helm/rerank-worker/files/alerts.yaml`,
# `... test rules tests/deploy/promtool/alerts_test.yaml`, any promtool command.
# `bash scripts/promtool.sh promql-names` instead runs tests/deploy/promtool/promql_names (Prometheus's own PromQL
# parser at the same module version): it reads a JSON list of expressions on stdin and prints, for each, the metric
# names its vector selectors name, or the parse error.
# promtool is not packaged here, so the first call builds both from source through the Go module proxy
# (`go install github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION`) into
# ${XDG_CACHE_HOME:-$HOME/.cache}/rerank-worker/promtool-$PROMETHEUS_MODULE_VERSION/; later calls exec the cached
# binaries. Prometheus 3.x publishes its Go module as v0.3MM.P for release 3.MM.P (v0.316.0 is Prometheus 3.16.0).
# The build sets the version ldflags of Prometheus's .promu.yml (`promtool --version` reports the release) and the
# tag remove_all_sd: the cloud service-discovery plugins (AWS, Azure, GCE, Kubernetes, ...) are left out, which
# only `promtool check service-discovery` and `check config` of such scrape configs use; rules, rule unit tests and
# PromQL are the same code as in the release binary.
# Needs Go >= 1.26.7 and GOPROXY reaching proxy.golang.org (or a mirror), for the first build only.
set -euo pipefail
PROMETHEUS_MODULE_VERSION=${PROMETHEUS_MODULE_VERSION:-v0.316.0}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
names_src=$repo/tests/deploy/promtool/promql_names
cache_dir=${XDG_CACHE_HOME:-$HOME/.cache}/rerank-worker/promtool-$PROMETHEUS_MODULE_VERSION
promtool=$cache_dir/promtool
promql_names=$cache_dir/promql-names

# v0.3MM.P -> 3.MM.P
release_of() {
  local minor_patch=${1#v0.3}
  local minor=${minor_patch%%.*}
  echo "3.$((10#$minor)).${minor_patch#*.}"
}
case $PROMETHEUS_MODULE_VERSION in v0.3[0-9][0-9].*) ;; *)
  echo "promtool.sh: PROMETHEUS_MODULE_VERSION=$PROMETHEUS_MODULE_VERSION is not a Prometheus 3.x module version (v0.3MM.P)" >&2
  exit 1
  ;;
esac
release=$(release_of "$PROMETHEUS_MODULE_VERSION")

source_sum() {
  cat "$names_src/go.mod" "$names_src/go.sum" "$names_src/main.go" | sha256sum | cut -d' ' -f1
}

promtool_cached() {
  [ -x "$promtool" ] && "$promtool" --version 2>/dev/null | head -1 | grep -q "^promtool, version $release "
}

# The parser tool is rebuilt when its source changes; its go.mod must pin the same module version as promtool.
names_cached() {
  [ -x "$promql_names" ] && [ -f "$promql_names.sum" ] && [ "$(cat "$promql_names.sum")" = "$(source_sum)" ]
}

build_promtool() {
  local build_dir=$1 ldflags
  ldflags="-s -w -X github.com/prometheus/common/version.Version=$release"
  ldflags="$ldflags -X github.com/prometheus/common/version.Revision=$PROMETHEUS_MODULE_VERSION"
  ldflags="$ldflags -X github.com/prometheus/common/version.Branch=module"
  # CGO off: a static binary, no C toolchain needed. -mod=mod: resolve from the module proxy, never a vendor dir.
  if ! GOBIN=$build_dir CGO_ENABLED=0 GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod" \
    go install -trimpath -tags remove_all_sd -ldflags "$ldflags" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION" >"$build_dir/build.log" 2>&1; then
    cat "$build_dir/build.log" >&2
    echo "promtool.sh: go install github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION failed" >&2
    exit 1
  fi
  mv -f "$build_dir/promtool" "$promtool"
}

build_promql_names() {
  local build_dir=$1 pinned
  # `require github.com/prometheus/prometheus vX` or the same line inside a require block
  pinned=$(awk '{ for (i = 1; i < NF; i++) if ($i == "github.com/prometheus/prometheus") { print $(i + 1); exit } }' \
    "$names_src/go.mod")
  if [ "$pinned" != "$PROMETHEUS_MODULE_VERSION" ]; then
    echo "promtool.sh: $names_src/go.mod pins github.com/prometheus/prometheus $pinned, not $PROMETHEUS_MODULE_VERSION" >&2
    exit 1
  fi
  local sum
  sum=$(source_sum)
  # -mod=readonly: the committed go.sum decides every dependency.
  if ! (cd "$names_src" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly" \
    go build -trimpath -ldflags "-s -w" -o "$build_dir/promql-names" .) >"$build_dir/build-names.log" 2>&1; then
    cat "$build_dir/build-names.log" >&2
    echo "promtool.sh: go build $names_src failed" >&2
    exit 1
  fi
  mv -f "$build_dir/promql-names" "$promql_names"
  echo "$sum" >"$promql_names.sum"
}

if ! promtool_cached || ! names_cached; then
  if ! command -v go >/dev/null 2>&1; then
    echo "promtool.sh: promtool $release is not cached at $cache_dir and Go is not installed to build it" >&2
    exit 1
  fi
  mkdir -p "$cache_dir"
  # One build at a time: concurrent callers (test.sh, pytest) wait for the first, then find the binaries.
  exec 9>"$cache_dir/.lock"
  flock 9
  if ! promtool_cached || ! names_cached; then
    start=$SECONDS
    build_dir=$(mktemp -d "$cache_dir/.build.XXXXXX")
    trap 'rm -rf "$build_dir"' EXIT
    if ! promtool_cached; then
      echo "promtool.sh: building promtool $release ($PROMETHEUS_MODULE_VERSION) from the Go module proxy ($(go env GOPROXY)); once" >&2
      build_promtool "$build_dir"
    fi
    if ! names_cached; then
      echo "promtool.sh: building promql-names against $PROMETHEUS_MODULE_VERSION" >&2
      build_promql_names "$build_dir"
    fi
    rm -rf "$build_dir"
    trap - EXIT
    echo "promtool.sh: built into $cache_dir in $((SECONDS - start)) s" >&2
  fi
  exec 9>&-
fi

if [ "${1-}" = promql-names ]; then
  shift
  exec "$promql_names" "$@"
fi
exec "$promtool" "$@"
