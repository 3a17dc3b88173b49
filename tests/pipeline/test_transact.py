"""The exactly-once stage's policy (worker.pipeline.transact) with a producer that fails on cue: what is retried,
what is fatal, what is replaced. The real broker's transactions: tests/integration/test_exactly_once.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kafka import errors as kafka_errors
from kafka.structs import TopicPartition

from worker.pipeline.commit import OffsetTracker
from worker.pipeline.errors import Fatal
from worker.pipeline.metrics import WorkerMetrics
from worker.pipeline.records import Finished, Outgoing, SourceRecord
from worker.pipeline.sink import WorkerSink
from worker.pipeline.transact import Transactions
from worker.settings import Settings

TP = TopicPartition("jobs", 0)
SETTINGS = Settings(max_attempts=3, retry_initial_ms=100, retry_max_ms=200)


class Sent:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.is_done = True

    def failed(self) -> bool:
        return self.error is not None

    @property
    def exception(self) -> BaseException | None:
        return self.error

    def add_callback(self, callback: Callable[[Any], None]) -> Sent:
        if self.error is None:
            callback("acknowledged")
        return self


class Producer:
    """A transactional producer's calls, recorded; `commit_errors` are raised by commit_transaction in turn, and
    a send to a topic in `too_large` fails as the broker refuses a record too large."""

    def __init__(self, commit_errors: list[BaseException] | None = None, too_large: set[str] | None = None) -> None:
        self.commit_errors = commit_errors or []
        self.too_large = too_large or set()
        self.calls: list[str] = []
        self.sending: list[tuple[str, bytes | None]] = []
        self.committed: list[list[tuple[str, bytes | None]]] = []
        self.headers: dict[bytes | None, dict[str, bytes]] = {}

    def begin_transaction(self) -> None:
        self.calls.append("begin")
        self.sending = []

    def send(self, topic: str, *, key: bytes | None, value: bytes | None, headers: Any) -> Sent:
        self.sending.append((topic, key))
        self.headers[key] = dict(headers or [])
        error = kafka_errors.MessageSizeTooLargeError() if topic in self.too_large else None
        return Sent(error)

    def send_offsets_to_transaction(self, offsets: dict[TopicPartition, Any], group_metadata: Any) -> None:
        self.calls.append(f"offsets {offsets[TP].offset}")

    def commit_transaction(self) -> None:
        if any(topic in self.too_large for topic, _ in self.sending):
            raise kafka_errors.KafkaError("a record of the transaction failed")
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        self.calls.append("commit")
        self.committed.append(self.sending)

    def abort_transaction(self) -> None:
        self.calls.append("abort")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(offset: int) -> SourceRecord:
    return SourceRecord("jobs", 0, offset, 0, 0, key=f"j{offset}".encode(), value=b"{}")


def answer(offset: int, topic: str = "results") -> Finished:
    rec = record(offset)
    return Finished(rec, message=Outgoing("result", rec, topic, f"j{offset}".encode(), b"{}", job_id=f"j{offset}"))


def stage(producer: Producer) -> tuple[Transactions, OffsetTracker[TopicPartition], Fatal, Clock]:
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    fatal, clock = Fatal(), Clock()
    sink = WorkerSink(SETTINGS, worker_id="w", model="m")
    return Transactions(producer, tracker, sink, SETTINGS, WorkerMetrics(), fatal, clock=clock), tracker, fatal, clock


def test_answers_wait_for_the_records_before_them_then_go_with_their_offsets() -> None:
    producer = Producer()
    transactions, tracker, fatal, _ = stage(producer)
    for offset in (5, 6, 7):
        tracker.add(TP, offset)
    transactions.hold(answer(6))
    assert transactions.commit([TP], lambda: "group") == 0  # 5 has no answer yet: nothing may go out
    transactions.hold(answer(5))
    assert transactions.commit([TP], lambda: "group") == 2
    assert producer.calls == ["begin", "offsets 7", "commit"]
    assert producer.committed == [[("results", b"j5"), ("results", b"j6")]]
    assert tracker.in_flight() == 1
    assert not fatal.is_set()


def test_a_transient_failure_is_aborted_and_tried_again_after_a_backoff() -> None:
    producer = Producer(commit_errors=[kafka_errors.KafkaTimeoutError("coordinator slow")])
    transactions, tracker, fatal, clock = stage(producer)
    tracker.add(TP, 0)
    transactions.hold(answer(0))
    assert transactions.commit([TP], lambda: "group") == 0
    assert producer.calls[-1] == "abort"
    assert transactions.commit([TP], lambda: "group") == 0  # still backing off
    clock.now += 1.0
    assert transactions.commit([TP], lambda: "group") == 1
    assert producer.committed == [[("results", b"j0")]]
    assert not fatal.is_set()


def test_a_rebalance_under_way_is_retried_and_a_fenced_producer_is_fatal() -> None:
    producer = Producer(commit_errors=[kafka_errors.TransactionAbortableError(), kafka_errors.ProducerFencedError()])
    transactions, tracker, fatal, clock = stage(producer)
    tracker.add(TP, 0)
    transactions.hold(answer(0))
    transactions.commit([TP], lambda: "group")
    assert not fatal.is_set()
    clock.now += 1.0
    transactions.commit([TP], lambda: "group")
    assert fatal.is_set()
    assert "fences" in (fatal.message or "")
    assert producer.committed == []
    assert tracker.in_flight() == 1  # never committed: read again after the restart


def test_retries_run_out_then_fatal() -> None:
    producer = Producer(commit_errors=[kafka_errors.KafkaTimeoutError() for _ in range(5)])
    transactions, tracker, fatal, clock = stage(producer)
    tracker.add(TP, 0)
    transactions.hold(answer(0))
    for _ in range(SETTINGS.max_attempts):
        transactions.commit([TP], lambda: "group")
        clock.now += 1.0
    assert fatal.is_set()
    assert "3 times" in (fatal.message or "")


def test_a_result_too_large_for_its_topic_becomes_its_dead_letter() -> None:
    producer = Producer(too_large={"results"})
    transactions, tracker, fatal, _ = stage(producer)
    tracker.add(TP, 0)
    tracker.add(TP, 1)
    transactions.hold(answer(0))
    transactions.hold(answer(1, topic="elsewhere"))
    assert transactions.commit([TP], lambda: "group") == 0  # aborted, the result replaced
    assert transactions.commit([TP], lambda: "group") == 2
    assert producer.committed == [[(SETTINGS.dlq_topic, b"j0"), ("elsewhere", b"j1")]]
    assert producer.headers[b"j0"]["rerank.error.reason"] == b"result_too_large"
    assert producer.headers[b"j0"]["rerank.error.class"].endswith(b"MessageSizeTooLargeError")
    assert not fatal.is_set()


def test_revoked_partitions_drop_their_answers() -> None:
    producer = Producer()
    transactions, tracker, _, _ = stage(producer)
    tracker.add(TP, 0)
    transactions.hold(answer(0))
    assert transactions.drop([TP]) == 1
    tracker.drop([TP])
    transactions.hold(answer(0))  # late: its partition is gone
    assert transactions.commit([TP], lambda: "group") == 0
    assert producer.calls == []
