"""What moves between the stages: a `SourceRecord` read from Kafka becomes a `WorkItem` (parsed, then tokenized),
leaves as an `Outgoing` message (its result or dead letter), and comes back to the consumer thread as `Finished`.

    consume -> SourceRecord -> parse -> WorkItem -> tokenize -> WorkItem.prepared -> batch -> score
    score -> Outgoing -> publish -> Finished -> commit

Plain data, no Kafka calls and no thread of their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from kafka.structs import TopicPartition

from worker.engine.api import PreparedJob
from worker.messages import RerankJob
from worker.pipeline.errors import Category, error_class, is_transient, one_line, reason_of

Headers = list[tuple[str, bytes]]

# Inbound headers whose value becomes the result's correlation id (first found wins); else the job_id.
CORRELATION_HEADERS = ("rerank.correlation.id", "correlation-id", "correlation_id", "x-correlation-id")


@dataclass(frozen=True)
class SourceRecord:
    """Where a job came from: enough to commit it, dead-letter it byte for byte, and say so in headers."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def from_consumer_record(cls, record: Any) -> Self:
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp=record.timestamp if record.timestamp is not None else -1,
            timestamp_type=record.timestamp_type if record.timestamp_type is not None else -1,
            key=record.key,
            value=record.value,
            headers=tuple(record.headers or ()),
        )

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def where(self) -> str:
        """`topic[partition]@offset`, the form every log line uses."""
        return f"{self.topic}[{self.partition}]@{self.offset}"

    @property
    def key_text(self) -> str | None:
        """The key as text: producers key jobs by job_id, so it names a job that could not be parsed."""
        return self.key.decode("utf-8", "replace") if self.key else None

    def header(self, *names: str) -> bytes | None:
        wanted = {n.lower() for n in names}
        for key, value in self.headers:
            if key.lower() in wanted:
                return value
        return None

    def correlation_id(self, job_id: str | None) -> str:
        for name in CORRELATION_HEADERS:
            value = self.header(name)
            if value:
                return value.decode("utf-8", "replace")
        return job_id or ""


@dataclass
class WorkItem:
    """A parsed job on its way through the pipeline: `prepared` once tokenized. `assignment`: which assignment of
    its partition it was polled under (the consumer thread numbers them): after a partition is revoked and assigned
    back (every eager rebalance does that), items of an older assignment are stale and skipped."""

    record: SourceRecord
    job: RerankJob
    prepared: PreparedJob | None = None
    assignment: int = 0
    polled_at: float = field(default_factory=time.monotonic)  # for rerank_queue_wait_seconds

    @property
    def tokens(self) -> int:
        """What the job puts through the model (the engine's count): a batch's token budget adds these up."""
        if self.prepared is None:
            raise RuntimeError("a job reached batching untokenized. This is a bug.")
        return self.prepared.tokens


@dataclass(frozen=True)
class Failure:
    """Why a job is rejected (dead-lettered by the worker, skipped by a replay)."""

    reason: str  # slug: not_json, out_of_memory, ...
    category: Category
    stage: str  # validate, prepare, score, publish
    error_class: str  # fully qualified exception class
    message: str
    attempts: int = 1

    @classmethod
    def of(cls, error: BaseException, *, stage: str, attempts: int = 1) -> Failure:
        """The Failure of an exception, its reason and category decided by the exception's class; a
        `PermanentError`'s own stage wins over `stage`."""
        return cls(
            reason=reason_of(error),
            category="transient" if is_transient(error) else "permanent",
            stage=getattr(error, "stage", stage),
            error_class=error_class(error),
            message=one_line(error),
            attempts=attempts,
        )


@dataclass
class Outgoing:
    """One message to publish; its acknowledgement finishes `record`."""

    kind: Literal["result", "dead_letter"]
    record: SourceRecord
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)
    job_id: str | None = None
    failure: Failure | None = None
    documents: int = 0


@dataclass(frozen=True)
class Finished:
    """A record back at the consumer thread: done (its answer acknowledged, or nothing to send), or, when
    `given_back`, not scored here (its partition was revoked under `assignment`: the next owner reads it again).
    Exactly-once: `message` is its answer, not sent yet: it goes out in the transaction that commits its offset."""

    record: SourceRecord
    given_back: bool = False
    assignment: int = 0
    message: Outgoing | None = None
