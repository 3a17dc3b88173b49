"""A small client for indexing pipelines: submit rerank jobs, optionally wait for their results by job_id.

    with RerankClient(Settings()) as client:
        job_id = client.submit({"job_id": "q1", "query": "red shoes", "documents": ["...", "..."]})
        outcome = client.wait([job_id], timeout_s=30)[job_id]   # RerankResult, or DeadLettered

Waiting reads the results topic (or the job's `reply_topic`) and the dead-letter topic from their ends, without a
consumer group: the client starts reading a topic before it sends the first job answered there, so no result is
missed, and a job that was dead-lettered is reported at once instead of timing out. Results are recognised by
their key (the job_id); a duplicate (at-least-once) is the same job's result again and is ignored. A `reply_topic`
that does not exist is not read (the worker dead-letters its jobs as `unknown_reply_topic`, and the client reports
that dead letter).
Jobs and results up to RERANK_MAX_MESSAGE_BYTES work (the clients are sized from the same setting, gzip on).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from pydantic import ValidationError

from worker.kafka.config import consumer_kwargs, producer_kwargs
from worker.kafka.topics import TopicCatalog, require_topics
from worker.messages import RerankJob, RerankResult
from worker.pipeline.deadletter import header_map
from worker.pipeline.errors import FatalError
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLettered:
    """A job the worker could not answer: the dead letter's reason and message."""

    job_id: str
    reason: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)


Outcome = RerankResult | DeadLettered


class RerankClient:
    def __init__(self, settings: Settings | None = None, *, client_id: str | None = None) -> None:
        self.settings = settings or Settings()
        self.client_id = client_id or f"rerank-client-{uuid.uuid4().hex[:8]}"
        self.producer = KafkaProducer(**producer_kwargs(self.settings, client_id=self.client_id))
        self._readers: dict[str, Any] = {}  # topic -> KafkaConsumer assigned to all its partitions
        self.outcomes: dict[str, Outcome] = {}  # answers read but not yet handed out by `wait`
        self._waiting: set[str] = set()  # job ids to keep answers for: other clients' answers are not kept
        self._catalog = TopicCatalog(self.settings, client_id=f"{self.client_id}-topics")

    def __enter__(self) -> RerankClient:
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.close()

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close(autocommit=False)
        self._readers.clear()
        self._catalog.close()
        self.producer.close(timeout=10)

    # -- submit ---------------------------------------------------------------------------------------------------

    def submit(
        self, job: RerankJob | Mapping[str, Any], *, correlation_id: str | None = None, timeout_s: float = 30
    ) -> str:
        """Validate, send and wait for the broker's acknowledgement; returns the job_id."""
        return self.submit_many([job], correlation_id=correlation_id, timeout_s=timeout_s)[0]

    def submit_many(
        self,
        jobs: Iterable[RerankJob | Mapping[str, Any]],
        *,
        correlation_id: str | None = None,
        timeout_s: float = 60,
        listen: bool = True,
    ) -> list[str]:
        """Send many jobs in one go (one acknowledgement wait). `listen=False` (fire and forget) skips preparing
        `wait` and remembers nothing of the jobs."""
        parsed = [j if isinstance(j, RerankJob) else RerankJob.model_validate(j) for j in jobs]
        if listen:
            self._waiting.update(j.job_id for j in parsed)
            for topic in {j.reply_topic or self.settings.results_topic for j in parsed} | {self.settings.dlq_topic}:
                self.listen(topic)
        futures = []
        for job in parsed:
            headers = [("rerank.correlation.id", (correlation_id or job.job_id).encode())]
            value = orjson.dumps(job.model_dump(mode="json"))
            key = job.job_id.encode()
            futures.append(self.producer.send(self.settings.jobs_topic, key=key, value=value, headers=headers))
        deadline = time.monotonic() + timeout_s
        for f in futures:
            f.get(timeout=max(0.1, deadline - time.monotonic()))
        return [j.job_id for j in parsed]

    # -- wait -----------------------------------------------------------------------------------------------------

    def listen(self, topic: str) -> None:
        """Start reading `topic` from its current end (before sending jobs whose results land there)."""
        if topic in self._readers:
            return
        # A topic that does not exist would have the producer wait its max_block_ms for metadata; a broker with
        # auto.create.topics.enable creates it, as a worker's first result would.
        try:
            require_topics(self.settings, [topic], client_id=f"{self.client_id}-topics", catalog=self._catalog)
        except FatalError as e:
            if e.__cause__ is None:  # it does not exist and was not created
                log.warning("not reading %s: the topic does not exist (its jobs will be dead-lettered)", topic)
                return
            log.warning("cannot look up topic %r: %s", topic, e)  # the producer's own metadata wait decides
            self._catalog.close()  # a fresh connection next time
        partitions = self.producer.partitions_for(topic)
        reader = KafkaConsumer(**consumer_kwargs(self.settings, client_id=f"{self.client_id}-reader", group_id=None))
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        reader.assign(tps)
        reader.seek_to_end(*tps)
        for tp in tps:
            reader.position(tp)  # resolve the end offsets now, not lazily after the jobs were sent
        self._readers[topic] = reader

    def wait(self, job_ids: Sequence[str], *, timeout_s: float = 60) -> dict[str, Outcome]:
        """Each job's result or dead letter; raises TimeoutError naming the jobs still unanswered. An answer is
        handed out once: the client then forgets the job (a long-running client keeps no history), and a duplicate
        of its answer arriving later is ignored."""
        deadline = time.monotonic() + timeout_s
        self._waiting.update(job_ids)
        pending = [j for j in job_ids if j not in self.outcomes]
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                shown = ", ".join(pending[:5]) + (" ..." if len(pending) > 5 else "")
                raise TimeoutError(f"no answer in {timeout_s:g}s for {len(pending)} of {len(job_ids)} jobs: {shown}")
            self._read(min(left, 0.2))
            pending = [j for j in pending if j not in self.outcomes]
        self._waiting.difference_update(job_ids)
        return {j: self.outcomes.pop(j) for j in dict.fromkeys(job_ids)}

    def rerank(self, query: str, documents: Sequence[str | None], *, timeout_s: float = 60, **job: Any) -> Outcome:
        """Submit one job and wait for it."""
        job_id = job.pop("job_id", None) or uuid.uuid4().hex
        self.submit({"job_id": job_id, "query": query, "documents": list(documents), **job})
        return self.wait([job_id], timeout_s=timeout_s)[job_id]

    def _read(self, timeout_s: float) -> None:
        per_reader_ms = max(1, int(timeout_s * 1000 / max(1, len(self._readers))))
        for topic, reader in self._readers.items():
            for records in reader.poll(timeout_ms=per_reader_ms).values():
                for r in records:
                    if r.key is None:
                        continue
                    job_id = r.key.decode("utf-8", "replace")
                    if job_id not in self._waiting:
                        continue  # another client's job (the topics are shared)
                    if job_id in self.outcomes:
                        continue  # a duplicate (at-least-once): the first answer stands
                    if topic == self.settings.dlq_topic:
                        headers = header_map(r.headers or [])
                        self.outcomes[job_id] = DeadLettered(
                            job_id,
                            headers.get("rerank.error.reason", "unknown"),
                            headers.get("rerank.error.message", ""),
                            headers,
                        )
                    elif r.value:
                        try:
                            self.outcomes[job_id] = RerankResult.model_validate_json(r.value)
                        except ValidationError as e:  # not a result of ours after all (a job id reused elsewhere)
                            log.warning(
                                "ignoring a record keyed %r on %s: not a RerankResult (%d errors)",
                                job_id,
                                topic,
                                e.error_count(),
                            )
