"""Shared by the pipeline tests: jobs on the tiny model, an engine that fails on cue, the GPU thread's stages."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

import orjson

from tests.engine_wrappers import ScoresAtResult
from worker.engine.api import EngineInfo, JobScores, PreparedJob, ScoreRequest
from worker.engine.engine import RerankEngine
from worker.messages import RerankJob
from worker.pipeline.batch import Batcher
from worker.pipeline.errors import Fatal
from worker.pipeline.metrics import WorkerMetrics
from worker.pipeline.records import Failure, Outgoing, SourceRecord, WorkItem
from worker.pipeline.score import Scorer
from worker.pipeline.sink import Outbox, WorkerSink
from worker.settings import Settings

SETTINGS = Settings(max_attempts=3, retry_initial_ms=1, retry_max_ms=2, batch_wait_ms=50)


def record(offset: int) -> SourceRecord:
    return SourceRecord("jobs", 0, offset, 0, 0, key=f"j{offset}".encode(), value=b"{}")


def item(engine: Any, offset: int, docs: Sequence[str], query: str = "what is a cat") -> WorkItem:
    job = RerankJob(job_id=f"j{offset}", query=query, documents=list(docs))
    return WorkItem(record(offset), job, prepared=engine.prepare(job.to_score_request()))


class Flaky(ScoresAtResult):
    """An engine that raises the scripted errors before scoring, and remembers what it was asked."""

    def __init__(
        self,
        inner: Any,
        errors: list[BaseException | None],
        poison: set[int] | None = None,
        *,
        can_shrink: bool = True,
        asked: list[int] | None = None,
    ) -> None:
        self.inner = inner
        self.errors = errors
        self.poison = poison if poison is not None else set()
        self.can_shrink = can_shrink
        self.asked = asked if asked is not None else []  # pack budgets asked for after running out of memory
        self.batches: list[int] = []
        self.budgets: list[int] = []

    @property
    def info(self) -> EngineInfo:
        info: EngineInfo = self.inner.info
        return info

    def prepare(self, request: ScoreRequest) -> PreparedJob:
        prepared: PreparedJob = self.inner.prepare(request)
        return prepared

    def score_prepared(self, jobs: Sequence[PreparedJob], *, batch_started: float | None = None) -> list[JobScores]:
        self.batches.append(len(jobs))
        self.budgets.append(self.info.max_pack_tokens)
        if any(id(j) in self.poison for j in jobs):
            raise ValueError("poisoned")
        if self.errors:
            error = self.errors.pop(0)
            if error is not None:
                raise error
        scored: list[JobScores] = self.inner.score_prepared(jobs)
        return scored

    def with_max_pack_tokens(self, max_pack_tokens: int) -> Flaky | None:
        self.asked.append(max_pack_tokens)
        smaller = self.inner.with_max_pack_tokens(max_pack_tokens) if self.can_shrink else None
        return None if smaller is None else Flaky(smaller, self.errors, self.poison, asked=self.asked)


class Harness:
    """The GPU thread's stages (not started): a batcher over a work queue, the scorer, the worker's outbox."""

    def __init__(self, engine: Any, settings: Settings = SETTINGS, owns: Any = lambda item: True) -> None:
        self.fatal = Fatal()
        self.outbox = Outbox(WorkerSink(settings, worker_id="w-1", model="m"), self.fatal)
        self.work: queue.Queue[WorkItem] = queue.Queue()
        self.metrics = WorkerMetrics()
        self.given_back: list[int] = []
        self.batcher = Batcher(
            self.work,
            budget_tokens=engine.info.max_pack_tokens * settings.batch_max_packs,
            wait_ms=settings.batch_wait_ms,
            owns=owns,
            give_back=lambda w: self.given_back.append(w.record.offset),
            stopping=threading.Event(),
        )
        self.scorer = Scorer(engine, self.batcher, self.outbox, settings, self.metrics, self.fatal)
        self.sent: list[Outgoing] = []

    def _take(self) -> list[Outgoing]:
        while not self.outbox.messages.empty():
            o = self.outbox.messages.get_nowait()
            assert o is not None
            self.sent.append(o)
        return self.sent

    @property
    def published(self) -> list[Outgoing]:
        return [o for o in self._take() if o.kind == "result"]

    @property
    def letters(self) -> list[tuple[str | None, Failure]]:
        return [(o.job_id, o.failure) for o in self._take() if o.kind == "dead_letter" and o.failure is not None]

    def scores(self) -> dict[str, list[float | None]]:
        out = {}
        for o in self.published:
            result = orjson.loads(o.value or b"")
            by_index = {r["index"]: r["relevance_score"] for r in result["results"]}
            out[result["job_id"]] = [by_index[i] for i in range(len(by_index))]
        return out


DOCS = ["cats purr", "dogs bark", "", "the moon is rock", "cats purr", "python is a language"]


def alone(engine: RerankEngine, docs: Sequence[str], query: str = "what is a cat") -> list[float | None]:
    (scored,) = engine.score([ScoreRequest(query=query, documents=list(docs))])
    return scored.scores
