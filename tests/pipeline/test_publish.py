"""The publisher's retries and redirects on fake producers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, TopicAuthorizationFailedError

from tests.pipeline.stages import SETTINGS, record
from worker.pipeline.deadletter import dead_letter, header_map
from worker.pipeline.errors import Fatal
from worker.pipeline.metrics import WorkerMetrics
from worker.pipeline.publish import Publisher
from worker.pipeline.records import Failure, Outgoing
from worker.pipeline.sink import Outbox, WorkerSink


class Future:
    """Settled when made, like a kafka-python future the broker already answered: callbacks run at once."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    def add_callback(self, callback: Callable[[Any], None]) -> Future:
        if self.error is None:
            callback("acknowledged")
        return self

    def get(self, timeout: float | None = None) -> str:
        if self.error is not None:
            raise self.error
        return "acknowledged"


class Producer:
    """Answers each send with the next scripted outcome: None (acknowledged), an error in the future, or
    ("raise", error) raised by send itself."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    def send(self, topic: str, *, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> Future:
        self.sent.append((topic, key, value, headers))
        outcome = self.script.pop(0) if self.script else None
        if isinstance(outcome, tuple):
            raise outcome[1]
        return Future(outcome)


class RecordingPublisher(Publisher):
    """The publisher, remembering each message acknowledged, in order."""

    def __init__(self, producer: Producer) -> None:
        settings = SETTINGS.model_copy(update={"dlq_topic": "dlq", "group_id": "g"})
        fatal = Fatal()
        outbox = Outbox(WorkerSink(settings, worker_id="w", model="m"), fatal)
        super().__init__(producer, outbox, settings, WorkerMetrics(), fatal, sleep=lambda s: None)
        self.done: list[Outgoing] = []

    def finished(self, o: Outgoing) -> None:
        self.done.append(o)
        super().finished(o)

    def settle_all(self, o: Outgoing) -> None:
        """Settle `o`, then whatever that queued (the dead letter of a result that failed), as the thread does."""
        self.settle(o, self.send(o))
        while not self.outbox.messages.empty():
            more = self.outbox.messages.get_nowait()
            assert more is not None
            self.settle(more, self.send(more))


def publisher(producer: Producer) -> tuple[RecordingPublisher, list[Outgoing], Fatal]:
    p = RecordingPublisher(producer)
    return p, p.done, p.fatal


def result(offset: int = 7) -> Outgoing:
    return Outgoing("result", record(offset), "results", b"j", b'{"job_id":"j"}', job_id="j", documents=3)


def test_transient_publish_failure_is_retried() -> None:
    producer = Producer([KafkaTimeoutError("no ack"), KafkaTimeoutError("no ack"), None])
    p, done, fatal = publisher(producer)
    o = result()
    p.settle_all(o)
    assert done == [o]
    assert not fatal.is_set()
    assert [t for t, *_ in producer.sent] == ["results"] * 3
    assert p.metrics.sample("rerank_retries_total", reason="produce_timeout") == 2
    assert p.metrics.sample("rerank_jobs_total", outcome="result") == 1
    assert p.metrics.sample("rerank_documents_total") == 3
    assert p.metrics.sample("rerank_publish_seconds_count") == 1  # the acknowledged send only


def test_result_failing_every_try_is_dead_lettered_with_attempts() -> None:
    producer = Producer([KafkaTimeoutError("no ack")] * 3 + [None])
    p, done, _fatal = publisher(producer)
    o = result()
    p.settle_all(o)
    ((letter),) = done
    assert letter.kind == "dead_letter"
    assert letter.record == o.record
    h = header_map(letter.headers)
    assert (h["rerank.error.reason"], h["rerank.error.category"], h["rerank.attempts"]) == (
        "produce_timeout",
        "transient",
        "3",
    )
    assert letter.value == o.record.value  # the job's original bytes, not the result
    assert [t for t, *_ in producer.sent] == ["results"] * 3 + ["dlq"]


def test_rejected_results_are_dead_lettered_at_once() -> None:
    for error, reason in [
        (("raise", MessageSizeTooLargeError("too big")), "result_too_large"),
        (TopicAuthorizationFailedError("no"), "publish_rejected"),
    ]:
        producer = Producer([error, None])
        p, done, _fatal = publisher(producer)
        o = result()
        p.settle_all(o)
        assert header_map(done[0].headers)["rerank.error.reason"] == reason
        assert len(producer.sent) == 2  # no retry of a permanent refusal


def test_dead_letter_too_large_goes_without_value() -> None:
    producer = Producer([MessageSizeTooLargeError("too big"), None])
    p, done, _fatal = publisher(producer)
    failure = Failure("message_too_large", "permanent", "validate", "x.Y", "big")
    letter = dead_letter(record(1), failure, topic="dlq", group_id="g", worker_id="w", model="m", job_id=None)
    p.settle_all(letter)
    assert done[0].value == b""
    assert "rerank.original.value.dropped" in header_map(done[0].headers)


def test_dead_letter_too_large_without_its_value_goes_without_the_original_headers() -> None:
    """A bad job whose own headers fill most of the size limit: without its value the dead letter is still too large
    (kafka-python counts headers); it must not become fatal (the job would be redelivered into the same failure)."""
    producer = Producer([MessageSizeTooLargeError("too big"), MessageSizeTooLargeError("still too big"), None])
    p, done, fatal = publisher(producer)
    failure = Failure("not_json", "permanent", "validate", "x.Y", "bad")
    big = replace(record(1), headers=(("trace", b"a" * 1000), ("tenant", b"t")))
    letter = dead_letter(big, failure, topic="dlq", group_id="g", worker_id="w", model="m", job_id=None)
    p.settle_all(letter)
    assert not fatal.is_set()
    (sent,) = done
    headers = header_map(sent.headers)
    assert sent.value == b""
    assert "trace" not in headers
    assert "tenant" not in headers
    assert headers["rerank.original.headers.dropped"] == "2"
    assert headers["rerank.error.reason"] == "not_json"
    assert "rerank.original.value.dropped" in headers


def test_unpublishable_dead_letter_is_fatal_and_not_done() -> None:
    producer = Producer([KafkaTimeoutError("down")] * 10)
    p, done, fatal = publisher(producer)
    failure = Failure("not_json", "permanent", "validate", "x.Y", "bad")
    letter = dead_letter(record(1), failure, topic="dlq", group_id="g", worker_id="w", model="m", job_id=None)
    p.settle_all(letter)
    assert not done
    assert fatal.message is not None
    assert "dead-letter topic" in fatal.message


def test_publisher_thread_sends_everything_before_stopping() -> None:
    producer = Producer([])
    p, done, _fatal = publisher(producer)
    outs = [result(i) for i in range(5)]
    for o in outs:
        p.outbox.messages.put(o)
    p.outbox.close()
    p.start()
    p.join(5)
    assert not p.is_alive()
    assert done == outs
