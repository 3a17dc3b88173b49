"""How far the engine's scores move under lower precision, on any local model: FP8, bfloat16 and float16 engines
against the float32 per-pair path (the model card's own scoring, one prompt per pair, in float32).

For each job of the chosen workloads (bench.workloads: a, b, c as in bench.throughput; c is its first 8 jobs) and
each engine variant it prints one JSON line: the Spearman rank correlation of the variant's scores with the fp32
per-pair scores, the largest |log-odds difference|, the top-10 overlap, and, as the yardstick, the same figures for
the bfloat16 per-pair path (the model card's path at the precision it is usually run in). Documents the engine
truncates (past RERANK_MAX_DOC_TOKENS) are left out: the per-pair path scores them whole.

Random-weight models (worker.testing.offline_model) measure the arithmetic, not what matters to a user: real
weights have other outliers, which FP8's per-channel and per-token scales may or may not absorb. With the real
weights in a local directory, check them:

    python -m bench.agreement --model /models/Qwen3-Reranker-4B --workloads a,b,c --variants fp8,bfloat16

(CUDA; FP8 needs compute capability 8.9 or newer.) A variant fit to serve keeps Spearman near 1 and its largest
log-odds difference near the bfloat16 per-pair path's own.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from bench.compare_per_pair import log_odds, per_pair_scores
from bench.workloads import make_job
from worker.engine.api import ScoreRequest
from worker.engine.load import load_engine

# engine variant -> (RERANK_DTYPE, RERANK_QUANTIZATION)
VARIANTS = {
    "fp8": ("bfloat16", "fp8"),
    "bfloat16": ("bfloat16", "none"),
    "float16": ("float16", "none"),
    "float32": ("float32", "none"),
}


def ranks(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Ranks 0..n-1, ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=r, minlength=len(values))
    return (sums / np.bincount(inverse, minlength=len(values)))[inverse]  # type: ignore[no-any-return]


def spearman(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks; 1.0 for fewer than two distinct values)."""
    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return 1.0 if denominator == 0 else float((ra * rb).sum()) / denominator


def top_overlap(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], k: int = 10) -> int:
    """How many of a's k best documents are among b's k best."""
    return len(set(np.argsort(-a, kind="stable")[:k].tolist()) & set(np.argsort(-b, kind="stable")[:k].tolist()))


def agreement(scores: npt.NDArray[np.float64], truth: npt.NDArray[np.float64]) -> dict[str, float]:
    """Probabilities against the truth's probabilities: Spearman, largest |log-odds difference| (absolute and over
    the truth's log-odds standard deviation), top-10 overlap."""
    got, want = log_odds(scores), log_odds(truth)
    diff = float(np.abs(got - want).max()) if len(got) else 0.0
    return {
        "spearman": round(spearman(got, want), 6),
        "max_logodds_diff": round(diff, 5),
        "max_logodds_diff_over_std": round(diff / max(float(want.std()), 1e-12), 5),
        "top10_overlap": top_overlap(got, want),
    }


def jobs_of(names: str, seed: int = 1) -> list[tuple[str, ScoreRequest]]:
    """The workloads' jobs, as bench.throughput draws them (c: its first 8 jobs of 20 documents)."""
    table: dict[str, Callable[[np.random.Generator], list[ScoreRequest]]] = {
        "a": lambda rng: [make_job(rng, 400, 55, 160)],
        "b": lambda rng: [make_job(rng, 1000, 190, 400)],
        "c": lambda rng: [make_job(rng, 20, 55, 160) for _ in range(8)],
    }
    out = []
    for name in names.split(","):
        for i, job in enumerate(table[name](np.random.default_rng(seed))):
            out.append((f"{name}{i}" if name == "c" else name, job))
    return out


def per_pair(model_dir: Path, dtype: torch.dtype, jobs: Sequence[ScoreRequest]) -> list[npt.NDArray[np.float64]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
    model = model.cuda().eval()
    scores = [per_pair_scores(model, tokenizer, job) for job in jobs]
    del model
    torch.cuda.empty_cache()
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model", type=Path, required=True, help="a local model directory (config.json, weights)")
    ap.add_argument("--workloads", default="a,b,c")
    ap.add_argument("--variants", default="fp8,bfloat16,float16", help=f"any of {','.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    a = ap.parse_args()
    named = jobs_of(a.workloads)
    jobs = [job for _, job in named]
    started = time.perf_counter()
    truth = per_pair(a.model, torch.float32, jobs)
    bf16_pairs = per_pair(a.model, torch.bfloat16, jobs)
    print(json.dumps({"per_pair_s": round(time.perf_counter() - started, 1)}), flush=True)
    rows: list[dict[str, Any]] = []
    for variant in a.variants.split(","):
        dtype, quantization = VARIANTS[variant]
        engine = load_engine(str(a.model), device="cuda", dtype=dtype, quantization=quantization)
        scored = engine.score(jobs)
        for (name, job), result, want, pairs in zip(named, scored, truth, bf16_pairs, strict=True):
            kept = np.asarray([not e.truncated for e in engine.tokenizer.encode_documents(list(job.documents))])
            got = np.asarray(result.scores, dtype=np.float64)[kept]
            row = {
                "model": str(a.model),
                "device": torch.cuda.get_device_name(),
                "job": name,
                "docs": int(kept.sum()),
                "variant": variant,
                **agreement(got, want[kept]),
                "per_pair_bfloat16": agreement(pairs[kept], want[kept]),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del engine
        torch.cuda.empty_cache()
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{'job':<5} {'variant':<9} {'spearman':>9} {'max dlo':>8} {'top10':>5}   per-pair bf16: spearman, max dlo")
    for r in rows:
        p = r["per_pair_bfloat16"]
        print(
            f"{r['job']:<5} {r['variant']:<9} {r['spearman']:>9} {r['max_logodds_diff']:>8} {r['top10_overlap']:>5}"
            f"   {p['spearman']}, {p['max_logodds_diff']}"
        )


if __name__ == "__main__":
    main()
