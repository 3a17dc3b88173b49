"""The consumer thread's loop over a fake consumer: parsing and rejecting, pausing, committing only what is
acknowledged, and revocation through the group source."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import orjson
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.engine.engine import RerankEngine
from worker.pipeline.consume import GroupSource
from worker.pipeline.deadletter import header_map
from worker.pipeline.errors import Fatal
from worker.pipeline.metrics import WorkerMetrics
from worker.pipeline.parse import Parser
from worker.pipeline.records import Finished, Outgoing, SourceRecord
from worker.pipeline.runner import Pipeline
from worker.pipeline.sink import WorkerSink
from worker.pipeline.worker import Worker
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

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener


def job(offset: int, **extra: Any) -> SourceRecord:
    value = orjson.dumps({"job_id": f"j{offset}", "query": "q", "documents": ["a", "b"], **extra})
    return SourceRecord("jobs", 0, offset, 0, 0, key=f"j{offset}".encode(), value=value)


def pipeline(engine: RerankEngine, **settings: Any) -> tuple[Pipeline, GroupSource, FakeConsumer]:
    """The worker's pipeline (its threads not started) over a fake consumer that was assigned partition 0."""
    s = Settings(jobs_topic="jobs", worker_id="w-1", **settings)
    consumer, fatal = FakeConsumer(), Fatal()
    source = GroupSource(consumer, "jobs", fatal)
    p = Pipeline(
        s,
        engine,
        source,
        WorkerSink(s, worker_id="w-1", model="m"),
        None,
        parser=Parser(max_message_bytes=s.max_message_bytes, max_docs=s.max_docs, reply_topics=s.reply_topic_pattern()),
        metrics=WorkerMetrics(),
        fatal=fatal,
    )
    source.assigned({TP})
    return p, source, consumer


def letters(p: Pipeline) -> list[Outgoing]:
    out = []
    while not p.outbox.messages.empty():
        o = p.outbox.messages.get_nowait()
        assert o is not None
        out.append(o)
    return out


def acknowledged(p: Pipeline, *records: SourceRecord) -> None:
    for record in records:
        p.outbox.finished.put(Finished(record))


def test_bad_messages_are_routed_to_the_dead_letter_outbox(engine: RerankEngine) -> None:
    p, _, _ = pipeline(engine, max_message_bytes=2000)
    p.admit(SourceRecord("jobs", 0, 0, 0, 0, key=b"k", value=b"x" * 2001))
    p.admit(job(1, reply_topic="elsewhere"))
    p.admit(SourceRecord("jobs", 0, 2, 0, 0, key=None, value=b"[1]"))
    p.admit(job(3))
    reasons = [header_map(o.headers)["rerank.error.reason"] for o in letters(p)]
    assert reasons == ["message_too_large", "disallowed_reply_topic", "schema_violation"]
    assert [i.job.job_id for i in p.tokenizer.backlog] == ["j3"]


def test_an_instruction_too_long_is_dead_lettered_when_prepared(engine: RerankEngine) -> None:
    p, _, _ = pipeline(engine)
    p.admit(job(0, instruction="word " * 2000))
    p.feed()
    (letter,) = letters(p)
    h = header_map(letter.headers)
    assert h["rerank.error.stage"] == "prepare"
    assert h["rerank.error.category"] == "permanent"
    assert p.work.empty()


def test_full_queue_pauses_and_drained_queue_resumes(engine: RerankEngine) -> None:
    p, _source, consumer = pipeline(engine, max_queued_jobs=2)
    for i in range(4):
        p.admit(job(i))
    p.feed()
    assert p.work.qsize() == 2
    assert len(p.tokenizer.backlog) == 2
    assert consumer.paused() == {TP}  # still polling, fetching nothing
    p.work.get_nowait()
    p.work.get_nowait()
    p.feed()
    assert len(p.tokenizer.backlog) == 0
    assert consumer.paused() == {TP}
    p.work.get_nowait()
    p.work.get_nowait()
    p.feed()
    assert consumer.paused() == set()


def test_commits_only_the_acknowledged_prefix(engine: RerankEngine) -> None:
    p, _source, consumer = pipeline(engine)
    for i in range(4):
        p.admit(job(i))
    acknowledged(p, job(1))
    acknowledged(p, job(2))
    p.take_finished()
    p.commit()
    assert consumer.commits == []  # offset 0 is not done: nothing may be committed
    acknowledged(p, job(0))
    p.take_finished()
    p.commit()
    assert consumer.commits == [{TP: 3}]  # 0, 1, 2 done; 3 still in flight
    p.commit()
    assert consumer.commits == [{TP: 3}]


def test_revocation_commits_what_is_done_and_forgets_the_rest(engine: RerankEngine) -> None:
    p, source, consumer = pipeline(engine, revoke_timeout_s=0.2)
    for i in range(3):
        p.admit(job(i))
    acknowledged(p, job(0))
    source.revoked({TP}, commit=True)
    assert consumer.async_commits == [{TP: 1}]  # a blocking commit cannot run on the listener's thread
    assert not p.tokenizer.backlog
    assert source.ownership.owned == frozenset()
    assert p.tracker.in_flight() == 0
    acknowledged(p, job(1))  # a late acknowledgement changes nothing
    p.take_finished()
    p.commit()
    assert consumer.commits == []


def test_revocation_waits_only_for_jobs_being_scored_or_published(engine: RerankEngine) -> None:
    """Jobs still in the backlog or the work queue are given up at once (the next owner reads them); only what
    the GPU thread or the publisher holds is waited for. It used to wait out RERANK_REVOKE_TIMEOUT_S for the jobs
    it had just dropped itself, on kafka-python's IO thread (no heartbeats), whenever the queue was full."""
    p, source, consumer = pipeline(engine, max_queued_jobs=2, revoke_timeout_s=5.0)
    for i in range(5):
        p.admit(job(i))
    p.feed()  # jobs 0, 1 in the work queue, 2-4 in the backlog
    p.work.get_nowait()  # the GPU thread took job 0 ...
    acknowledged(p, job(0))  # ... and its result was acknowledged
    began = time.monotonic()
    source.revoked({TP}, commit=True)
    assert time.monotonic() - began < 1.0
    assert consumer.async_commits == [{TP: 1}]  # job 1 (queued, never started) and the rest are read again


def test_a_partition_handed_straight_back_is_read_again_from_the_jobs_given_up(engine: RerankEngine) -> None:
    """Kafka's eager protocol revokes every partition on each rebalance and hands most straight back, and
    kafka-python 3 keeps their fetch positions: the jobs given up at revocation must be read again (a seek back to
    the first offset not done), and the copies queued before must not be scored beside them."""
    p, source, consumer = pipeline(engine, revoke_timeout_s=0.0)
    for i in range(3):
        p.admit(job(i))
    p.feed()
    p.work.get_nowait()  # the GPU thread took job 0 ...
    acknowledged(p, job(0))  # ... and its result was acknowledged
    stale = list(p.work.queue)
    source.revoked({TP}, commit=True)
    assert consumer.async_commits == [{TP: 1}]
    source.assigned({TP})
    assert consumer.seeks == [(TP, 1)]
    source.assigned({TP})  # a later rebalance with nothing revoked in between: no seek
    assert consumer.seeks == [(TP, 1)]
    for i in (1, 2):
        p.admit(job(i))  # read again from there
    p.feed()
    fresh = list(p.work.queue)[2:]
    assert [source.ownership.owns(item) for item in stale] == [False, False]
    assert [source.ownership.owns(item) for item in fresh] == [True, True]


def test_a_partition_that_cannot_be_read_again_is_left_alone_and_the_worker_stops(engine: RerankEngine) -> None:
    p, source, consumer = pipeline(engine, revoke_timeout_s=0.0)
    p.admit(job(0))
    source.revoked({TP}, commit=True)

    def refuse(tp: TopicPartition, offset: int) -> None:
        raise ValueError("Unassigned partition")

    consumer.seek = refuse  # type: ignore[method-assign]
    source.assigned({TP})
    assert p.fatal.message is not None
    assert "cannot read" in p.fatal.message
    assert (
        TP not in source.ownership.owned
    )  # nothing of it is routed or committed: the next owner reads it from the committed offset


def test_jobs_the_gpu_thread_skipped_are_never_committed(engine: RerankEngine) -> None:
    p, _source, consumer = pipeline(engine)
    for i in range(3):
        p.admit(job(i))
    first = p.tokenizer.backlog[0]
    p.outbox.give_back(replace(first, assignment=first.assignment - 1))  # a stale copy's report: changes nothing
    p.take_finished()
    assert p.tracker.in_flight() == 3
    p.outbox.give_back(first)  # skipped as no longer ours (a revocation raced with the GPU thread)
    acknowledged(p, job(1))
    acknowledged(p, job(2))
    p.take_finished()
    assert p.tracker.in_flight() == 0  # not waited for
    p.commit()
    assert consumer.commits == []  # and not committed past


def test_lost_partitions_are_not_committed(engine: RerankEngine) -> None:
    p, source, consumer = pipeline(engine)
    p.admit(job(0))
    acknowledged(p, job(0))
    source.revoked({TP}, commit=False)
    assert consumer.async_commits == []
    assert consumer.commits == []
    source.assigned({TP})  # back after the session expired: kafka-python starts it from the committed offset
    assert consumer.seeks == []


def test_a_partition_revoked_out_of_the_assignment_is_not_sought_when_it_returns(engine: RerankEngine) -> None:
    """Cooperative rebalancing revokes partitions already out of the consumer's assignment: kafka-python drops
    their state, so when one returns (maybe much later) it starts from the group's committed offset."""
    p, source, consumer = pipeline(engine, revoke_timeout_s=0.0)
    p.admit(job(0))
    consumer.assigned = set()
    source.revoked({TP}, commit=True)
    source.assigned({TP})
    assert consumer.seeks == []


def test_missing_codec_is_fatal_at_start(engine: RerankEngine, monkeypatch: Any) -> None:
    from kafka import codec

    monkeypatch.setattr(codec, "has_zstd", lambda: False)
    w = Worker(Settings(compression_type="zstd", bootstrap_servers="127.0.0.1:1", http_port=0), engine)
    assert w.run() == 4  # exit non-zero at once, before trying to connect
