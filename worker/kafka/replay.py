"""`rerank-worker replay`: re-score a time range of the jobs topic with the model this process loads.

For teams that re-score a topic with a new model: run it as a one-shot job (a GPU where it runs) with RERANK_MODEL
set to that model. It reads the range, scores the jobs in-process through the engine, batched and packed across
jobs like the worker does, and publishes each result, marked as a replay, to `--reply-topic` (default
RERANK_RESULTS_TOPIC; a job's own `reply_topic` is not used: one replay, one topic to read it from). One thread
reads, tokenizes, scores and publishes in turn: simple and deterministic, but tokenizing does not overlap the GPU
work as it does in the worker.

- Range: `--from` and `--to` are Kafka record timestamps, half-open [FROM, TO). Per partition of the jobs topic,
  `offsets_for_times(FROM)` gives the first offset and `offsets_for_times(TO)` the end, capped at the end offsets
  read at start (no `--to`: those end offsets). Jobs produced while the replay runs are not replayed.
- Consumer group: its own, `<RERANK_GROUP_ID>.replay.<replay id>` or `--group-id`, never the workers' group
  (refused). Partitions are assigned (assign + seek), not subscribed: no rebalance, nothing joins the workers'
  group. The replay group's offsets are committed after each batch's results are acknowledged, so
  `kafka-consumer-groups --describe` shows how far a replay got.
- Results: the same RerankResult as the worker's, with `replay: {replay_id, source_topic, source_partition,
  source_offset, source_timestamp}`, and headers `rerank.replay: true`, `rerank.replay.id`,
  `rerank.source.topic/partition/offset/timestamp`, `rerank.correlation.id`, `rerank.model`, `rerank.worker.id`. The
  producer is the worker's (acks=all, idempotent); the replay waits for every acknowledgement before it finishes.
- Bad records in the range (not a job, too large, over-long instruction, failing alone in the engine, result too
  large) are counted by reason, logged and skipped, NOT dead-lettered: the workers dead-lettered them when they
  first read them, and a second dead letter would make `dlq requeue` send the same job twice.
- Failures: CUDA out of memory halves the pass budget and tries again (RERANK_MAX_ATTEMPTS); a failed batch is
  split and its jobs scored alone; FATAL_AFTER_FAILED_JOBS jobs failing alone in a row, a result that cannot be
  published, or a range that stops advancing end the replay with FatalError (what was published stays published).
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.engine import InvalidJobError, JobScores
from worker.kafka.errors import FatalError, PermanentError, is_out_of_memory, one_line, reason_of
from worker.kafka.logs import job_fields
from worker.kafka.records import Engine, SourceRecord, WorkItem, encode_result
from worker.kafka.scoring import FATAL_AFTER_FAILED_JOBS, engine_with_budget
from worker.messages import ReplayInfo, RerankResult
from worker.settings import Settings

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 200
STALL_S = 60.0  # no record and no position change for this long while the range is unfinished: give up

# -- TIME ----------------------------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^-\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
# Digits below this are not plausible epoch milliseconds (1973-03-03) but are plausible epoch seconds.
_MIN_EPOCH_MS = 10**11


def is_relative_time(text: str) -> bool:
    return _RELATIVE.fullmatch(text.strip().lower()) is not None


def parse_time(text: str, *, now_ms: int | None = None) -> int:
    """TIME as epoch milliseconds: ISO-8601 (`2026-11-27T10:00:00Z`; no zone means UTC), epoch milliseconds
    (`1795773600000`), `now`, or relative to now (`-2h`, `-30m`, `-45s`, `-1d`, `-1w`, `-500ms`)."""
    value = text.strip()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if not value:
        raise ValueError("empty TIME")
    if value.lower() == "now":
        return now
    if m := _RELATIVE.fullmatch(value.lower()):
        return now - round(float(m.group(1)) * _UNIT_MS[m.group(2)])
    if value.isdigit():
        ms = int(value)
        if 0 < ms < _MIN_EPOCH_MS:
            raise ValueError(f"TIME {text!r} looks like epoch seconds; give epoch milliseconds ({ms * 1000})")
        return ms
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"TIME {text!r} is not ISO-8601 (2026-11-27T10:00:00Z), epoch milliseconds, `now` or relative (-2h, -30m)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    ms = int(parsed.timestamp() * 1000)
    if ms < 0:
        raise ValueError(f"TIME {text!r} is before 1970")
    return ms


def format_time(ms: int) -> str:
    """Epoch milliseconds as `2026-11-27T10:00:00.123Z`."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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

    bar = tqdm(total=total, desc=desc, unit="job", file=sys.stderr, dynamic_ncols=True)
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
        self.budget_tokens = engine.info.max_batch_tokens * settings.batch_max_packs
        self.pending: list[WorkItem] = []  # read, prepared, not scored yet (in read order)
        self.futures: list[Any] = []  # sent, not acknowledged yet
        self.next_read: dict[TopicPartition, int] = {}
        self.summary: ReplaySummary | None = None
        self._failed_alone = 0
        self._committed: dict[TopicPartition, int] = {}
        self._bar: Any = _NoBar()

    # -- plan -----------------------------------------------------------------------------------------------------

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

    # -- run ------------------------------------------------------------------------------------------------------

    def run(self) -> ReplaySummary:
        started = time.monotonic()
        ranges = self.plan()
        summary = self.summary = ReplaySummary(
            self.replay_id,
            self.group_id,
            self.settings.jobs_topic,
            self.reply_topic,
            self.from_ms,
            self.to_ms,
            ranges,
        )
        ends = {TopicPartition(self.settings.jobs_topic, r.partition): r.end for r in ranges if r.size > 0}
        log.info("replay started", extra=summary.as_json())
        if ends:
            self.consumer.assign(list(ends))
            for r in ranges:
                if r.size > 0:
                    tp = TopicPartition(self.settings.jobs_topic, r.partition)
                    self.consumer.seek(tp, r.start)
                    self.next_read[tp] = r.start
            with _progress(summary.total, f"replay {self.settings.jobs_topic}", self.progress) as self._bar:
                self._consume(ends)
                self._flush(everything=True)
                self._bar.set_postfix(replayed=summary.replayed, skipped=sum(summary.skipped.values()))
        summary.seconds = time.monotonic() - started
        log.info("replay finished", extra=summary.as_json())
        return summary

    def _consume(self, ends: dict[TopicPartition, int]) -> None:
        active = set(ends)
        last_progress = time.monotonic()
        while active:
            polled = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
            got = 0
            for tp, records in polled.items():
                for r in records:
                    if tp not in active or r.offset >= ends[tp] or r.offset < self.next_read[tp]:
                        continue  # past the range's end (or a duplicate after a seek): not ours
                    self._bar.update(r.offset + 1 - self.next_read[tp])
                    self.next_read[tp] = r.offset + 1
                    self.read(SourceRecord.from_consumer_record(r))
                    got += 1
            for tp in list(active):
                position = self.consumer.position(tp)
                if position >= ends[tp]:
                    self._bar.update(max(0, ends[tp] - self.next_read[tp]))  # offsets without records (gaps)
                    self.next_read[tp] = max(self.next_read[tp], ends[tp])
                    active.discard(tp)
                    self.consumer.pause(tp)
            scored = self._flush(everything=not got or not active)
            if got or scored:
                last_progress = time.monotonic()
            elif active and time.monotonic() - last_progress > STALL_S:
                left = {f"{tp.topic}[{tp.partition}]": (self.next_read[tp], ends[tp]) for tp in active}
                raise FatalError(f"the replay stopped advancing for {STALL_S:.0f}s short of the range's end: {left}")

    # -- one record -----------------------------------------------------------------------------------------------

    def read(self, record: SourceRecord) -> None:
        job_id = record.key.decode("utf-8", "replace") if record.key else None
        try:
            job = record.parse_job(max_message_bytes=self.settings.max_message_bytes, max_docs=self.settings.max_docs)
            job_id = job.job_id
            item = WorkItem(record, job)
            item.prepare(self.engine)
        except (PermanentError, InvalidJobError) as e:
            self.skip(record, job_id, reason_of(e), one_line(e))
            return
        self.pending.append(item)

    def skip(self, record: SourceRecord, job_id: str | None, reason: str, message: str) -> None:
        assert self.summary is not None
        self.summary.skipped[reason] += 1
        log.warning("skipped: %s", message, extra=job_fields(record, job_id, reason=reason))

    # -- batches --------------------------------------------------------------------------------------------------

    def _flush(self, *, everything: bool) -> bool:
        """Score pending jobs in batches under the token budget (the last, partial one only with `everything`),
        then wait for the acknowledgements and commit the replay group's offsets. True when it scored a batch."""
        scored_any = False
        while self.pending:
            batch, tokens = [self.pending[0]], self.pending[0].tokens
            for item in self.pending[1:]:
                if tokens + item.tokens > self.budget_tokens:
                    break
                batch.append(item)
                tokens += item.tokens
            if len(batch) == len(self.pending) and tokens < self.budget_tokens and not everything:
                break  # room for more: read on first
            del self.pending[: len(batch)]
            self.score(batch)
            scored_any = True
            assert self.summary is not None
            self.summary.batches += 1
        if scored_any or everything:
            self.settle()
        return scored_any

    def score(self, batch: list[WorkItem]) -> None:
        try:
            engine, scored = self._score_with_retries(batch)
        except Exception as e:
            if is_out_of_memory(e):
                raise FatalError(
                    f"CUDA out of memory on a batch of {len(batch)} jobs after {self.settings.max_attempts} tries"
                ) from e
            if len(batch) > 1:
                log.warning("batch of %d jobs failed (%s); scoring them one by one", len(batch), one_line(e))
                for item in batch:
                    self.score([item])
                return
            item = batch[0]
            self.skip(item.record, item.job.job_id, reason_of(e), one_line(e))
            if not isinstance(e, InvalidJobError):
                self._failed_alone += 1
                if self._failed_alone >= FATAL_AFTER_FAILED_JOBS:
                    raise FatalError(f"{self._failed_alone} jobs in a row failed to score: {one_line(e)}") from e
            return
        self._failed_alone = 0
        for item, job_scores in zip(batch, scored, strict=True):
            self.publish(engine, item, job_scores)

    def _score_with_retries(self, batch: Sequence[WorkItem]) -> tuple[Engine, list[JobScores]]:
        engine = self.engine
        prepared = [item.prepared for item in batch if item.prepared is not None]
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                return engine, engine.score_prepared(prepared)
            except Exception as e:
                if not is_out_of_memory(e) or attempt == self.settings.max_attempts:
                    raise
                engine = engine_with_budget(self.engine, engine.info.max_batch_tokens // 2) or engine
                log.warning(
                    "CUDA out of memory on a batch of %d jobs (try %d); next try with %d tokens per pass",
                    len(batch),
                    attempt,
                    engine.info.max_batch_tokens,
                )
        raise RuntimeError("unreachable")

    def publish(self, engine: Engine, item: WorkItem, scored: JobScores) -> None:
        record, job = item.record, item.job
        replay = ReplayInfo(
            replay_id=self.replay_id,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            source_timestamp=record.timestamp,
        )
        try:
            value = encode_result(
                lambda: RerankResult.from_scores(job, scored, engine.info, replay=replay),
                max_message_bytes=self.settings.max_message_bytes,
            )
        except PermanentError as e:
            self.skip(record, job.job_id, e.reason, str(e))
            return
        headers = replay_headers(record, job.job_id, replay_id=self.replay_id, model=engine.info.model)
        headers.append(("rerank.worker.id", self.worker_id.encode()))
        future = self.producer.send(self.reply_topic, key=job.job_id.encode(), value=value, headers=headers)
        self.futures.append(future)
        assert self.summary is not None
        self.summary.replayed += 1

    def settle(self) -> None:
        """Wait for every result sent; then commit the replay group up to the first job not yet scored."""
        wait_s = self.settings.produce_timeout_ms / 1000 + 5
        futures, self.futures = self.futures, []
        for f in futures:
            try:
                f.get(timeout=wait_s)
            except Exception as e:
                raise FatalError(f"cannot publish replayed results to {self.reply_topic!r}: {one_line(e)}") from e
        assert self.summary is not None
        self._bar.set_postfix(replayed=self.summary.replayed, skipped=sum(self.summary.skipped.values()))
        done = dict(self.next_read)
        for item in self.pending:
            tp = TopicPartition(item.record.topic, item.record.partition)
            done[tp] = min(done[tp], item.record.offset)
        if not done or done == self._committed:
            return
        try:
            self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in done.items()})
        except Exception as e:  # the replay group's offsets only report progress: never fatal
            log.warning("committing the replay group's offsets failed: %s", one_line(e))
            return
        self._committed = done


def replay_headers(record: SourceRecord, job_id: str, *, replay_id: str, model: str) -> list[tuple[str, bytes]]:
    """Headers of a replayed result (plus `rerank.worker.id`)."""
    return [
        ("rerank.replay", b"true"),
        ("rerank.replay.id", replay_id.encode()),
        ("rerank.correlation.id", record.correlation_id(job_id).encode()),
        ("rerank.source.topic", record.topic.encode()),
        ("rerank.source.partition", str(record.partition).encode()),
        ("rerank.source.offset", str(record.offset).encode()),
        ("rerank.source.timestamp", str(record.timestamp).encode()),
        ("rerank.model", model.encode()),
        ("content-type", b"application/json"),
    ]


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
    from kafka import KafkaConsumer

    from worker.kafka.config import compression, consumer_kwargs
    from worker.kafka.loop import default_worker_id
    from worker.kafka.topics import open_producer, require_topics

    check_range(from_ms, to_ms)
    compression(settings)  # ValueError when the codec's package is missing
    replay_id = replay_id or default_replay_id()
    group = replay_group_id(settings, replay_id, group_id)
    worker_id = settings.worker_id or default_worker_id()
    target = reply_topic or settings.results_topic
    servers = settings.bootstrap_servers
    producer = open_producer(settings, client_id=f"rerank-replay-{replay_id}-producer")
    try:
        require_topics(producer, settings, [target])
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
