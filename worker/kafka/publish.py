"""The publisher thread: send results and dead letters, wait for the broker's acknowledgement, report completions.

A job is done only when its result or dead letter is acknowledged (acks=all, idempotent producer); only then does
its record go back to the consumer thread, which commits the watermark. Everything queued is sent first and then
awaited in order, so many sends share a round trip.

Failures of one message:
- transient (retriable Kafka error, timeout): tried again with tenacity (exponential backoff with jitter) up to
  RERANK_MAX_ATTEMPTS, the first try being the pipelined send;
- a result that still fails, or is rejected (too large, not authorized for its reply topic), is replaced by the
  job's dead letter, with the attempts made;
- a dead letter too large for the dead-letter topic is sent again without its value (`rerank.original.value.dropped`),
  and if still too large, also without the original record's own headers (`rerank.original.headers.dropped`);
- a dead letter that cannot be published at all is fatal: the worker exits without committing the job, which is
  then redelivered (Kafka is unreachable or misconfigured; nothing is lost).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tenacity

from worker.kafka.deadletter import failure_from, smaller_dead_letter
from worker.kafka.errors import PermanentError, is_too_large, is_transient, one_line, retry_error
from worker.kafka.logs import job_fields
from worker.kafka.metrics import WorkerMetrics
from worker.kafka.records import Failure, Outgoing
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
        outbox: queue.Queue[Outgoing | None],
        settings: Settings,
        metrics: WorkerMetrics,
        *,
        on_done: Callable[[Outgoing], None],
        redirect: Callable[[Outgoing, Failure], Outgoing],
        on_fatal: Callable[[str], None],
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(name="rerank-publish", daemon=True)
        self.producer = producer
        self.outbox = outbox
        self.settings = settings
        self.metrics = metrics
        self.on_done = on_done
        self.redirect = redirect  # a failed result -> the job's dead letter
        self.on_fatal = on_fatal
        self.abort = threading.Event()  # set on a fatal error: stop waiting for anything
        self._sleep: Callable[[float], Any] = sleep or self.abort.wait  # a fatal error cuts a backoff short
        self.wait_s = settings.produce_timeout_ms / 1000 + 5

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # a bug: exit (nothing unacknowledged was committed) rather than hang
            log.exception("the publisher thread crashed")
            self.abort.set()
            self.on_fatal(f"the publisher thread crashed: {one_line(e)}. This is a bug.")

    def _run(self) -> None:
        finished = False
        while not finished and not self.abort.is_set():
            first = self.outbox.get()
            if first is None:
                break
            batch = [first]
            while True:  # everything already queued rides the same round trip
                try:
                    more = self.outbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    finished = True
                    break
                batch.append(more)
            sent = [(o, self._send(o)) for o in batch]
            for o, future in sent:
                if self.abort.is_set():
                    return
                self.settle(o, future)

    def _send(self, o: Outgoing) -> Any:
        try:
            return self.producer.send(o.topic, key=o.key, value=o.value, headers=o.headers)
        except Exception as e:  # raised before a future existed (too large, metadata timeout, buffer full)
            return _Failed(e)

    def settle(self, o: Outgoing, future: Any) -> None:
        futures = iter([future])
        attempts = 0
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.settings.max_attempts),
            wait=tenacity.wait_random_exponential(
                multiplier=self.settings.retry_initial_ms / 1000, max=self.settings.retry_max_ms / 1000
            ),
            retry=tenacity.retry_if_exception(is_transient),
            sleep=lambda seconds: self._sleep(seconds),
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    if self.abort.is_set():
                        raise PermanentError("aborted", "the worker is stopping after a fatal error", stage="publish")
                    f = next(futures, None) or self._send(o)
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
        if self.abort.is_set():
            return
        fields = job_fields(o.record, o.job_id, topic_out=o.topic, attempts=attempts)
        if o.kind == "result":
            if is_too_large(error):
                failure = Failure(
                    reason="result_too_large",
                    category="permanent",
                    stage="publish",
                    error_class=failure_from(error, stage="publish").error_class,
                    message=one_line(error),
                    attempts=attempts,
                )
            else:
                failure = failure_from(error, stage="publish", attempts=attempts)
            log.warning("result not published (%s): dead-lettering the job", one_line(error), extra=fields)
            letter = self.redirect(o, failure)
            self.settle(letter, self._send(letter))
        elif is_too_large(error) and (smaller := smaller_dead_letter(o)) is not None:
            dropped = smaller.headers[-1][0]  # rerank.original.value.dropped, then .headers.dropped
            log.warning("dead letter too large for %s: sending it again with %s", o.topic, dropped, extra=fields)
            self.settle(smaller, self._send(smaller))
        else:
            self.abort.set()
            self.on_fatal(
                f"cannot publish to the dead-letter topic {o.topic!r} after {attempts} tries: {one_line(error)}"
            )

    def finished(self, o: Outgoing) -> None:
        if o.kind == "result":
            self.metrics.jobs.inc(outcome="result")
            self.metrics.documents.inc(o.documents)
            log.info("result published", extra=job_fields(o.record, o.job_id, topic_out=o.topic))
        else:
            reason = o.failure.reason if o.failure else "unknown"
            self.metrics.jobs.inc(outcome="dead_letter")
            self.metrics.dead_letters.inc(reason=reason)
            message = o.failure.message if o.failure else ""
            log.warning(
                "dead-lettered: %s", message, extra=job_fields(o.record, o.job_id, reason=reason, topic_out=o.topic)
            )
        self.on_done(o)
