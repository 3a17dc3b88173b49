"""Kafka settings: KAFKA_* names without prefix, secrets kept secret, orderings checked, kafka-python kwargs."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from worker.kafka.config import FRAMING_BYTES, consumer_kwargs, producer_kwargs
from worker.settings import Settings, env_name, settings_table


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith(("RERANK_", "KAFKA_")):
            monkeypatch.delenv(key)


def test_kafka_connection_reads_unprefixed_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "b1:9092, b2:9093")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", "/etc/ca.pem")
    monkeypatch.setenv("RERANK_JOBS_TOPIC", "jobs.x")
    s = Settings()
    assert s.bootstrap_servers == "b1:9092, b2:9093"
    assert s.jobs_topic == "jobs.x"
    kwargs = consumer_kwargs(s, client_id="c", group_id="g")
    assert kwargs["bootstrap_servers"] == ["b1:9092", "b2:9093"]
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "svc"
    assert kwargs["sasl_plain_password"] == "hunter2"
    # kafka-python's admin client logs its arguments at DEBUG: the password shows as '***' there
    assert "hunter2" not in repr(kwargs)
    assert "hunter2" not in "configuration: %s" % (kwargs,)  # noqa: UP031 (the admin client's own format)
    assert "\0".join(["svc", "svc", kwargs["sasl_plain_password"]]).encode() == b"svc\0svc\0hunter2"  # SASL PLAIN
    assert kwargs["ssl_cafile"] == "/etc/ca.pem"
    # the password never shows in a repr, a dump or a log line of the settings
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s.model_dump())


def test_prefixed_kafka_name_is_a_typo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_BOOTSTRAP_SERVERS", "x:1")
    with pytest.raises(ValidationError, match="RERANK_BOOTSTRAP_SERVERS"):
        Settings()


def test_sasl_needs_credentials() -> None:
    with pytest.raises(ValidationError, match="KAFKA_SASL_USERNAME"):
        Settings(security_protocol="SASL_PLAINTEXT")


def test_heartbeat_below_a_third_of_session() -> None:
    with pytest.raises(ValidationError, match="RERANK_HEARTBEAT_INTERVAL_MS=3000"):
        Settings(session_timeout_ms=6000)
    Settings(session_timeout_ms=6000, heartbeat_interval_ms=2000)


def test_reply_topic_allowlist() -> None:
    assert Settings().reply_topic_pattern().fullmatch("rerank.results")
    assert not Settings().reply_topic_pattern().fullmatch("rerankXresults")
    s = Settings(reply_topic_allowlist=r"replies\.[a-z]+")
    assert s.reply_topic_pattern().fullmatch("replies.team")
    assert not s.reply_topic_pattern().fullmatch("replies.team.x")
    with pytest.raises(ValidationError, match="not a regular expression"):
        Settings(reply_topic_allowlist="(")


def test_settings_table_names_every_variable() -> None:
    table = settings_table()
    for name in Settings.model_fields:
        assert f"| `{env_name(name)}` |" in table
    assert "| `KAFKA_BOOTSTRAP_SERVERS` | `localhost:9092` |" in table
    assert "RERANK_BOOTSTRAP_SERVERS" not in table
    assert "| `RERANK_GROUP_ID` | `rerank-worker` |" in table


def test_at_least_once_client_settings() -> None:
    s = Settings(max_message_bytes=5_000_000)
    c = consumer_kwargs(s, client_id="c", group_id="g")
    assert c["enable_auto_commit"] is False
    assert c["auto_offset_reset"] == "earliest"
    assert c["max_partition_fetch_bytes"] == 5_000_000 + FRAMING_BYTES
    assert c["fetch_max_bytes"] >= c["max_partition_fetch_bytes"]
    p = producer_kwargs(s, client_id="p")
    assert p["acks"] == "all"
    assert p["enable_idempotence"] is True
    assert p["compression_type"] == "gzip"
    assert p["max_request_size"] == 5_000_000 + FRAMING_BYTES
    assert "sasl_plain_password" not in p  # PLAINTEXT: no SASL keys at all


def test_clients_accept_the_kwargs() -> None:
    """kafka-python rejects unknown keys: build real clients (no broker needed to construct the config check)."""
    from kafka import KafkaConsumer

    s = Settings(bootstrap_servers="127.0.0.1:1")
    kwargs = consumer_kwargs(s, client_id="c", group_id="g")
    assert set(kwargs) <= set(KafkaConsumer.DEFAULT_CONFIG)
    from kafka import KafkaProducer

    assert set(producer_kwargs(s, client_id="p")) <= set(KafkaProducer.DEFAULT_CONFIG)


def test_password_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    s = Settings(security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="s3cret")
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("settings: %s", s)
    assert "s3cret" not in caplog.text
