"""The batcher: one token budget, the job that would overflow pushed back, jobs no longer owned given back."""

from __future__ import annotations

from tests.pipeline.stages import DOCS, Harness, item
from worker.engine.engine import RerankEngine
from worker.settings import Settings


def test_budget_pushes_back_the_job_that_would_overflow(engine: RerankEngine) -> None:
    h = Harness(engine, Settings(batch_max_packs=1, batch_wait_ms=50))
    budget = engine.info.max_pack_tokens
    items = [item(engine, i, [f"word {j} " * 20 for j in range(12)]) for i in range(6)]
    per_job = items[0].tokens
    for w in items:
        h.work.put(w)
    sizes = []
    while not h.work.empty() or h.batcher.carry:
        batch = h.batcher.gather()
        sizes.append(len(batch))
        assert sum(w.tokens for w in batch) <= budget or len(batch) == 1
    assert sum(sizes) == 6
    assert max(sizes) == budget // per_job  # as many as fit, the next one waits


def test_jobs_no_longer_owned_are_given_back(engine: RerankEngine) -> None:
    owned = {0, 3}
    h = Harness(engine, Settings(batch_max_packs=1), owns=lambda w: w.record.offset in owned)
    skipped = h.given_back
    big = [f"word {j} " * 20 for j in range(40)]  # more than half of a pass: two never share a batch
    for i, docs in enumerate([big, DOCS, DOCS, big]):
        h.work.put(item(engine, i, docs))
    assert h.work.queue[0].tokens > engine.info.max_pack_tokens // 2
    assert [w.record.offset for w in h.batcher.gather()] == [0]  # 3 was pushed back to open the next batch
    assert skipped == [1, 2]
    owned.discard(3)  # its partition was revoked meanwhile: the job pushed back is skipped too
    assert h.batcher.gather(first_wait_s=0.0) == []
    assert skipped == [1, 2, 3]
