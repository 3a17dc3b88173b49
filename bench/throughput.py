"""Throughput benchmark of record: the engine end to end vs the per-pair path, three workloads.

Full-size Qwen3-Reranker-0.6B architecture with random weights (`worker.testing.offline_model`, same cost as the real
model), the real Qwen3 tokenizer, seeded synthetic documents. Workloads:
  a  1 query + 400 documents of ~70 tokens
  b  1 query + 1,000 documents of ~250 tokens
  c  a stream of 200 jobs of 20 documents (~70 tokens), scored together (cross-job packing)
For each: ms per job (median, p90) for the engine (tokenization included) and for the per-pair path (batch 128,
`logits_to_keep=1`) on the same inputs, documents/s, tokens/s, useful TFLOP/s, the ratio to the linear-layer floor
measured in the same run, peak GPU memory, and the largest score difference from the per-pair path (in log-odds,
over the fp32 spread). Writes JSON and, where matplotlib is installed, a PNG chart.

GPU: python -m bench.throughput --out results/   CPU smoke: python -m bench.throughput --size tiny --device cpu
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen3-reranker-full-random"))
    ap.add_argument("--size", choices=["tiny", "full"], default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workloads", default="a,b,c")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--cuda-graphs", choices=["on", "off"], default="on")
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(a.model_dir))
    t0 = time.perf_counter()
    engine = load_engine(
        str(a.model_dir),
        device=a.device,
        dtype=str(dtype).removeprefix("torch."),
        attention=a.attention,
        cuda_graphs=a.cuda_graphs == "on",
    )
    load_s = time.perf_counter() - t0
    warm_up_s = engine.warm_up()
    # What the engine keeps beyond its weights once warm (CUDA graphs' memory pool included: its blocks are reserved,
    # not allocated, between replays), measured before the reference model joins the process.
    resident_gib = None
    if device.type == "cuda":
        weights = sum(p.numel() * p.element_size() for p in engine.scorer.model.parameters())
        resident_gib = (torch.cuda.memory_reserved() - weights) / 2**30
    reference = AutoModelForCausalLM.from_pretrained(str(a.model_dir), dtype=dtype, attn_implementation="sdpa")
    reference = reference.to(device).eval()
    # fp32 truth for both bf16 paths: how far each is from the exact scores, not only from each other
    truth_model = None
    if dtype != torch.float32:
        truth_model = AutoModelForCausalLM.from_pretrained(str(a.model_dir), dtype=torch.float32).to(device).eval()
    info = engine.info
    header = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": info.dtype,
        "attention": info.attention,
        "max_pack_tokens": info.max_pack_tokens,
        "forward": info.forward,
        "compiled": info.compiled,
        "cuda_graphs": info.cuda_graphs,
        "engine_load_s": round(load_s, 1),
        "engine_warm_up_s": round(warm_up_s, 1),
        "engine_reserved_gib_after_warm_up": None if resident_gib is None else round(resident_gib, 2),
        "document_encoder": engine.tokenizer.document_encoder,
        "switch_interval_ms": sys.getswitchinterval() * 1e3,
    }
    print(json.dumps(header), flush=True)
    rows = []
    suffix = len(engine.tokenizer.suffix_ids)
    for wl in workloads(a.workloads, 1):
        prepared = [engine.prepare(job) for job in wl.jobs]
        heads = [len(p.head_ids) for p in prepared]
        doc_lens = [len(d) for p in prepared for d in p.unique_docs]
        flops = useful_flops(reference.config, heads, doc_lens, suffix)
        tokens = sum(heads) + sum(d + suffix for d in doc_lens)
        num_docs = sum(len(j.documents) for j in wl.jobs)
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
        pairs, _, ptimes = timed(
            lambda wl=wl: [per_pair_scores(reference, tokenizer, job) for job in wl.jobs], max(1, wl.reps // 3), device
        )
        floor = linear_floor_s(reference, tokens, device, dtype)
        # Agreement over the documents the engine scores whole: one it truncates to RERANK_MAX_DOC_TOKENS is a
        # different input from the per-pair path's untruncated pair (a few of b's documents run past 512 tokens).
        kept = np.concatenate(
            [[not enc.truncated for enc in engine.tokenizer.encode_documents(list(job.documents))] for job in wl.jobs]
        )
        got = np.concatenate([np.asarray(s.scores, dtype=np.float64) for s in scored])[kept]
        want_fp32_head = np.concatenate(
            [per_pair_scores(reference, tokenizer, job, fp32_head=True) for job in wl.jobs]
        )[kept]
        want = np.concatenate(pairs)[kept]
        spread = float(log_odds(want).std())
        latency_per_job = np.asarray(times) / len(wl.jobs)
        med = float(np.median(stream_per_job)) * len(wl.jobs)  # seconds for this workload's jobs, steady state
        pair_med = statistics.median(ptimes)
        row = {
            "workload": wl.name,
            "jobs": len(wl.jobs),
            "docs": num_docs,
            "tokens": tokens,
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
            "per_pair_ms_per_job_median": round(pair_med / len(wl.jobs) * 1e3, 2),
            "speedup_vs_per_pair": round(pair_med / med, 2),
            "latency_speedup_vs_per_pair": round(pair_med / float(np.median(times)), 2),
            "docs_per_s": round(num_docs / med, 1),
            "tokens_per_s": round(tokens / med),
            "useful_tflops": round(flops / med / 1e12, 1),
            "linear_floor_ms": round(floor * 1e3, 2),
            "ratio_to_floor": round(med / floor, 2),
            "peak_gib_beyond_weights": round(peak_gib, 2) if peak_gib is not None else None,
            "docs_truncated_left_out_of_agreement": int((~kept).sum()),
            "max_logodds_diff_over_spread": round(float(np.abs(log_odds(got) - log_odds(want)).max()) / spread, 4),
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
        if truth_model is not None:
            truth = log_odds(np.concatenate([per_pair_scores(truth_model, tokenizer, job) for job in wl.jobs])[kept])
            row["engine_vs_fp32_over_spread"] = round(float(np.abs(log_odds(got) - truth).max()) / spread, 4)
            row["per_pair_vs_fp32_over_spread"] = round(float(np.abs(log_odds(want) - truth).max()) / spread, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "throughput.json").write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        names = [r["workload"] for r in rows]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["engine_ms_per_job_median"] for r in rows], 0.4, label="engine (packed)")
        ax.bar(x + 0.2, [r["per_pair_ms_per_job_median"] for r in rows], 0.4, label="per-pair, batch 128")
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylabel("ms per job (median)")
        ax.set_yscale("log")
        ax.set_title(f"{header['device']}, {header['dtype']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out / "throughput.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no chart", flush=True)
    print(
        "\nworkload                           ms/job  p90     latency  per-pair  speedup  docs/s  xfloor  peakGiB  "
        "diff/std  diff/range"
    )
    for r in rows:
        print(
            f"{r['workload']:<34} {r['engine_ms_per_job_median']:>7} {r['engine_ms_per_job_p90']:>7} "
            f"{r['engine_latency_ms_per_job_median']:>8} {r['per_pair_ms_per_job_median']:>9} "
            f"{r['speedup_vs_per_pair']:>7} {r['docs_per_s']:>8} {r['ratio_to_floor']:>6} "
            f"{r['peak_gib_beyond_weights']!s:>8} {r['max_logodds_diff_over_spread']:>8} "
            f"{r['max_logodds_diff_over_range']:>9}"
        )


if __name__ == "__main__":
    main()
