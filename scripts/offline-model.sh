#!/usr/bin/env bash
# Print a model to use: $RERANK_MODEL if set; the real Qwen/Qwen3-Reranker-0.6B if the model hub answers;
# otherwise a small random-weight Qwen3 reranker with the real tokenizer, built once into .cache/ (scores meaningless).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${RERANK_MODEL:-}" ]; then echo "$RERANK_MODEL"; exit 0; fi
if timeout 15 .venv/bin/python -c "from huggingface_hub import model_info; model_info('Qwen/Qwen3-Reranker-0.6B')" >/dev/null 2>&1; then
  echo "Qwen/Qwen3-Reranker-0.6B"; exit 0
fi
dir=.cache/tiny-qwen3-reranker
if [ ! -f "$dir/config.json" ]; then
  .venv/bin/python -m worker.testing.offline_model "$dir" --size tiny >/dev/null 2>&1
fi
echo "NOTICE: the model hub is not reachable; using a small RANDOM-WEIGHT Qwen3 reranker ($dir) with the real" \
  "Qwen3 tokenizer. Its scores are meaningless; the pipeline around them is the real one." >&2
echo "$dir"
