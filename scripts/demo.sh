#!/usr/bin/env bash
# The main job, end to end on one machine: set up, start a local Apache Kafka broker, start the worker, send the
# sample job (examples/job.json) and print its ranked result. Stops worker and broker on exit.
# Model: $RERANK_MODEL, else the real Qwen/Qwen3-Reranker-0.6B when the hub answers, else a small offline model
# with random weights (a notice says so: its scores are meaningless).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p .cache
RERANK_MODEL="$(bash scripts/offline-model.sh)"
export RERANK_MODEL
export RERANK_HTTP_PORT="${RERANK_HTTP_PORT:-8080}"
started_broker=0
if [ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
  export "$(bash scripts/kafka/local-kafka.sh start)"
  started_broker=1
fi
echo "demo: broker $KAFKA_BOOTSTRAP_SERVERS, model $RERANK_MODEL, worker log .cache/demo-worker.log" >&2
.venv/bin/rerank-worker run >.cache/demo-worker.log 2>&1 &
worker=$!
cleanup() {
  kill -TERM "$worker" 2>/dev/null && wait "$worker" 2>/dev/null || true
  if [ "$started_broker" = 1 ]; then bash scripts/kafka/local-kafka.sh stop; fi
}
trap cleanup EXIT
.venv/bin/rerank-worker enqueue --file examples/job.json --wait --timeout 180
