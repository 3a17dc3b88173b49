#!/usr/bin/env bash
# Regenerate requirements/image.txt, the container image's dependency lock (docs/DEPENDENCIES.md):
#   bash scripts/lock.sh                         follow pyproject.toml, keeping every pin that still fits
#   bash scripts/lock.sh --upgrade               the newest versions pyproject.toml allows, all of them
#   bash scripts/lock.sh --upgrade-package NAME  the newest NAME (NAME==X.Y.Z for a given version), the rest kept
#   bash scripts/lock.sh --check                 exit 1 when pyproject.toml no longer resolves to the locked pins
# The lock holds pyproject's runtime dependencies and its build-system requirements (the image builds the worker
# without build isolation, so nothing unlocked is downloaded), resolved by uv for the image's interpreter:
# CPython 3.12 (Ubuntu 24.04's python3) on x86_64 glibc 2.39, wheels only, with every file's sha256.
# torch comes from PyPI: its Linux x86_64 wheel is the CUDA 13.2 build, its CUDA libraries the nvidia-* wheels.
# uv $UV_VERSION is installed once from PyPI into ${XDG_CACHE_HOME:-$HOME/.cache}/rerank-worker/uv-$UV_VERSION/.
# Needs python3 >= 3.11 and PyPI (or the index UV_INDEX_URL names).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
UV_VERSION=${UV_VERSION:-0.13.10}
LOCK=requirements/image.txt
cache_dir=${XDG_CACHE_HOME:-$HOME/.cache}/rerank-worker/uv-$UV_VERSION
uv=$cache_dir/bin/uv

cached() {
  [ -x "$uv" ] && [ "$("$uv" --version 2>/dev/null | cut -d' ' -f2)" = "$UV_VERSION" ]
}

if ! cached; then
  mkdir -p "$cache_dir"
  # One install at a time: concurrent callers (pytest workers, a developer's shell) wait for the first.
  exec 9>"$cache_dir/.lock"
  flock 9
  if ! cached; then
    echo "lock.sh: installing uv $UV_VERSION from PyPI into $cache_dir; once" >&2
    build_dir=$(mktemp -d "$cache_dir/.install.XXXXXX")
    trap 'rm -rf "$build_dir"' EXIT
    if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary :all: \
      --target "$build_dir" "uv==$UV_VERSION" >"$build_dir/install.log" 2>&1; then
      cat "$build_dir/install.log" >&2
      echo "lock.sh: pip install uv==$UV_VERSION failed" >&2
      exit 1
    fi
    rm -rf "${cache_dir:?}/bin"
    mv "$build_dir/bin" "$cache_dir/bin"
    rm -rf "$build_dir"
    trap - EXIT
  fi
  exec 9>&-
fi

check=false
if [ "${1:-}" = --check ]; then
  if [ $# -ne 1 ]; then
    echo "lock.sh: --check takes no other arguments" >&2
    exit 2
  fi
  check=true
  shift
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# uv keeps the pins of its output file where they still fit: start from the committed lock.
if [ -f "$LOCK" ]; then
  cp "$LOCK" "$work/image.txt"
fi
"$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
  >"$work/build-system.txt"
# --no-config: a developer's uv.toml does not change the lock. The header names this script, not the temporary paths.
"$uv" pip compile --quiet --no-config \
  --python-version 3.12 --python-platform x86_64-manylinux_2_39 --only-binary :all: --generate-hashes \
  --custom-compile-command "bash scripts/lock.sh" \
  --output-file "$work/image.txt" "$@" pyproject.toml - <"$work/build-system.txt"

if $check; then
  # Pins, not hashes: a wheel uploaded later for a pinned version adds a hash without making the lock stale.
  pins() { grep -E '^[A-Za-z0-9]' "$1" | sed 's/ *\\$//' || true; }
  if [ ! -f "$LOCK" ] || ! diff -u --label "$LOCK" --label "resolved from pyproject.toml" \
    <(pins "$LOCK") <(pins "$work/image.txt") >&2; then
    echo "lock.sh: $LOCK is out of date with pyproject.toml: run bash scripts/lock.sh and commit the result" >&2
    exit 1
  fi
  exit 0
fi
mkdir -p "$(dirname "$LOCK")"
cp "$work/image.txt" "$LOCK.tmp"
mv -f "$LOCK.tmp" "$LOCK"  # a failed or interrupted run leaves the lock as it was
echo "lock.sh: wrote $LOCK ($(grep -cE '^[A-Za-z0-9]' "$LOCK") packages)" >&2
