"""Replay without a broker: TIME parsing, range planning, and the replay loop over a fake consumer and producer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from kafka.structs import OffsetAndTimestamp, TopicPartition

from tests.engine_wrappers import ScoresAtResult
from worker.engine.api import ScoreRequest
from worker.engine.engine import RerankEngine
from worker.messages import RerankResult
from worker.pipeline.deadletter import header_map
from worker.pipeline.errors import FatalError
from worker.settings import Settings
from worker.tools.replay import PartitionRange, Replay, check_range, plan_ranges, replay_group_id

NOW = 1_795_773_600_000  # 2026-11-27T10:00:00Z


def test_plan_ranges() -> None:
    ends = {0: 10, 1: 5, 2: 0, 3: 8}
    starts = {0: 3, 1: None, 2: None, 3: 8}  # 1: nothing at or after FROM; 2: empty
    assert plan_ranges(starts, None, ends) == [
        PartitionRange(0, 3, 10),
        PartitionRange(1, 5, 5),
        PartitionRange(2, 0, 0),
        PartitionRange(3, 8, 8),
    ]
    stops = {0: 7, 1: None, 2: None, 3: None}  # 3: nothing at or after TO: up to the end
    assert plan_ranges(starts, stops, ends) == [
        PartitionRange(0, 3, 7),
        PartitionRange(1, 5, 5),
        PartitionRange(2, 0, 0),
        PartitionRange(3, 8, 8),
    ]
    # A partition written to after the end offsets were read: the range stops at the end read at start.
    assert plan_ranges({0: 2}, {0: 50}, {0: 10}) == [PartitionRange(0, 2, 10)]
    assert plan_ranges({0: 12}, None, {0: 10}) == [PartitionRange(0, 10, 10)]
    assert sum(r.size for r in plan_ranges(starts, stops, ends)) == 4


def test_the_replay_never_uses_the_workers_group() -> None:
    settings = Settings(group_id="rerank-worker")
    assert replay_group_id(settings, "r1") == "rerank-worker.replay.r1"
    assert replay_group_id(settings, "r1", "mine") == "mine"
    with pytest.raises(ValueError, match="workers' group"):
        replay_group_id(settings, "r1", "rerank-worker")


def test_check_range() -> None:
    check_range(NOW, None)
    check_range(NOW, NOW + 1)
    with pytest.raises(ValueError, match="after --from"):
        check_range(NOW, NOW)


# -- the loop over fakes ---------------------------------------------------------------------------------------------


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_type: int = 0


class FakeConsumer:
    """A topic in memory: offsets_for_times, end_offsets, assign/seek/poll/position, commit."""

    def __init__(self, topic: str, partitions: dict[int, list[Rec]]) -> None:
        self.topic = topic
        self.logs = partitions
        self.positions: dict[TopicPartition, int] = {}
        self.commits: list[dict[TopicPartition, int]] = []
        self.paused: set[TopicPartition] = set()

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(self.logs) if topic == self.topic else set()

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.logs[tp.partition]) for tp in tps}

    def offsets_for_times(self, times: dict[TopicPartition, int]) -> dict[TopicPartition, Any]:
        out: dict[TopicPartition, Any] = {}
        for tp, ms in times.items():
            found = next((r for r in self.logs[tp.partition] if r.timestamp >= ms), None)
            out[tp] = None if found is None else OffsetAndTimestamp(found.offset, found.timestamp, -1)
        return out

    def assign(self, tps: list[TopicPartition]) -> None:
        self.positions = dict.fromkeys(tps, 0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    def pause(self, *tps: TopicPartition) -> None:
        self.paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused -= set(tps)

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.logs[tp.partition])

    def poll(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Rec]]:
        out = {}
        for tp, pos in self.positions.items():
            if tp in self.paused:
                continue
            records = self.logs[tp.partition][pos : pos + 3]  # a few at a time, past the range's end too
            if records:
                out[tp] = records
                self.positions[tp] = pos + len(records)
        return out

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.commits.append({tp: o.offset for tp, o in offsets.items()})


class Done:
    """An acknowledged send, as kafka-python's future of one: callbacks run at once."""

    def get(self, timeout: float | None = None) -> None:
        return None

    def add_callback(self, callback: Callable[[Any], None]) -> Done:
        callback(None)
        return self


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []

    def send(self, topic: str, *, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> Done:
        self.sent.append((topic, key, value, headers))
        return Done()


def job_record(partition: int, offset: int, ts: int, job_id: str, value: bytes | None = None) -> Rec:
    job = {"job_id": job_id, "query": "red shoes", "documents": [f"shoe {job_id}", "a boot", None]}
    return Rec("jobs", partition, offset, ts, job_id.encode(), value or orjson.dumps(job), [("trace", b"t")])


def test_the_replay_scores_the_range_skips_bad_records_and_marks_its_results(engine: RerankEngine) -> None:
    logs = {
        0: [job_record(0, i, 1000 + 10 * i, f"p0-{i}") for i in range(8)],
        1: [job_record(1, i, 1005 + 10 * i, f"p1-{i}") for i in range(8)],
    }
    logs[0][3] = job_record(0, 3, 1030, "bad", value=b"{not json")
    consumer, producer = FakeConsumer("jobs", logs), FakeProducer()
    settings = Settings(jobs_topic="jobs", results_topic="results", batch_max_packs=1)
    run = Replay(
        settings,
        engine,
        consumer,
        producer,
        from_ms=1020,  # p0 from offset 2, p1 from offset 2 (1025)
        to_ms=1060,  # p0 up to offset 5 (1050), p1 up to 5 (1055)
        reply_topic="replays",
        replay_id="r1",
        group_id="g.replay.r1",
        worker_id="w",
        progress=False,
    )
    summary = run.run()
    assert summary.ranges == [PartitionRange(0, 2, 6), PartitionRange(1, 2, 6)]
    assert summary.total == 8
    assert summary.replayed == 7
    assert dict(summary.skipped) == {"not_json": 1}
    sent = {key.decode(): (topic, value, headers) for topic, key, value, headers in producer.sent}
    assert sorted(sent) == sorted(["p0-2", "p0-4", "p0-5"] + [f"p1-{i}" for i in range(2, 6)])
    for job_id, (topic, value, headers) in sent.items():
        assert topic == "replays"
        h = header_map(headers)
        partition, offset = int(job_id[1]), int(job_id.split("-")[1])
        assert h["rerank.replay"] == "true"
        assert h["rerank.replay.id"] == "r1"
        assert (h["rerank.source.topic"], h["rerank.source.partition"], h["rerank.source.offset"]) == (
            "jobs",
            str(partition),
            str(offset),
        )
        assert h["rerank.worker.id"] == "w"
        result = RerankResult.model_validate_json(value)
        assert result.replay is not None
        assert (result.replay.replay_id, result.replay.source_topic) == ("r1", "jobs")
        assert (result.replay.source_partition, result.replay.source_offset) == (partition, offset)
        assert result.replay.source_timestamp == logs[partition][offset].timestamp
        (expected,) = engine.score([score_request_of(job_id)])
        scores = {r.index: r.relevance_score for r in result.results}
        assert scores[2] is None
        for i in (0, 1):
            assert abs((scores[i] or 0) - (expected.scores[i] or 0)) <= 5e-6
    # The replay group is committed up to the range's end, and no further.
    # (Each partition's last commit counts: both need not move in the same turn.)
    last: dict[TopicPartition, int] = {}
    for commit in consumer.commits:
        last.update(commit)
    assert last == {TopicPartition("jobs", 0): 6, TopicPartition("jobs", 1): 6}
    assert max(o for commit in consumer.commits for o in commit.values()) == 6
    assert summary.batches >= 1


def score_request_of(job_id: str) -> ScoreRequest:
    """What job_record(..., job_id) asks to score."""
    return ScoreRequest("red shoes", [f"shoe {job_id}", "a boot", None])


def test_a_range_without_records_replays_nothing(engine: RerankEngine) -> None:
    consumer = FakeConsumer("jobs", {0: [job_record(0, 0, 1000, "a")], 1: []})
    producer = FakeProducer()
    run = Replay(
        Settings(jobs_topic="jobs"),
        engine,
        consumer,
        producer,
        from_ms=5000,
        replay_id="r",
        group_id="g",
        worker_id="w",
        progress=False,
    )
    summary = run.run()
    assert summary.total == 0
    assert summary.replayed == 0
    assert producer.sent == []
    assert "none (no records)" in summary.describe()


def test_a_result_without_replay_has_no_replay_field(engine: RerankEngine) -> None:
    from worker.messages import RerankJob

    job = RerankJob(job_id="j", query="q", documents=["a"])
    (scored,) = engine.score([job.to_score_request()])
    wire = RerankResult.from_scores(job, scored, engine.info).model_dump(mode="json")
    assert "replay" not in wire
    assert RerankResult.model_validate(wire).replay is None


def test_relative_times_can_follow_their_flag() -> None:
    from worker.cli import _relative_times_attached, build_parser

    argv = _relative_times_attached(["replay", "--from", "-2h", "--to", "-30m", "--reply-topic", "r"])
    args = build_parser().parse_args(argv)
    assert (args.from_time, args.to_time, args.reply_topic) == ("-2h", "-30m", "r")
    args = build_parser().parse_args(_relative_times_attached(["dlq", "requeue", "--since", "-1d", "--dry-run"]))
    assert (args.since, args.dry_run) == ("-1d", True)
    assert _relative_times_attached(["dlq", "list", "--since", "-h"]) == ["dlq", "list", "--since", "-h"]


class PoisonEngine(ScoresAtResult):
    """The engine, but a batch holding a job whose query is `poison` fails (a bug, or a broken input)."""

    def __init__(self, inner: RerankEngine) -> None:
        self.inner = inner
        self.queries: dict[int, str] = {}
        self.batches: list[int] = []

    @property
    def info(self) -> Any:
        return self.inner.info

    def prepare(self, request: ScoreRequest) -> Any:
        prepared = self.inner.prepare(request)
        self.queries[id(prepared)] = request.query
        return prepared

    def score_prepared(self, jobs: Any, *, batch_started: float | None = None) -> Any:
        self.batches.append(len(jobs))
        if any(self.queries[id(j)] == "poison" for j in jobs):
            raise RuntimeError("boom")
        return self.inner.score_prepared(jobs)


def test_a_job_failing_alone_is_skipped_and_its_batch_neighbours_are_published(engine: RerankEngine) -> None:
    records = [job_record(0, i, 1000 + i, f"j{i}") for i in range(5)]
    poison = {"job_id": "p", "query": "poison", "documents": ["x"]}
    records[2] = Rec("jobs", 0, 2, 1002, b"p", orjson.dumps(poison), [])
    consumer, producer = FakeConsumer("jobs", {0: records}), FakeProducer()
    poisoned = PoisonEngine(engine)
    run = Replay(
        Settings(jobs_topic="jobs"),
        poisoned,
        consumer,
        producer,
        from_ms=0,
        replay_id="r",
        group_id="g",
        worker_id="w",
        progress=False,
    )
    summary = run.run()
    assert sorted(key.decode() for _, key, _, _ in producer.sent) == ["j0", "j1", "j3", "j4"]
    assert dict(summary.skipped) == {"scoring_error": 1}
    assert max(poisoned.batches) > 1  # jobs were batched together before the split
    assert consumer.commits[-1] == {TopicPartition("jobs", 0): 5}


class OutOfMemory(ScoresAtResult):
    """The engine, but every batch runs out of CUDA memory (and no smaller budget can hold a prompt)."""

    def __init__(self, inner: RerankEngine) -> None:
        self.inner = inner

    @property
    def info(self) -> Any:
        return self.inner.info

    def prepare(self, request: ScoreRequest) -> Any:
        return self.inner.prepare(request)

    def score_prepared(self, jobs: Any, *, batch_started: float | None = None) -> Any:
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    def with_max_pack_tokens(self, max_pack_tokens: int) -> None:
        return None


def test_a_transient_failure_that_outlives_its_tries_ends_the_replay(engine: RerankEngine) -> None:
    """A replay does not skip what a retry might have answered: out of memory on every try ends it (FatalError),
    and nothing of that batch is published or committed."""
    consumer = FakeConsumer("jobs", {0: [job_record(0, i, 1000 + i, f"j{i}") for i in range(3)]})
    producer = FakeProducer()
    run = Replay(
        Settings(jobs_topic="jobs", max_attempts=2, retry_initial_ms=1, retry_max_ms=2),
        OutOfMemory(engine),
        consumer,
        producer,
        from_ms=0,
        replay_id="r",
        group_id="g",
        worker_id="w",
        progress=False,
    )
    with pytest.raises(FatalError, match="out_of_memory on jobs\\[0\\]@0 after 2 tries"):
        run.run()
    assert producer.sent == []
    assert consumer.commits == []


def test_the_progress_bar_draws_when_the_terminal_reports_no_columns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import shutil

    from worker.tools.replay import _progress

    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(0, 0): os.terminal_size((0, 24)))
    with _progress(4, "replay", enabled=True) as bar:
        bar.update(3)
    drawn = capsys.readouterr().err
    assert "3/4" in drawn
    assert "replay" in drawn
