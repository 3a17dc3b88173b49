"""Dead-letter headers, the Prometheus text exposition, the health server and the JSON log lines."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import pytest

from worker.engine.api import InvalidJobError
from worker.pipeline.deadletter import dead_letter, header_map, smaller_dead_letter
from worker.pipeline.http import HealthServer
from worker.pipeline.logs import JsonFormatter, configure_logging, job_fields
from worker.pipeline.metrics import Counter, Gauge, Histogram, Registry, WorkerMetrics
from worker.pipeline.records import Failure, SourceRecord

RECORD = SourceRecord(
    topic="jobs",
    partition=3,
    offset=41,
    timestamp=1700000000123,
    timestamp_type=0,
    key=b"job-1",
    value=b"\xff not utf-8",
    headers=(("trace", b"abc"), ("rerank.error.reason", b"old")),
)


def test_dead_letter_keeps_bytes_and_says_why() -> None:
    failure = Failure.of(InvalidJobError("not_utf8", "job is not UTF-8"), stage="validate")
    letter = dead_letter(RECORD, failure, topic="dlq", group_id="g", worker_id="w-1", model="m", job_id="job-1")
    assert (letter.topic, letter.key, letter.value) == ("dlq", b"job-1", b"\xff not utf-8")
    h = header_map(letter.headers)
    assert h == {
        "trace": "abc",  # the record's own headers are kept, an old rerank.error.* is replaced
        "rerank.error.reason": "not_utf8",
        "rerank.error.category": "permanent",
        "rerank.error.class": "worker.engine.errors.InvalidJobError",
        "rerank.error.message": "job is not UTF-8",
        "rerank.error.stage": "validate",
        "rerank.original.topic": "jobs",
        "rerank.original.partition": "3",
        "rerank.original.offset": "41",
        "rerank.original.timestamp": "1700000000123",
        "rerank.original.timestamp.type": "0",
        "rerank.consumer.group": "g",
        "rerank.attempts": "1",
        "rerank.worker.id": "w-1",
        "rerank.model": "m",
    }
    assert [k for k, _ in letter.headers].count("rerank.error.reason") == 1


def test_tombstone_and_oversized_dead_letters() -> None:
    tombstone = SourceRecord("jobs", 0, 1, 0, 0, key=None, value=None)
    failure = Failure.of(InvalidJobError("not_json", "empty"), stage="validate")
    letter = dead_letter(tombstone, failure, topic="dlq", group_id="g", worker_id="w", model="m", job_id=None)
    assert letter.value == b""  # Kafka needs a key or a value
    big = dead_letter(RECORD, failure, topic="dlq", group_id="g", worker_id="w", model="m", job_id=None)
    dropped = smaller_dead_letter(big)
    assert dropped is not None
    assert dropped.value == b""
    assert dropped.key == RECORD.key
    assert header_map(dropped.headers)["rerank.original.value.dropped"] == str(len(RECORD.value or b""))


def test_transient_failure_category() -> None:
    from kafka.errors import KafkaTimeoutError

    f = Failure.of(KafkaTimeoutError("no ack"), stage="publish", attempts=5)
    assert (f.reason, f.category, f.attempts, f.stage) == ("produce_timeout", "transient", 5, "publish")


def test_prometheus_exposition() -> None:
    r = Registry()
    c = Counter(r, "x_total", "Things.", ["reason"])
    g = Gauge(r, "y", "A level.")
    h = Histogram(r, "z_seconds", "Durations.", [0.1, 1.0])
    c.inc(reason='a"b')
    c.inc(2, reason="c")
    g.set(1.5)
    for v in (0.05, 0.5, 0.7, 3.0):
        h.observe(v)
    text = r.render()
    assert text.splitlines() == [
        "# HELP x_total Things.",
        "# TYPE x_total counter",
        'x_total{reason="a\\"b"} 1',
        'x_total{reason="c"} 2',
        "# HELP y A level.",
        "# TYPE y gauge",
        "y 1.5",
        "# HELP z_seconds Durations.",
        "# TYPE z_seconds histogram",
        'z_seconds_bucket{le="0.1"} 1',
        'z_seconds_bucket{le="1"} 3',
        'z_seconds_bucket{le="+Inf"} 4',
        "z_seconds_sum 4.25",
        "z_seconds_count 4",
    ]
    with pytest.raises(ValueError, match="labels"):
        c.inc(wrong="x")


def test_health_server() -> None:
    state = {"alive": True, "ready": False}
    metrics = WorkerMetrics()
    metrics.dead_letters.inc(reason="not_json")
    server = HealthServer(
        "127.0.0.1", 0, alive=lambda: state["alive"], ready=lambda: state["ready"], metrics=metrics.render
    ).start()
    try:

        def get(path: str) -> tuple[int, str, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as resp:
                    return resp.status, resp.read().decode(), resp.headers["Content-Type"]
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode(), e.headers["Content-Type"]

        assert get("/healthz")[0] == 200
        assert get("/readyz")[0] == 503
        state["ready"] = True
        assert get("/readyz")[0] == 200
        state["alive"] = False
        assert get("/healthz")[0] == 503
        status, body, content_type = get("/metrics")
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        assert 'rerank_dead_letters_total{reason="not_json"} 1' in body
        assert "# TYPE rerank_batch_seconds histogram" in body
        assert get("/nope")[0] == 404
    finally:
        server.close()


def test_json_log_lines_carry_the_job() -> None:
    formatter = JsonFormatter(worker_id="w-1")
    record = logging.LogRecord("worker", logging.INFO, __file__, 1, "scored %d", (3,), None)
    for key, value in job_fields(RECORD, "job-1", reason="x").items():
        setattr(record, key, value)
    line = json.loads(formatter.format(record))
    assert line["msg"] == "scored 3"
    assert line["level"] == "info"
    assert line["worker_id"] == "w-1"
    assert line["job_id"] == "job-1"
    assert line["where"] == "jobs[3]@41"
    assert line["reason"] == "x"


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_kafka_pythons_own_lines_are_debug_lines(level: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("kafka").level)
    try:
        configure_logging(level, "w-1")
        logging.getLogger("kafka.net.manager").error("Connection failed: KafkaConnectionError: 111 ECONNREFUSED")
        logging.getLogger("worker.kafka.startup").warning("Kafka at b:9092 is not reachable")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("kafka").setLevel(saved[2])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [
        *([("kafka.net.manager", "debug")] if level == "DEBUG" else []),
        ("worker.kafka.startup", "warning"),
    ]
