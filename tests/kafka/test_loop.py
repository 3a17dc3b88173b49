"""The consumer thread's bookkeeping with a fake consumer: routing, pausing, committing only what is acknowledged,
and revocation."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import orjson
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.engine import RerankEngine
from worker.kafka.deadletter import header_map
from worker.kafka.loop import Worker
from worker.kafka.records import Outgoing, SourceRecord
from worker.settings import Settings

TP = TopicPartition("jobs", 0)


class FakeConsumer:
    def __init__(self) -> None:
        self.assigned = {TP}
        self.paused_set: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.async_commits: list[dict[TopicPartition, int]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_set |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_set -= set(tps)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_set)

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.commits.append({tp: o.offset for tp, o in offsets.items()})

    def commit_async(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.async_commits.append({tp: o.offset for tp, o in offsets.items()})

    def highwater(self, tp: TopicPartition) -> int | None:
        return None

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


def job(offset: int, **extra: Any) -> SourceRecord:
    value = orjson.dumps({"job_id": f"j{offset}", "query": "q", "documents": ["a", "b"], **extra})
    return SourceRecord("jobs", 0, offset, 0, 0, key=f"j{offset}".encode(), value=value)


def worker(engine: RerankEngine, **settings: Any) -> tuple[Worker, FakeConsumer]:
    w = Worker(Settings(jobs_topic="jobs", worker_id="w-1", **settings), engine)
    consumer = FakeConsumer()
    w.consumer = consumer
    w.partitions_assigned({TP})
    return w, consumer


def letters(w: Worker) -> list[Outgoing]:
    out = []
    while not w.outbox.empty():
        o = w.outbox.get_nowait()
        assert o is not None
        out.append(o)
    return out


def test_bad_messages_are_routed_to_the_dead_letter_outbox(engine: RerankEngine) -> None:
    w, _ = worker(engine, max_message_bytes=2000)
    w.route(SourceRecord("jobs", 0, 0, 0, 0, key=b"k", value=b"x" * 2001))
    w.route(job(1, reply_topic="elsewhere"))
    w.route(SourceRecord("jobs", 0, 2, 0, 0, key=None, value=b"[1]"))
    w.route(job(3))
    reasons = [header_map(o.headers)["rerank.error.reason"] for o in letters(w)]
    assert reasons == ["message_too_large", "disallowed_reply_topic", "schema_violation"]
    assert [i.job.job_id for i in w.backlog] == ["j3"]


def test_an_instruction_too_long_is_dead_lettered_when_prepared(engine: RerankEngine) -> None:
    w, _ = worker(engine)
    w.route(job(0, instruction="word " * 2000))
    w.feed()
    (letter,) = letters(w)
    h = header_map(letter.headers)
    assert h["rerank.error.stage"] == "prepare"
    assert h["rerank.error.category"] == "permanent"
    assert w.work.empty()


def test_full_queue_pauses_and_drained_queue_resumes(engine: RerankEngine) -> None:
    w, consumer = worker(engine, max_queued_jobs=2)
    for i in range(4):
        w.route(job(i))
    w.feed()
    assert w.work.qsize() == 2
    assert len(w.backlog) == 2
    assert consumer.paused() == {TP}  # still polling, fetching nothing
    w.work.get_nowait()
    w.work.get_nowait()
    w.feed()
    assert len(w.backlog) == 0
    assert consumer.paused() == {TP}
    w.work.get_nowait()
    w.work.get_nowait()
    w.feed()
    assert consumer.paused() == set()


def test_commits_only_the_acknowledged_prefix(engine: RerankEngine) -> None:
    w, consumer = worker(engine)
    for i in range(4):
        w.route(job(i))
    w.completions.put(job(1))
    w.completions.put(job(2))
    w.take_completions()
    w.commit()
    assert consumer.commits == []  # offset 0 is not done: nothing may be committed
    w.completions.put(job(0))
    w.take_completions()
    w.commit()
    assert consumer.commits == [{TP: 3}]  # 0, 1, 2 done; 3 still in flight
    w.commit()
    assert consumer.commits == [{TP: 3}]


def test_revocation_commits_what_is_done_and_forgets_the_rest(engine: RerankEngine) -> None:
    w, consumer = worker(engine, revoke_timeout_s=0.2)
    for i in range(3):
        w.route(job(i))
    w.completions.put(job(0))
    w.partitions_revoked({TP}, commit=True)
    assert consumer.async_commits == [{TP: 1}]  # a blocking commit cannot run on the listener's thread
    assert not w.backlog
    assert w.owned == frozenset()
    assert w.tracker.in_flight() == 0
    w.completions.put(job(1))  # a late acknowledgement changes nothing
    w.take_completions()
    w.commit()
    assert consumer.commits == []


def test_revocation_waits_only_for_jobs_being_scored_or_published(engine: RerankEngine) -> None:
    """Jobs still in the backlog or the work queue are given up at once (the next owner reads them); only what
    the GPU thread or the publisher holds is waited for. It used to wait out RERANK_REVOKE_TIMEOUT_S for the jobs
    it had just dropped itself, on kafka-python's IO thread (no heartbeats), whenever the queue was full."""
    w, consumer = worker(engine, max_queued_jobs=2, revoke_timeout_s=5.0)
    for i in range(5):
        w.route(job(i))
    w.feed()  # jobs 0, 1 in the work queue, 2-4 in the backlog
    w.work.get_nowait()  # the GPU thread took job 0 ...
    w.completions.put(job(0))  # ... and its result was acknowledged
    began = time.monotonic()
    w.partitions_revoked({TP}, commit=True)
    assert time.monotonic() - began < 1.0
    assert consumer.async_commits == [{TP: 1}]  # job 1 (queued, never started) and the rest are read again


def test_a_partition_handed_straight_back_is_read_again_from_the_jobs_given_up(engine: RerankEngine) -> None:
    """Kafka's eager protocol revokes every partition on each rebalance and hands most straight back, and
    kafka-python 3 keeps their fetch positions: the jobs given up at revocation must be read again (a seek back to
    the first offset not done), and the copies queued before must not be scored beside them."""
    w, consumer = worker(engine, revoke_timeout_s=0.0)
    for i in range(3):
        w.route(job(i))
    w.feed()
    w.work.get_nowait()  # the GPU thread took job 0 ...
    w.completions.put(job(0))  # ... and its result was acknowledged
    stale = list(w.work.queue)
    w.partitions_revoked({TP}, commit=True)
    assert consumer.async_commits == [{TP: 1}]
    w.partitions_assigned({TP})
    assert consumer.seeks == [(TP, 1)]
    w.partitions_assigned({TP})  # a later rebalance with nothing revoked in between: no seek
    assert consumer.seeks == [(TP, 1)]
    for i in (1, 2):
        w.route(job(i))  # read again from there
    w.feed()
    fresh = list(w.work.queue)[2:]
    assert [w.owns(item) for item in stale] == [False, False]
    assert [w.owns(item) for item in fresh] == [True, True]


def test_a_partition_that_cannot_be_read_again_is_left_alone_and_the_worker_stops(engine: RerankEngine) -> None:
    w, consumer = worker(engine, revoke_timeout_s=0.0)
    w.route(job(0))
    w.partitions_revoked({TP}, commit=True)

    def refuse(tp: TopicPartition, offset: int) -> None:
        raise ValueError("Unassigned partition")

    consumer.seek = refuse  # type: ignore[method-assign]
    w.partitions_assigned({TP})
    assert w.fatal is not None
    assert "cannot read" in w.fatal
    assert TP not in w.owned  # nothing of it is routed or committed: the next owner reads it from the committed offset


def test_jobs_the_gpu_thread_skipped_are_never_committed(engine: RerankEngine) -> None:
    w, consumer = worker(engine)
    for i in range(3):
        w.route(job(i))
    first = w.backlog[0]
    w.skipped.put(replace(first, assignment=first.assignment - 1))  # a stale copy's report: changes nothing
    w.take_completions()
    assert w.tracker.in_flight() == 3
    w.skipped.put(first)  # skipped as no longer ours (a revocation raced with the GPU thread)
    w.completions.put(job(1))
    w.completions.put(job(2))
    w.take_completions()
    assert w.tracker.in_flight() == 0  # not waited for
    w.commit()
    assert consumer.commits == []  # and not committed past


def test_lost_partitions_are_not_committed(engine: RerankEngine) -> None:
    w, consumer = worker(engine)
    w.route(job(0))
    w.completions.put(job(0))
    w.partitions_revoked({TP}, commit=False)
    assert consumer.async_commits == []
    assert consumer.commits == []
    w.partitions_assigned({TP})  # back after the session expired: kafka-python starts it from the committed offset
    assert consumer.seeks == []


def test_a_partition_revoked_out_of_the_assignment_is_not_sought_when_it_returns(engine: RerankEngine) -> None:
    """Cooperative rebalancing revokes partitions already out of the consumer's assignment: kafka-python drops
    their state, so when one returns (maybe much later) it starts from the group's committed offset."""
    w, consumer = worker(engine, revoke_timeout_s=0.0)
    w.route(job(0))
    consumer.assigned = set()
    w.partitions_revoked({TP}, commit=True)
    w.partitions_assigned({TP})
    assert consumer.seeks == []


def test_missing_codec_is_fatal_at_start(engine: RerankEngine, monkeypatch: Any) -> None:
    from kafka import codec

    monkeypatch.setattr(codec, "has_zstd", lambda: False)
    w = Worker(Settings(compression_type="zstd", bootstrap_servers="127.0.0.1:1", http_port=0), engine)
    assert w.run() == 4  # exit non-zero at once, before trying to connect
