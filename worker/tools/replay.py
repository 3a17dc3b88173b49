"""`rerank-worker replay`: re-score a time range of the jobs topic with the model this process loads.

For teams that re-score a topic with a new model: run it as a one-shot job (a GPU where it runs) with RERANK_MODEL
set to that model. A replay is the worker's pipeline (worker.pipeline) with other ends: a `RangeSource` reads the
range, the same stages parse, tokenize, batch, score and publish it (tokenizing overlaps the GPU, jobs share packs,
out of memory halves the pack budget, results wait for their acknowledgement), and a `ReplaySink` marks each result
as a replay and sends it to `--reply-topic` (default RERANK_RESULTS_TOPIC; a job's own `reply_topic` is not used:
one replay, one topic to read it from).

- Range: `--from` and `--to` are Kafka record timestamps, half-open [FROM, TO). Per partition of the jobs topic,
  `offsets_for_times(FROM)` gives the first offset and `offsets_for_times(TO)` the end, capped at the end offsets
  read at start (no `--to`: those end offsets). Jobs produced while the replay runs are not replayed.
- Consumer group: its own, `<RERANK_GROUP_ID>.replay.<replay id>` or `--group-id`, never the workers' group
  (refused). Partitions are assigned (assign + seek), not subscribed: no rebalance, nothing joins the workers'
  group. The replay group's watermark is committed as results are acknowledged, so `kafka-consumer-groups
  --describe` shows how far a replay got.
- Results: the same RerankResult as the worker's, with `replay: {replay_id, source_topic, source_partition,
  source_offset, source_timestamp}`, and headers `rerank.replay: true`, `rerank.replay.id`,
  `rerank.source.topic/partition/offset/timestamp`, `rerank.correlation.id`, `rerank.model`, `rerank.worker.id`.
- Bad records in the range (not a job, too large, over-long instruction, failing alone in the engine, result too
  large) are counted by reason, logged and skipped, NOT dead-lettered (worker.pipeline.sink.ReplaySink).
- Failures: a transient failure that outlives RERANK_MAX_ATTEMPTS (out of memory, results that cannot be
  published), FATAL_AFTER_FAILED_JOBS jobs failing alone in a row, or a range that stops advancing end the replay
  with FatalError (what was published stays published).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from worker.engine.api import Engine
from worker.kafka.config import compression, consumer_kwargs
from worker.kafka.topics import open_producer, require_topics
from worker.pipeline.consume import RangeSource
from worker.pipeline.errors import FatalError, one_line
from worker.pipeline.metrics import WorkerMetrics
from worker.pipeline.parse import Parser
from worker.pipeline.runner import Pipeline
from worker.pipeline.sink import ReplaySink
from worker.pipeline.worker import default_worker_id
from worker.settings import Settings
from worker.tools.times import format_time

log = logging.getLogger(__name__)


# -- the range -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionRange:
    """Offsets [start, end) of one partition."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_ranges(
    starts: Mapping[int, int | None], stops: Mapping[int, int | None] | None, ends: Mapping[int, int]
) -> list[PartitionRange]:
    """Per partition: start at `offsets_for_times(FROM)` (None: no record at or after FROM, nothing to replay),
    end at `offsets_for_times(TO)` (None: no record at or after TO, so up to the end) or, without TO (`stops`
    None), at the end offset read at start; never past that end offset."""
    ranges = []
    for partition in sorted(ends):
        end = ends[partition]
        start = starts.get(partition)
        start = end if start is None else min(start, end)
        stop = stops.get(partition) if stops is not None else None
        stop = end if stop is None else min(stop, end)
        ranges.append(PartitionRange(partition, start, max(start, stop)))
    return ranges


def default_replay_id(now: datetime | None = None) -> str:
    return f"{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def replay_group_id(settings: Settings, replay_id: str, group_id: str | None = None) -> str:
    """The replay's own consumer group; the workers' group is refused (ValueError)."""
    group = group_id or f"{settings.group_id}.replay.{replay_id}"
    if group == settings.group_id:
        raise ValueError(f"--group-id {group!r} is the workers' group (RERANK_GROUP_ID): a replay needs its own")
    return group


def check_range(from_ms: int, to_ms: int | None) -> None:
    if to_ms is not None and to_ms <= from_ms:
        raise ValueError(f"--to ({format_time(to_ms)}) must be after --from ({format_time(from_ms)})")


# -- the replay ----------------------------------------------------------------------------------------------------


@dataclass
class ReplaySummary:
    replay_id: str
    group_id: str
    jobs_topic: str
    reply_topic: str
    from_ms: int
    to_ms: int | None
    ranges: list[PartitionRange]
    replayed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(r.size for r in self.ranges)

    def describe(self) -> str:
        to = format_time(self.to_ms) if self.to_ms is not None else "the end at start"
        lines = [
            f"replay {self.replay_id}: {self.replayed} jobs of {self.jobs_topic} [{format_time(self.from_ms)}, {to}) "
            f"re-scored to {self.reply_topic} in {self.batches} batches, {self.seconds:.1f}s "
            f"(group {self.group_id})",
            "  ranges: "
            + (", ".join(f"[{r.partition}] {r.start}..{r.end}" for r in self.ranges if r.size) or "none (no records)"),
        ]
        if self.skipped:
            shown = ", ".join(f"{reason} {n}" for reason, n in self.skipped.most_common())
            lines.append(f"  skipped {sum(self.skipped.values())}: {shown}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "replay_id": self.replay_id,
            "group_id": self.group_id,
            "jobs_topic": self.jobs_topic,
            "reply_topic": self.reply_topic,
            "from_ms": self.from_ms,
            "to_ms": self.to_ms,
            "ranges": [{"partition": r.partition, "start": r.start, "end": r.end} for r in self.ranges],
            "total": self.total,
            "replayed": self.replayed,
            "skipped": dict(self.skipped),
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
        }


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield _NoBar()
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    # A terminal that reports 0 columns (some CI runners, `stty cols 0`) would get an empty bar: 80 there.
    dynamic = shutil.get_terminal_size(fallback=(0, 0)).columns > 0
    width = None if dynamic else 80
    bar = tqdm(total=total, desc=desc, unit="job", file=sys.stderr, dynamic_ncols=dynamic, ncols=width)
    try:
        with logging_redirect_tqdm():  # log lines print above the bar instead of through it
            yield bar
    finally:
        bar.close()


class Replay:
    """One replay over an opened consumer (group of its own, nothing assigned yet) and producer."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        consumer: Any,
        producer: Any,
        *,
        from_ms: int,
        to_ms: int | None = None,
        reply_topic: str | None = None,
        replay_id: str,
        group_id: str,
        worker_id: str,
        progress: bool = True,
    ) -> None:
        check_range(from_ms, to_ms)
        self.settings = settings
        self.engine = engine
        self.consumer = consumer
        self.producer = producer
        self.from_ms = from_ms
        self.to_ms = to_ms
        self.reply_topic = reply_topic or settings.results_topic
        self.replay_id = replay_id
        self.group_id = group_id
        self.worker_id = worker_id
        self.progress = progress
        self.metrics = WorkerMetrics()

    def plan(self) -> list[PartitionRange]:
        topic = self.settings.jobs_topic
        partitions = sorted(self.consumer.partitions_for_topic(topic) or ())
        if not partitions:
            raise FatalError(f"topic {topic!r} is not available on {self.settings.bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in partitions]
        ends = {tp.partition: o for tp, o in self.consumer.end_offsets(tps).items()}
        starts = _offsets(self.consumer.offsets_for_times({tp: self.from_ms for tp in tps}))
        stops = None
        if self.to_ms is not None:
            stops = _offsets(self.consumer.offsets_for_times({tp: self.to_ms for tp in tps}))
        return plan_ranges(starts, stops, ends)

    def run(self) -> ReplaySummary:
        """Run the pipeline over the planned ranges until every job is finished; FatalError if it fails."""
        started = time.monotonic()
        ranges = self.plan()
        s = self.settings
        summary = ReplaySummary(
            self.replay_id, self.group_id, s.jobs_topic, self.reply_topic, self.from_ms, self.to_ms, ranges
        )
        log.info("replay started", extra=summary.as_json())
        sink = ReplaySink(s, replay_id=self.replay_id, reply_topic=self.reply_topic, worker_id=self.worker_id)
        with _progress(summary.total, f"replay {s.jobs_topic}", self.progress) as bar:
            source = RangeSource(
                self.consumer,
                {TopicPartition(s.jobs_topic, r.partition): (r.start, r.end) for r in ranges},
                progress=bar.update,
            )
            pipeline = Pipeline(
                s,
                self.engine,
                source,
                sink,
                self.producer,
                parser=Parser(max_message_bytes=s.max_message_bytes, max_docs=s.max_docs, reply_topics=None),
                metrics=self.metrics,
                name="replay",
            )
            pipeline.run()
            summary.replayed = int(self.metrics.sample("rerank_jobs_total", outcome="result"))
            summary.skipped = sink.skipped
            summary.batches = int(self.metrics.sample("rerank_batch_seconds_count"))
            bar.set_postfix(replayed=summary.replayed, skipped=sum(summary.skipped.values()))
        summary.seconds = time.monotonic() - started
        if pipeline.fatal.message is not None:
            raise FatalError(pipeline.fatal.message)
        log.info("replay finished", extra=summary.as_json())
        return summary


def _offsets(found: Mapping[TopicPartition, Any]) -> dict[int, int | None]:
    return {tp.partition: (None if ot is None else int(ot.offset)) for tp, ot in found.items()}


def replay(
    settings: Settings,
    engine: Engine,
    *,
    from_ms: int,
    to_ms: int | None = None,
    reply_topic: str | None = None,
    group_id: str | None = None,
    replay_id: str | None = None,
    progress: bool = True,
) -> ReplaySummary:
    """Re-score the jobs of [from_ms, to_ms) and publish the results, marked as replays; see the module doc.

    Raises ValueError for bad options (before connecting), FatalError when Kafka fails."""
    check_range(from_ms, to_ms)
    compression(settings)  # ValueError when the codec's package is missing
    replay_id = replay_id or default_replay_id()
    group = replay_group_id(settings, replay_id, group_id)
    worker_id = settings.worker_id or default_worker_id()
    target = reply_topic or settings.results_topic
    servers = settings.bootstrap_servers
    producer = open_producer(settings, client_id=f"rerank-replay-{replay_id}-producer")
    try:
        require_topics(settings, [target], client_id=f"rerank-replay-{replay_id}-topics")
        try:
            consumer = KafkaConsumer(
                **consumer_kwargs(settings, client_id=f"rerank-replay-{replay_id}-consumer", group_id=group)
            )
        except Exception as e:
            raise FatalError(f"cannot start the Kafka consumer for {servers}: {one_line(e)}") from e
        try:
            return Replay(
                settings,
                engine,
                consumer,
                producer,
                from_ms=from_ms,
                to_ms=to_ms,
                reply_topic=target,
                replay_id=replay_id,
                group_id=group,
                worker_id=worker_id,
                progress=progress,
            ).run()
        finally:
            consumer.close(autocommit=False)
    finally:
        producer.close(timeout=10)
