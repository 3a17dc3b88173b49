"""The GPU thread's batching and error policy, and the publisher's retries, on the tiny model and fake producers."""

from __future__ import annotations

import queue
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, TopicAuthorizationFailedError

from tests.engine_wrappers import ScoresAtResult
from worker.engine import EngineInfo, JobScores, RerankEngine, ScoreRequest
from worker.engine.plan import PreparedJob
from worker.kafka.deadletter import dead_letter, header_map
from worker.kafka.metrics import WorkerMetrics
from worker.kafka.publish import Publisher
from worker.kafka.records import Failure, Outgoing, SourceRecord, WorkItem
from worker.kafka.scoring import Scorer, engine_with_budget
from worker.messages import RerankJob, RerankResult
from worker.settings import Settings

SETTINGS = Settings(max_attempts=3, retry_initial_ms=1, retry_max_ms=2, batch_wait_ms=50)


def record(offset: int) -> SourceRecord:
    return SourceRecord("jobs", 0, offset, 0, 0, key=f"j{offset}".encode(), value=b"{}")


def item(engine: Any, offset: int, docs: Sequence[str], query: str = "what is a cat") -> WorkItem:
    job = RerankJob(job_id=f"j{offset}", query=query, documents=list(docs))
    w = WorkItem(record(offset), job)
    w.prepare(engine)
    return w


class Flaky(ScoresAtResult):
    """An engine that raises the scripted errors before scoring, and remembers what it was asked."""

    def __init__(self, inner: Any, errors: list[BaseException | None], poison: set[int] | None = None) -> None:
        self.inner = inner
        self.errors = errors
        self.poison = poison if poison is not None else set()
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
        self.budgets.append(self.info.max_batch_tokens)
        if any(id(j) in self.poison for j in jobs):
            raise ValueError("poisoned")
        if self.errors:
            error = self.errors.pop(0)
            if error is not None:
                raise error
        scored: list[JobScores] = self.inner.score_prepared(jobs)
        return scored


class Harness:
    def __init__(self, engine: Any, settings: Settings = SETTINGS, **kwargs: Any) -> None:
        self.published: list[Outgoing] = []
        self.letters: list[tuple[WorkItem, Failure]] = []
        self.fatal: list[str] = []
        self.work: queue.Queue[WorkItem] = queue.Queue()
        self.metrics = WorkerMetrics()
        self.scorer = Scorer(
            engine,
            self.work,
            publish=self.published.append,
            dead_letter=lambda w, f: self.letters.append((w, f)),
            settings=settings,
            metrics=self.metrics,
            worker_id="w-1",
            on_fatal=self.fatal.append,
            **kwargs,
        )

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


def test_batch_scores_equal_scoring_alone(engine: RerankEngine) -> None:
    h = Harness(engine)
    items = [item(engine, i, [*DOCS[i % 3 :], f"doc {i}"], query=f"query {i}") for i in range(5)]
    for w in items:
        h.work.put(w)
    batch = h.scorer.gather()
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
    assert h.metrics.batch_seconds.count == 1
    assert 0 < h.metrics.pack_fill.value() <= 1


def test_budget_pushes_back_the_job_that_would_overflow(engine: RerankEngine) -> None:
    h = Harness(engine, Settings(batch_max_packs=1, batch_wait_ms=50))
    budget = engine.info.max_batch_tokens
    items = [item(engine, i, [f"word {j} " * 20 for j in range(12)]) for i in range(6)]
    per_job = items[0].tokens
    for w in items:
        h.work.put(w)
    sizes = []
    while not h.work.empty() or h.scorer._carry:
        batch = h.scorer.gather()
        sizes.append(len(batch))
        assert sum(w.tokens for w in batch) <= budget or len(batch) == 1
    assert sum(sizes) == 6
    assert max(sizes) == budget // per_job  # as many as fit, the next one waits


def test_out_of_memory_halves_the_budget_then_succeeds(engine: RerankEngine) -> None:
    oom = torch.cuda.OutOfMemoryError
    errors: list[BaseException | None] = [oom("CUDA out of memory"), oom("CUDA out of memory")]
    flaky = Flaky(engine, errors)
    asked: list[int] = []

    def shrink(e: Any, tokens: int) -> Any:
        asked.append(tokens)
        smaller = engine_with_budget(engine, tokens)
        return None if smaller is None else Flaky(smaller, errors)

    h = Harness(flaky, shrink=shrink)
    w = item(engine, 0, DOCS)
    h.scorer.score_batch([w])
    assert asked == [2048, 1024]  # halved on each out-of-memory; 1024 cannot hold one prompt: kept 2048
    assert not h.letters
    assert len(h.published) == 1
    np.testing.assert_allclose(
        np.array(h.scores()["j0"], dtype=float), np.array(alone(engine, DOCS), dtype=float), atol=1e-6
    )
    assert orjson.loads(h.published[0].value or b"")["meta"]["max_batch_tokens"] == 2048
    assert h.metrics.retries.value(reason="out_of_memory") == 2


def test_out_of_memory_every_time_dead_letters_with_attempts(engine: RerankEngine) -> None:
    flaky = Flaky(engine, [torch.cuda.OutOfMemoryError("CUDA out of memory")] * 10)
    h = Harness(flaky, shrink=lambda e, t: None)
    items = [item(engine, i, DOCS) for i in range(2)]
    h.scorer.score_batch(items)
    assert len(flaky.batches) == SETTINGS.max_attempts
    assert [(w.job.job_id, f.reason, f.category, f.attempts, f.stage) for w, f in h.letters] == [
        ("j0", "out_of_memory", "transient", 3, "score"),
        ("j1", "out_of_memory", "transient", 3, "score"),
    ]
    assert not h.published
    assert h.metrics.retries.value(reason="out_of_memory") == SETTINGS.max_attempts - 1  # the last try is not retried


def test_a_poison_job_is_isolated_and_dead_lettered(engine: RerankEngine) -> None:
    items = [item(engine, i, DOCS) for i in range(3)]
    flaky = Flaky(engine, [], poison={id(items[1].prepared)})
    h = Harness(flaky)
    h.scorer.score_batch(items)
    assert flaky.batches == [3, 1, 1, 1]  # the batch, then each job alone
    assert sorted(h.scores()) == ["j0", "j2"]
    ((w, f),) = h.letters
    assert (w.job.job_id, f.reason, f.category) == ("j1", "scoring_error", "permanent")
    assert f.error_class == "builtins.ValueError"
    assert not h.fatal


def test_many_jobs_failing_alone_is_fatal(engine: RerankEngine) -> None:
    items = [item(engine, i, DOCS) for i in range(3)]
    flaky = Flaky(engine, [], poison={id(w.prepared) for w in items})
    h = Harness(flaky)
    for w in items:
        h.scorer.score_batch([w])
    assert len(h.letters) == 3
    assert len(h.fatal) == 1
    assert "broken" in h.fatal[0]


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
    ((w, f),) = h.letters
    assert w is unwritable
    assert (f.reason, f.category, f.stage) == ("result_not_serializable", "permanent", "publish")
    assert "RecursionError" in f.error_class
    assert [o.job_id for o in h.published] == [fine.job.job_id]
    assert not h.fatal


def test_jobs_no_longer_owned_are_skipped_and_reported(engine: RerankEngine) -> None:
    owned = {0, 3}
    skipped: list[int] = []
    h = Harness(engine, Settings(batch_max_packs=1), owned=lambda w: w.record.offset in owned)
    h.scorer.on_skipped = lambda w: skipped.append(w.record.offset)
    big = [f"word {j} " * 20 for j in range(40)]  # more than half of a pass: two never share a batch
    for i, docs in enumerate([big, DOCS, DOCS, big]):
        h.work.put(item(engine, i, docs))
    assert h.work.queue[0].tokens > engine.info.max_batch_tokens // 2
    assert [w.record.offset for w in h.scorer.gather()] == [0]  # 3 was pushed back to open the next batch
    assert skipped == [1, 2]
    owned.discard(3)  # its partition was revoked meanwhile: the job pushed back is skipped too
    assert h.scorer.gather(first_wait_s=0.0) == []
    assert skipped == [1, 2, 3]


# -- publisher --------------------------------------------------------------------------------------------------


class Future:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    def get(self, timeout: float | None = None) -> str:
        if self.error is not None:
            raise self.error
        return "acknowledged"


class Producer:
    """Answers each send with the next scripted outcome: None (acknowledged), an error in the future, or
    ("raise", error) raised by send itself."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    def send(self, topic: str, *, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> Future:
        self.sent.append((topic, key, value, headers))
        outcome = self.script.pop(0) if self.script else None
        if isinstance(outcome, tuple):
            raise outcome[1]
        return Future(outcome)


def publisher(producer: Producer) -> tuple[Publisher, list[Outgoing], list[str]]:
    done: list[Outgoing] = []
    fatal: list[str] = []
    p = Publisher(
        producer,
        queue.Queue(),
        SETTINGS,
        WorkerMetrics(),
        on_done=done.append,
        redirect=lambda o, failure: dead_letter(
            o.record, failure, topic="dlq", group_id="g", worker_id="w", model="m", job_id=o.job_id
        ),
        on_fatal=fatal.append,
        sleep=lambda s: None,
    )
    return p, done, fatal


def result(offset: int = 7) -> Outgoing:
    return Outgoing("result", record(offset), "results", b"j", b'{"job_id":"j"}', job_id="j", documents=3)


def test_transient_publish_failure_is_retried() -> None:
    producer = Producer([KafkaTimeoutError("no ack"), KafkaTimeoutError("no ack"), None])
    p, done, fatal = publisher(producer)
    o = result()
    p.settle(o, p._send(o))
    assert done == [o]
    assert not fatal
    assert [t for t, *_ in producer.sent] == ["results"] * 3
    assert p.metrics.retries.value(reason="produce_timeout") == 2
    assert p.metrics.jobs.value(outcome="result") == 1
    assert p.metrics.documents.value() == 3


def test_result_failing_every_try_is_dead_lettered_with_attempts() -> None:
    producer = Producer([KafkaTimeoutError("no ack")] * 3 + [None])
    p, done, _fatal = publisher(producer)
    o = result()
    p.settle(o, p._send(o))
    ((letter),) = done
    assert letter.kind == "dead_letter"
    assert letter.record == o.record
    h = header_map(letter.headers)
    assert (h["rerank.error.reason"], h["rerank.error.category"], h["rerank.attempts"]) == (
        "produce_timeout",
        "transient",
        "3",
    )
    assert letter.value == o.record.value  # the job's original bytes, not the result
    assert [t for t, *_ in producer.sent] == ["results"] * 3 + ["dlq"]


def test_rejected_results_are_dead_lettered_at_once() -> None:
    for error, reason in [
        (("raise", MessageSizeTooLargeError("too big")), "result_too_large"),
        (TopicAuthorizationFailedError("no"), "publish_rejected"),
    ]:
        producer = Producer([error, None])
        p, done, _fatal = publisher(producer)
        o = result()
        p.settle(o, p._send(o))
        assert header_map(done[0].headers)["rerank.error.reason"] == reason
        assert len(producer.sent) == 2  # no retry of a permanent refusal


def test_dead_letter_too_large_goes_without_value() -> None:
    producer = Producer([MessageSizeTooLargeError("too big"), None])
    p, done, _fatal = publisher(producer)
    failure = Failure("message_too_large", "permanent", "validate", "x.Y", "big")
    letter = dead_letter(record(1), failure, topic="dlq", group_id="g", worker_id="w", model="m", job_id=None)
    p.settle(letter, p._send(letter))
    assert done[0].value == b""
    assert "rerank.original.value.dropped" in header_map(done[0].headers)


def test_dead_letter_too_large_without_its_value_goes_without_the_original_headers() -> None:
    """A bad job whose own headers fill most of the size limit: without its value the dead letter is still too large
    (kafka-python counts headers); it must not become fatal (the job would be redelivered into the same failure)."""
    producer = Producer([MessageSizeTooLargeError("too big"), MessageSizeTooLargeError("still too big"), None])
    p, done, fatal = publisher(producer)
    failure = Failure("not_json", "permanent", "validate", "x.Y", "bad")
    big = replace(record(1), headers=(("trace", b"a" * 1000), ("tenant", b"t")))
    letter = dead_letter(big, failure, topic="dlq", group_id="g", worker_id="w", model="m", job_id=None)
    p.settle(letter, p._send(letter))
    assert not fatal
    (sent,) = done
    headers = header_map(sent.headers)
    assert sent.value == b""
    assert "trace" not in headers
    assert "tenant" not in headers
    assert headers["rerank.original.headers.dropped"] == "2"
    assert headers["rerank.error.reason"] == "not_json"
    assert "rerank.original.value.dropped" in headers


def test_unpublishable_dead_letter_is_fatal_and_not_done() -> None:
    producer = Producer([KafkaTimeoutError("down")] * 10)
    p, done, fatal = publisher(producer)
    failure = Failure("not_json", "permanent", "validate", "x.Y", "bad")
    letter = dead_letter(record(1), failure, topic="dlq", group_id="g", worker_id="w", model="m", job_id=None)
    p.settle(letter, p._send(letter))
    assert not done
    assert len(fatal) == 1
    assert "dead-letter topic" in fatal[0]


def test_publisher_thread_sends_everything_before_stopping() -> None:
    producer = Producer([])
    p, done, _fatal = publisher(producer)
    outs = [result(i) for i in range(5)]
    for o in outs:
        p.outbox.put(o)
    p.outbox.put(None)
    p.start()
    p.join(5)
    assert not p.is_alive()
    assert done == outs
