"""Job generators and result readers shared by the integration tests."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import orjson

from worker.engine.engine import RerankEngine
from worker.pipeline.deadletter import header_map

WORDS = (
    "cat dog river stone python rust iron moon tree data model query answer light sound red shoe leather boot "
    "garden rain cloud storm engine wheel road city night star ocean salt bread"
).split()


def make_jobs(
    n: int, *, min_docs: int = 1, max_docs: int = 40, seed: int = 0, prefix: str = "job"
) -> list[dict[str, Any]]:
    """Jobs with duplicate, blank and null documents mixed in, some with ids, instructions and top_n."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        docs: list[Any] = []
        for d in range(rng.randint(min_docs, max_docs)):
            roll = rng.random()
            if roll < 0.05:
                docs.append(None)
            elif roll < 0.1:
                docs.append("   ")
            elif roll < 0.2 and docs:
                docs.append(rng.choice([x for x in docs if isinstance(x, str)] or ["x"]))
            elif roll < 0.3:
                docs.append({"id": f"d{d}", "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))})
            else:
                docs.append(" ".join(rng.choices(WORDS, k=rng.randint(3, 30))))
        job: dict[str, Any] = {"job_id": f"{prefix}-{i}", "query": " ".join(rng.choices(WORDS, k=3)), "documents": docs}
        if rng.random() < 0.3:
            job["instruction"] = "Rank products by query with category & style match prioritized"
        if rng.random() < 0.2:
            job["metadata"] = {"tenant": "t1", "n": i}
        jobs.append(job)
    return jobs


# Scores of a job packed with other jobs differ from the job scored alone by up to ~2e-6 on CPU in float32 (measured
# on the tiny model: 14 of 30 jobs above 1e-6, none above 1.91e-6): the engine's matmuls round differently for
# different pack lengths. A job scored alone twice is bit-identical. 5e-6 keeps the check strict (scores of
# different documents differ by ~1e-2) without failing on float rounding; see the report to the engine owner.
PACKING_TOLERANCE = 5e-6


def scores_by_index(result: dict[str, Any] | Any) -> dict[int, float | None]:
    data = result if isinstance(result, dict) else result.model_dump(mode="json")
    return {r["index"]: r["relevance_score"] for r in data["results"]}


def assert_scores_equal_engine(engine: RerankEngine, job: dict[str, Any], result: dict[str, Any] | Any) -> None:
    """The result's scores are `engine.score` of the job alone (what `rerank-worker score` prints)."""
    from worker.messages import RerankJob

    parsed = RerankJob.model_validate(job)
    (expected,) = engine.score([parsed.to_score_request()])
    got = scores_by_index(result)
    assert sorted(got) == list(range(len(parsed.documents)))
    for i, want in enumerate(expected.scores):
        if want is None:
            assert got[i] is None, (job["job_id"], i)
        else:
            assert got[i] is not None, (job["job_id"], i)
            assert abs(got[i] - want) <= PACKING_TOLERANCE, (job["job_id"], i, got[i], want)
    data = result if isinstance(result, dict) else result.model_dump(mode="json")
    ranked = [r["relevance_score"] for r in data["results"] if r["relevance_score"] is not None]
    assert ranked == sorted(ranked, reverse=True)
    assert np.isfinite(ranked).all()


def answered(records: list[Any]) -> dict[str, list[Any]]:
    """job_id -> its result records (several after a redelivery)."""
    out: dict[str, list[Any]] = {}
    for r in records:
        out.setdefault(r.key.decode(), []).append(r)
    return out


def source_of(record: Any) -> tuple[int, int]:
    h = header_map(record.headers)
    return int(h["rerank.source.partition"]), int(h["rerank.source.offset"])


def value(record: Any) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(record.value)
    return data
