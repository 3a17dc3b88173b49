"""Where a job leaves the pipeline: its result message, or what becomes of it when it cannot be answered.

A `Sink` is the policy that differs between the worker and a replay; `Outbox` applies it for every stage:
- `WorkerSink`: results to RERANK_RESULTS_TOPIC (or the job's allowed `reply_topic`); a job that cannot be answered
  is dead-lettered (worker.pipeline.deadletter).
- `ReplaySink`: results to the replay's topic, marked as replays (`replay` in the result, `rerank.replay.*`
  headers); a bad job is skipped and counted by reason (the workers dead-lettered it when they first read it, and a
  second dead letter would make `dlq requeue` send it twice); a transient failure that outlived its retries ends
  the replay.

Every thread hands its messages to the `Outbox`: the consumer thread (parse and tokenize rejections), the GPU thread
(results, scoring failures) and the publisher thread (a result that could not be published). Messages go to the
publisher thread; a record with nothing to send goes straight back to the consumer thread as finished.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import orjson

from worker.engine.api import EngineInfo, JobScores
from worker.messages import ReplayInfo, RerankResult
from worker.pipeline.deadletter import dead_letter
from worker.pipeline.errors import Fatal, FatalError, PermanentError, error_class, one_line
from worker.pipeline.logs import job_fields
from worker.pipeline.records import Failure, Finished, Headers, Outgoing, SourceRecord, WorkItem
from worker.settings import Settings

log = logging.getLogger(__name__)


class Sink(Protocol):
    def result(self, item: WorkItem, scored: JobScores, engine: EngineInfo) -> Outgoing:
        """The result message of a scored job; PermanentError (stage publish) when it cannot be written."""
        ...

    def reject(self, record: SourceRecord, failure: Failure, job_id: str | None) -> Outgoing | None:
        """What becomes of a job that cannot be answered: its dead letter, or None (nothing to send). Raises
        FatalError when the run must stop instead."""
        ...


def encode_result(result: Callable[[], RerankResult], *, max_message_bytes: int) -> bytes:
    """The JSON of the result `result()` builds, or PermanentError (stage publish) when it cannot be written
    (`result_not_serializable`, raised from the cause: the job's own data, such as its metadata, can do that) or is
    too large (`result_too_large`). Either way that job fails, not the thread that scores it."""
    try:
        value = orjson.dumps(result().model_dump(mode="json"))
    except Exception as e:
        message = f"the result cannot be written: {one_line(e)}"
        raise PermanentError("result_not_serializable", message, stage="publish") from e
    if len(value) > max_message_bytes:
        message = f"result of {len(value)} bytes exceeds RERANK_MAX_MESSAGE_BYTES={max_message_bytes}"
        raise PermanentError("result_too_large", message, stage="publish")
    return value


def source_headers(record: SourceRecord, job_id: str, *, worker_id: str, model: str) -> Headers:
    """Headers every result carries: where its job was read, who scored it, with which model."""
    return [
        ("rerank.correlation.id", record.correlation_id(job_id).encode()),
        ("rerank.source.topic", record.topic.encode()),
        ("rerank.source.partition", str(record.partition).encode()),
        ("rerank.source.offset", str(record.offset).encode()),
        ("rerank.worker.id", worker_id.encode()),
        ("rerank.model", model.encode()),
        ("content-type", b"application/json"),
    ]


def result_message(item: WorkItem, topic: str, value: bytes, headers: Headers) -> Outgoing:
    """A job's result as the message to publish: keyed by its job_id."""
    job = item.job
    return Outgoing(
        kind="result",
        record=item.record,
        topic=topic,
        key=job.job_id.encode(),
        value=value,
        headers=headers,
        job_id=job.job_id,
        documents=len(job.documents),
    )


class WorkerSink:
    def __init__(self, settings: Settings, *, worker_id: str, model: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.model = model

    def result(self, item: WorkItem, scored: JobScores, engine: EngineInfo) -> Outgoing:
        job = item.job
        value = encode_result(
            lambda: RerankResult.from_scores(job, scored, engine), max_message_bytes=self.settings.max_message_bytes
        )
        headers = source_headers(item.record, job.job_id, worker_id=self.worker_id, model=engine.model)
        return result_message(item, job.reply_topic or self.settings.results_topic, value, headers)

    def reject(self, record: SourceRecord, failure: Failure, job_id: str | None) -> Outgoing:
        log.debug("dead-lettering: %s", failure.message, extra=job_fields(record, job_id, reason=failure.reason))
        s = self.settings
        return dead_letter(
            record,
            failure,
            topic=s.dlq_topic,
            group_id=s.group_id,
            worker_id=self.worker_id,
            model=self.model,
            job_id=job_id,
        )


class ReplaySink:
    def __init__(self, settings: Settings, *, replay_id: str, reply_topic: str, worker_id: str) -> None:
        self.settings = settings
        self.replay_id = replay_id
        self.reply_topic = reply_topic
        self.worker_id = worker_id
        self._lock = threading.Lock()  # skips are counted from the consumer, GPU and publisher threads
        self._skipped: Counter[str] = Counter()

    @property
    def skipped(self) -> Counter[str]:
        with self._lock:
            return Counter(self._skipped)

    def result(self, item: WorkItem, scored: JobScores, engine: EngineInfo) -> Outgoing:
        record, job = item.record, item.job
        replay = ReplayInfo(
            replay_id=self.replay_id,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            source_timestamp=record.timestamp,
        )
        value = encode_result(
            lambda: RerankResult.from_scores(job, scored, engine, replay=replay),
            max_message_bytes=self.settings.max_message_bytes,
        )
        headers = [
            ("rerank.replay", b"true"),
            ("rerank.replay.id", self.replay_id.encode()),
            ("rerank.source.timestamp", str(record.timestamp).encode()),
            *source_headers(record, job.job_id, worker_id=self.worker_id, model=engine.model),
        ]
        return result_message(item, self.reply_topic, value, headers)

    def reject(self, record: SourceRecord, failure: Failure, job_id: str | None) -> None:
        if failure.category == "transient" and failure.stage == "publish":
            raise FatalError(
                f"cannot publish replayed results to {self.reply_topic!r} after {failure.attempts} tries: "
                f"{failure.message}"
            )
        if failure.category == "transient":
            raise FatalError(f"{failure.reason} on {record.where} after {failure.attempts} tries: {failure.message}")
        with self._lock:
            self._skipped[failure.reason] += 1
        log.warning("skipped: %s", failure.message, extra=job_fields(record, job_id, reason=failure.reason))
        return None


class Outbox:
    """Applies the sink for every stage: `messages` is the publisher thread's queue (None closes it), `finished`
    the consumer thread's. `transactional` (exactly-once): messages go to the consumer thread with their record
    instead, to be sent in the transaction that commits the record's offset (worker.pipeline.transact)."""

    def __init__(self, sink: Sink, fatal: Fatal, *, transactional: bool = False) -> None:
        self.sink = sink
        self.fatal = fatal
        self.transactional = transactional
        self.messages: queue.Queue[Outgoing | None] = queue.Queue()
        self.finished: queue.Queue[Finished] = queue.Queue()

    def send(self, message: Outgoing) -> None:
        if self.transactional:
            self.finished.put(Finished(message.record, message=message))
        else:
            self.messages.put(message)

    def result(self, item: WorkItem, scored: JobScores, engine: EngineInfo) -> None:
        """Queue a scored job's result; a result that cannot be written rejects the job instead."""
        try:
            message = self.sink.result(item, scored, engine)
        except PermanentError as e:
            failure = Failure.of(e, stage="publish")
            if e.__cause__ is not None:  # the error that made the result unwritable, as the failure's class
                failure = replace(failure, error_class=error_class(e.__cause__))
            self.reject(item.record, failure, item.job.job_id)
            return
        self.send(message)

    def reject(self, record: SourceRecord, failure: Failure, job_id: str | None) -> None:
        try:
            letter = self.sink.reject(record, failure, job_id)
        except FatalError as e:
            self.fatal.fail(str(e))  # not finished: never committed
            return
        if letter is None:
            self.finished.put(Finished(record))
        else:
            self.send(letter)

    def acknowledged(self, message: Outgoing) -> None:
        self.finished.put(Finished(message.record))

    def give_back(self, item: WorkItem) -> None:
        self.finished.put(Finished(item.record, given_back=True, assignment=item.assignment))

    def close(self) -> None:
        """After everything already queued: the publisher thread sends it all, then ends."""
        self.messages.put(None)
