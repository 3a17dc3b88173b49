"""RERANK_DELIVERY=exactly_once against the real broker: answers and offsets in one transaction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from tests.integration.conftest import Topics, committed_offsets, produce, read_topic, worker_thread
from tests.integration.jobs import answered, make_jobs
from worker.client import DeadLettered, RerankClient
from worker.engine.engine import RerankEngine
from worker.settings import Settings

pytestmark = pytest.mark.integration


def read_uncommitted(bootstrap: str, topic: str) -> list[Any]:
    """Every record of `topic`, aborted transactions' included (what a read_uncommitted consumer sees)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, isolation_level="read_uncommitted")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        records: list[Any] = []
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close(autocommit=False)


def test_answers_and_offsets_are_committed_together(
    kafka_bootstrap: str, topics: Topics, make_settings: Callable[..., Settings], engine: RerankEngine
) -> None:
    settings = make_settings(delivery="exactly_once", worker_id="w-eos")
    jobs = make_jobs(24, min_docs=1, max_docs=20, seed=3, prefix="eos")
    produce(kafka_bootstrap, topics.jobs, [(b"eos-bad", b"{not json", [])])
    with worker_thread(settings, engine) as worker, RerankClient(settings) as client:
        ids = client.submit_many(jobs)
        outcomes = client.wait(ids, timeout_s=120)
        letters = read_topic(kafka_bootstrap, topics.dlq, until=lambda rs: len(rs) >= 1)
        assert worker.pipeline is not None
        assert worker.pipeline.transactions is not None
    assert not [o for o in outcomes.values() if isinstance(o, DeadLettered)]
    results = read_topic(kafka_bootstrap, topics.results, until=lambda rs: len(answered(rs)) >= len(jobs))
    assert sorted(answered(results)) == sorted(ids)
    assert all(len(copies) == 1 for copies in answered(results).values())
    assert [r.key for r in letters] == [b"eos-bad"]
    # Transactional: every answer record is followed by a commit marker, which takes an offset of its own.
    raw = read_uncommitted(kafka_bootstrap, topics.results)
    assert len(raw) == len(jobs)
    end = {}
    for r in read_topic(kafka_bootstrap, topics.jobs):
        end[r.partition] = max(end.get(r.partition, 0), r.offset + 1)
    assert committed_offsets(kafka_bootstrap, topics.group, topics.jobs) == end
