"""Throughput benchmark of record (issue 4): the engine end to end vs the per-pair path, three workloads.

Full-size Qwen3-Reranker-0.6B architecture with random weights (`worker.offline`, same cost as the real model), the
real Qwen3 tokenizer, seeded synthetic documents. Workloads:
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.compare_per_pair import log_odds, per_pair_scores
from bench.workloads import make_job
from worker.engine import RerankEngine, ScoreRequest
from worker.offline import build_random_reranker


@dataclass(frozen=True)
class Workload:
    name: str
    jobs: list[ScoreRequest]
    reps: int


def workloads(names: str, rng_seed: int) -> list[Workload]:
    rng = np.random.default_rng(rng_seed)
    table: dict[str, Callable[[], Workload]] = {
        # ~1.3 tokens per word of the synthetic vocabulary: 55 words ~ 70 tokens, 190 words ~ 250 tokens
        "a": lambda: Workload("a: 1 query x 400 docs ~70 tok", [make_job(rng, 400, 55, 160)], 10),
        "b": lambda: Workload("b: 1 query x 1000 docs ~250 tok", [make_job(rng, 1000, 190, 400)], 3),
        "c": lambda: Workload("c: 200 jobs x 20 docs ~70 tok", [make_job(rng, 20, 55, 160) for _ in range(200)], 3),
    }
    return [table[n]() for n in names.split(",")]


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
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    a = ap.parse_args()
    if not (a.model_dir / "config.json").exists():
        build_random_reranker(a.model_dir, size=a.size, seed=0)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if device.type == "cuda" else torch.float32
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(a.model_dir))
    t0 = time.perf_counter()
    engine = RerankEngine.load(str(a.model_dir), device=a.device, dtype=str(dtype).removeprefix("torch."))
    load_s = time.perf_counter() - t0
    reference = AutoModelForCausalLM.from_pretrained(str(a.model_dir), dtype=dtype, attn_implementation="sdpa")
    reference = reference.to(device).eval()
    info = engine.info
    header = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": info.dtype,
        "attention": info.attention,
        "max_batch_tokens": info.max_batch_tokens,
        "engine_load_s": round(load_s, 1),
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
        peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
        pairs, _, ptimes = timed(
            lambda wl=wl: [per_pair_scores(reference, tokenizer, job) for job in wl.jobs], max(1, wl.reps // 3), device
        )
        floor = linear_floor_s(reference, tokens, device, dtype)
        got = np.concatenate([np.asarray(s.scores, dtype=np.float64) for s in scored])
        want = np.concatenate(pairs)
        spread = float(log_odds(want).std())
        per_job = np.asarray(times) / len(wl.jobs)
        med = float(np.median(times))
        row = {
            "workload": wl.name,
            "jobs": len(wl.jobs),
            "docs": num_docs,
            "tokens": tokens,
            "engine_ms_per_job_median": round(float(np.median(per_job)) * 1e3, 2),
            "engine_ms_per_job_p90": round(float(np.percentile(per_job, 90)) * 1e3, 2),
            "engine_first_call_s": round(first, 2),
            "per_pair_ms_per_job_median": round(statistics.median(ptimes) / len(wl.jobs) * 1e3, 2),
            "speedup_vs_per_pair": round(statistics.median(ptimes) / med, 2),
            "docs_per_s": round(num_docs / med, 1),
            "tokens_per_s": round(tokens / med),
            "useful_tflops": round(flops / med / 1e12, 1),
            "linear_floor_ms": round(floor * 1e3, 2),
            "ratio_to_floor": round(med / floor, 2),
            "peak_gib_beyond_weights": round(peak_gib, 2) if peak_gib is not None else None,
            "max_logodds_diff_over_spread": round(float(np.abs(log_odds(got) - log_odds(want)).max()) / spread, 4),
        }
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
        "\nworkload                           engine ms/job  p90    per-pair  speedup  docs/s  xfloor  peakGiB  maxdiff"
    )
    for r in rows:
        print(
            f"{r['workload']:<34} {r['engine_ms_per_job_median']:>9} {r['engine_ms_per_job_p90']:>7} "
            f"{r['per_pair_ms_per_job_median']:>9} {r['speedup_vs_per_pair']:>7} {r['docs_per_s']:>8} "
            f"{r['ratio_to_floor']:>6} {r['peak_gib_beyond_weights']!s:>8} {r['max_logodds_diff_over_spread']:>8}"
        )


if __name__ == "__main__":
    main()
