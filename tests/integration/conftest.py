"""A real Apache Kafka broker for the integration tests, and helpers to run workers against it.

The broker, in order: KAFKA_BOOTSTRAP_SERVERS when set; else testcontainers' KafkaContainer when a Docker engine
answers; else scripts/kafka/local-kafka.sh (Apache Kafka 4.x jars from Maven Central, KRaft, loopback) on a free
port, stopped at the end. If none works the tests FAIL with the reason: they never skip.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from pydantic import SecretStr

from worker.kafka.topics import ensure_topics
from worker.pipeline.worker import Worker
from worker.settings import ENV_PREFIX, Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kafka" / "local-kafka.sh"


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (client and controller listeners of the local broker)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        yield given
        return
    errors = []
    if _docker_answers():
        try:
            try:
                from testcontainers.community.kafka import KafkaContainer
            except ImportError:  # testcontainers before the community split
                from testcontainers.kafka import KafkaContainer

            container = KafkaContainer().with_kraft()
            for key, value in {
                "KAFKA_MESSAGE_MAX_BYTES": "16777216",
                "KAFKA_REPLICA_FETCH_MAX_BYTES": "16777216",
                "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
                "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
            }.items():
                container = container.with_env(key, value)
            container.start()
        except Exception as e:
            errors.append(f"testcontainers: {e}")
        else:
            try:
                yield container.get_bootstrap_server()
            finally:
                container.stop()
            return
    else:
        errors.append("testcontainers: no Docker engine answers")
    port = _free_port_pair()
    # Auto-create off, as on most production clusters: nothing may depend on a topic appearing when first named.
    env = {
        **os.environ,
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(port + 1),
        "KAFKA_AUTO_CREATE_TOPICS": "false",
    }
    start = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600)
    if start.returncode != 0:
        errors.append(f"{SCRIPT.name} start exited {start.returncode}:\n{start.stderr[-3000:]}")
        pytest.fail("no Kafka broker for the integration tests:\n" + "\n".join(errors), pytrace=False)
    line = start.stdout.strip().splitlines()[-1]
    assert line.startswith("KAFKA_BOOTSTRAP_SERVERS="), start.stdout
    try:
        yield line.split("=", 1)[1]
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)


class LocalBroker:
    """A broker of one test's own (scripts/kafka/local-kafka.sh, auto-create off), started and stopped at will; its
    data is kept across restarts."""

    def __init__(self, directory: Path, **env: str) -> None:
        """`env`: more of local-kafka.sh's settings (the secured listeners')."""
        self.port = _free_port_pair()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "KAFKA_PORT": str(self.port),
            "KAFKA_CONTROLLER_PORT": str(self.port + 1),
            "KAFKA_RUN_DIR": str(directory / "broker"),
            "KAFKA_DATA_DIR": str(directory / "broker-data"),
            "KAFKA_AUTO_CREATE_TOPICS": "false",
            **env,
        }

    def script(self, command: str) -> None:
        done = subprocess.run([str(SCRIPT), command], env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"local-kafka.sh {command}: {done.stderr[-3000:]}"

    def start(self) -> None:
        self.script("start")

    def stop(self) -> None:
        self.script("stop")

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def local_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A LocalBroker, not yet started; stopped at the end."""
    broker = LocalBroker(tmp_path)
    try:
        yield broker
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=broker.env, capture_output=True, text=True, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Topics:
    jobs: str
    results: str
    dlq: str
    group: str


@pytest.fixture
def topics(kafka_bootstrap: str) -> Topics:
    """Fresh topics and group per test (uuid names), created with 16 MiB message limits and 4 job partitions."""
    tag = uuid.uuid4().hex[:10]
    t = Topics(f"t{tag}.jobs", f"t{tag}.results", f"t{tag}.dlq", f"g{tag}")
    ensure_topics(Settings(bootstrap_servers=kafka_bootstrap), {t.jobs: 4, t.results: 2, t.dlq: 1})
    return t


# Timings for a 2-core machine: a dead worker's partitions move after 6 s (the broker's minimum session).
FAST = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 20000,
    "batch_wait_ms": 20,
    "shutdown_timeout_s": 20.0,
    "revoke_timeout_s": 2.0,
    "retry_initial_ms": 50,
    "retry_max_ms": 500,
    "http_port": 0,
    "http_host": "127.0.0.1",
}


@pytest.fixture
def make_settings(kafka_bootstrap: str, topics: Topics) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values = {
            "bootstrap_servers": kafka_bootstrap,
            "jobs_topic": topics.jobs,
            "results_topic": topics.results,
            "dlq_topic": topics.dlq,
            "group_id": topics.group,
            **FAST,
            **overrides,
        }
        return Settings(**values)

    return make


@contextmanager
def worker_thread(settings: Settings, engine: Any, *, ready_timeout_s: float = 60) -> Iterator[Worker]:
    """A worker running in a thread of this process (the session's tiny model); stopped cleanly on exit."""
    worker = Worker(settings, engine)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()), name="test-worker", daemon=True)
    thread.start()
    try:
        if not worker.started.wait(ready_timeout_s):
            raise AssertionError(f"the worker got no partitions within {ready_timeout_s}s (fatal: {worker.fatal})")
        yield worker
    finally:
        worker.stop()
        thread.join(settings.shutdown_timeout_s + 10)
    assert not thread.is_alive(), "the worker did not stop"
    assert codes == [0], f"worker exit code {codes}, fatal: {worker.fatal}"


def worker_env(settings: Settings, model_dir: Path) -> dict[str, str]:
    """The environment of a `rerank-worker run` subprocess with these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith((ENV_PREFIX, "KAFKA_"))}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is not None and name in settings.model_fields_set:
            env[env_name(name)] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    env.update({"RERANK_MODEL": str(model_dir), "RERANK_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"})
    return env


class WorkerProcess:
    """`python -m worker.cli run` as a real process, its JSON log lines kept in a file."""

    def __init__(self, settings: Settings, model_dir: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"],
            env=worker_env(settings, model_dir),
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode} before {text!r}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} in the worker log within {timeout_s}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


@pytest.fixture
def spawn(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Callable[[Settings], WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(settings: Settings) -> WorkerProcess:
        w = WorkerProcess(settings, tiny_model_dir, tmp_path / f"worker-{len(started)}.log")
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def produce(
    bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]
) -> list[Any]:
    """Send raw (key, value, headers) messages; returns their RecordMetadata (partition, offset, timestamp)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=17 * 1024 * 1024, compression_type="gzip")
    try:
        futures = [producer.send(topic, key=k, value=v, headers=h) for k, v, h in messages]
        return [f.get(timeout=30) for f in futures]
    finally:
        producer.close()


def read_topic(
    bootstrap: str, topic: str, *, until: Callable[[list[Any]], bool] | None = None, timeout_s: float = 60
) -> list[Any]:
    """Every record of `topic` from the beginning, read until `until(records)` holds (AssertionError on timeout);
    without `until`, everything up to the topic's current end."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=17 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    try:
        partitions = None
        deadline = time.monotonic() + timeout_s
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                time.sleep(0.2)
        assert partitions is not None, f"topic {topic} has no metadata"
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        if until is None:
            ends = consumer.end_offsets(tps)

            def until(_: list[Any]) -> bool:
                return all(consumer.position(tp) >= end for tp, end in ends.items())

        while not until(records):
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: condition not met within {timeout_s}s ({len(records)} records)")
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        return records
    finally:
        consumer.close(autocommit=False)


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition of `topic` (missing: nothing committed)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        out = {}
        for p in sorted(partitions):
            offset = consumer.committed(TopicPartition(topic, p))
            if offset is not None:
                out[p] = offset
        return out
    finally:
        consumer.close(autocommit=False)


@dataclass(frozen=True)
class CliRun:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_model_dir: Path
) -> Callable[..., CliRun]:
    """`rerank-worker ARGS` in this process (no interpreter start, no torch import: fast), with `settings` as its
    environment (RERANK_MODEL: the session's tiny model); returns its exit code, stdout and stderr."""
    import logging

    from worker import cli

    root, kafka_log = logging.getLogger(), logging.getLogger("kafka")
    # The commands configure logging for a process of their own: keep this process's handlers and levels.
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(kafka_log, "level", kafka_log.level)

    def run(settings: Settings, *args: str) -> CliRun:
        for name in list(os.environ):
            if name.startswith((ENV_PREFIX, "KAFKA_")):
                monkeypatch.delenv(name)
        for name, value in worker_env(settings, tiny_model_dir).items():
            if name.startswith((ENV_PREFIX, "KAFKA_")):
                monkeypatch.setenv(name, value)
        capsys.readouterr()
        try:
            cli.main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return run
