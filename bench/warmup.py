"""Warm-up, recompiles and where the time goes, for the engine as configured.

Loads the engine in a fresh process, times `warm_up()`, the first real 400-document job, its steady state (end to
end, and the GPU side alone), then scores a stream of jobs of random sizes and counts the graphs compiled after
warm-up (the goal is none). Optionally prints a kernel profile of one pack and compares the scores with the
model's own decoder (`forward="transformers"`) on the same job.
GPU machine: python -m bench.warmup --model-dir /tmp/full [--quantization fp8] [--profile] [--compare]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.compare_per_pair import log_odds
from bench.workloads import make_job
from worker.engine.load import load_engine
from worker.testing.offline_model import build_random_reranker


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def triton_compiles() -> Iterator[list[str] | None]:
    """Inside the block, the name of every Triton kernel compiled (a new specialization of an integer argument, or
    an autotuner keyed on a new value, shows here; Inductor's kernels are counted as graphs). Triton's `knobs`
    exist from 3.4: with an older Triton it yields None (not counted), never an empty list that would read as none."""
    try:
        from triton import knobs
    except ImportError:
        yield None
        return
    compiled: list[str] = []

    def hook(**kwargs: Any) -> None:
        compiled.append(str(getattr(kwargs.get("fn"), "name", "?")))

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield compiled
    finally:
        knobs.runtime.jit_post_compile_hook = None


def median_ms(fn: object, reps: int = 10) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen3-reranker-full-random"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", choices=["none", "fp8"], default="none")
    ap.add_argument(
        "--size", choices=["0.6b", "4b", "8b", "full"], default="full", help="the shape built when --model-dir is empty"
    )
    ap.add_argument("--stream", type=int, default=30, help="jobs of random sizes scored after warm-up")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--cuda-graphs", choices=["on", "off"], default="on")
    ap.add_argument("--compare", action="store_true")
    a = ap.parse_args()
    if not (a.model_dir / "config.json").exists():
        build_random_reranker(a.model_dir, size=a.size, seed=0)
    started = time.perf_counter()
    engine = load_engine(
        str(a.model_dir),
        device="cuda",
        dtype=a.dtype,
        attention=a.attention,
        cuda_graphs=a.cuda_graphs == "on",
        quantization=a.quantization,
    )
    load_s = time.perf_counter() - started
    warm_s = engine.warm_up()
    graphs_warm = compiled_graphs()
    with triton_compiles() as triton_after_warm_up:  # the first job, the timings and the stream
        rng = np.random.default_rng(1)
        request = make_job(rng, 400, 55, 160)
        t0 = time.perf_counter()
        engine.score([request])
        first_job_s = time.perf_counter() - t0
        row: dict[str, object] = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "info": engine.info.__dict__,
            "document_encoder": engine.tokenizer.document_encoder,
            "load_s": round(load_s, 1),
            "warm_up_s": round(warm_s, 1),
            "first_job_after_warm_up_s": round(first_job_s, 3),
            "start_to_first_result_s": round(time.perf_counter() - started, 1),
            "graphs_after_warm_up": graphs_warm,
        }
        prepared = engine.prepare(request)
        row["job_tokens"] = len(prepared.head_ids) + sum(
            len(d) + len(engine.tokenizer.suffix_ids) for d in prepared.unique_docs
        )
        row["end_to_end_ms"] = median_ms(lambda: engine.score([request]))
        row["gpu_side_ms"] = median_ms(lambda: engine.score_prepared([prepared]))
        row["prepare_ms"] = median_ms(lambda: engine.prepare(request))
        before = compiled_graphs()
        for _ in range(a.stream):
            n, words = int(rng.integers(1, 700)), float(rng.uniform(5, 200))
            engine.score([make_job(rng, n, words, 400)])
        row["stream_jobs"] = a.stream
        row["graphs_compiled_during_stream"] = compiled_graphs() - before
    row["triton_kernels_compiled_after_warm_up"] = triton_after_warm_up
    print(json.dumps(row), flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            engine.score_prepared([prepared])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
        # which host op issues each copy: operators with their input shapes, by the device time under them
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(
            by_shape.table(
                sort_by="cuda_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=80
            )
        )
    if a.compare:
        other = load_engine(str(a.model_dir), device="cuda", dtype=a.dtype, forward="transformers")
        got = np.asarray(engine.score([request])[0].scores, dtype=np.float64)
        want = np.asarray(other.score([request])[0].scores, dtype=np.float64)
        spread = float(log_odds(want).max() - log_odds(want).min())
        diff = float(np.abs(log_odds(got) - log_odds(want)).max())
        print(json.dumps({"vs_transformers_decoder_max_logodds_diff": diff, "spread": spread}), flush=True)


if __name__ == "__main__":
    main()
