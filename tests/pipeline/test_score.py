"""The GPU thread's error policy on the tiny model: out of memory, poison jobs, unwritable results."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
import torch

from tests.pipeline.stages import DOCS, SETTINGS, Flaky, Harness, alone, item
from worker.engine.engine import RerankEngine
from worker.messages import RerankResult
from worker.pipeline.deadletter import header_map
from worker.settings import Settings


def test_batch_scores_equal_scoring_alone(engine: RerankEngine) -> None:
    h = Harness(engine)
    items = [item(engine, i, [*DOCS[i % 3 :], f"doc {i}"], query=f"query {i}") for i in range(5)]
    for w in items:
        h.work.put(w)
    batch = h.batcher.gather()
    assert len(batch) == 5  # small jobs share one batch (and its packs)
    h.scorer.score_batch(batch)
    got = h.scores()
    for w in items:
        expected = alone(engine, w.job.document_texts(), w.job.query)  # type: ignore[arg-type]
        np.testing.assert_allclose(np.array(got[w.job.job_id], dtype=float), np.array(expected, dtype=float), atol=5e-6)
    out = h.published[0]
    assert out.topic == "rerank.results"
    assert out.key == b"j0"
    assert header_map(out.headers)["rerank.source.offset"] == "0"
    assert header_map(out.headers)["rerank.correlation.id"] == "j0"
    assert h.metrics.sample("rerank_batch_seconds_count") == 1
    assert 0 < h.metrics.sample("rerank_pack_fill_ratio") <= 1


def test_out_of_memory_halves_the_budget_then_succeeds(engine: RerankEngine) -> None:
    oom = torch.cuda.OutOfMemoryError
    errors: list[BaseException | None] = [oom("CUDA out of memory"), oom("CUDA out of memory")]
    flaky = Flaky(engine, errors)
    h = Harness(flaky)
    w = item(engine, 0, DOCS)
    h.scorer.score_batch([w])
    assert flaky.asked == [2048, 1024]  # halved on each out-of-memory; 1024 cannot hold one prompt: kept 2048
    assert not h.letters
    assert len(h.published) == 1
    np.testing.assert_allclose(
        np.array(h.scores()["j0"], dtype=float), np.array(alone(engine, DOCS), dtype=float), atol=1e-6
    )
    assert orjson.loads(h.published[0].value or b"")["meta"]["max_pack_tokens"] == 2048
    assert h.metrics.sample("rerank_retries_total", reason="out_of_memory") == 2


def test_out_of_memory_every_time_dead_letters_with_attempts(engine: RerankEngine) -> None:
    flaky = Flaky(engine, [torch.cuda.OutOfMemoryError("CUDA out of memory")] * 10, can_shrink=False)
    h = Harness(flaky)
    items = [item(engine, i, DOCS) for i in range(2)]
    h.scorer.score_batch(items)
    assert len(flaky.batches) == SETTINGS.max_attempts
    assert [(job_id, f.reason, f.category, f.attempts, f.stage) for job_id, f in h.letters] == [
        ("j0", "out_of_memory", "transient", 3, "score"),
        ("j1", "out_of_memory", "transient", 3, "score"),
    ]
    assert not h.published
    assert (
        h.metrics.sample("rerank_retries_total", reason="out_of_memory") == SETTINGS.max_attempts - 1
    )  # the last try is not retried


def test_a_poison_job_is_isolated_and_dead_lettered(engine: RerankEngine) -> None:
    items = [item(engine, i, DOCS) for i in range(3)]
    flaky = Flaky(engine, [], poison={id(items[1].prepared)})
    h = Harness(flaky)
    h.scorer.score_batch(items)
    assert flaky.batches == [3, 1, 1, 1]  # the batch, then each job alone
    assert sorted(h.scores()) == ["j0", "j2"]
    ((job_id, f),) = h.letters
    assert (job_id, f.reason, f.category) == ("j1", "scoring_error", "permanent")
    assert f.error_class == "builtins.ValueError"
    assert not h.fatal.is_set()


def test_many_jobs_failing_alone_is_fatal(engine: RerankEngine) -> None:
    items = [item(engine, i, DOCS) for i in range(3)]
    flaky = Flaky(engine, [], poison={id(w.prepared) for w in items})
    h = Harness(flaky)
    for w in items:
        h.scorer.score_batch([w])
    assert len(h.letters) == 3
    assert h.fatal.message is not None
    assert "broken" in h.fatal.message


def test_result_too_large_is_dead_lettered(engine: RerankEngine) -> None:
    h = Harness(engine, Settings(max_message_bytes=300))
    h.scorer.score_batch([item(engine, 0, DOCS)])
    ((_w, f),) = h.letters
    assert (f.reason, f.stage) == ("result_too_large", "publish")
    assert not h.published


def test_a_result_that_cannot_be_written_is_dead_lettered_and_the_thread_goes_on(
    engine: RerankEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(engine)
    unwritable, fine = item(engine, 0, DOCS), item(engine, 1, DOCS)
    from_scores = RerankResult.from_scores

    def failing_for_the_first(job: Any, *args: Any, **kwargs: Any) -> RerankResult:
        if job is unwritable.job:
            raise RecursionError("maximum recursion depth exceeded")
        return from_scores(job, *args, **kwargs)

    monkeypatch.setattr(RerankResult, "from_scores", failing_for_the_first)
    h.scorer.score_batch([unwritable, fine])
    ((job_id, f),) = h.letters
    assert job_id == unwritable.job.job_id
    assert (f.reason, f.category, f.stage) == ("result_not_serializable", "permanent", "publish")
    assert "RecursionError" in f.error_class
    assert [o.job_id for o in h.published] == [fine.job.job_id]
    assert not h.fatal.is_set()
