#!/usr/bin/env bash
# Set up, lint, type-check and run every test (unit and integration against a real Kafka broker).
# Integration tests use KAFKA_BOOTSTRAP_SERVERS when set, else testcontainers when a Docker engine answers,
# else they start a local Apache Kafka broker themselves (scripts/kafka/local-kafka.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/kafka/local-kafka.sh fetch   # broker jars from Maven Central, cached
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
bash scripts/helm.sh lint --strict deploy/helm/rerank-worker   # builds Helm from the Go module proxy once (cached)
bash scripts/helm.sh lint --strict deploy/helm/rerank-worker -f deploy/helm/ci-values-all-on.yaml
# Built from the Go module proxy once (cached) before pytest, so no test spends its time on a cold build.
bash scripts/promtool.sh --version >/dev/null
bash scripts/kubeconform.sh -v >/dev/null
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
