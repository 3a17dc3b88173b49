"""The pipeline: every stage wired once, and the consumer thread's run loop over them.

    consumer thread                      GPU thread                  publisher thread
    consume -> parse -> tokenize --work queue--> batch -> score --outbox--> publish
       ^                                                                     |
       '-- commit <------------------------ finished ------------------------'

Every turn of the loop (a fraction of a second): poll the source, parse each record (a bad one is rejected at
once), tokenize the backlog into the bounded work queue (pausing the source while it is full), take the records
that finished, commit the watermark, update the gauges. The worker and a replay run this same pipeline with
different ends: a `GroupSource` and a `WorkerSink` (results and dead letters) run until stopped; a `RangeSource`
and a `ReplaySink` (replay results, skips) run until the ranges are read and every job is finished.

Delivery is at-least-once: a record is committed only once its result or dead letter is acknowledged, so a crash
at any moment loses no job. With `transactional` (RERANK_DELIVERY=exactly_once) the answers skip the publisher
thread and go out with their offsets in one transaction per commit (worker.pipeline.transact). Stop (SIGTERM, or
the end of a range): stop fetching, let the GPU thread finish the batch in hand, publish it, commit; jobs never
started are redelivered. Bounded by RERANK_SHUTDOWN_TIMEOUT_S.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from kafka.structs import TopicPartition

from worker.engine.api import Engine, InvalidJobError
from worker.pipeline.batch import Batcher
from worker.pipeline.commit import Committer, show
from worker.pipeline.consume import Source
from worker.pipeline.errors import Fatal, FatalError, PermanentError
from worker.pipeline.metrics import WorkerMetrics
from worker.pipeline.parse import Parser
from worker.pipeline.publish import Publisher
from worker.pipeline.records import Failure, SourceRecord, WorkItem
from worker.pipeline.score import Scorer
from worker.pipeline.sink import Outbox, Sink
from worker.pipeline.tokenize import Tokenizer
from worker.pipeline.transact import Transactions
from worker.settings import Settings

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FATAL = 4  # misconfigured or unreachable Kafka, broken device: one log line says which

OBSERVE_EVERY_S = 1.0


class Pipeline:
    """`name` says which pipeline it is in log lines (`worker`, `replay`); `parser` decides what a valid job is
    (the worker checks `reply_topic` against its allowlist, a replay ignores it)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        source: Source,
        sink: Sink,
        producer: Any,
        *,
        parser: Parser,
        metrics: WorkerMetrics,
        name: str = "worker",
        fatal: Fatal | None = None,
        started: threading.Event | None = None,
        transactional: bool = False,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.source = source
        self.parser = parser
        self.metrics = metrics
        self.name = name
        self.fatal = fatal or Fatal()
        self.stopping = threading.Event()  # stop taking work (SIGTERM); the loop then shuts down
        self.started = started or threading.Event()  # set once a partition is owned
        self.closing = False
        self.last_turn = time.monotonic()
        self._last_observe = 0.0
        self.stall: str | None = None  # set by observe(): why the GPU thread looks stuck

        self.outbox = Outbox(sink, self.fatal, transactional=transactional)
        self.work: queue.Queue[WorkItem] = queue.Queue(maxsize=settings.max_queued_jobs)
        self.tokenizer = Tokenizer(engine, self.work)
        self.batcher = Batcher(
            self.work,
            budget_tokens=engine.info.max_pack_tokens * settings.batch_max_packs,
            wait_ms=settings.batch_wait_ms,
            owns=source.ownership.owns,
            give_back=self.outbox.give_back,
            stopping=threading.Event(),
        )
        self.scorer = Scorer(engine, self.batcher, self.outbox, settings, metrics, self.fatal)
        self.publisher = Publisher(producer, self.outbox, settings, metrics, self.fatal)
        self.committer = Committer(source.consumer, metrics)
        self.transactions = (
            Transactions(producer, self.committer.tracker, sink, settings, metrics, self.fatal)
            if transactional
            else None
        )
        source.bind(self)

    @property
    def tracker(self) -> Any:
        return self.committer.tracker

    # -- the loop ---------------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped, fatally failed, or (a bounded source) done; returns the exit code."""
        self.scorer.start()
        self.publisher.start()
        while not self.stopping.is_set() and not self.fatal.is_set() and not self.done():
            self.turn()
        return self.shutdown()

    def turn(self) -> None:
        self.last_turn = time.monotonic()
        for record in self.poll():
            self.admit(record)
        self.feed()
        self.take_finished()
        self.commit()
        self.observe()

    def done(self) -> bool:
        """A bounded source read to its end, and every job read is finished."""
        return self.source.exhausted and not self.tokenizer.backlog and self.tracker.in_flight() == 0

    def stop(self) -> None:
        self.stopping.set()

    # -- the steps of a turn ----------------------------------------------------------------------------------------

    def poll(self) -> list[SourceRecord]:
        try:
            return self.source.poll()
        except FatalError as e:
            self.fatal.fail(str(e))
            return []

    def admit(self, record: SourceRecord) -> None:
        """A polled record: tracked, then parsed; a bad one is rejected now, a good one waits to be tokenized."""
        tp = record.tp
        if tp not in self.source.ownership.owned:
            return  # its partition was revoked during this poll: the new owner reads it again
        self.tracker.add(tp, record.offset)
        job_id = record.key_text
        try:
            job = self.parser.parse(record)
            job_id = job.job_id
            self.parser.check(job)
        except (PermanentError, InvalidJobError) as e:
            self.outbox.reject(record, Failure.of(e, stage="validate"), job_id)
            return
        self.tokenizer.add(WorkItem(record, job, assignment=self.source.ownership.assignment(tp)))

    def feed(self) -> None:
        """Tokenize the backlog into the work queue; fetch nothing more while jobs wait for room."""
        for item, failure in self.tokenizer.feed():
            self.outbox.reject(item.record, failure, item.job.job_id)
        if self.tokenizer.blocked:
            self.source.pause()
            self.metrics.paused.set(1)
        else:
            self.source.resume()
            self.metrics.paused.set(0)

    def take_finished(self, wait_s: float = 0.0) -> int:
        """Mark the records that came back finished (or given back); returns how many were finished."""
        taken = 0
        while True:
            try:
                f = (
                    self.outbox.finished.get(timeout=wait_s)
                    if wait_s and not taken
                    else self.outbox.finished.get_nowait()
                )
            except queue.Empty:
                return taken
            tp = f.record.tp
            if f.message is not None and self.transactions is not None:
                self.transactions.hold(f)  # done once its transaction commits
                taken += 1
            elif not f.given_back:
                self.tracker.done(tp, f.record.offset)
                taken += 1
            elif self.source.ownership.assignment(tp) == f.assignment:  # not a stale copy of a job since read again
                self.tracker.abandon(tp, f.record.offset)

    def commit(self) -> None:
        owned = [tp for tp in self.tracker.partitions() if tp in self.source.ownership.owned]
        if self.transactions is not None:
            self.transactions.commit(owned, self.source.consumer.group_metadata)
        else:
            self.committer.commit(owned)

    def stalled(self, now: float | None = None) -> str | None:
        """Why the GPU thread looks stuck (a batch has not finished for RERANK_STALL_TIMEOUT_S: a hung driver, a
        deadlock), or None. While idle the thread turns at least every 0.1 s, so only a batch that does not end
        trips it."""
        if self.closing or not self.scorer.is_alive():
            return None
        quiet = (time.monotonic() if now is None else now) - self.scorer.progress_at
        if quiet <= self.settings.stall_timeout_s:
            return None
        return (
            f"stage score (the GPU thread) has not finished its batch for {quiet:.0f} s "
            f"(RERANK_STALL_TIMEOUT_S={self.settings.stall_timeout_s:g}); {self.work.qsize()} jobs wait behind it"
        )

    def observe(self) -> None:
        now = time.monotonic()
        if now - self._last_observe < OBSERVE_EVERY_S:
            return
        self._last_observe = now
        stall = self.stalled(now)
        if stall and not self.stall:
            log.error("stuck: %s; /healthz now fails so that the worker is restarted", stall)
        self.stall = stall
        self.metrics.in_flight.set(self.tracker.in_flight())
        self.metrics.queued.set(self.tokenizer.waiting)
        for tp in self.source.ownership.owned:
            high = self.source.consumer.highwater(tp)
            if high is not None:
                mark = self.tracker.watermark(tp)
                lag = high - (mark if mark is not None else high)
                self.metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)

    # -- partitions (the source calls these; for a group, on kafka-python's IO thread inside poll) -----------------

    def release(self, partitions: set[TopicPartition], *, commit: bool) -> dict[TopicPartition, int | None]:
        """Give the jobs of `partitions` not started yet up at once (the backlog's and the work queue's: the GPU
        thread skips those), wait (bounded) only for the jobs being scored or published, commit their watermark
        and forget the partitions: what was given up stays below the watermark, so the next owner reads it."""
        given_up = self.tokenizer.give_up(partitions)
        for item in given_up:
            self.tracker.abandon(item.record.tp, item.record.offset)
        if self.transactions is not None:
            # No transaction can run on kafka-python's IO thread, which calls this: answers held for these
            # partitions were never sent, and the next owner answers their jobs again.
            dropped = self.transactions.drop(partitions)
            log.info(
                "partitions revoked" if commit else "partitions lost",
                extra={
                    "partitions": show(partitions),
                    "answers_dropped": dropped,
                    "given_up": len(given_up),
                    "redelivered": self.tracker.in_flight(partitions) + len(given_up),
                },
            )
        elif commit and not self.closing:
            s = self.settings
            deadline = time.monotonic() + min(s.revoke_timeout_s, s.session_timeout_ms / 2000)
            self.take_finished()  # what was acknowledged already, even with nothing left to wait for
            while self.tracker.in_flight(partitions) and time.monotonic() < deadline:
                self.take_finished(wait_s=0.05)
            committed = self.committer.commit_async(partitions)
            left = self.tracker.in_flight(partitions)
            log.info(
                "partitions revoked",
                extra={
                    "partitions": show(partitions),
                    "committed": show(committed),
                    "given_up": len(given_up),
                    "redelivered": left + len(given_up),
                },
            )
        elif not commit:
            log.warning(
                "partitions lost: this member's session expired or it left its group; their jobs not finished here "
                "are redelivered to the next owner",
                extra={
                    "partitions": show(partitions),
                    "given_up": len(given_up),
                    "in_flight": self.tracker.in_flight(partitions),
                },
            )
        marks = {tp: self.tracker.watermark(tp) for tp in partitions}
        self.tracker.drop(partitions)
        self.metrics.revoked.inc(len(partitions))
        for tp in partitions:
            self.metrics.forget_partition(tp.topic, tp.partition)
        self.metrics.assigned.set(len(self.source.ownership.owned))
        return marks

    def acquired(self, partitions: set[TopicPartition]) -> None:
        self.metrics.rebalances.inc()
        self.metrics.assigned.set(len(self.source.ownership.owned))
        log.info("partitions assigned", extra={"partitions": show(partitions)})
        if self.source.ownership.owned:
            self.started.set()

    # -- health -----------------------------------------------------------------------------------------------------

    def ready(self) -> bool:
        return bool(self.source.ownership.owned) and not self.stopping.is_set() and not self.fatal.is_set()

    # -- shutdown ---------------------------------------------------------------------------------------------------

    def shutdown(self) -> int:
        """Stop fetching, finish and publish the batch in hand, commit; returns the exit code."""
        s = self.settings
        started = time.monotonic()
        reserve = min(5.0, s.shutdown_timeout_s / 4)  # kept for the last commit and closing the clients
        deadline = started + s.shutdown_timeout_s - reserve
        self.closing = True
        self.source.pause()
        not_started = self.tokenizer.clear_backlog()
        self.batcher.stopping.set()  # the batch in hand finishes; no other starts
        self._wait_for(self.scorer, deadline)
        not_started += len(self.scorer.drain())
        self.outbox.close()  # after everything already scored
        self._wait_for(self.publisher, deadline)
        self.take_finished()
        self.commit()
        left = self.tracker.in_flight()
        self.source.ownership.remove(self.source.ownership.owned)
        self.committer.tracker.drop(self.tracker.partitions())  # nothing for the close-time listener to do
        log.info(
            f"{self.name} stopped",
            extra={
                "seconds": round(time.monotonic() - started, 3),
                "not_started": not_started,
                "redelivered": left,
                "fatal": self.fatal.message,
            },
        )
        return EXIT_FATAL if self.fatal.is_set() else EXIT_OK

    def _wait_for(self, thread: threading.Thread, deadline: float) -> None:
        while thread.is_alive() and time.monotonic() < deadline:
            self.take_finished(wait_s=0.05)
            self.commit()
