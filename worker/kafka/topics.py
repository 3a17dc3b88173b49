"""Create the worker's topics with size limits that match RERANK_MAX_MESSAGE_BYTES.

Kafka's default `max.message.bytes` is about 1 MB; a 1,000-document job or its result with `return_documents`
is larger. The producer, the consumer and the topic must agree: `config.py` sizes the clients, this sizes the
topics (`max.message.bytes`), and `compression.type=producer` keeps what the producer compressed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient

from worker.kafka.config import FRAMING_BYTES, connection_kwargs, producer_kwargs
from worker.pipeline.errors import FatalError, one_line
from worker.settings import Settings

TOPIC_ALREADY_EXISTS = 36


def topic_configs(settings: Settings) -> dict[str, str]:
    return {"max.message.bytes": str(settings.max_message_bytes + FRAMING_BYTES), "compression.type": "producer"}


def ensure_topics(settings: Settings, partitions: Mapping[str, int], *, timeout_ms: int = 30000) -> list[str]:
    """Create each topic (name -> partitions) that does not exist yet; returns those created.

    Replication factor: the broker's default (`default.replication.factor`). Existing topics are left as they are.
    """
    admin = KafkaAdminClient(**connection_kwargs(settings, client_id="rerank-topics"))
    try:
        existing = set(admin.list_topics())
        wanted: dict[str, dict[str, Any]] = {
            name: {"num_partitions": n, "configs": topic_configs(settings)}
            for name, n in partitions.items()
            if name not in existing
        }
        if wanted:
            admin.create_topics(wanted, timeout_ms=timeout_ms, raise_errors=False, wait_for_metadata=True)
            created = set(admin.list_topics())
            missing = sorted(set(wanted) - created)
            if missing:
                raise RuntimeError(f"topics not created: {missing}")
        return sorted(wanted)
    finally:
        admin.close()


def open_producer(settings: Settings, *, client_id: str) -> Any:
    """The worker's producer (acks=all, idempotent, sized and compressed as configured), or FatalError."""
    try:
        return KafkaProducer(**producer_kwargs(settings, client_id=client_id))
    except Exception as e:
        raise FatalError(f"cannot start the Kafka producer for {settings.bootstrap_servers}: {one_line(e)}") from e


def require_topics(producer: Any, settings: Settings, topics: Iterable[str]) -> None:
    """FatalError unless every topic exists with partitions (checked through the producer's metadata)."""
    for topic in topics:
        try:
            partitions = producer.partitions_for(topic)
        except Exception as e:
            partitions = None
            detail = one_line(e)
        else:
            detail = "no partitions"
        if not partitions:
            raise FatalError(
                f"topic {topic!r} is not available on {settings.bootstrap_servers} ({detail}): create it, or "
                "enable auto.create.topics.enable on the broker"
            )
