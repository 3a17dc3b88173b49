"""Stage consume (consumer thread): the source of records, and which partitions are this consumer's.

kafka-python's KafkaConsumer is not thread-safe: the consumer thread owns it and makes every call on it (poll,
pause, resume, commit, seek). The rebalance listener is the one exception: kafka-python calls it on its own IO
thread while the consumer thread is blocked inside `poll` (or `close`), so the two never run at once.

Two sources, one interface (`Source`):
- `GroupSource` (the worker): subscribed to the jobs topic in the workers' group. On a revocation it gives the
  partitions up (`PartitionHandler.release`: the jobs not started are given up, those being scored or published are
  waited for, briefly, and their watermark committed); on an assignment it takes them. With Kafka's eager protocol
  every rebalance revokes all partitions and hands most straight back, and kafka-python keeps such a partition's
  fetch position: the source seeks it back to the first offset not done, so the jobs given up are read again.
- `RangeSource` (a replay): partitions assigned, not subscribed (no group membership, no rebalance), each read from a
  start offset up to an end offset, then paused; `exhausted` once every range is read.

`Ownership` says which partitions are owned now and under which assignment: the GPU thread reads it to skip jobs of
a partition revoked (or revoked and assigned again) since they were polled.

`GroupWatch` keeps a group member from idling outside its group while jobs wait. kafka-python can leave a consumer
that stays out of the group's current generation: a rebalance finished by the coordinator but never completed in
the client (its state stays "rebalancing", its heartbeats stop and the coordinator drops it), or a member left
behind by its session. So the watch compares the consumer's own state with the coordinator's view of the group
(DescribeGroups), only while the consumer is unsettled or holds no partitions, and the source rejoins the group
when they disagree: the group is stable without this member, the coordinator assigned it partitions it does not
own, or some of the topic's partitions belong to no member (an assignment made before the topic's metadata
arrived).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import MemberState, TopicPartition

from worker.kafka.groups import GroupView
from worker.pipeline.errors import Fatal, FatalError, is_transient, one_line
from worker.pipeline.metrics import WorkerMetrics
from worker.pipeline.records import SourceRecord, WorkItem

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 100
STALL_S = 60.0  # a range source that reads nothing for this long, unpaused and unfinished, gives up
WATCH_EVERY_S = 10.0  # at most one DescribeGroups this often
JOIN_POLL_S = 1.0  # at most this long polling back to back while the member joins its group
IDLE_REPORT_EVERY_S = 600.0  # an idle member with jobs waiting logs it once, then this often


class Ownership:
    """The partitions owned now and how often each was assigned. Written by the consumer thread and the rebalance
    listener, read by the GPU thread: each field is replaced whole, never changed in place."""

    def __init__(self) -> None:
        self.owned: frozenset[TopicPartition] = frozenset()
        self.assignments: dict[TopicPartition, int] = {}

    def owns(self, item: WorkItem) -> bool:
        """Whether a job is still this consumer's: its partition is owned, under the assignment it was polled in."""
        tp = item.record.tp
        return tp in self.owned and self.assignments.get(tp) == item.assignment

    def assignment(self, tp: TopicPartition) -> int:
        return self.assignments.get(tp, 0)

    def add(self, partitions: Collection[TopicPartition]) -> None:
        self.assignments = {**self.assignments, **{tp: self.assignments.get(tp, 0) + 1 for tp in partitions}}
        self.owned = self.owned | frozenset(partitions)

    def remove(self, partitions: Collection[TopicPartition]) -> None:
        self.owned = self.owned - frozenset(partitions)


class PartitionHandler(Protocol):
    """What a source reports partition changes to (the pipeline)."""

    def release(self, partitions: set[TopicPartition], *, commit: bool) -> dict[TopicPartition, int | None]:
        """Stop working on `partitions` (committing what is done when `commit`); returns each one's first offset
        not done (None where nothing was read)."""
        ...

    def acquired(self, partitions: set[TopicPartition]) -> None: ...


class Source(Protocol):
    consumer: Any
    ownership: Ownership

    def bind(self, handler: PartitionHandler) -> None:
        """Start reading: subscribe, or assign and seek; partition changes go to `handler`."""
        ...

    def poll(self) -> list[SourceRecord]:
        """The records of one poll (fractions of a second); FatalError when the consumer cannot go on."""
        ...

    def pause(self) -> None:
        """Fetch nothing more (the pipeline is full) but stay a live member."""
        ...

    def resume(self) -> None: ...

    @property
    def exhausted(self) -> bool:
        """Everything there is to read was read (never, for an endless source)."""
        ...


def poll_records(consumer: Any, timeout_ms: int = POLL_TIMEOUT_MS) -> dict[TopicPartition, list[SourceRecord]]:
    """One poll; a transient error gives nothing (the next poll tries again), any other raises FatalError."""
    try:
        polled = consumer.poll(timeout_ms=timeout_ms)
    except KafkaError as e:
        if is_transient(e):
            log.warning("poll failed, polling again: %s", one_line(e))
            time.sleep(0.5)
            return {}
        raise FatalError(f"the consumer failed: {one_line(e)}") from e
    return {tp: [SourceRecord.from_consumer_record(r) for r in records] for tp, records in polled.items()}


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: GroupSource) -> None:
        self.source = source

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.source.revoked(revoked, commit=True)

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.source.revoked(lost, commit=False)  # no longer ours: a commit would be refused

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.source.assigned(assigned)


class GroupAdmin(Protocol):
    """The coordinator's view of the group (worker.kafka.groups.GroupAdmin)."""

    def describe(self) -> GroupView: ...

    def committed(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]: ...


class GroupWatch:
    """Why the consumer must rejoin its group, if it must (consumer thread; see the module docstring).

    `settle_s`: how long the consumer may stay unsettled (not stable in its group) before the coordinator is asked;
    `idle_after_s`: how long it may hold no partitions before the coordinator is asked (and the jobs waiting in the
    group counted, `idle_lag`)."""

    def __init__(
        self,
        consumer: Any,
        topic: str,
        admin: GroupAdmin,
        *,
        settle_s: float,
        idle_after_s: float,
        every_s: float = WATCH_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.admin = admin
        self.settle_s = settle_s
        self.idle_after_s = idle_after_s
        self.every_s = every_s
        self.clock = clock
        self.unsettled_since: float | None = None
        self.idle_since: float | None = None
        self.idle_lag: int | None = None  # jobs waiting in the group while this consumer idles (None: not idle)
        self.idle_members = 0
        self._next_check = 0.0

    def reset(self) -> None:
        """After a rejoin: start counting again, and give the rejoin time to settle."""
        self.unsettled_since = self.idle_since = self.idle_lag = None
        self._next_check = self.clock() + self.settle_s

    def check(self, owned: frozenset[TopicPartition]) -> str | None:
        now = self.clock()
        member = self.consumer.group_metadata()
        stable = member.state == MemberState.STABLE
        self.unsettled_since = None if stable else (self.unsettled_since or now)
        self.idle_since = None if owned or not stable else (self.idle_since or now)
        if self.idle_since is None:
            self.idle_lag = None
        unsettled = self.unsettled_since is not None and now - self.unsettled_since >= self.settle_s
        idle = self.idle_since is not None and now - self.idle_since >= self.idle_after_s
        if not (unsettled or idle) or now < self._next_check:
            return None
        self._next_check = now + self.every_s
        try:
            view = self.admin.describe()
        except Exception as e:  # the coordinator is moving or unreachable: the consumer's own retries handle that
            log.debug("describing the group failed: %s", one_line(e))
            return None
        if view.state in ("PreparingRebalance", "CompletingRebalance"):
            return None  # a rebalance under way: the consumer takes part in it
        if member.member_id not in view.members:
            return (
                f"the group is {view.state} without this member ({member.member_id or 'no member id'}, {member.state})"
            )
        if self.unsettled_since is not None and unsettled:
            waited = now - self.unsettled_since
            return f"the group finished its rebalance, this consumer did not ({member.state} for {waited:.0f}s)"
        if view.state != "Stable":
            return None
        assigned = view.members[member.member_id]
        if assigned != owned:
            return f"the coordinator assigned this member {show(assigned)}, which it does not consume"
        topic_partitions = {TopicPartition(self.topic, p) for p in self.consumer.partitions_for_topic(self.topic) or ()}
        if orphaned := topic_partitions - view.assigned():
            return f"{show(orphaned)} belong to no member (an assignment made before the topic's metadata arrived)"
        self.idle_members = len(view.members)
        self.idle_lag = self._lag(topic_partitions)
        return None

    def _lag(self, partitions: set[TopicPartition]) -> int | None:
        """Jobs of the topic not yet committed by the group (from its start where nothing was committed)."""
        if not partitions:
            return 0
        try:
            committed = self.admin.committed(partitions)
            ends = self.consumer.end_offsets(list(partitions))
            starts = self.consumer.beginning_offsets([tp for tp in partitions if tp not in committed])
        except Exception as e:
            log.debug("reading the group's lag failed: %s", one_line(e))
            return None
        return sum(max(0, int(ends[tp]) - committed.get(tp, int(starts.get(tp, ends[tp])))) for tp in partitions)


def show(partitions: Collection[TopicPartition]) -> str:
    return ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)) or "nothing"


class GroupSource:
    """The jobs topic, subscribed in a consumer group (the worker's source). `watch`: see GroupWatch; without one
    (unit tests) nothing checks the consumer's membership."""

    def __init__(
        self,
        consumer: Any,
        topic: str,
        fatal: Fatal,
        *,
        watch: GroupWatch | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.fatal = fatal
        self.watch = watch
        self.metrics = metrics or WorkerMetrics()
        self.ownership = Ownership()
        self.handler: PartitionHandler | None = None
        self._listener = _Listener(self)
        self._idle_reported = 0.0
        # Revoked partitions still in the consumer's assignment (an eager revocation): where to read again should
        # one be handed straight back, since kafka-python keeps its fetch position past the jobs given up.
        self.resume_at: dict[TopicPartition, int] = {}

    def bind(self, handler: PartitionHandler) -> None:
        self.handler = handler
        self.consumer.subscribe([self.topic], listener=self._listener)

    def poll(self) -> list[SourceRecord]:
        records = [r for records in poll_records(self.consumer).values() for r in records]
        # kafka-python completes a join (JoinGroup, SyncGroup, the new assignment) only inside poll, and a join that
        # ends between two polls can be lost for good. While the member is joining, poll back to back, so that a
        # join that outlasts one poll ends inside the next.
        until = time.monotonic() + JOIN_POLL_S
        while not records and not self._stable() and time.monotonic() < until:
            records = [r for records in poll_records(self.consumer).values() for r in records]
        if self.watch is not None:
            if reason := self.watch.check(self.ownership.owned):
                self.rejoin(reason)
            self._report_idle()
        return records

    def _stable(self) -> bool:
        return bool(self.consumer.group_metadata().state == MemberState.STABLE)

    def rejoin(self, reason: str) -> None:
        """Leave the group and join it again as a new member: a rebalance in which this consumer takes part."""
        log.warning("rejoining consumer group: %s", reason, extra={"topic": self.topic})
        self.metrics.rejoins.inc()
        if held := set(self.consumer.assignment()):
            self.revoked(held, commit=False)  # as lost: the group may have handed them on already
        self.consumer.unsubscribe()  # leaves the group (unsubscribing does not call the listener)
        self.consumer.subscribe([self.topic], listener=self._listener)
        if self.watch is not None:
            self.watch.reset()

    def _report_idle(self) -> None:
        assert self.watch is not None
        lag = self.watch.idle_lag
        waiting = lag is not None and lag > 0
        self.metrics.idle_with_lag.set(1 if waiting else 0)
        now = time.monotonic()
        if waiting and now - self._idle_reported >= IDLE_REPORT_EVERY_S:
            self._idle_reported = now
            log.warning(
                "this worker holds no partitions while %d jobs wait in its group (%d members for the topic's "
                "partitions: a member beyond the partition count idles)",
                lag,
                self.watch.idle_members,
                extra={"topic": self.topic},
            )
        elif not waiting:
            self._idle_reported = 0.0

    def pause(self) -> None:
        self.consumer.pause(*self.consumer.assignment())

    def resume(self) -> None:
        if paused := self.consumer.paused():
            self.consumer.resume(*paused)

    @property
    def exhausted(self) -> bool:
        return False

    # -- rebalance (kafka-python's IO thread, while the consumer thread is blocked in poll or close) ---------------

    def revoked(self, partitions: set[TopicPartition], *, commit: bool) -> None:
        revoked = set(partitions)
        if not revoked or self.handler is None:
            return
        self.ownership.remove(revoked)  # from here on the GPU thread starts none of their jobs
        marks = self.handler.release(revoked, commit=commit)
        # Only an eager revocation leaves the partition in the assignment, with its state and position kept. Lost
        # partitions, and partitions revoked cooperatively (already out of the assignment), start from the group's
        # committed offset anyway.
        still_assigned = self.consumer.assignment() if commit else set()
        for tp in revoked:
            mark = marks.get(tp)
            if tp in still_assigned and mark is not None:
                self.resume_at[tp] = mark
            elif tp not in still_assigned:
                self.resume_at.pop(tp, None)

    def assigned(self, partitions: set[TopicPartition]) -> None:
        unreadable = set()
        for tp in sorted(set(partitions) & set(self.resume_at)):
            try:
                self.consumer.seek(tp, self.resume_at[tp])
            except (ValueError, KafkaError) as e:  # not for an assigned partition; should it happen, the partition
                # is left alone (going on from the kept position would commit past the jobs given up) and we stop
                unreadable.add(tp)
                self.fatal.fail(f"cannot read {tp} again from offset {self.resume_at[tp]}: {one_line(e)}")
        self.resume_at = {}
        self.ownership.add(set(partitions) - unreadable)
        if self.handler is not None:
            self.handler.acquired(set(partitions))


class RangeSource:
    """Offsets [start, end) of some partitions, assigned (a replay's source); `progress(n)` is told of every offset
    read past, records or gaps."""

    def __init__(
        self,
        consumer: Any,
        ranges: Mapping[TopicPartition, tuple[int, int]],
        *,
        progress: Callable[[int], object] = lambda n: None,
        stall_s: float = STALL_S,
    ) -> None:
        self.consumer = consumer
        self.ends = {tp: end for tp, (start, end) in ranges.items() if end > start}
        self.next_read = {tp: start for tp, (start, end) in ranges.items() if end > start}
        self.active = set(self.ends)
        self.ownership = Ownership()
        self.progress = progress
        self.stall_s = stall_s
        self._paused = False
        self._last_progress = time.monotonic()

    def bind(self, handler: PartitionHandler) -> None:
        if not self.active:
            return
        self.consumer.assign(sorted(self.active, key=lambda tp: tp.partition))
        for tp in self.active:
            self.consumer.seek(tp, self.next_read[tp])
        self.ownership.add(self.active)
        handler.acquired(set(self.active))

    def poll(self) -> list[SourceRecord]:
        if not self.active:
            return []
        out = []
        for tp, records in poll_records(self.consumer).items():
            for r in records:
                if tp not in self.active or r.offset >= self.ends[tp] or r.offset < self.next_read[tp]:
                    continue  # past the range's end (or read twice after a seek): not ours
                self.progress(r.offset + 1 - self.next_read[tp])
                self.next_read[tp] = r.offset + 1
                out.append(r)
        for tp in list(self.active):
            if self.consumer.position(tp) >= self.ends[tp]:
                self.progress(max(0, self.ends[tp] - self.next_read[tp]))  # offsets without records (gaps)
                self.next_read[tp] = max(self.next_read[tp], self.ends[tp])
                self.active.discard(tp)
                self.consumer.pause(tp)
        self._check_stall(bool(out))
        return out

    def _check_stall(self, read: bool) -> None:
        now = time.monotonic()
        if read or self._paused or not self.active:
            self._last_progress = now
        elif now - self._last_progress > self.stall_s:
            left = {f"{tp.topic}[{tp.partition}]": (self.next_read[tp], self.ends[tp]) for tp in self.active}
            raise FatalError(f"reading stopped advancing for {self.stall_s:.0f}s short of the range's end: {left}")

    def pause(self) -> None:
        self._paused = True
        if self.active:
            self.consumer.pause(*self.active)

    def resume(self) -> None:
        if self._paused and self.active:
            self.consumer.resume(*self.active)
        self._paused = False

    @property
    def exhausted(self) -> bool:
        return not self.active
