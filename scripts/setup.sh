#!/usr/bin/env bash
# Create .venv and install the project with its test and offline-model extras. Idempotent: skips the install when
# pyproject.toml has not changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version 2>&1)" >&2
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.rerank-worker-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing torch, transformers, kafka-python and the test tools into .venv" \
    "(several minutes on a fresh machine; log: .venv/setup.log)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip >.venv/setup.log 2>&1
  .venv/bin/python -m pip install --progress-bar off -e '.[dev]' >>.venv/setup.log 2>&1 &
  pip_pid=$!
  while kill -0 "$pip_pid" 2>/dev/null; do  # a line every 20 s: what pip is on
    sleep 20
    if kill -0 "$pip_pid" 2>/dev/null; then
      step=$(grep -Eo '^(Collecting|Downloading|Installing collected packages|Building)[^(]{0,60}' .venv/setup.log |
        tail -1 || true)
      echo "setup: ${SECONDS} s: ${step:-starting}" >&2
    fi
  done
  if ! wait "$pip_pid"; then
    tail -40 .venv/setup.log >&2
    echo "setup: pip install failed (full log: .venv/setup.log)" >&2
    exit 1
  fi
  echo "$want" >"$stamp"
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))" >&2
