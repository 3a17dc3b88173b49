"""The values that flow between the three threads: consumer -> GPU (WorkItem), GPU/consumer -> publisher
(Outgoing), publisher -> consumer (the SourceRecord of a finished job, through the completions queue)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from worker.engine import EngineInfo, JobScores, ScoreRequest
from worker.engine.plan import PreparedJob
from worker.kafka.errors import Category, PermanentError, one_line
from worker.messages import RerankJob, RerankResult, parse_job

Headers = list[tuple[str, bytes]]

# Inbound headers whose value becomes the result's correlation id (first found wins); else the job_id.
CORRELATION_HEADERS = ("rerank.correlation.id", "correlation-id", "correlation_id", "x-correlation-id")
# The Qwen3 prompt suffix is 9 tokens (FACTS.md). Used only to estimate a batch's tokens before packing.
SUFFIX_TOKENS_ESTIMATE = 9


class Submitted(Protocol):
    """A batch queued on the device (`RerankEngine.submit` returns a `ScoringBatch`)."""

    @property
    def fully_queued(self) -> bool: ...

    def result(self) -> list[JobScores]: ...


class Engine(Protocol):
    """What the loop needs of RerankEngine (tests pass wrappers that inject failures and delays)."""

    @property
    def info(self) -> EngineInfo: ...

    def prepare(self, request: ScoreRequest) -> PreparedJob: ...

    def score_prepared(self, jobs: Sequence[PreparedJob], *, batch_started: float | None = None) -> list[JobScores]: ...

    def submit(self, jobs: Sequence[PreparedJob], *, batch_started: float | None = None) -> Submitted: ...


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
    def from_consumer_record(cls, record: Any) -> SourceRecord:
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

    def parse_job(self, *, max_message_bytes: int, max_docs: int) -> RerankJob:
        """The job this record carries, or PermanentError / InvalidJobError saying why it can never be one."""
        size = len(self.value or b"")
        if size > max_message_bytes:
            raise PermanentError(
                "message_too_large", f"job of {size} bytes exceeds RERANK_MAX_MESSAGE_BYTES={max_message_bytes}"
            )
        return parse_job(self.value or b"", max_docs=max_docs)

    @property
    def where(self) -> str:
        """`topic[partition]@offset`, the form every log line uses."""
        return f"{self.topic}[{self.partition}]@{self.offset}"

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


def encode_result(result: Callable[[], RerankResult], *, max_message_bytes: int) -> bytes:
    """The JSON of the result `result()` builds (the way back of `SourceRecord.parse_job`), or PermanentError
    (stage publish) when it cannot be written (`result_not_serializable`, raised from the cause: the job's own data,
    such as its metadata, can do that) or is too large (`result_too_large`). Either way that job fails, not the
    thread that scores or replays it."""
    try:
        value = orjson.dumps(result().model_dump(mode="json"))
    except Exception as e:
        message = f"the result cannot be written: {one_line(e)}"
        raise PermanentError("result_not_serializable", message, stage="publish") from e
    if len(value) > max_message_bytes:
        message = f"result of {len(value)} bytes exceeds RERANK_MAX_MESSAGE_BYTES={max_message_bytes}"
        raise PermanentError("result_too_large", message, stage="publish")
    return value


@dataclass
class WorkItem:
    """A parsed job on its way to the GPU thread."""

    record: SourceRecord
    job: RerankJob
    prepared: PreparedJob | None = None
    tokens: int = 0  # estimated tokens through the model, for the batch budget
    # which assignment of its partition it was polled under (the consumer thread counts them): after a partition
    # is revoked and assigned back (every rebalance does that under Kafka's eager protocol), older jobs are stale
    assignment: int = 0

    def prepare(self, engine: Engine) -> None:
        self.prepared = engine.prepare(self.job.to_score_request())
        p = self.prepared
        self.tokens = len(p.head_ids) + sum(len(d) + SUFFIX_TOKENS_ESTIMATE for d in p.unique_docs)


@dataclass(frozen=True)
class Failure:
    """Why a job is dead-lettered."""

    reason: str  # slug: not_json, out_of_memory, ...
    category: Category
    stage: str  # validate, prepare, score, publish
    error_class: str  # fully qualified exception class
    message: str
    attempts: int = 1


@dataclass
class Outgoing:
    """One message to publish; acknowledging it finishes `record`."""

    kind: Literal["result", "dead_letter"]
    record: SourceRecord
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)
    job_id: str | None = None
    failure: Failure | None = None
    documents: int = 0
