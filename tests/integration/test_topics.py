"""worker.kafka.topics against the real broker: which topics exist, asked with a bound and remembered."""

from __future__ import annotations

import time
import uuid

import pytest

from worker.kafka.topics import TopicCatalog, ensure_topics
from worker.settings import Settings

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_catalog_remembers_found_and_missing_topics_for_their_own_times(kafka_bootstrap: str) -> None:
    settings = Settings(bootstrap_servers=kafka_bootstrap)
    topic = f"t{uuid.uuid4().hex[:10]}.replies"
    clock = Clock()
    catalog = TopicCatalog(settings, client_id="test-catalog", found_ttl_s=300, missing_ttl_s=10, clock=clock)
    try:
        assert catalog.exists(topic) is False
        ensure_topics(settings, {topic: 1})
        assert catalog.exists(topic) is False  # "missing" is remembered for missing_ttl_s
        clock.now = 10.5
        assert catalog.exists(topic) is True
        clock.now = 300.0  # "found" is remembered far longer; the next answer comes from memory, not the cluster
        catalog.close()
        catalog.settings = Settings(bootstrap_servers="127.0.0.1:9")
        assert catalog.exists(topic) is True
    finally:
        catalog.close()


def test_an_unreachable_cluster_answers_none_within_the_bound() -> None:
    catalog = TopicCatalog(Settings(bootstrap_servers="127.0.0.1:9"), client_id="test-catalog", timeout_ms=1000)
    started = time.monotonic()
    try:
        assert catalog.exists("anything") is None
        assert catalog.exists("anything") is None  # nothing remembered: asked again
    finally:
        catalog.close()
    assert time.monotonic() - started < 15
