"""A broker that demands SASL_SSL (SCRAM-SHA-512) or mutual TLS, with certificates from a test CA made at test time:
the worker, `enqueue`, `replay` and `dlq` connect with credentials from the environment; each refusal exits 4 at
once with one line; the password appears nowhere."""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.integration.conftest import (
    CliRun,
    LocalBroker,
    Topics,
    WorkerProcess,
    free_port,
    produce,
    read_topic,
)
from tests.integration.tls import Certificates, make_certificates
from worker.client import RerankClient
from worker.kafka.topics import ensure_topics
from worker.pipeline.deadletter import header_map
from worker.settings import Settings

pytestmark = pytest.mark.integration

USER = "rerank-svc"
PASSWORD = f"pw-{uuid.uuid4().hex}"  # unique: found anywhere means leaked


@dataclass(frozen=True)
class SecureBroker:
    plaintext: str  # for the test's own set-up and reads
    sasl_ssl: str
    mtls: str
    certs: Certificates


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    directory = tmp_path_factory.mktemp("secure-broker")
    certs = make_certificates(directory / "tls")
    sasl_port, mtls_port = free_port(), free_port()
    broker = LocalBroker(
        directory,
        KAFKA_SASL_SSL_PORT=str(sasl_port),
        KAFKA_MTLS_PORT=str(mtls_port),
        KAFKA_TLS_KEYSTORE=str(certs.broker_keystore),
        KAFKA_TLS_CA=str(certs.ca),
        KAFKA_SCRAM_USER=USER,
        KAFKA_SCRAM_PASSWORD=PASSWORD,
    )
    broker.start()
    try:
        yield SecureBroker(broker.bootstrap, f"127.0.0.1:{sasl_port}", f"127.0.0.1:{mtls_port}", certs)
    finally:
        broker.stop()


@pytest.fixture
def secure_topics(secure_broker: SecureBroker) -> Topics:
    tag = uuid.uuid4().hex[:10]
    t = Topics(f"s{tag}.jobs", f"s{tag}.results", f"s{tag}.dlq", f"g{tag}")
    ensure_topics(Settings(bootstrap_servers=secure_broker.plaintext), {t.jobs: 2, t.results: 1, t.dlq: 1})
    return t


def sasl_settings(
    make_settings: Callable[..., Settings], broker: SecureBroker, topics: Topics, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "bootstrap_servers": broker.sasl_ssl,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": USER,
        "sasl_password": PASSWORD,
        "ssl_cafile": str(broker.certs.ca),
        "jobs_topic": topics.jobs,
        "results_topic": topics.results,
        "dlq_topic": topics.dlq,
        "group_id": topics.group,
        "kafka_startup_timeout_s": 120.0,
        **overrides,
    }
    return make_settings(**values)


def test_worker_and_tools_connect_with_sasl_ssl_and_never_show_the_password(
    secure_broker: SecureBroker,
    secure_topics: Topics,
    make_settings: Callable[..., Settings],
    spawn: Callable[[Settings], WorkerProcess],
    run_cli: Callable[..., CliRun],
    tmp_path: Path,
) -> None:
    port = free_port()
    settings = sasl_settings(make_settings, secure_broker, secure_topics, http_port=port, worker_id="w-sasl")
    worker = spawn(settings)
    worker.wait_for_log("worker started", timeout_s=120)

    job = tmp_path / "job.json"
    job.write_bytes(orjson.dumps({"job_id": "over-tls", "query": "red shoes", "documents": ["a red shoe", "a boot"]}))
    enqueued = run_cli(settings, "enqueue", "--file", str(job), "--wait", "--json", "--timeout", "90")
    assert enqueued.code == 0, enqueued.err
    assert [r["index"] for r in orjson.loads(enqueued.out)["results"]] in ([0, 1], [1, 0])

    produce(secure_broker.plaintext, secure_topics.jobs, [(b"bad", b"{not json", [])])
    letters = read_topic(secure_broker.plaintext, secure_topics.dlq, until=lambda rs: len(rs) >= 1)
    listed = run_cli(settings, "dlq", "list", "--json")
    assert listed.code == 0, listed.err
    assert orjson.loads(listed.out)["by_reason"] == {"not_json": 1}

    replayed = run_cli(settings, "replay", "--from", "1970-01-01T00:00:00Z", "--json", "--no-progress")
    assert replayed.code == 0, replayed.err
    assert orjson.loads(replayed.out)["replayed"] == 1

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    worker.proc.terminate()
    assert worker.proc.wait(60) == 0
    seen = [
        worker.log(),
        metrics,
        enqueued.out + enqueued.err,
        listed.out + listed.err,
        replayed.out + replayed.err,
        *(str(header_map(letter.headers)) for letter in letters),
    ]
    assert not [text for text in seen if PASSWORD in text]


def test_mutual_tls_with_a_client_certificate(
    secure_broker: SecureBroker, secure_topics: Topics, make_settings: Callable[..., Settings], engine: Any
) -> None:
    from tests.integration.conftest import worker_thread

    settings = make_settings(
        bootstrap_servers=secure_broker.mtls,
        security_protocol="SSL",
        ssl_cafile=str(secure_broker.certs.ca),
        ssl_certfile=str(secure_broker.certs.client_cert),
        ssl_keyfile=str(secure_broker.certs.client_key),
        jobs_topic=secure_topics.jobs,
        results_topic=secure_topics.results,
        dlq_topic=secure_topics.dlq,
        group_id=secure_topics.group,
    )
    with worker_thread(settings, engine), RerankClient(settings) as client:
        outcome = client.rerank("red shoes", ["a red shoe", "a boot"], timeout_s=60)
    assert len(getattr(outcome, "results", [])) == 2, outcome


REFUSALS = {
    "wrong-password": ({"sasl_password": "not-the-password"}, "authentication failed"),
    "unknown-ca": ({"ssl_cafile": "OTHER_CA"}, "certificate is not trusted"),
    "plaintext-against-tls": (
        {"security_protocol": "PLAINTEXT", "sasl_mechanism": None, "sasl_username": None, "sasl_password": None},
        "speaks",  # "speaks TLS" (found by asking) or "speaks another protocol" (from kafka-python's log)
    ),
    "mtls-without-a-certificate": (
        {"bootstrap_servers": "MTLS", "security_protocol": "SSL", "sasl_username": None, "sasl_password": None},
        "refused the client's TLS certificate",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_refusal_exits_4_at_once_with_one_line(
    case: str,
    secure_broker: SecureBroker,
    secure_topics: Topics,
    make_settings: Callable[..., Settings],
    spawn: Callable[[Settings], WorkerProcess],
    run_cli: Callable[..., CliRun],
    tmp_path: Path,
) -> None:
    overrides, meaning = REFUSALS[case]
    overrides = {
        k: {"OTHER_CA": str(secure_broker.certs.other_ca), "MTLS": secure_broker.mtls}.get(v, v) if v else v
        for k, v in overrides.items()
    }
    # The wait for an unreachable cluster is long (300 s): a refusal must not wait it out.
    settings = sasl_settings(make_settings, secure_broker, secure_topics, kafka_startup_timeout_s=300, **overrides)
    started = time.monotonic()
    worker = spawn(settings)
    assert worker.proc.wait(90) == 4
    took = time.monotonic() - started
    lines = [orjson.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    critical = [line["msg"] for line in lines if line["level"] == "critical"]
    assert len(critical) == 1, worker.log()[-3000:]
    assert meaning in critical[0]
    assert took < 90
    assert "Traceback" not in worker.log()

    job = tmp_path / "job.json"
    job.write_bytes(orjson.dumps({"job_id": "refused", "query": "q", "documents": ["a"]}))
    enqueued = run_cli(settings, "enqueue", "--file", str(job))
    assert enqueued.code == 4, enqueued.err
    assert enqueued.err.count("\n") == 1
    assert meaning in enqueued.err
    assert PASSWORD not in worker.log() + enqueued.err
