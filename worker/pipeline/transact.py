"""Stage publish, exactly-once (consumer thread): answers go out in the Kafka transaction that commits their offsets.

RERANK_DELIVERY=exactly_once. A record's answer (its result or dead letter) is held until every record before it in
its partition has an answer too; then the answers of that prefix and the offsets past it go out in one transaction,
with the consumer's group metadata (KIP-447: the group coordinator refuses the offsets of a member that has lost
its partitions, so a zombie cannot commit). A crash before the commit leaves an open transaction that the next
producer with the same transactional id aborts (or that times out): no read_committed consumer sees its answers,
and the jobs are read again. After the commit, both answers and offsets hold: no job is answered twice.

Held answers live in memory only; on a rebalance the revoked partitions' are dropped, and the next owner answers
those jobs again (nothing of theirs was sent). A transaction that fails transiently (a broker unavailable, a
timeout, a rebalance under way) is aborted and tried again on a later turn, with backoff, up to
RERANK_MAX_ATTEMPTS. A message too large for its topic is replaced as the at-least-once publisher does (a result by
its dead letter, a dead letter by a smaller one) and the transaction tried again. A producer fenced by a newer one
with its transactional id, a failed abort, or retries used up, is fatal: the open transaction is never visible, and
its jobs are read again after the restart.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from kafka import errors as kafka_errors
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.pipeline.commit import OffsetTracker, show
from worker.pipeline.deadletter import smaller_dead_letter
from worker.pipeline.errors import Fatal, is_too_large, is_transient, one_line
from worker.pipeline.metrics import WorkerMetrics
from worker.pipeline.publish import report_published, result_failure, timed_send
from worker.pipeline.records import Finished, Outgoing
from worker.pipeline.sink import Sink
from worker.settings import Settings

log = logging.getLogger(__name__)

# Refusals that no retry of this producer can change.
_FATAL = (
    kafka_errors.ProducerFencedError,
    kafka_errors.InvalidProducerEpochError,
    kafka_errors.TransactionalIdAuthorizationFailedError,
    kafka_errors.TransactionCoordinatorFencedError,
    kafka_errors.AuthorizationError,
)
# The group moved on (a rebalance under way, this member's generation is old), or the broker asks for an abort:
# abort, try again later (a rebalance meanwhile revokes what this member may no longer commit).
_GROUP_MOVED = (
    kafka_errors.TransactionAbortableError,
    kafka_errors.CommitFailedError,
    kafka_errors.IllegalGenerationError,
    kafka_errors.UnknownMemberIdError,
    kafka_errors.RebalanceInProgressError,
    kafka_errors.FencedInstanceIdError,
)


class Transactions:
    """The held answers of the owned partitions and the transactions that publish them. `tracker`: the consumer
    thread's offsets (a record is pending until its transaction commits)."""

    def __init__(
        self,
        producer: Any,
        tracker: OffsetTracker[TopicPartition],
        sink: Sink,
        settings: Settings,
        metrics: WorkerMetrics,
        fatal: Fatal,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.producer = producer
        self.tracker = tracker
        self.sink = sink
        self.settings = settings
        self.metrics = metrics
        self.fatal = fatal
        self.clock = clock
        self.held: dict[TopicPartition, dict[int, Outgoing]] = {}
        self.failures = 0  # transient failures in a row
        self.not_before = 0.0  # backoff after a failure

    def hold(self, finished: Finished) -> None:
        """A record's answer, to be sent with its offset; ignored when its partition is no longer tracked here."""
        assert finished.message is not None
        tp, offset = finished.record.tp, finished.record.offset
        if self.tracker.is_pending(tp, offset):
            self.held.setdefault(tp, {})[offset] = finished.message

    def drop(self, partitions: Iterable[TopicPartition]) -> int:
        """Forget the answers of revoked partitions (their jobs are answered again by the next owner)."""
        return sum(len(self.held.pop(tp, {})) for tp in partitions)

    def ready(self, partitions: Iterable[TopicPartition]) -> tuple[list[Outgoing], dict[TopicPartition, int]]:
        """The answers of each partition's longest run of answered records from its watermark, in offset order, and
        the offsets to commit with them (one past each run)."""
        messages: list[Outgoing] = []
        offsets: dict[TopicPartition, int] = {}
        for tp in partitions:
            held = self.held.get(tp)
            if not held:
                continue
            run, end = self.tracker.answered_run(tp, held.keys())
            if run:
                messages.extend(held[o] for o in run)
                offsets[tp] = end
        return messages, offsets

    def commit(self, partitions: Iterable[TopicPartition], group_metadata: Callable[[], Any]) -> int:
        """One transaction with what is ready among `partitions`; returns how many answers it published."""
        if self.fatal.is_set() or self.clock() < self.not_before:
            return 0
        messages, offsets = self.ready(partitions)
        if not messages:
            return 0
        sent: list[tuple[Outgoing, Any]] = []
        try:
            self.producer.begin_transaction()
            sent = [(m, timed_send(self.producer, m, self.metrics)) for m in messages]
            commits = {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
            self.producer.send_offsets_to_transaction(commits, group_metadata())
            self.producer.commit_transaction()
        except Exception as e:
            self._failed(e, sent, offsets)
            return 0
        for m in messages:
            tp, offset = m.record.tp, m.record.offset
            self.tracker.done(tp, offset)
            self.held[tp].pop(offset, None)
            report_published(m, self.metrics)
        self.tracker.mark_committed(offsets)
        self.metrics.commits.labels(result="ok").inc()
        self.failures = 0
        log.debug("transaction committed", extra={"answers": len(messages), "offsets": show(offsets)})
        return len(messages)

    def _failed(
        self, error: BaseException, sent: list[tuple[Outgoing, Any]], offsets: dict[TopicPartition, int]
    ) -> None:
        aborted = self._abort()
        self.metrics.commits.labels(result="failed").inc()
        if isinstance(error, _FATAL) or not aborted:
            self.fatal.fail(
                f"exactly-once transaction failed and cannot go on: {one_line(error)}; its jobs are read again "
                "after a restart (another worker with this transactional id fences this one)"
            )
            return
        too_large = [(m, f.exception) for m, f in sent if f.is_done and f.failed() and is_too_large(f.exception)]
        if too_large:
            for m, refusal in too_large:
                self._replace(m, refusal)
            return  # tried again at once, without the message that broke it
        if not (isinstance(error, _GROUP_MOVED) or is_transient(error)):
            self.fatal.fail(f"exactly-once transaction failed: {one_line(error)}; its jobs are read again")
            return
        self.failures += 1
        if self.failures >= self.settings.max_attempts:
            self.fatal.fail(
                f"exactly-once transaction failed {self.failures} times: {one_line(error)}; its jobs are read again"
            )
            return
        s = self.settings
        delay_ms = min(s.retry_max_ms, s.retry_initial_ms * 2 ** (self.failures - 1)) * random.uniform(0.5, 1.0)
        self.not_before = self.clock() + delay_ms / 1000
        self.metrics.retries.labels(reason=type(error).__name__).inc()
        log.warning(
            "transaction aborted, trying again in %.1f s: %s",
            delay_ms / 1000,
            one_line(error),
            extra={"offsets": show(offsets), "attempt": self.failures},
        )

    def _abort(self) -> bool:
        try:
            self.producer.abort_transaction()
        except kafka_errors.IllegalStateError:
            return True  # no transaction was open (begin_transaction itself failed)
        except Exception as e:
            log.error("aborting the transaction failed: %s", one_line(e))
            return False
        return True

    def _replace(self, message: Outgoing, refusal: BaseException) -> None:
        """A message its topic refuses as too large: a result becomes its job's dead letter (as the at-least-once
        publisher does it), a dead letter a smaller one (without the original value, then without its headers)."""
        tp, offset = message.record.tp, message.record.offset
        if message.kind == "result":
            failure = result_failure(refusal, attempts=1)
            replacement = self.sink.reject(message.record, failure, message.job_id)
        else:
            replacement = smaller_dead_letter(message)
        if replacement is None:
            self.fatal.fail(f"dead letter too large for {message.topic} even without the job's value and headers")
            return
        log.warning("%s too large for %s: replaced", message.kind, message.topic, extra={"where": message.record.where})
        self.held[tp][offset] = replacement
