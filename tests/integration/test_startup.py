"""A worker process whose broker is down when it starts, or whose topics are missing (worker.kafka.startup)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.integration.conftest import LocalBroker, Topics, WorkerProcess, free_port, read_topic
from tests.integration.jobs import answered
from worker.client import RerankClient
from worker.kafka.topics import ensure_topics
from worker.settings import Settings

pytestmark = pytest.mark.integration

Spawn = Callable[[Settings], WorkerProcess]


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def log_lines(worker: WorkerProcess) -> list[dict[str, Any]]:
    lines = []
    for line in worker.log().splitlines():
        try:
            lines.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return lines


def test_a_worker_started_while_the_broker_is_down_waits_for_it_then_serves(
    local_broker: LocalBroker, topics: Topics, make_settings: Callable[..., Settings], spawn: Spawn
) -> None:
    port = free_port()
    local_broker.start()
    ensure_topics(
        Settings(bootstrap_servers=local_broker.bootstrap), {topics.jobs: 4, topics.results: 2, topics.dlq: 1}
    )
    local_broker.stop()  # data kept: the topics are there when it comes back
    settings = make_settings(bootstrap_servers=local_broker.bootstrap, http_port=port, kafka_startup_timeout_s=300)
    worker = spawn(settings)
    worker.wait_for_log("is not reachable", timeout_s=60)
    assert status(port, "/healthz") == 200  # alive: waiting is not a reason to be restarted
    assert status(port, "/readyz") == 503
    assert "engine warm" not in worker.log()  # the model waits for the broker: a misconfiguration costs no load
    time.sleep(4)  # a few attempts: one line each, nothing from kafka-python above debug
    waits = [line for line in log_lines(worker) if "is not reachable" in line["msg"]]
    assert 1 <= len(waits) <= 4, waits
    assert not [line for line in log_lines(worker) if line["logger"].startswith("kafka")], worker.log()[-3000:]

    local_broker.start()
    worker.wait_for_log("worker started", timeout_s=120)
    with RerankClient(make_settings(bootstrap_servers=local_broker.bootstrap)) as client:
        job_id = client.submit({"job_id": "after-the-wait", "query": "q", "documents": ["a", "b"]})
        outcome = client.wait([job_id], timeout_s=90)[job_id]
    assert len(getattr(outcome, "results", [])) == 2, outcome
    results = read_topic(local_broker.bootstrap, topics.results, until=lambda rs: len(answered(rs)) >= 1)
    assert list(answered(results)) == ["after-the-wait"]


def test_a_broker_that_stays_down_ends_the_wait_with_one_line_and_exit_4(
    make_settings: Callable[..., Settings], spawn: Spawn
) -> None:
    settings = make_settings(bootstrap_servers=f"127.0.0.1:{free_port()}", kafka_startup_timeout_s=3)
    worker = spawn(settings)
    assert worker.proc.wait(60) == 4
    lines = log_lines(worker)
    critical = [line for line in lines if line["level"] == "critical"]
    assert len(critical) == 1, worker.log()[-3000:]
    assert "unreachable for 3 s" in critical[0]["msg"]
    assert "RERANK_KAFKA_STARTUP_TIMEOUT_S" in critical[0]["msg"]
    assert "Traceback" not in worker.log()


def test_a_missing_topic_exits_at_once_before_the_model_loads(
    kafka_bootstrap: str, topics: Topics, make_settings: Callable[..., Settings], spawn: Spawn
) -> None:
    settings = make_settings(jobs_topic=f"{topics.jobs}.missing", kafka_startup_timeout_s=300)
    worker = spawn(settings)
    assert worker.proc.wait(60) == 4  # at once: no retry can make the topic exist
    critical = [line for line in log_lines(worker) if line["level"] == "critical"]
    assert len(critical) == 1, worker.log()[-3000:]
    assert "does not exist" in critical[0]["msg"]
    assert f"{topics.jobs}.missing" in critical[0]["msg"]
    assert "engine warm" not in worker.log()


def test_a_normal_start_and_a_job_log_no_warning_or_error(
    kafka_bootstrap: str, topics: Topics, make_settings: Callable[..., Settings], spawn: Spawn
) -> None:
    """A new group on fresh topics: kafka-python's NotCoordinator and missing-metadata chatter while the group is
    created stays at debug level."""
    settings = make_settings()
    worker = spawn(settings)
    worker.wait_for_log("worker started", timeout_s=120)
    with RerankClient(settings) as client:
        outcome = client.rerank("red shoes", ["a red shoe", "a boot"], timeout_s=90)
    assert len(getattr(outcome, "results", [])) == 2, outcome
    worker.proc.terminate()
    assert worker.proc.wait(60) == 0
    loud = [line for line in log_lines(worker) if line["level"] in ("warning", "error", "critical")]
    assert loud == []
