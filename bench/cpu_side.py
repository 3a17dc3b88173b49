"""CPU side of one job: parse, validate, tokenize, plan, build pack arrays, serialize the result.

No GPU and no forward pass: the scores are stand-ins, the costs are the real code's. Runs on a CI-class machine.
Usage: python -m bench.cpu_side [--model-dir DIR] [--docs 400]   (DIR: any model directory with the Qwen3
tokenizer; the tiny offline one is built if missing)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.workloads import make_job
from worker.engine.api import JobScores
from worker.engine.engine import RerankEngine
from worker.engine.load import load_engine
from worker.engine.plan import build_pack_arrays
from worker.messages import RerankResult, parse_job
from worker.testing.offline_model import build_random_reranker


def median_ms(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path(".cache/tiny-qwen3-reranker"))
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    if not (a.model_dir / "config.json").exists():
        build_random_reranker(a.model_dir, size="tiny")
    engine = load_engine(str(a.model_dir), device="cpu", max_pack_tokens=65536, doc_cache_size=0)
    cached = RerankEngine(
        engine.tokenizer.with_limits(max_query_tokens=512, max_doc_tokens=512, doc_cache_size=10 * a.docs),
        engine.scorer,
        model_name=engine.model_name,
        max_pack_tokens=65536,
    )
    request = make_job(np.random.default_rng(1), a.docs, 55, 160)
    raw = orjson.dumps({"job_id": "bench", "query": request.query, "documents": list(request.documents)})
    job = parse_job(raw, max_docs=10_000)
    prepared = engine.prepare(job.to_score_request())
    packs = engine.plan_packs([prepared])
    scored = engine.score_prepared([prepared])[0]
    fake = JobScores(scores=list(np.random.default_rng(2).random(a.docs)), stats=scored.stats)
    suffix = engine.tokenizer.suffix_ids
    rows = {
        "parse_and_validate_ms": median_ms(lambda: parse_job(raw, max_docs=10_000), a.reps),
        "tokenize_cold_ms": median_ms(lambda: engine.prepare(job.to_score_request()), a.reps),
        "tokenize_warm_cache_ms": median_ms(lambda: cached.prepare(job.to_score_request()), a.reps),
        "plan_ms": median_ms(lambda: engine.plan_packs([prepared]), a.reps),
        "pack_arrays_ms": median_ms(lambda: [build_pack_arrays(p, [prepared], suffix, 128) for p in packs], a.reps),
        "result_serialize_ms": median_ms(
            lambda: orjson.dumps(RerankResult.from_scores(job, fake, engine.info).model_dump(mode="json")), a.reps
        ),
    }
    tokens = int(sum(len(d) for d in prepared.unique_docs))
    total_cold = round(sum(v for k, v in rows.items() if k != "tokenize_warm_cache_ms"), 2)
    total_warm = round(total_cold - rows["tokenize_cold_ms"] + rows["tokenize_warm_cache_ms"], 2)
    print(
        json.dumps(
            {
                "docs": a.docs,
                "document_tokens": tokens,
                **rows,
                "total_cold_ms": total_cold,
                "total_warm_cache_ms": total_warm,
            }
        )
    )


if __name__ == "__main__":
    main()
