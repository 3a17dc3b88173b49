#!/usr/bin/env bash
# Create .venv and install the project with its test and offline-model extras. Idempotent: skips the install when
# pyproject.toml has not changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.rerank-worker-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  if ! .venv/bin/python -m pip install --quiet -e '.[dev]' >.venv/setup.log 2>&1; then
    cat .venv/setup.log >&2
    echo "setup: pip install failed" >&2
    exit 1
  fi
  echo "$want" >"$stamp"
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))" >&2
