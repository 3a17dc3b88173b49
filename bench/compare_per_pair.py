"""Full-size Qwen3-Reranker-0.6B architecture (random weights): the engine's packed path vs the per-pair path.

Builds the model directory offline (worker.testing.offline_model, size "full"), loads it through from_pretrained,
scores one job of 1 query + N documents both ways in the same process, and prints the score agreement and timings
as JSON lines.
Per-pair path: official prompt per pair, left padding, batch 128, logits_to_keep=1, softmax over (no, yes).
Usage (on the GPU machine): python -m bench.compare_per_pair --model-dir /tmp/qwen3-full --docs 400
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.workloads import make_job
from worker.engine.api import ScoreRequest
from worker.engine.load import load_engine
from worker.engine.prompt import DEFAULT_INSTRUCTION, PREFIX, SUFFIX, official_body
from worker.testing.offline_model import build_random_reranker


def per_pair_scores(
    model: Any, tokenizer: Any, request: ScoreRequest, batch: int = 128, *, fp32_head: bool = False
) -> np.ndarray:
    """The model card's path. `fp32_head`: the same forward, but the yes/no logits taken in float32 from the last
    hidden state (as the engine does), to separate the head's bf16 rounding from the body's."""
    device = next(model.parameters()).device
    prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(SUFFIX, add_special_tokens=False)
    seqs = [
        prefix
        + tokenizer(official_body(DEFAULT_INSTRUCTION, request.query, d), add_special_tokens=False)["input_ids"]
        + suffix
        for d in request.documents
        if d is not None
    ]
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    out = np.empty(len(seqs))
    order = np.argsort([len(s) for s in seqs])
    with torch.inference_mode():
        for start in range(0, len(seqs), batch):
            chunk = order[start : start + batch]
            width = max(len(seqs[i]) for i in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding, as the model card does
                ids[row, width - len(seqs[i]) :] = torch.tensor(seqs[i])
                mask[row, width - len(seqs[i]) :] = 1
            if fp32_head:
                hidden = model.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                logits = hidden[:, -1].float() @ model.get_output_embeddings().weight.float().T
            else:
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1).logits
                logits = logits[:, -1]
            pair = torch.stack([logits[:, no], logits[:, yes]], dim=1).float()
            out[chunk] = torch.softmax(pair, dim=1)[:, 1].cpu().numpy()
    return out


def timed(fn: Any, reps: int) -> tuple[Any, float, list[float]]:
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return result, first, times


def run_engine(
    model_dir: Path, dtype: str, request: ScoreRequest, reps: int
) -> tuple[Any, np.ndarray, float, list[float]]:
    engine = load_engine(str(model_dir), device="cuda", dtype=dtype)
    (scored,), first, times = timed(lambda: engine.score([request]), reps)
    torch.cuda.empty_cache()
    return scored, np.array(scored.scores, dtype=np.float64), first, times


def run_per_pair(
    model_dir: Path, dtype: str, tokenizer: Any, request: ScoreRequest, reps: int
) -> tuple[np.ndarray, float, list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    model = model.cuda().eval()
    pairs, first, times = timed(lambda: per_pair_scores(model, tokenizer, request), reps)
    torch.cuda.empty_cache()
    return pairs, first, times


def log_odds(p: np.ndarray) -> np.ndarray:
    # float32 probabilities saturate at 1.0 past a log-odds of ~17: clip well inside, so a score that one path
    # rounds to 1.0 and another to 0.99999994 does not count as a difference of 10 log-odds units
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen3-reranker-full-random"))
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--mean-words", type=float, default=45.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    a = ap.parse_args()
    if not (a.model_dir / "config.json").exists():
        t0 = time.perf_counter()
        build_random_reranker(a.model_dir, size="full", seed=0)
        print(json.dumps({"built_model_s": round(time.perf_counter() - t0, 1)}), flush=True)
    request = make_job(np.random.default_rng(1), a.docs, a.mean_words, 160)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(a.model_dir))
    # fp32 per-pair scores are the truth; each lower precision is judged against it, packed and per-pair alike,
    # so that packing error and precision noise are told apart.
    truth, _, _ = run_per_pair(a.model_dir, "float32", tokenizer, request, 0)
    lo_truth = log_odds(truth)
    spread = float(lo_truth.std())

    def err(p: np.ndarray) -> float:
        return float(np.abs(log_odds(p) - lo_truth).max() / spread)

    for dtype in a.dtypes.split(","):
        torch.cuda.reset_peak_memory_stats()
        scored, packed, first, times = run_engine(a.model_dir, dtype, request, a.reps)
        peak = torch.cuda.max_memory_allocated() / 2**30
        pairs, pfirst, ptimes = run_per_pair(a.model_dir, dtype, tokenizer, request, a.reps)
        row = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "dtype": dtype,
            "docs": a.docs,
            "tokens_per_job": scored.stats.tokens,
            "packs": scored.stats.packs,
            "engine_first_s": round(first, 2),
            "engine_median_ms": round(statistics.median(times) * 1e3, 1),
            "engine_peak_gib": round(peak, 2),
            "per_pair_first_s": round(pfirst, 2),
            "per_pair_median_ms": round(statistics.median(ptimes) * 1e3, 1),
            "logodds_spread_fp32": round(spread, 3),
            "engine_vs_fp32_truth": round(err(packed), 5),
            "per_pair_vs_fp32_truth": round(err(pairs), 5),
            "engine_vs_per_pair_same_dtype": round(float(np.abs(log_odds(packed) - log_odds(pairs)).max()) / spread, 5),
            "max_abs_score_diff_vs_per_pair": float(np.abs(packed - pairs).max()),
            "top10_same_as_truth": {
                "engine": len(set(np.argsort(-packed)[:10]) & set(np.argsort(-truth)[:10])),
                "per_pair": len(set(np.argsort(-pairs)[:10]) & set(np.argsort(-truth)[:10])),
            },
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
