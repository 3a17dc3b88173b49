"""Stage commit (consumer thread): per partition, the offset that may be committed, and its commit.

The rule: one past the highest offset below which every polled job is finished. Jobs finish out of order (small
jobs pack faster than big ones, a retried publish finishes late). Committing the highest finished offset would lose
the unfinished ones below it on a crash; committing the contiguous watermark never does. Offsets of one partition
need not be consecutive (compaction, transaction markers), so the watermark is the smallest offset still pending,
or one past the highest offset seen when nothing is pending. A job is finished when its result or dead letter is
acknowledged, or when there was nothing to send (a replay's skip).

`OffsetTracker` is pure bookkeeping, no Kafka calls; `Committer` commits its watermarks through the consumer. Both
belong to the consumer thread (the rebalance listener uses them too, but only while the consumer thread is blocked
inside `poll`, so there is never a second concurrent user). The worker commits the workers' group; a replay commits
its own group, which is how far it got.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.pipeline.errors import one_line
from worker.pipeline.metrics import WorkerMetrics

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Hashable)  # a partition: kafka's TopicPartition, or anything hashable in tests


@dataclass
class PartitionOffsets:
    pending: set[int] = field(default_factory=set)
    abandoned: set[int] = field(default_factory=set)  # not done and never will be here: the next owner reads them
    next_offset: int | None = None  # one past the highest offset seen
    committed: int | None = None  # the last watermark committed (or handed to commit)

    def watermark(self) -> int | None:
        if self.pending or self.abandoned:
            return min(self.pending | self.abandoned)
        return self.next_offset


class OffsetTracker(Generic[P]):
    def __init__(self) -> None:
        self._partitions: dict[P, PartitionOffsets] = {}

    def add(self, partition: P, offset: int) -> None:
        """A record was polled: it is pending until `done`."""
        state = self._partitions.get(partition)
        if state is None:
            # The first offset read is where the group already stands: committing it again would change nothing.
            state = self._partitions[partition] = PartitionOffsets(committed=offset)
        state.pending.add(offset)  # an offset read again (a seek back) is simply pending again
        state.abandoned.discard(offset)
        state.next_offset = max(offset + 1, state.next_offset or 0)

    def done(self, partition: P, offset: int) -> bool:
        """The record's result or dead letter was acknowledged. False when the offset is not pending (for example
        its partition was revoked meanwhile): nothing changes then."""
        state = self._partitions.get(partition)
        if state is None or offset not in state.pending | state.abandoned:
            return False
        state.pending.discard(offset)
        state.abandoned.discard(offset)  # given up on, yet acknowledged after all: done is done
        return True

    def is_pending(self, partition: P, offset: int) -> bool:
        state = self._partitions.get(partition)
        return state is not None and offset in state.pending

    def answered_run(self, partition: P, answered: Iterable[int]) -> tuple[list[int], int]:
        """Exactly-once: the pending offsets from the watermark up that are all `answered`, in order, and the offset
        one past them (the next offset still waited for, or one past the highest seen). ([], watermark) when the
        record at the watermark has no answer yet."""
        state = self._partitions.get(partition)
        if state is None:
            return [], 0
        have = set(answered)
        waiting = sorted(state.pending | state.abandoned)
        run: list[int] = []
        for offset in waiting:
            if offset not in have or offset in state.abandoned:
                return run, offset
            run.append(offset)
        return run, state.next_offset if state.next_offset is not None else 0

    def abandon(self, partition: P, offset: int) -> None:
        """A pending record that will not be finished here (its partition is being revoked and it never reached the
        GPU): no longer waited for, but the watermark stays below it, so it is not committed."""
        state = self._partitions.get(partition)
        if state is not None and offset in state.pending:
            state.pending.discard(offset)
            state.abandoned.add(offset)

    def committable(self, partitions: Iterable[P] | None = None) -> dict[P, int]:
        """Watermarks that moved since they were last marked committed."""
        chosen = self._partitions if partitions is None else [p for p in partitions if p in self._partitions]
        out = {}
        for p in chosen:
            state = self._partitions[p]
            mark = state.watermark()
            if mark is not None and (state.committed is None or mark > state.committed):
                out[p] = mark
        return out

    def mark_committed(self, offsets: dict[P, int]) -> None:
        for p, offset in offsets.items():
            if p in self._partitions:
                state = self._partitions[p]
                state.committed = max(offset, state.committed or 0)

    def in_flight(self, partitions: Iterable[P] | None = None) -> int:
        """Records pending and still expected to finish (abandoned ones are not)."""
        chosen = self._partitions if partitions is None else [p for p in partitions if p in self._partitions]
        return sum(len(self._partitions[p].pending) for p in chosen)

    def watermark(self, partition: P) -> int | None:
        state = self._partitions.get(partition)
        return None if state is None else state.watermark()

    def drop(self, partitions: Iterable[P]) -> None:
        """Forget revoked or lost partitions; late completions for them are then ignored."""
        for p in partitions:
            self._partitions.pop(p, None)

    def partitions(self) -> list[P]:
        return list(self._partitions)


class Committer:
    """Commits the tracker's watermarks through the consumer (synchronously, or from the rebalance listener,
    asynchronously: a blocking commit cannot run on kafka-python's IO thread, which calls the listener)."""

    def __init__(self, consumer: Any, metrics: WorkerMetrics) -> None:
        self.consumer = consumer
        self.metrics = metrics
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()

    def commit(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Commit the watermarks of `partitions` that moved; a failure (a rebalance under way) is logged and
        counted, and what is not committed is redelivered. Returns what was committed."""
        offsets = self.tracker.committable(partitions)
        if not offsets:
            return {}
        try:
            self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        except KafkaError as e:
            self.metrics.commits.labels(result="failed").inc()
            log.warning("commit failed: %s", one_line(e), extra={"offsets": show(offsets)})
            return {}
        self.tracker.mark_committed(offsets)
        self.metrics.commits.labels(result="ok").inc()
        log.debug("committed", extra={"offsets": show(offsets)})
        return offsets

    def commit_async(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        offsets = self.tracker.committable(partitions)
        if offsets:
            self.consumer.commit_async({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
            self.tracker.mark_committed(offsets)
        return offsets


def show(partitions: Iterable[TopicPartition] | dict[TopicPartition, int]) -> dict[str, Any] | list[str]:
    """Partitions (or partition offsets) as `topic[partition]` for log lines."""
    if isinstance(partitions, dict):
        return {f"{tp.topic}[{tp.partition}]": o for tp, o in partitions.items()}
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)
