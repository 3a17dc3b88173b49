"""Which offset may be committed: one past the highest offset below which every polled job is done.

Jobs finish out of order (small jobs pack faster than big ones, a retried publish finishes late). Committing the
highest finished offset would lose the unfinished ones below it on a crash; committing the contiguous watermark
never does. Offsets of one partition need not be consecutive (compaction, transaction markers), so the watermark
is the smallest offset still pending, or one past the highest offset seen when nothing is pending.

Pure bookkeeping, no Kafka calls: the consumer thread owns the tracker (the rebalance listener touches it too,
but only while the consumer thread is blocked inside `poll`, so there is never a second concurrent user).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

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
