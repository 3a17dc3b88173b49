"""`rerank-worker dlq list` and `dlq requeue`: inspect dead letters by reason, send chosen ones back as jobs.

Both read RERANK_DLQ_TOPIC with a throwaway consumer (no group: assign + seek, nothing committed) from the
beginning, or from `--since` (`offsets_for_times` on the dead-letter topic: when the job was dead-lettered), and
stop at the end offsets read at start, so a worker dead-lettering meanwhile cannot keep them reading.

Requeue re-publishes a dead letter's ORIGINAL key and value bytes, unchanged, with the job's own headers: those the
worker added (`rerank.error.*`, `rerank.original.*`, `rerank.consumer.group`, `rerank.attempts`, `rerank.worker.id`,
`rerank.model`; see worker.pipeline.deadletter) are removed, and `rerank.requeued.from: <dlq topic>[partition]@offset`
is added (replacing an older one). The producer is the worker's (acks=all, idempotent); the command waits for
every acknowledgement. The key is the original one, so the job lands on the partition it was first sent to when
the partition count did not change. A dead letter whose value was dropped (`rerank.original.value.dropped`, too
large even for the dead-letter topic) cannot be requeued and is reported as such. Requeueing is not idempotent:
run it twice and the jobs are sent twice (narrow it with `--reason` and `--since`, check with `--dry-run`).
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from worker.kafka.config import consumer_kwargs
from worker.kafka.topics import open_producer, require_topics
from worker.pipeline.deadletter import REPLACED, VALUE_DROPPED, header_map
from worker.pipeline.errors import FatalError, one_line
from worker.pipeline.records import SourceRecord
from worker.settings import Settings
from worker.tools.times import format_time

POLL_TIMEOUT_MS = 200
STALL_S = 30.0
REQUEUED_FROM = "rerank.requeued.from"


@dataclass(frozen=True)
class DeadLetter(SourceRecord):
    """One record of the dead-letter topic: a record like any other (`where`, `from_consumer_record`), read for the
    worker's `rerank.*` headers."""

    @property
    def h(self) -> dict[str, str]:
        return header_map(list(self.headers))

    @property
    def reason(self) -> str:
        return self.h.get("rerank.error.reason") or "unknown"

    @property
    def message(self) -> str:
        return self.h.get("rerank.error.message", "")

    @property
    def job_id(self) -> str | None:
        """The worker dead-letters with the job's original key, which producers set to job_id."""
        return self.key_text

    @property
    def original_where(self) -> str:
        h = self.h
        topic = h.get("rerank.original.topic", "?")
        return f"{topic}[{h.get('rerank.original.partition', '?')}]@{h.get('rerank.original.offset', '?')}"

    @property
    def value_dropped(self) -> bool:
        return VALUE_DROPPED in self.h

    def requeue_headers(self) -> list[tuple[str, bytes]]:
        """The job's own headers (the worker's dead-letter headers removed), plus where it was requeued from."""
        kept = [(k, v) for k, v in self.headers if not k.startswith(REPLACED) and k != REQUEUED_FROM]
        return [*kept, (REQUEUED_FROM, self.where.encode())]

    def as_json(self) -> dict[str, Any]:
        h = self.h

        def number(name: str) -> int | None:
            text = h.get(name)
            return int(text) if text is not None and text.lstrip("-").isdigit() else None

        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp,
            "time": format_time(self.timestamp) if self.timestamp >= 0 else None,
            "reason": self.reason,
            "category": h.get("rerank.error.category"),
            "stage": h.get("rerank.error.stage"),
            "message": self.message,
            "job_id": self.job_id,
            "original_topic": h.get("rerank.original.topic"),
            "original_partition": number("rerank.original.partition"),
            "original_offset": number("rerank.original.offset"),
            "original_timestamp": number("rerank.original.timestamp"),
            "attempts": number("rerank.attempts"),
            "worker_id": h.get("rerank.worker.id"),
            "requeued_from": h.get(REQUEUED_FROM),
            "value_bytes": len(self.value or b""),
            "value_dropped": self.value_dropped,
        }


# -- choose --------------------------------------------------------------------------------------------------------


def selector(reasons: Iterable[str] | None = None, since_ms: int | None = None) -> Callable[[DeadLetter], bool]:
    """Which dead letters a command acts on: any of `reasons` (None or empty: all), dead-lettered at or after
    `since_ms` (the reading starts there already; this also drops records with an older timestamp after it)."""
    wanted = set(reasons or ())

    def chosen(letter: DeadLetter) -> bool:
        if wanted and letter.reason not in wanted:
            return False
        return since_ms is None or letter.timestamp >= since_ms

    return chosen


@dataclass
class DlqSummary:
    topic: str
    limit: int
    total: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    _newest: list[tuple[int, int, int, DeadLetter]] = field(default_factory=list)

    def add(self, letter: DeadLetter) -> None:
        self.total += 1
        self.by_reason[letter.reason] += 1
        entry = (letter.timestamp, letter.partition, letter.offset, letter)
        if self.limit <= 0:
            self._newest.append(entry)
        elif len(self._newest) < self.limit:
            heapq.heappush(self._newest, entry)
        elif entry[:3] > self._newest[0][:3]:
            heapq.heapreplace(self._newest, entry)

    @property
    def entries(self) -> list[DeadLetter]:
        """The newest `limit` dead letters (all when limit <= 0), oldest first."""
        return [e[3] for e in sorted(self._newest, key=lambda e: e[:3])]

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "total": self.total,
            "by_reason": dict(self.by_reason.most_common()),
            "entries": [letter.as_json() for letter in self.entries],
        }

    def describe(self, width: int = 70) -> str:
        lines = [f"{self.total} dead letters in {self.topic}" + (":" if self.total else "")]
        pad = max((len(r) for r in self.by_reason), default=0)
        lines += [f"  {reason:<{pad}}  {n:>6}" for reason, n in self.by_reason.most_common()]
        entries = self.entries
        if not entries:
            return "\n".join(lines)
        shown = "all" if len(entries) == self.total else f"newest {len(entries)}"
        lines += ["", f"{shown}:"]
        rows = [("time", "reason", "original", "job_id", "where", "message")]
        for letter in entries:
            message = " ".join(letter.message.split())
            message = message if len(message) <= width else message[: width - 3] + "..."
            time_text = format_time(letter.timestamp) if letter.timestamp >= 0 else "-"
            rows.append((time_text, letter.reason, letter.original_where, letter.job_id or "-", letter.where, message))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)) + "  " + row[5])
        return "\n".join(lines)


# -- read ----------------------------------------------------------------------------------------------------------


def read_dead_letters(
    settings: Settings, *, since_ms: int | None = None, client_id: str = "rerank-dlq"
) -> Iterator[DeadLetter]:
    """Every dead letter from the beginning (or `since_ms`) up to the end offsets read at start."""
    topic, servers = settings.dlq_topic, settings.bootstrap_servers
    try:
        consumer = KafkaConsumer(**consumer_kwargs(settings, client_id=client_id, group_id=None))
    except Exception as e:
        raise FatalError(f"cannot start the Kafka consumer for {servers}: {one_line(e)}") from e
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        if not partitions:
            raise FatalError(f"dead-letter topic {topic!r} is not available on {servers}")
        tps = [TopicPartition(topic, p) for p in partitions]
        ends = consumer.end_offsets(tps)
        if since_ms is None:
            starts = consumer.beginning_offsets(tps)
        else:
            found = consumer.offsets_for_times({tp: since_ms for tp in tps})
            starts = {tp: ends[tp] if found.get(tp) is None else found[tp].offset for tp in tps}
        active = {tp for tp in tps if starts[tp] < ends[tp]}
        if not active:
            return
        consumer.assign(sorted(active, key=lambda tp: tp.partition))
        for tp in active:
            consumer.seek(tp, starts[tp])
        last_progress = time.monotonic()
        while active:
            got = False
            for tp, records in consumer.poll(timeout_ms=POLL_TIMEOUT_MS).items():
                for r in records:
                    if tp in active and r.offset < ends[tp]:
                        got = True
                        yield DeadLetter.from_consumer_record(r)
            for tp in list(active):
                if consumer.position(tp) >= ends[tp]:
                    active.discard(tp)
                    consumer.pause(tp)
            if got:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > STALL_S:
                raise FatalError(f"reading {topic!r} stopped advancing for {STALL_S:.0f}s short of its end offsets")
    finally:
        consumer.close(autocommit=False)


def list_dead_letters(
    settings: Settings, *, reasons: Iterable[str] | None = None, since_ms: int | None = None, limit: int = 50
) -> DlqSummary:
    chosen = selector(reasons, since_ms)
    summary = DlqSummary(settings.dlq_topic, limit)
    for letter in read_dead_letters(settings, since_ms=since_ms):
        if chosen(letter):
            summary.add(letter)
    return summary


# -- requeue -------------------------------------------------------------------------------------------------------


@dataclass
class Requeued:
    letter: DeadLetter
    to: str | None = None  # `topic[partition]@offset` once acknowledged; None on a dry run or when skipped
    skipped: str | None = None  # why it was not requeued


@dataclass
class RequeueReport:
    dlq_topic: str
    target: str
    dry_run: bool
    items: list[Requeued] = field(default_factory=list)

    @property
    def requeued(self) -> list[Requeued]:
        return [i for i in self.items if i.skipped is None]

    def describe(self) -> str:
        verb = "would requeue" if self.dry_run else "requeued"
        lines = []
        for i in self.items:
            letter = i.letter
            what = f"{letter.where} ({letter.reason}, job {letter.job_id or '-'})"
            if i.skipped:
                lines.append(f"skipped {what}: {i.skipped}")
            else:
                lines.append(f"{verb} {what} -> {i.to or self.target}")
        n = len(self.requeued)
        skipped = len(self.items) - n
        tail = f", {skipped} skipped" if skipped else ""
        lines.append(f"{verb} {n} dead letters of {self.dlq_topic} to {self.target}{tail}")
        return "\n".join(lines)


def requeue(
    settings: Settings,
    *,
    reasons: Iterable[str] | None = None,
    since_ms: int | None = None,
    dry_run: bool = False,
    to_topic: str | None = None,
) -> RequeueReport:
    """Send the chosen dead letters' original key and value bytes back to the jobs topic (or `to_topic`), each as
    it is read (the report keeps them without their values), then wait for every acknowledgement."""
    target = to_topic or settings.jobs_topic
    report = RequeueReport(settings.dlq_topic, target, dry_run)
    chosen = selector(reasons, since_ms)
    with ExitStack() as stack:
        producer = None if dry_run else _producer_for(settings, target, stack)
        sent: list[tuple[Requeued, Any]] = []
        for letter in read_dead_letters(settings, since_ms=since_ms):
            if not chosen(letter):
                continue
            item = Requeued(replace(letter, value=None))
            report.items.append(item)
            if letter.value_dropped:
                item.skipped = "its value was dropped (too large for the dead-letter topic)"
            elif producer is not None:
                future = producer.send(target, key=letter.key, value=letter.value, headers=letter.requeue_headers())
                sent.append((item, future))
        wait_s = settings.produce_timeout_ms / 1000 + 5
        for item, future in sent:
            try:
                meta = future.get(timeout=wait_s)
            except Exception as e:
                done = sum(1 for i, _ in sent if i.to)
                raise FatalError(
                    f"requeue to {target!r} failed at {item.letter.where} ({done} of {len(sent)} acknowledged "
                    f"before it): {one_line(e)}"
                ) from e
            item.to = f"{meta.topic}[{meta.partition}]@{meta.offset}"
    return report


def _producer_for(settings: Settings, topic: str, stack: ExitStack) -> Any:
    """The worker's producer (acks=all, idempotent), once `topic` is known to exist; closed with `stack`."""
    producer = open_producer(settings, client_id="rerank-dlq-requeue")
    stack.callback(producer.close, timeout=10)
    require_topics(settings, [topic], client_id="rerank-dlq-requeue-topics")
    return producer
