"""Stage publish (the publisher thread): send results and dead letters, wait for the broker's acknowledgement, hand
the finished records back to the consumer thread.

A job is finished only when its result or dead letter is acknowledged (acks=all, idempotent producer); only then
does its record go back to the consumer thread, which commits the watermark. Everything queued is sent first and
then awaited in order, so many sends share a round trip.

The one publishing-failure policy of the worker and the replay, per message:
- transient (retriable Kafka error, timeout): tried again with tenacity (exponential backoff with jitter) up to
  RERANK_MAX_ATTEMPTS, the first try being the pipelined send;
- a result that still fails, or is refused (too large, not authorized for its reply topic), rejects its job through
  the sink (`Outbox.reject`: the worker dead-letters it, a replay stops or skips it), with the attempts made;
- a dead letter too large for the dead-letter topic is sent again without its value (`rerank.original.value.dropped`),
  and if still too large, also without the original record's own headers (`rerank.original.headers.dropped`);
- a dead letter that cannot be published at all is fatal: nothing more is acknowledged, and the job is redelivered
  (Kafka is unreachable or misconfigured; nothing is lost).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tenacity

from worker.pipeline.deadletter import smaller_dead_letter
from worker.pipeline.errors import Fatal, PermanentError, is_too_large, one_line, retry_error, transient_retries
from worker.pipeline.logs import job_fields
from worker.pipeline.metrics import WorkerMetrics
from worker.pipeline.records import Failure, Outgoing
from worker.pipeline.sink import Outbox
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Failed:
    """A send that raised before it had a future."""

    error: BaseException

    def get(self, timeout: float | None = None) -> Any:
        raise self.error


class Publisher(threading.Thread):
    def __init__(
        self,
        producer: Any,
        outbox: Outbox,
        settings: Settings,
        metrics: WorkerMetrics,
        fatal: Fatal,
        *,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(name="rerank-publish", daemon=True)
        self.producer = producer
        self.outbox = outbox
        self.settings = settings
        self.metrics = metrics
        self.fatal = fatal
        self._sleep: Callable[[float], None] = sleep or self._wait  # a fatal error cuts a backoff short
        self.wait_s = settings.produce_timeout_ms / 1000 + 5

    def _wait(self, seconds: float) -> None:
        self.fatal.wait(seconds)

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # a bug: stop (nothing unacknowledged was committed) rather than hang
            log.exception("the publisher thread crashed")
            self.fatal.fail(f"the publisher thread crashed: {one_line(e)}. This is a bug.")

    def _run(self) -> None:
        messages = self.outbox.messages
        closing = False  # the outbox was closed: send what is queued (dead letters of failed results too), then end
        while not self.fatal.is_set():
            try:
                first = messages.get_nowait() if closing else messages.get()
            except queue.Empty:
                return
            if first is None:
                closing = True
                continue
            batch = [first]
            while True:  # everything already queued rides the same round trip
                try:
                    more = messages.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    continue
                batch.append(more)
            sent = [(o, self.send(o)) for o in batch]
            for o, future in sent:
                if self.fatal.is_set():
                    return
                self.settle(o, future)

    def send(self, o: Outgoing) -> Any:
        try:
            return timed_send(self.producer, o, self.metrics)
        except Exception as e:  # raised before a future existed (too large, metadata timeout, buffer full)
            return _Failed(e)

    def settle(self, o: Outgoing, future: Any) -> None:
        """Wait for `o`'s acknowledgement, trying again where that helps; then finish it or handle its failure."""
        futures = iter([future])
        attempts = 0
        retrying = transient_retries(self.settings, sleep=self._sleep, before_sleep=self._count_retry)
        try:
            for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    if self.fatal.is_set():
                        raise PermanentError("aborted", "stopping after a fatal error", stage="publish")
                    f = next(futures, None) or self.send(o)
                    f.get(timeout=self.wait_s)
        except Exception as e:
            self.failed(o, e, attempts)
            return
        self.finished(o)

    def _count_retry(self, state: tenacity.RetryCallState) -> None:
        self.metrics.count_retry(state)
        error = retry_error(state)
        log.warning("publish failed, trying again: %s", one_line(error) if error else "?")

    def failed(self, o: Outgoing, error: BaseException, attempts: int) -> None:
        if self.fatal.is_set():
            return
        fields = job_fields(o.record, o.job_id, topic_out=o.topic, attempts=attempts)
        if o.kind == "result":
            failure = result_failure(error, attempts)
            log.warning("result not published (%s): rejecting the job", one_line(error), extra=fields)
            self.outbox.reject(o.record, failure, o.job_id)
        elif is_too_large(error) and (smaller := smaller_dead_letter(o)) is not None:
            dropped = smaller.headers[-1][0]  # rerank.original.value.dropped, then .headers.dropped
            log.warning("dead letter too large for %s: sending it again with %s", o.topic, dropped, extra=fields)
            self.settle(smaller, self.send(smaller))
        else:
            self.fatal.fail(
                f"cannot publish to the dead-letter topic {o.topic!r} after {attempts} tries: {one_line(error)}"
            )

    def finished(self, o: Outgoing) -> None:
        report_published(o, self.metrics)
        self.outbox.acknowledged(o)


def result_failure(error: BaseException, attempts: int) -> Failure:
    """Why a result could not be published, for its job's dead letter: `result_too_large` (permanent) when its topic
    refused it as too large."""
    failure = Failure.of(error, stage="publish", attempts=attempts)
    if is_too_large(error):
        failure = Failure("result_too_large", "permanent", "publish", failure.error_class, failure.message, attempts)
    return failure


def timed_send(producer: Any, o: Outgoing, metrics: WorkerMetrics) -> Any:
    """`producer.send` of `o`; its acknowledgement, when it comes, observes rerank_publish_seconds (in the
    producer's I/O thread, at the moment the broker answered)."""
    sent = time.perf_counter()
    future = producer.send(o.topic, key=o.key, value=o.value, headers=o.headers)
    future.add_callback(lambda _: metrics.publish_seconds.observe(time.perf_counter() - sent))
    return future


def report_published(o: Outgoing, metrics: WorkerMetrics) -> None:
    """Count and log an acknowledged (or, exactly-once, committed) result or dead letter."""
    reason = o.failure.reason if o.failure else "unknown"
    metrics.answered(o.kind, o.record.timestamp, reason=reason, documents=o.documents)
    if o.kind == "result":
        log.info("result published", extra=job_fields(o.record, o.job_id, topic_out=o.topic))
    else:
        message = o.failure.message if o.failure else ""
        log.warning(
            "dead-lettered: %s", message, extra=job_fields(o.record, o.job_id, reason=reason, topic_out=o.topic)
        )
