"""The run loop: the consumer thread polls, routes, feeds the GPU thread, pauses, commits; nothing else touches the
consumer (kafka-python's KafkaConsumer is not thread-safe).

Threads and queues:

    consumer thread --WorkItem--> work queue (bounded) --> GPU thread (scoring.Scorer)
          |  ^                                                  |
          |  '--- completions (acknowledged records) ---.       | results
          '--- dead letters (bad messages) ---> outbox ---> publisher thread (publish.Publisher) --> Kafka

- Every turn: poll (a fraction of a second) -> route each record (size, parse, reply topic; bad ones to the dead
  letter outbox) -> feed prepared jobs to the GPU thread -> pause or resume -> take completions -> commit.
- Jobs are tokenized (engine.prepare) here, right before they enter the work queue, so the next batch is prepared
  while the GPU runs the current one. While jobs wait in the backlog because the queue is full, every assigned
  partition is paused and the thread keeps polling: the group sees a live member however long a batch takes
  (max_poll_interval_ms is never reached), and pause() does not rebalance.
- Commits: per partition, the contiguous watermark of acknowledged records (offsets.OffsetTracker), synchronously,
  each turn the watermark moved. A crash at any moment loses no job: what was not acknowledged is not committed.
- Rebalance: kafka-python 3 calls the listener on its own IO thread while this thread is blocked inside poll().
  On revocation the listener gives up the jobs of those partitions that the GPU thread has not started (dropped
  from the backlog; skipped by the GPU thread, which takes no more of them), waits (bounded) only for the jobs
  being scored or published, commits their watermark with commit_async (a blocking commit cannot run on the IO
  thread) and forgets them; the jobs given up are below the watermark, so the partition's next owner reads them.
  With Kafka's eager protocol every rebalance revokes all partitions and hands most of them straight back, and
  kafka-python 3 keeps such a partition's fetch position: the listener seeks it back to the first offset not done,
  so the jobs given up are read again. Each assignment of a partition is numbered and jobs carry the number they
  were polled under, so a job queued before is skipped rather than scored beside its copy read again.
- Shutdown (SIGTERM/SIGINT): stop fetching, let the GPU thread finish the batch in hand, publish it, commit,
  leave the group; jobs never started are redelivered. Bounded by RERANK_SHUTDOWN_TIMEOUT_S.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable
from contextlib import ExitStack
from types import FrameType
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.engine import InvalidJobError
from worker.kafka.config import compression, consumer_kwargs
from worker.kafka.deadletter import dead_letter, failure_from
from worker.kafka.errors import FatalError, PermanentError, is_transient, one_line
from worker.kafka.http import HealthServer
from worker.kafka.logs import job_fields
from worker.kafka.metrics import WorkerMetrics
from worker.kafka.offsets import OffsetTracker
from worker.kafka.publish import Publisher
from worker.kafka.records import Engine, Failure, Outgoing, SourceRecord, WorkItem
from worker.kafka.scoring import Scorer
from worker.kafka.topics import open_producer, require_topics
from worker.settings import Settings

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FATAL = 4  # misconfigured or unreachable Kafka, broken device: one log line says which

POLL_TIMEOUT_MS = 100
FEED_SLICE_S = 0.5  # at most this long tokenizing before polling again
OBSERVE_EVERY_S = 1.0
STUCK_AFTER_S = 30.0  # /healthz fails when the loop has not turned for this long


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _tp(record: SourceRecord) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.worker.partitions_revoked(revoked, commit=True)

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.worker.partitions_revoked(lost, commit=False)  # no longer ours: a commit would be refused

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.worker.partitions_assigned(assigned)


class Worker:
    def __init__(self, settings: Settings, engine: Engine, *, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.model = engine.info.model
        self.worker_id = settings.worker_id or default_worker_id()
        self.metrics = metrics or WorkerMetrics()
        self.allowed_reply = settings.reply_topic_pattern()

        self.stopping = threading.Event()
        self.started = threading.Event()  # set once partitions were assigned (tests wait on it)
        self.fatal: str | None = None
        self.closing = False
        self.http_port: int | None = None

        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.backlog: deque[WorkItem] = deque()  # polled and parsed, not yet in the work queue
        self.work: queue.Queue[WorkItem] = queue.Queue(maxsize=settings.max_queued_jobs)
        self.outbox: queue.Queue[Outgoing | None] = queue.Queue()
        self.completions: queue.Queue[SourceRecord] = queue.Queue()
        self.skipped: queue.Queue[WorkItem] = queue.Queue()  # jobs the GPU thread skipped as no longer ours
        self.owned: frozenset[TopicPartition] = frozenset()  # replaced whole, read by the GPU thread
        self.assignments: dict[TopicPartition, int] = {}  # how often each partition was assigned; replaced whole
        self.resume_at: dict[TopicPartition, int] = {}  # revoked partitions: the first offset not done here
        self.last_turn = time.monotonic()
        self._last_observe = 0.0

        self.consumer: Any = None
        self.producer: Any = None
        self.scorer: Scorer | None = None
        self.publisher: Publisher | None = None

    # -- public ---------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a clean shutdown (what SIGTERM does)."""
        self.stopping.set()

    def run(self, *, install_signals: bool = False) -> int:
        """Run until stopped; returns the exit code. Signal handlers need the main thread (the CLI)."""
        previous = self._install_signals() if install_signals else {}
        try:
            with ExitStack() as stack:
                try:
                    self.open(stack)
                except FatalError as e:
                    log.critical("%s", e)
                    return EXIT_FATAL
                log.info(
                    "worker started",
                    extra={
                        "worker_id": self.worker_id,
                        "group_id": self.settings.group_id,
                        "jobs_topic": self.settings.jobs_topic,
                        "model": self.model,
                        "http_port": self.http_port,
                    },
                )
                while not self.stopping.is_set() and self.fatal is None:
                    self.turn()
                return self.shutdown()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    # -- start ----------------------------------------------------------------------------------------------------

    def open(self, stack: ExitStack) -> None:
        s = self.settings
        server = HealthServer(s.http_host, s.http_port, alive=self.alive, ready=self.ready, metrics=self.metrics.render)
        stack.callback(server.close)
        self.http_port = server.start().port
        servers = s.bootstrap_servers
        try:
            compression(s)
        except ValueError as e:
            raise FatalError(str(e)) from None
        self.producer = open_producer(s, client_id=f"{self.worker_id}-producer")
        stack.callback(self._close_producer)
        require_topics(self.producer, s, (s.jobs_topic, s.results_topic, s.dlq_topic))
        try:
            self.consumer = KafkaConsumer(
                **consumer_kwargs(s, client_id=f"{self.worker_id}-consumer", group_id=s.group_id)
            )
        except Exception as e:
            raise FatalError(f"cannot start the Kafka consumer for {servers}: {one_line(e)}") from e
        stack.callback(self._close_consumer)
        self.consumer.subscribe([s.jobs_topic], listener=_Listener(self))

        self.scorer = Scorer(
            self.engine,
            self.work,
            publish=self.outbox.put,
            dead_letter=lambda item, failure: self.dead_letter(item.record, failure, item.job.job_id),
            settings=s,
            metrics=self.metrics,
            worker_id=self.worker_id,
            on_fatal=self.set_fatal,
            owned=self.owns,
            on_skipped=self.skipped.put,
        )
        self.publisher = Publisher(
            self.producer,
            self.outbox,
            s,
            self.metrics,
            on_done=lambda o: self.completions.put(o.record),
            redirect=lambda o, failure: self._letter(o.record, failure, o.job_id),
            on_fatal=self.set_fatal,
        )
        self.scorer.start()
        self.publisher.start()

    def _install_signals(self) -> dict[int, Any]:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self.stopping.is_set() and signum == signal.SIGINT:
                os._exit(130)  # a second Ctrl+C: out now
            log.info("signal %s: shutting down", signal.Signals(signum).name)
            self.stopping.set()
            self._arm_watchdog()

        return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _arm_watchdog(self) -> None:
        """Should closing hang (an unreachable coordinator), exit anyway shortly after the shutdown timeout."""

        def expire() -> None:
            timeout = self.settings.shutdown_timeout_s
            log.error("shutdown took longer than RERANK_SHUTDOWN_TIMEOUT_S=%s; exiting", timeout)
            logging.shutdown()
            os._exit(1)

        timer = threading.Timer(self.settings.shutdown_timeout_s + 2, expire)
        timer.daemon = True
        timer.start()

    # -- one turn of the loop -------------------------------------------------------------------------------------

    def turn(self) -> None:
        self.last_turn = time.monotonic()
        for record in self.poll():
            self.route(record)
        self.feed()
        self.take_completions()
        self.commit()
        self.observe()

    def poll(self) -> list[SourceRecord]:
        try:
            polled = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
        except KafkaError as e:
            if is_transient(e):
                log.warning("poll failed, polling again: %s", one_line(e))
                time.sleep(0.5)
                return []
            self.set_fatal(f"the consumer failed: {one_line(e)}")
            return []
        return [SourceRecord.from_consumer_record(r) for records in polled.values() for r in records]

    def route(self, record: SourceRecord) -> None:
        """A polled record: tracked, then checked; a bad one is dead-lettered now, a good one waits for the GPU."""
        if _tp(record) not in self.owned:
            return  # its partition was revoked during this poll: the new owner reads it again
        self.tracker.add(_tp(record), record.offset)
        job_id = record.key.decode("utf-8", "replace") if record.key else None
        try:
            job = record.parse_job(max_message_bytes=self.settings.max_message_bytes, max_docs=self.settings.max_docs)
            job_id = job.job_id
            if job.reply_topic is not None and not self.allowed_reply.fullmatch(job.reply_topic):
                raise PermanentError(
                    "disallowed_reply_topic",
                    f"reply_topic {job.reply_topic!r} does not match RERANK_REPLY_TOPIC_ALLOWLIST "
                    f"{self.allowed_reply.pattern!r}",
                )
        except (PermanentError, InvalidJobError) as e:
            self.dead_letter(record, failure_from(e, stage="validate"), job_id)
            return
        self.backlog.append(WorkItem(record, job, assignment=self.assignments.get(_tp(record), 0)))

    def owns(self, item: WorkItem) -> bool:
        """Whether a job is still this worker's to score: its partition is assigned, under the same assignment."""
        tp = _tp(item.record)
        return tp in self.owned and self.assignments.get(tp) == item.assignment

    def feed(self) -> None:
        """Tokenize backlog jobs into the work queue while it has room; fetch nothing more while it is full."""
        until = time.monotonic() + FEED_SLICE_S
        while self.backlog and not self.work.full() and time.monotonic() < until:
            item = self.backlog.popleft()
            try:
                item.prepare(self.engine)
            except InvalidJobError as e:  # e.g. an instruction longer than RERANK_MAX_QUERY_TOKENS
                self.dead_letter(item.record, failure_from(e, stage="prepare"), item.job.job_id)
                continue
            self.work.put_nowait(item)
        if self.backlog or self.work.full():
            self.consumer.pause(*self.consumer.assignment())
            self.metrics.paused.set(1)
        elif self.consumer.paused():
            self.consumer.resume(*self.consumer.paused())
            self.metrics.paused.set(0)

    def take_completions(self, wait_s: float = 0.0) -> int:
        while True:  # jobs the GPU thread skipped: not finished here (their partition's owner reads them)
            try:
                item = self.skipped.get_nowait()
            except queue.Empty:
                break
            tp = _tp(item.record)
            if self.assignments.get(tp) == item.assignment:  # not a stale copy of a job since read again
                self.tracker.abandon(tp, item.record.offset)
        taken = 0
        while True:
            try:
                record = self.completions.get(timeout=wait_s) if wait_s and not taken else self.completions.get_nowait()
            except queue.Empty:
                return taken
            self.tracker.done(_tp(record), record.offset)
            taken += 1

    def commit(self) -> None:
        offsets = self.tracker.committable(tp for tp in self.tracker.partitions() if tp in self.owned)
        if not offsets:
            return
        try:
            self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        except KafkaError as e:  # a rebalance under way: the listener commits, the rest is redelivered
            self.metrics.commits.inc(result="failed")
            log.warning("commit failed: %s", one_line(e), extra={"offsets": _show(offsets)})
            return
        self.tracker.mark_committed(offsets)
        self.metrics.commits.inc(result="ok")
        log.debug("committed", extra={"offsets": _show(offsets)})

    def observe(self) -> None:
        now = time.monotonic()
        if now - self._last_observe < OBSERVE_EVERY_S:
            return
        self._last_observe = now
        self.metrics.in_flight.set(self.tracker.in_flight())
        self.metrics.queued.set(self.work.qsize() + len(self.backlog))
        for tp in self.owned:
            high = self.consumer.highwater(tp)
            if high is not None:
                mark = self.tracker.watermark(tp)
                lag = high - (mark if mark is not None else high)
                self.metrics.lag.set(lag, topic=tp.topic, partition=str(tp.partition))

    # -- dead letters ---------------------------------------------------------------------------------------------

    def _letter(self, record: SourceRecord, failure: Failure, job_id: str | None) -> Outgoing:
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

    def dead_letter(self, record: SourceRecord, failure: Failure, job_id: str | None) -> None:
        log.debug("dead-lettering: %s", failure.message, extra=job_fields(record, job_id, reason=failure.reason))
        self.outbox.put(self._letter(record, failure, job_id))

    # -- rebalance (called on kafka-python's IO thread while this thread is blocked in poll or close) -------------

    def partitions_revoked(self, partitions: set[TopicPartition], *, commit: bool) -> None:
        revoked = set(partitions)
        if not revoked:
            return
        self.owned = frozenset(self.owned - revoked)  # from here on the GPU thread starts none of their jobs
        # Their jobs not started yet are given up, not waited for: the backlog's, and those in the work queue (the
        # GPU thread skips them when it gets there; a snapshot under the queue's lock, as it may be taking one now).
        given_up = [item.record for item in self.backlog if _tp(item.record) in revoked]
        self.backlog = deque(item for item in self.backlog if _tp(item.record) not in revoked)
        with self.work.mutex:
            given_up += [item.record for item in self.work.queue if _tp(item.record) in revoked]
        for record in given_up:
            self.tracker.abandon(_tp(record), record.offset)
        if commit and not self.closing:
            s = self.settings
            deadline = time.monotonic() + min(s.revoke_timeout_s, s.session_timeout_ms / 2000)
            self.take_completions()  # what was acknowledged already, even with nothing left to wait for
            while self.tracker.in_flight(revoked) and time.monotonic() < deadline:
                self.take_completions(wait_s=0.05)
            offsets = self.tracker.committable(revoked)
            if offsets:
                # commit() blocks on the IO thread, which is this thread here: kafka-python 3 refuses it.
                self.consumer.commit_async({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
                self.tracker.mark_committed(offsets)
            left = self.tracker.in_flight(revoked)
            log.info(
                "partitions revoked",
                extra={
                    "partitions": _show(revoked),
                    "committed": _show(offsets),
                    "given_up": len(given_up),
                    "redelivered": left + len(given_up),
                },
            )
        self.metrics.revoked.inc(len(revoked))
        # Where to read again should the partition be handed straight back: only on an eager revocation, where
        # kafka-python keeps the partition's state (and position) for that. Lost partitions, and partitions revoked
        # cooperatively (already out of the assignment), start from the group's committed offset anyway.
        still_assigned = self.consumer.assignment() if commit and self.consumer is not None else set()
        for tp in revoked:
            mark = self.tracker.watermark(tp)
            if tp in still_assigned and mark is not None:
                self.resume_at[tp] = mark
            elif tp not in still_assigned:
                self.resume_at.pop(tp, None)
        self.tracker.drop(revoked)
        for tp in revoked:
            self.metrics.lag.remove(topic=tp.topic, partition=str(tp.partition))
        self.metrics.assigned.set(len(self.owned))

    def partitions_assigned(self, partitions: set[TopicPartition]) -> None:
        # kafka-python 3 keeps the fetch position of a partition revoked and assigned straight back (every eager
        # rebalance does that): it would go on after the jobs given up at revocation. Read them again.
        unreadable = set()
        for tp in sorted(set(partitions) & set(self.resume_at)):
            try:
                self.consumer.seek(tp, self.resume_at[tp])
            except (ValueError, KafkaError) as e:  # not for an assigned partition; should it happen, the partition
                # is left alone (going on from the kept position would commit past the jobs given up) and we stop
                unreadable.add(tp)
                self.set_fatal(f"cannot read {tp} again from offset {self.resume_at[tp]}: {one_line(e)}")
        self.resume_at = {}
        self.assignments = {**self.assignments, **{tp: self.assignments.get(tp, 0) + 1 for tp in partitions}}
        self.owned = frozenset(self.owned | (set(partitions) - unreadable))
        self.metrics.rebalances.inc()
        self.metrics.assigned.set(len(self.owned))
        log.info("partitions assigned", extra={"partitions": _show(partitions)})
        if self.owned:
            self.started.set()

    # -- health ---------------------------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.fatal is None and time.monotonic() - self.last_turn < STUCK_AFTER_S

    def ready(self) -> bool:
        return bool(self.owned) and not self.stopping.is_set() and self.fatal is None

    def set_fatal(self, message: str) -> None:
        if self.fatal is None:
            self.fatal = message
            log.critical("%s", message)
        if self.scorer is not None:
            self.scorer.stop_event.set()

    # -- shutdown -------------------------------------------------------------------------------------------------

    def shutdown(self) -> int:
        """Stop fetching, finish and publish the batch in hand, commit, leave the group."""
        s = self.settings
        started = time.monotonic()
        reserve = min(5.0, s.shutdown_timeout_s / 4)  # kept for the last commit and leaving the group
        deadline = started + s.shutdown_timeout_s - reserve
        self.closing = True
        if self.consumer is not None and self.consumer.assignment():
            self.consumer.pause(*self.consumer.assignment())
        dropped = len(self.backlog)
        self.backlog.clear()
        if self.scorer is not None:
            self.scorer.stop_event.set()  # the batch in hand finishes; no other starts
            self._wait_for(self.scorer, deadline)
            dropped += len(self.scorer.drain())
        if self.publisher is not None:
            if self.fatal is not None:
                self.publisher.abort.set()
            self.outbox.put(None)  # after everything already scored
            self._wait_for(self.publisher, deadline)
        self.take_completions()
        self.commit()
        left = self.tracker.in_flight()
        self.owned = frozenset()
        self.tracker = OffsetTracker()  # nothing for the close-time listener to do
        log.info(
            "worker stopped",
            extra={
                "seconds": round(time.monotonic() - started, 3),
                "not_started": dropped,
                "redelivered": left,
                "fatal": self.fatal,
            },
        )
        return EXIT_FATAL if self.fatal is not None else EXIT_OK

    def _wait_for(self, thread: threading.Thread, deadline: float) -> None:
        while thread.is_alive() and time.monotonic() < deadline:
            self.take_completions(wait_s=0.05)
            self.commit()

    def _close_consumer(self) -> None:
        timeout_ms = int(min(5.0, self.settings.shutdown_timeout_s / 4) * 1000)
        try:
            self.consumer.close(autocommit=False, timeout_ms=timeout_ms)  # leaves the group
        except Exception as e:
            log.warning("closing the consumer failed: %s", one_line(e))

    def _close_producer(self) -> None:
        try:
            self.producer.close(timeout=min(5.0, self.settings.shutdown_timeout_s / 4))
        except Exception as e:
            log.warning("closing the producer failed: %s", one_line(e))


def _show(offsets: Iterable[TopicPartition] | dict[TopicPartition, int]) -> dict[str, Any] | list[str]:
    if isinstance(offsets, dict):
        return {f"{tp.topic}[{tp.partition}]": o for tp, o in offsets.items()}
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in offsets)


def run_worker(settings: Settings, engine: Engine, *, install_signals: bool = True) -> int:
    return Worker(settings, engine).run(install_signals=install_signals)
