"""Throughput benchmark of record: the engine end to end vs the per-pair path, three workloads.

A published Qwen3-Reranker architecture (0.6B by default) with random weights (`worker.testing.offline_model`,
same cost as the real model), the real Qwen3 tokenizer, seeded synthetic documents. Workloads:
  a  1 query + 400 documents of ~70 tokens
  b  1 query + 1,000 documents of ~250 tokens
  c  a stream of 200 jobs of 20 documents (~70 tokens), scored together (cross-job packing)
For each: ms per job (median, p90) for the engine (tokenization included) and for the per-pair path (batch 128,
`logits_to_keep=1`) on the same inputs, documents/s, tokens/s, useful TFLOP/s, the ratio to the linear-layer floor
measured in the same run, peak GPU memory, and the largest score difference from the per-pair path (in log-odds,
over the fp32 spread). Writes JSON and, where matplotlib is installed, a PNG chart.

Several engine variants run one after another in one process (`--engines bfloat16,fp8`), each released before the
next loads, then the per-pair path and the fp32 truth; `--size 0.6b|4b|8b` builds that published shape when
`--model-dir` holds no model, and `--per-pair off --truth off` leaves out the references (the 8B's fp32 copy
alone is 32 GB). Per job, the worst Spearman, largest log-odds difference and top-10 overlap against the fp32
per-pair scores (`engine_vs_fp32`), and the same for the per-pair path at --dtype (`per_pair_vs_fp32`).

GPU: python -m bench.throughput --out results/ --engines bfloat16,fp8
CPU smoke: python -m bench.throughput --size tiny --device cpu --workloads c
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.compare_per_pair import log_odds, per_pair_scores
from bench.workloads import make_job
from worker.engine.api import JobScores, ScoreRequest
from worker.engine.engine import RerankEngine, ScoringBatch
from worker.engine.load import load_engine
from worker.testing.offline_model import build_random_reranker


@dataclass(frozen=True)
class Workload:
    name: str
    jobs: list[ScoreRequest]  # the jobs compared with the per-pair path; one engine call for the latency figure
    stream: list[list[ScoreRequest]]  # batches, as the worker forms them, for the steady-state figure
    reps: int


def workloads(names: str, rng_seed: int) -> list[Workload]:
    """The named workloads, each from its own generator seeded with `rng_seed`, so a workload's texts do not
    depend on which others run with it."""

    def a() -> Workload:
        rng = np.random.default_rng(rng_seed)
        jobs = [make_job(rng, 400, 55, 160) for _ in range(8)]
        return Workload("a: 1 query x 400 docs ~70 tok", jobs[:1], [[j] for j in jobs], 10)

    def b() -> Workload:
        rng = np.random.default_rng(rng_seed)
        jobs = [make_job(rng, 1000, 190, 400) for _ in range(3)]
        return Workload("b: 1 query x 1000 docs ~250 tok", jobs[:1], [[j] for j in jobs], 3)

    def c() -> Workload:
        rng = np.random.default_rng(rng_seed)
        jobs = [make_job(rng, 20, 55, 160) for _ in range(200)]
        # the worker's batches: as many jobs as fill one 32k-token pass (~1,750 tokens per 20-document job)
        per_batch = 18
        return Workload(
            "c: 200 jobs x 20 docs ~70 tok", jobs, [jobs[i : i + per_batch] for i in range(0, 200, per_batch)], 3
        )

    # ~1.3 tokens per word of the synthetic vocabulary: 55 words ~ 70 tokens, 190 words ~ 250 tokens
    table: dict[str, Callable[[], Workload]] = {"a": a, "b": b, "c": c}
    return [table[n]() for n in names.split(",")]


@dataclass
class StreamTimes:
    """Where a stream's time goes, per batch: waiting for its tokenizing (should be ~0: it overlaps the GPU),
    `submit` (plan, pack arrays, queue on the device), and `result()` of the batch queued before it (the wait for
    the device, then collecting). Seconds. And each batch's results, in order."""

    per_job: list[float] = field(default_factory=list)
    waited_for_prepare: list[float] = field(default_factory=list)
    submitting: list[float] = field(default_factory=list)
    collecting: list[float] = field(default_factory=list)
    results: list[list[JobScores]] = field(default_factory=list)

    def __add__(self, other: StreamTimes) -> StreamTimes:
        return StreamTimes(
            self.per_job + other.per_job,
            self.waited_for_prepare + other.waited_for_prepare,
            self.submitting + other.submitting,
            self.collecting + other.collecting,
            self.results + other.results,
        )


def stream(engine: RerankEngine, batches: list[list[ScoreRequest]], device: torch.device) -> StreamTimes:
    """Score batches the way the worker does: the next batch is tokenized on another thread while this one is on
    the GPU (the tokenizer releases the GIL), and queued on the device before the host waits for the batch ahead
    of it. Per job: time between completions, divided by the batch's jobs."""
    from concurrent.futures import ThreadPoolExecutor

    times = StreamTimes()
    last = 0.0

    def finish(batch: ScoringBatch, jobs: int) -> None:
        nonlocal last
        waiting = time.perf_counter()
        times.results.append(batch.result())  # host scores: the GPU work is done
        now = time.perf_counter()
        times.collecting.append(now - waiting)
        times.per_job.append((now - last) / jobs)
        last = now

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: [engine.prepare(r) for r in batches[0]])
        sync(device)
        last = time.perf_counter()
        in_flight: tuple[ScoringBatch, int] | None = None
        for i, _ in enumerate(batches):
            started = time.perf_counter()
            prepared = pending.result()
            ready = time.perf_counter()
            times.waited_for_prepare.append(ready - started)
            if i + 1 < len(batches):
                pending = pool.submit(lambda nxt=batches[i + 1]: [engine.prepare(r) for r in nxt])
            if in_flight is not None and not in_flight[0].fully_queued:
                finish(*in_flight)  # its later packs go to the device first (as the worker does)
                in_flight = None
            submitting = time.perf_counter()
            queued = (engine.submit(prepared), len(prepared))
            times.submitting.append(time.perf_counter() - submitting)
            if in_flight is not None:
                finish(*in_flight)
            in_flight = queued
        if in_flight is not None:
            finish(*in_flight)
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], reps: int, device: torch.device) -> tuple[Any, float, list[float]]:
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    first = time.perf_counter() - t0
    fn()  # a second warm-up: shapes seen once may still compile on the second call
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return result, first, times


def useful_flops(config: Any, heads: Sequence[int], docs: Sequence[int], suffix: int) -> float:
    """Linear layers on every useful token plus causal attention over head + own document (no padding, no waste)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    qd, kvd = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_token = layers * 2 * (h * qd + 2 * h * kvd + qd * h + 3 * h * config.intermediate_size)
    tokens = sum(heads) + sum(d + suffix for d in docs)
    pairs = sum(p * (p + 1) // 2 for p in heads)
    mean_head = float(np.mean(heads))
    pairs += sum((d + suffix) * mean_head + (d + suffix) * (d + suffix + 1) // 2 for d in docs)
    return per_token * tokens + layers * 4 * qd * pairs


def linear_floor_s(model: Any, tokens: int, device: torch.device, dtype: torch.dtype) -> float:
    """Time only the decoder layers' linear projections on a [tokens, hidden] input: the matmul floor."""
    x = torch.randn(tokens, model.config.hidden_size, device=device, dtype=dtype)

    def once() -> torch.Tensor:
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            q, _, _ = a.q_proj(x), a.k_proj(x), a.v_proj(x)
            o = a.o_proj(q)
            y = m.down_proj(m.gate_proj(o) * m.up_proj(o))
        return y

    with torch.inference_mode():
        _, _, times = timed(once, 5, device)
    return statistics.median(times)


def per_job_agreement(wl: Workload, scores: np.ndarray, kept: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    """Per job of the workload, against the fp32 per-pair scores (`bench.agreement.agreement`); the worst job's
    figures: the lowest Spearman and top-10 overlap, the largest log-odds difference."""
    from bench.agreement import agreement

    worst: dict[str, float | int] = {}
    start = 0
    for job in wl.jobs:
        end = start + len(job.documents)
        keep = kept[start:end]
        one = agreement(scores[start:end][keep], truth[start:end][keep])
        for key, value in one.items():
            lower_is_worse = key in ("spearman", "top10_overlap")
            if key not in worst or (value < worst[key] if lower_is_worse else value > worst[key]):
                worst[key] = value
        start = end
    return worst


def fp8_linear_floor_s(model: Any, tokens: int, device: torch.device) -> float:
    """`linear_floor_s` on FP8 tensor cores: the same projections as `_scaled_mm` of pre-quantized operands (no
    activation quantization), bf16 out: the matmul floor of the FP8 engine."""
    from worker.engine.fp8 import FP8

    config = model.config
    h, inter = config.hidden_size, config.intermediate_size
    qd, kvd = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = [(qd, h), (kvd, h), (kvd, h), (h, qd), (inter, h), (inter, h), (h, inter)]  # q k v o gate up down
    weights = [(torch.randn(n, k, device=device) / 8).to(FP8) for n, k in shapes]
    scales = [torch.ones(1, n, device=device) for n, _ in shapes]
    inputs = {k: (torch.randn(tokens, k, device=device) * 8).to(FP8) for _, k in shapes}
    row_scale = torch.ones(tokens, 1, device=device)

    def once() -> torch.Tensor:
        for _ in range(config.num_hidden_layers):
            for w, s in zip(weights, scales, strict=True):
                y = torch._scaled_mm(inputs[w.shape[1]], w.t(), scale_a=row_scale, scale_b=s, out_dtype=torch.bfloat16)
        return y

    _, _, times = timed(once, 5, device)
    return statistics.median(times)


# engine variant -> (dtype, quantization)
ENGINE_VARIANTS = {
    "bfloat16": ("bfloat16", "none"),
    "float16": ("float16", "none"),
    "float32": ("float32", "none"),
    "fp8": ("bfloat16", "fp8"),
}


@dataclass
class EngineRun:
    """One engine variant's measurements of one workload (its scores over the documents it scores whole)."""

    variant: str
    header: dict[str, Any]
    workload: str
    measured: dict[str, Any]
    scores: np.ndarray
    kept: np.ndarray
    tokens: int
    flops: float
    seconds_per_workload: float  # steady-state stream, for this workload's jobs


def run_engine(
    variant: str, a: argparse.Namespace, wls: list[Workload], device: torch.device, config: Any
) -> list[EngineRun]:
    """Load, warm and measure one engine variant on every workload (`release` gives its memory back after)."""
    dtype_name, quantization = ENGINE_VARIANTS[variant]
    if device.type != "cuda":
        dtype_name = "float32"
    t0 = time.perf_counter()
    engine = load_engine(
        str(a.model_dir),
        device=a.device,
        dtype=dtype_name,
        attention=a.attention,
        cuda_graphs=a.cuda_graphs == "on",
        quantization=quantization,
    )
    load_s = time.perf_counter() - t0
    warm_up_s = engine.warm_up()
    # What the engine keeps beyond its weights once warm (CUDA graphs' memory pool included: its blocks are reserved,
    # not allocated, between replays), measured with nothing else on the device.
    resident_gib = None
    if device.type == "cuda":
        scorer: Any = engine.scorer
        weights = scorer.weight_bytes() if hasattr(scorer, "weight_bytes") else 0
        resident_gib = (torch.cuda.memory_reserved() - weights) / 2**30
    info = engine.info
    header = {
        "engine": variant,
        "dtype": info.dtype,
        "quantization": info.quantization,
        "attention": info.attention,
        "max_pack_tokens": info.max_pack_tokens,
        "forward": info.forward,
        "compiled": info.compiled,
        "cuda_graphs": info.cuda_graphs,
        "engine_load_s": round(load_s, 1),
        "engine_warm_up_s": round(warm_up_s, 1),
        "engine_reserved_gib_after_warm_up": None if resident_gib is None else round(resident_gib, 2),
        "document_encoder": engine.tokenizer.document_encoder,
    }
    print(json.dumps(header), flush=True)
    suffix = len(engine.tokenizer.suffix_ids)
    runs = []
    for wl in wls:
        prepared = [engine.prepare(job) for job in wl.jobs]
        heads = [len(p.head_ids) for p in prepared]
        doc_lens = [len(d) for p in prepared for d in p.unique_docs]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        scored, first, times = timed(lambda wl=wl: engine.score(wl.jobs), wl.reps, device)
        stream(engine, wl.stream, device)  # warm
        streamed = stream(engine, wl.stream, device) + stream(engine, wl.stream, device)
        stream_per_job = np.asarray(streamed.per_job)
        # peak beyond the weights: what the warm engine reserves, plus what this workload allocated on top of it
        peak_gib = (
            resident_gib + (torch.cuda.max_memory_allocated() - base) / 2**30 if resident_gib is not None else None
        )
        # Agreement over the documents the engine scores whole: one it truncates to RERANK_MAX_DOC_TOKENS is a
        # different input from the per-pair path's untruncated pair (a few of b's documents run past 512 tokens).
        kept = np.concatenate(
            [[not enc.truncated for enc in engine.tokenizer.encode_documents(list(job.documents))] for job in wl.jobs]
        )
        got = np.concatenate([np.asarray(s.scores, dtype=np.float64) for s in scored])
        latency_per_job = np.asarray(times) / len(wl.jobs)
        measured = {
            # steady state: batches back to back, tokenizing the next while the GPU runs this one (the worker)
            "engine_ms_per_job_median": round(float(np.median(stream_per_job)) * 1e3, 2),
            "engine_ms_per_job_p90": round(float(np.percentile(stream_per_job, 90)) * 1e3, 2),
            # per stream batch, medians: the wait for the overlapped tokenizing, submit, and result() of the batch ahead
            "stream_wait_for_prepare_ms_median": round(float(np.median(streamed.waited_for_prepare)) * 1e3, 2),
            "stream_submit_ms_median": round(float(np.median(streamed.submitting)) * 1e3, 2),
            "stream_result_ms_median": round(float(np.median(streamed.collecting)) * 1e3, 2),
            # one call of engine.score on these jobs alone, tokenization included, nothing overlapped
            "engine_latency_ms_per_job_median": round(float(np.median(latency_per_job)) * 1e3, 2),
            "engine_latency_ms_per_job_p90": round(float(np.percentile(latency_per_job, 90)) * 1e3, 2),
            "engine_first_call_s": round(first, 2),
            "peak_gib_beyond_weights": round(peak_gib, 2) if peak_gib is not None else None,
        }
        runs.append(
            EngineRun(
                variant,
                header,
                wl.name,
                measured,
                got,
                kept,
                sum(heads) + sum(d + suffix for d in doc_lens),
                useful_flops(config, heads, doc_lens, suffix),
                float(np.median(stream_per_job)) * len(wl.jobs),
            )
        )
        print(json.dumps({"engine": variant, "workload": wl.name, **measured}), flush=True)
    return runs


def release(device: torch.device) -> None:
    """Give what released models and engines held back to the device."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen3-reranker-full-random"))
    ap.add_argument(
        "--size",
        choices=["tiny", "0.6b", "4b", "8b", "full"],
        default="full",
        help="the shape built when --model-dir holds no model (full: 0.6b)",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", help="the per-pair path's dtype, and the engine's without --engines")
    ap.add_argument(
        "--engines",
        default=None,
        help=f"engine variants measured one after another in this run, any of {','.join(ENGINE_VARIANTS)} "
        "(fp8: bfloat16 with RERANK_QUANTIZATION=fp8); default: --dtype",
    )
    ap.add_argument("--workloads", default="a,b,c")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--cuda-graphs", choices=["on", "off"], default="on")
    ap.add_argument("--per-pair", choices=["on", "off"], default="on", help="time and score the per-pair path")
    ap.add_argument("--truth", choices=["on", "off"], default="on", help="score the fp32 per-pair path (agreement)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="sys.setswitchinterval for the run (Python's default 5 ms): how soon a thread waiting for the GIL gets it",
    )
    a = ap.parse_args()
    if a.switch_interval_ms is not None:
        sys.setswitchinterval(a.switch_interval_ms / 1e3)
    if not (a.model_dir / "config.json").exists():
        build_random_reranker(a.model_dir, size=a.size, seed=0)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if device.type == "cuda" else torch.float32
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(a.model_dir))
    config = AutoConfig.from_pretrained(str(a.model_dir))
    variants = (a.engines or a.dtype).split(",")
    header: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, intermediate "
        f"{config.intermediate_size}, {config.num_attention_heads}/{config.num_key_value_heads} heads",
        "per_pair_dtype": str(dtype).removeprefix("torch."),
        "switch_interval_ms": sys.getswitchinterval() * 1e3,
    }
    print(json.dumps(header), flush=True)
    wls = workloads(a.workloads, 1)
    runs: list[EngineRun] = []
    for variant in variants:
        runs += run_engine(variant, a, wls, device, config)
        release(device)
    # The references, after every engine has let go of the device
    per_pair: dict[str, dict[str, Any]] = {}
    if a.per_pair == "on":
        reference = AutoModelForCausalLM.from_pretrained(str(a.model_dir), dtype=dtype, attn_implementation="sdpa")
        reference = reference.to(device).eval()
        for wl in wls:
            pairs, _, ptimes = timed(
                lambda wl=wl: [per_pair_scores(reference, tokenizer, job) for job in wl.jobs],
                max(1, wl.reps // 3),
                device,
            )
            tokens = next(r.tokens for r in runs if r.workload == wl.name)
            per_pair[wl.name] = {
                "scores": np.concatenate(pairs),
                "fp32_head": np.concatenate(
                    [per_pair_scores(reference, tokenizer, job, fp32_head=True) for job in wl.jobs]
                ),
                "seconds": statistics.median(ptimes),
                "floor_s": linear_floor_s(reference, tokens, device, dtype),
                "fp8_floor_s": fp8_linear_floor_s(reference, tokens, device)
                if device.type == "cuda" and "fp8" in variants
                else None,
            }
        del reference
        release(device)
    truths: dict[str, np.ndarray] = {}
    if a.truth == "on" and (dtype != torch.float32 or "fp8" in variants):
        truth_model = AutoModelForCausalLM.from_pretrained(str(a.model_dir), dtype=torch.float32).to(device).eval()
        for wl in wls:
            truths[wl.name] = np.concatenate([per_pair_scores(truth_model, tokenizer, job) for job in wl.jobs])
        del truth_model
        release(device)
    rows = []
    for r in runs:
        wl = next(w for w in wls if w.name == r.workload)
        num_docs = sum(len(j.documents) for j in wl.jobs)
        med = r.seconds_per_workload
        got = r.scores[r.kept]
        row: dict[str, Any] = {
            "engine": r.variant,
            "workload": r.workload,
            "jobs": len(wl.jobs),
            "docs": num_docs,
            "tokens": r.tokens,
            **r.measured,
            "docs_per_s": round(num_docs / med, 1),
            "tokens_per_s": round(r.tokens / med),
            "useful_tflops": round(r.flops / med / 1e12, 1),
            "docs_truncated_left_out_of_agreement": int((~r.kept).sum()),
        }
        if r.workload in per_pair:
            p = per_pair[r.workload]
            want, want_fp32_head = p["scores"][r.kept], p["fp32_head"][r.kept]
            spread = float(log_odds(want).std())
            row.update(
                {
                    "per_pair_ms_per_job_median": round(p["seconds"] / len(wl.jobs) * 1e3, 2),
                    "speedup_vs_per_pair": round(p["seconds"] / med, 2),
                    "latency_speedup_vs_per_pair": round(
                        p["seconds"] / (r.measured["engine_latency_ms_per_job_median"] / 1e3 * len(wl.jobs)), 2
                    ),
                    "linear_floor_ms": round(p["floor_s"] * 1e3, 2),
                    "ratio_to_floor": round(med / p["floor_s"], 2),
                    "fp8_linear_floor_ms": None if p["fp8_floor_s"] is None else round(p["fp8_floor_s"] * 1e3, 2),
                    "ratio_to_fp8_floor": None if p["fp8_floor_s"] is None else round(med / p["fp8_floor_s"], 2),
                    "max_logodds_diff_over_spread": round(
                        float(np.abs(log_odds(got) - log_odds(want)).max()) / spread, 4
                    ),
                    "vs_fp32_head_per_pair_max_logodds_diff_over_spread": round(
                        float(np.abs(log_odds(got) - log_odds(want_fp32_head)).max()) / spread, 4
                    ),
                    "per_pair_bf16_head_vs_fp32_head_over_spread": round(
                        float(np.abs(log_odds(want) - log_odds(want_fp32_head)).max()) / spread, 4
                    ),
                    "max_logodds_diff_over_range": round(
                        float(np.abs(log_odds(got) - log_odds(want)).max()) / float(np.ptp(log_odds(want))), 4
                    ),
                }
            )
        if r.workload in truths:
            truth = truths[r.workload][r.kept]
            spread = float(log_odds(truth).std())
            row["engine_vs_fp32_over_spread"] = round(float(np.abs(log_odds(got) - log_odds(truth)).max()) / spread, 4)
            row["engine_vs_fp32"] = per_job_agreement(wl, r.scores, r.kept, truths[r.workload])
            if r.workload in per_pair:
                want = per_pair[r.workload]["scores"][r.kept]
                row["per_pair_vs_fp32_over_spread"] = round(
                    float(np.abs(log_odds(want) - log_odds(truth)).max()) / spread, 4
                )
                row["per_pair_vs_fp32"] = per_job_agreement(
                    wl, per_pair[r.workload]["scores"], r.kept, truths[r.workload]
                )
        rows.append(row)
        print(json.dumps(row), flush=True)
    header["engines"] = [next(r.header for r in runs if r.variant == v) for v in variants]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "throughput.json").write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        names = [r["workload"] for r in rows if r["engine"] == variants[0]]
        x = np.arange(len(names))
        width = 0.8 / (len(variants) + 1)
        for k, variant in enumerate(variants):
            ms = [r["engine_ms_per_job_median"] for r in rows if r["engine"] == variant]
            ax.bar(x + (k - len(variants) / 2) * width, ms, width, label=f"engine, {variant}")
        if per_pair:
            ms = [per_pair[n]["seconds"] / next(len(w.jobs) for w in wls if w.name == n) * 1e3 for n in names]
            ax.bar(x + len(variants) / 2 * width, ms, width, label=f"per-pair, batch 128, {header['per_pair_dtype']}")
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylabel("ms per job (median)")
        ax.set_yscale("log")
        ax.set_title(f"{header['device']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out / "throughput.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no chart", flush=True)
    print(
        "\nengine    workload                           ms/job  p90     latency  per-pair  speedup  docs/s  xfloor  "
        "x fp8 floor  peakGiB  vs fp32: spearman  max dlo  top10 (per-pair: max dlo)"
    )
    for shown in rows:
        vs = shown.get("engine_vs_fp32", {})
        pp = shown.get("per_pair_vs_fp32", {})
        print(
            f"{shown['engine']:<9} {shown['workload']:<34} {shown['engine_ms_per_job_median']:>7} "
            f"{shown['engine_ms_per_job_p90']:>7} "
            f"{shown['engine_latency_ms_per_job_median']:>8} {shown.get('per_pair_ms_per_job_median')!s:>9} "
            f"{shown.get('speedup_vs_per_pair')!s:>7} {shown['docs_per_s']:>8} {shown.get('ratio_to_floor')!s:>6} "
            f"{shown.get('ratio_to_fp8_floor')!s:>11} {shown['peak_gib_beyond_weights']!s:>8} "
            f"{vs.get('spearman')!s:>18} {vs.get('max_logodds_diff')!s:>8} {vs.get('top10_overlap')!s:>6} "
            f"({pp.get('max_logodds_diff')!s})"
        )


if __name__ == "__main__":
    main()
