"""kafka-python keyword arguments built from Settings: connection and security once, then consumer and producer.

Checked against kafka-python 3.0.12's own defaults: the consumer defaults to auto-commit and `latest`, which a job
queue with at-least-once must not use; the producer defaults to acks=all and idempotence, set here explicitly
anyway so a change of default cannot weaken them. Sizes: one RERANK_MAX_MESSAGE_BYTES setting drives the
producer's request size and the consumer's fetch sizes, so a job or result the broker accepts is also one the
clients can carry.
"""

from __future__ import annotations

from typing import Any

from worker.settings import Settings

# Room for dead-letter headers and record-batch framing on top of the largest job (the producer's limit counts
# the whole record, headers included).
FRAMING_BYTES = 64 * 1024


class Redacted(str):
    """A secret as kafka-python takes it (a str: SASL joins and encodes it) whose repr is '***': kafka-python's admin
    client logs its keyword arguments at DEBUG (`Starting KafkaAdminClient with configuration: %s`), which prints
    each value's repr."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


def connection_kwargs(settings: Settings, *, client_id: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in settings.bootstrap_servers.split(",") if s.strip()],
        "client_id": client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol.startswith("SASL_"):
        kwargs["sasl_mechanism"] = settings.sasl_mechanism or "PLAIN"
        kwargs["sasl_plain_username"] = settings.sasl_username
        password = settings.sasl_password
        kwargs["sasl_plain_password"] = Redacted(password.get_secret_value()) if password is not None else None
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        if settings.ssl_cafile:
            kwargs["ssl_cafile"] = settings.ssl_cafile
        if settings.ssl_certfile and settings.ssl_keyfile:
            kwargs["ssl_certfile"] = settings.ssl_certfile
            kwargs["ssl_keyfile"] = settings.ssl_keyfile
    return kwargs


_CODEC_PACKAGES = {"gzip": "the standard library", "snappy": "python-snappy", "lz4": "lz4", "zstd": "zstandard"}


def compression(settings: Settings) -> str | None:
    """The producer's codec; raises ValueError at start when its package is missing (kafka-python would only say
    so after connecting)."""
    if settings.compression_type == "none":
        return None
    from kafka import codec

    if not getattr(codec, f"has_{settings.compression_type}")():
        package = _CODEC_PACKAGES[settings.compression_type]
        raise ValueError(f"RERANK_COMPRESSION_TYPE={settings.compression_type} needs the {package} package")
    return settings.compression_type


def consumer_kwargs(settings: Settings, *, client_id: str, group_id: str | None) -> dict[str, Any]:
    fetch_bytes = settings.max_message_bytes + FRAMING_BYTES
    return {
        **connection_kwargs(settings, client_id=client_id),
        "group_id": group_id,
        "enable_auto_commit": False,  # at-least-once: offsets are committed only after the result is acknowledged
        "auto_offset_reset": "earliest",  # a new group must not skip jobs enqueued before it joined
        "max_partition_fetch_bytes": fetch_bytes,
        "fetch_max_bytes": max(fetch_bytes, 50 * 1024 * 1024),
        "max_poll_records": settings.max_poll_records,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        # Jobs produced in transactions count once committed; results of exactly-once workers likewise.
        "isolation_level": "read_committed",
    }


def producer_kwargs(settings: Settings, *, client_id: str, transactional_id: str | None = None) -> dict[str, Any]:
    """`transactional_id`: a transactional producer (RERANK_DELIVERY=exactly_once)."""
    request_timeout_ms = min(30000, settings.produce_timeout_ms)
    extra: dict[str, Any] = {} if transactional_id is None else {"transactional_id": transactional_id}
    return {
        **extra,
        **connection_kwargs(settings, client_id=client_id),
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": compression(settings),
        "max_request_size": settings.max_message_bytes + FRAMING_BYTES,
        "linger_ms": 5,
        "request_timeout_ms": request_timeout_ms,
        "delivery_timeout_ms": max(settings.produce_timeout_ms, request_timeout_ms + 5),
        "max_block_ms": min(settings.produce_timeout_ms, 60000),
    }
