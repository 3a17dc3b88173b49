"""The GPU thread's run loop: one batch queued ahead where queuing does not wait for the device, in order, and
nothing scored after a fatal error. Runs the real thread on the tiny model; the engine is wrapped only to log
when each batch is queued and waited for, and to say it queues without waiting, as the engine does on CUDA."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from tests.pipeline.stages import Harness
from worker.engine.api import EngineInfo, JobScores, PreparedJob, ScoreRequest
from worker.engine.engine import RerankEngine
from worker.messages import RerankJob
from worker.pipeline.records import Outgoing, SourceRecord, WorkItem
from worker.pipeline.score import FATAL_AFTER_FAILED_JOBS
from worker.settings import Settings

# one job per batch: each job below takes more than half of a batch's token budget (checked in `run_thread`)
ONE_JOB_PER_BATCH = Settings(batch_max_packs=1, batch_wait_ms=0, max_attempts=1)


class LoggedEngine:
    """The engine, logging ("submit" | "result", job) in call order. `device` is what `info` reports (the thread
    queues ahead only on CUDA); the forward runs at `result()`, as a queued batch's does; `fully_queued=False`
    stands for a batch of several packs; `fail` makes every result raise."""

    def __init__(self, inner: RerankEngine, *, device: str, fully_queued: bool = True, fail: bool = False) -> None:
        self.inner = inner
        self.device = device
        self.fully_queued = fully_queued
        self.fail = fail
        self.log: list[tuple[str, str]] = []
        self.names: dict[int, str] = {}

    @property
    def info(self) -> EngineInfo:
        return dataclasses.replace(self.inner.info, device=self.device)

    def prepare(self, request: ScoreRequest) -> PreparedJob:
        prepared = self.inner.prepare(request)
        self.names[id(prepared)] = request.query
        return prepared

    def score_prepared(self, jobs: Sequence[PreparedJob], *, batch_started: float | None = None) -> list[JobScores]:
        return self.submit(jobs).result()

    def submit(self, jobs: Sequence[PreparedJob], *, batch_started: float | None = None) -> Any:
        name = "+".join(self.names[id(j)] for j in jobs)
        self.log.append(("submit", name))

        def result() -> list[JobScores]:
            self.log.append(("result", name))
            if self.fail:
                raise RuntimeError("device lost")
            return self.inner.score_prepared(jobs)

        return SimpleNamespace(result=result, fully_queued=self.fully_queued, num_packs=1, passes=[])


def run_thread(engine: LoggedEngine, names: Sequence[str], until: Any) -> tuple[Harness, list[Outgoing], list[Any]]:
    """Queue one job per name, run the GPU thread until `until(published, letters, fatal)` holds, stop it."""
    h = Harness(engine, ONE_JOB_PER_BATCH)
    for offset, name in enumerate(names):
        job = RerankJob(job_id=name, query=name, documents=[f"document {i} " + "word " * 60 for i in range(30)])
        record = SourceRecord("jobs", 0, offset, 0, 0, key=name.encode(), value=b"{}")
        item = WorkItem(record, job, prepared=engine.prepare(job.to_score_request()))
        assert 2 * item.tokens > h.batcher.budget_tokens  # so that every batch holds one job
        h.work.put(item)
    h.scorer.start()
    deadline = time.monotonic() + 120
    while not until(h.published, h.letters, h.fatal.message) and time.monotonic() < deadline:
        time.sleep(0.01)
    h.batcher.stopping.set()
    h.scorer.join(timeout=60)
    assert not h.scorer.is_alive()
    fatal = [h.fatal.message] if h.fatal.message else []
    return h, h.published, [job_id for job_id, _ in h.letters] + fatal


def all_published(count: int) -> Any:
    return lambda published, letters, fatal: len(published) >= count


def test_on_cuda_the_next_batch_is_queued_before_the_one_on_the_device_is_waited_for(engine: RerankEngine) -> None:
    logged = LoggedEngine(engine, device="cuda:0")
    _, published, _ = run_thread(logged, ["a", "b", "c"], all_published(3))
    assert logged.log == [
        ("submit", "a"),
        ("submit", "b"),
        ("result", "a"),
        ("submit", "c"),
        ("result", "b"),
        ("result", "c"),
    ]
    assert [o.key for o in published] == [b"a", b"b", b"c"]  # results in order


@pytest.mark.parametrize(
    ("device", "fully_queued"),
    [("cpu", True), ("cuda:0", False)],
    ids=["cpu-forward-runs-in-submit", "batch-of-several-packs"],
)
def test_each_batch_is_waited_for_before_the_next_is_queued_where_queuing_ahead_would_delay_it(
    engine: RerankEngine, device: str, fully_queued: bool
) -> None:
    logged = LoggedEngine(engine, device=device, fully_queued=fully_queued)
    _, published, _ = run_thread(logged, ["a", "b", "c"], all_published(3))
    assert logged.log == [(step, name) for name in "abc" for step in ("submit", "result")]
    assert [o.key for o in published] == [b"a", b"b", b"c"]


def test_after_a_fatal_error_the_batch_queued_behind_is_neither_scored_nor_dead_lettered(
    engine: RerankEngine,
) -> None:
    logged = LoggedEngine(engine, device="cuda:0", fail=True)
    names = ["a", "b", "c", "d", "e"]
    h, published, outcome = run_thread(logged, names, lambda published, letters, fatal: bool(fatal))
    failed = names[:FATAL_AFTER_FAILED_JOBS]
    assert published == []
    assert outcome[:-1] == failed  # each failed alone and was dead-lettered, then the thread gave up once
    assert "jobs in a row failed" in outcome[-1]
    queued_behind = names[FATAL_AFTER_FAILED_JOBS]
    assert ("submit", queued_behind) in logged.log  # it was on the device ...
    assert ("result", queued_behind) not in logged.log  # ... and never waited for, published or dead-lettered
    left = [w.job.job_id for w in h.scorer.drain()]
    assert left == names[FATAL_AFTER_FAILED_JOBS:]  # not committed: the next owner of the partition scores them
