"""Dead-letter headers, the metrics and their exposition (Prometheus text and OpenMetrics), the health server and
the JSON log lines."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from worker.engine.api import InvalidJobError, PassStats
from worker.pipeline.deadletter import dead_letter, header_map, smaller_dead_letter
from worker.pipeline.http import HealthServer
from worker.pipeline.logs import JsonFormatter, configure_logging, job_fields
from worker.pipeline.metrics import WorkerMetrics
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


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_render_what_the_stages_report() -> None:
    m = WorkerMetrics()
    now_ms = int(time.time() * 1000)
    m.answered("result", now_ms - 2500, documents=3)
    m.answered("dead_letter", now_ms, reason="not_json")
    m.answered("result", now_ms + 60_000, documents=1)  # a producer clock ahead of ours: no negative latency
    m.answered("result", -1, documents=1)  # no timestamp: counted, not timed
    m.scored_batch(
        [PassStats(3000, 0.02), PassStats(1000, 0.01)], [3, 400], tokens=4000, seconds=0.05, max_pack_tokens=4096
    )
    m.forget_partition("jobs", 0)  # never reported: nothing to forget
    body, content_type = m.exposition(None)
    assert content_type.startswith("text/plain; version=0.0.4")
    got = families(body.decode())

    def value(family: str, sample: str, **labels: str) -> float:
        (found,) = [s.value for s in got[family].samples if s.name == sample and s.labels == labels]
        return float(found)

    assert value("rerank_jobs", "rerank_jobs_total", outcome="result") == 3
    assert value("rerank_jobs", "rerank_jobs_total", outcome="dead_letter") == 1
    assert value("rerank_documents", "rerank_documents_total") == 5
    assert value("rerank_dead_letters", "rerank_dead_letters_total", reason="not_json") == 1
    latency = "rerank_job_latency_seconds"
    assert value(latency, latency + "_count", outcome="result") == 2
    assert 2.5 <= value(latency, latency + "_sum", outcome="result") < 10
    assert value(latency, latency + "_bucket", outcome="result", le="0.01") == 1  # the skewed one, as 0
    assert value(latency, latency + "_bucket", outcome="result", le="1.0") == 1
    assert value(latency, latency + "_bucket", outcome="result", le="5.0") == 2
    assert got[latency].type == "histogram"
    assert value("rerank_gpu_seconds", "rerank_gpu_seconds_count") == 2
    assert value("rerank_gpu_seconds", "rerank_gpu_seconds_sum") == pytest.approx(0.03)
    fill = "rerank_pass_fill_ratio"
    assert value(fill, fill + "_bucket", le="0.3") == 1
    assert value(fill, fill + "_bucket", le="0.8") == 2
    assert value("rerank_pack_fill_ratio", "rerank_pack_fill_ratio") == pytest.approx(4000 / (2 * 4096))
    assert value("rerank_tokens_per_second", "rerank_tokens_per_second") == pytest.approx(4000 / 0.03)
    assert value("rerank_batch_jobs", "rerank_batch_jobs_bucket", le="2.0") == 1
    assert value("rerank_job_documents", "rerank_job_documents_bucket", le="5.0") == 1
    assert value("rerank_job_documents", "rerank_job_documents_count") == 2
    # Series an alert divides by exist before anything happened; the process collector is on.
    fresh = families(WorkerMetrics().exposition(None)[0].decode())
    assert {s.labels["result"] for s in fresh["rerank_commits"].samples if s.name == "rerank_commits_total"} == {
        "ok",
        "failed",
    }
    assert "process_resident_memory_bytes" in fresh
    assert "python_info" in fresh


def test_metrics_speak_openmetrics_when_asked() -> None:
    m = WorkerMetrics()
    m.dead_letters.labels(reason="not_json").inc()
    body, content_type = m.exposition("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    got = {f.name: f for f in openmetrics_families(text)}
    assert got["rerank_dead_letters"].type == "counter"
    assert [s.value for s in got["rerank_dead_letters"].samples if s.name == "rerank_dead_letters_total"] == [1.0]


def test_health_server() -> None:
    state = {"alive": True, "ready": False}
    metrics = WorkerMetrics()
    metrics.dead_letters.labels(reason="not_json").inc()
    server = HealthServer(
        "127.0.0.1", 0, alive=lambda: state["alive"], ready=lambda: state["ready"], metrics=metrics.exposition
    ).start()
    try:

        def get(path: str, accept: str | None = None) -> tuple[int, str, str]:
            request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}")
            if accept:
                request.add_header("Accept", accept)
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
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
        assert 'rerank_dead_letters_total{reason="not_json"} 1.0' in body
        assert "# TYPE rerank_batch_seconds histogram" in body
        status, body, content_type = get("/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert status == 200
        assert content_type.startswith("application/openmetrics-text")
        assert body.endswith("# EOF\n")
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
