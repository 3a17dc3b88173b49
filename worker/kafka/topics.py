"""Create the worker's topics with size limits that match RERANK_MAX_MESSAGE_BYTES.

Kafka's default `max.message.bytes` is about 1 MB; a 1,000-document job or its result with `return_documents`
is larger. The producer, the consumer and the topic must agree: `config.py` sizes the clients, this sizes the
topics (`max.message.bytes`), and `compression.type=producer` keeps what the producer compressed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kafka import KafkaProducer
from kafka import errors as kafka_errors
from kafka.admin import KafkaAdminClient

from worker.kafka.config import FRAMING_BYTES, connection_kwargs, producer_kwargs
from worker.pipeline.errors import FatalError, one_line
from worker.settings import Settings

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36
UNKNOWN_TOPIC_OR_PARTITION = 3
AUTO_CREATE_WAIT_MS = 5000  # how long a broker that creates topics may take to create a missing one


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


def open_producer(settings: Settings, *, client_id: str, transactional_id: str | None = None) -> Any:
    """The worker's producer (acks=all, idempotent, sized and compressed as configured), or FatalError. With
    `transactional_id`, a transactional one, initialized: a producer left by an earlier run with that id is fenced
    and its open transaction aborted."""
    try:
        producer = KafkaProducer(**producer_kwargs(settings, client_id=client_id, transactional_id=transactional_id))
    except Exception as e:
        raise FatalError(f"cannot start the Kafka producer for {settings.bootstrap_servers}: {one_line(e)}") from e
    if transactional_id is not None:
        try:
            producer.init_transactions()
        except Exception as e:
            producer.close(timeout=5)
            raise FatalError(f"cannot start transactions as {transactional_id!r}: {one_line(e)}") from e
    return producer


def require_topics(
    settings: Settings, topics: Iterable[str], *, client_id: str, catalog: TopicCatalog | None = None
) -> None:
    """Return when every topic exists; FatalError (raised from nothing) naming one that does not.

    Asked without creating anything (through `catalog` when given, else a catalog of its own, closed after); a topic
    that is missing is then named once to a producer, as a producer's first send would name it, so that a broker
    with `auto.create.topics.enable` creates it (within AUTO_CREATE_WAIT_MS). Errors reaching the cluster are raised
    as a FatalError from them (worker.kafka.startup decides from the cause whether to wait).
    """
    asking = catalog or TopicCatalog(settings, client_id=client_id)
    try:
        missing = [topic for topic in topics if not asking.lookup(topic)]
    except Exception as e:
        raise FatalError(f"cannot look up topics on {settings.bootstrap_servers}: {one_line(e)}") from e
    finally:
        if catalog is None:
            asking.close()
    if not missing:
        return
    producer = KafkaProducer(**{**producer_kwargs(settings, client_id=client_id), "max_block_ms": AUTO_CREATE_WAIT_MS})
    try:
        for topic in missing:
            try:
                created = producer.partitions_for(topic)
            except kafka_errors.KafkaTimeoutError:
                created = None
            if not created:
                raise FatalError(
                    f"topic {topic!r} does not exist on {settings.bootstrap_servers} and the broker does not create "
                    "topics: create it (see the README's topic sizes), or enable auto.create.topics.enable"
                )
    finally:
        producer.close(timeout=5)


class TopicCatalog:
    """Which topics exist, asked of the cluster with a short bound and remembered, for the consumer thread.

    A job's `reply_topic` is checked here before the job is scored: the producer would otherwise block on metadata
    for a topic that does not exist (up to its `max_block_ms`, per try) with every other result queued behind it.
    The question never creates a topic, whatever the broker's `auto.create.topics.enable`: a reply topic is made by
    its owner (with `rerank-worker topics`' sizes; an auto-created one gets the broker's default message size).
    A topic found is remembered for `found_ttl_s`, one not found for `missing_ttl_s` (so one created later is used
    soon); when the cluster cannot answer within `timeout_ms` the answer is None and nothing is remembered.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        client_id: str,
        timeout_ms: int = 5000,
        found_ttl_s: float = 300.0,
        missing_ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.timeout_ms = timeout_ms
        self.found_ttl_s = found_ttl_s
        self.missing_ttl_s = missing_ttl_s
        self.clock = clock
        self._known: dict[str, tuple[bool, float]] = {}  # topic -> (exists, until)
        self._admin: Any = None

    def exists(self, topic: str) -> bool | None:
        """True or False as the cluster said (or recently said); None when it could not be asked."""
        try:
            return self.lookup(topic)
        except Exception as e:
            log.warning("cannot look up topic %r: %s", topic, one_line(e))
            self.close()  # a fresh connection next time
            return None

    def lookup(self, topic: str) -> bool:
        """Whether `topic` exists, as the cluster said (or recently said); raises what asking it raised."""
        now = self.clock()
        known = self._known.get(topic)
        if known is not None and now < known[1]:
            return known[0]
        described = self._client().describe_topics([topic])
        error_code = next((int(t.get("error_code") or 0) for t in described if t.get("name") == topic), -1)
        if error_code not in (0, UNKNOWN_TOPIC_OR_PARTITION):
            raise kafka_errors.for_code(error_code)(f"describing topic {topic!r}")
        found = error_code == 0
        self._known[topic] = (found, now + (self.found_ttl_s if found else self.missing_ttl_s))
        return found

    def _client(self) -> Any:
        if self._admin is None:
            self._admin = KafkaAdminClient(
                **connection_kwargs(self.settings, client_id=self.client_id),
                request_timeout_ms=self.timeout_ms,
                bootstrap_timeout_ms=self.timeout_ms,
            )
        return self._admin

    def close(self) -> None:
        if self._admin is not None:
            try:
                self._admin.close()
            finally:
                self._admin = None
