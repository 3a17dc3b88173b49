"""The group watch's verdicts on a fake consumer and a fake coordinator: when a member outside its group's current
generation must rejoin, when an idle member is left alone, and the rejoin itself."""

from __future__ import annotations

from typing import Any

import pytest
from kafka.structs import ConsumerGroupMetadata, MemberState, TopicPartition

from worker.kafka.groups import GroupView, group_view
from worker.pipeline.consume import GroupSource, GroupWatch
from worker.pipeline.errors import Fatal

TOPIC = "jobs"
TPS = [TopicPartition(TOPIC, p) for p in range(4)]
ME = "member-me"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Consumer:
    def __init__(self) -> None:
        self.state = MemberState.STABLE
        self.member_id = ME
        self.assigned: set[TopicPartition] = set()
        self.calls: list[str] = []
        self.listener: Any = None

    def group_metadata(self) -> ConsumerGroupMetadata:
        return ConsumerGroupMetadata("g", 3, self.member_id, None, self.state)

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {tp.partition for tp in TPS}

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 10)

    def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def unsubscribe(self) -> None:
        self.calls.append("unsubscribe")

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.calls.append("subscribe")
        self.listener = listener


class Admin:
    def __init__(self, view: GroupView, committed: dict[TopicPartition, int] | None = None) -> None:
        self.view = view
        self.described = 0
        self._committed = committed or {}

    def describe(self) -> GroupView:
        self.described += 1
        return self.view

    def committed(self, partitions: Any) -> dict[TopicPartition, int]:
        return dict(self._committed)


def watch(consumer: Consumer, admin: Admin, clock: Clock) -> GroupWatch:
    return GroupWatch(consumer, TOPIC, admin, settle_s=5.0, idle_after_s=10.0, every_s=10.0, clock=clock)


def stable(members: dict[str, list[TopicPartition]]) -> GroupView:
    return GroupView("Stable", {m: frozenset(tps) for m, tps in members.items()})


def test_a_consumer_left_rebalancing_after_its_group_settled_rejoins() -> None:
    """The stuck client: the coordinator finished the rebalance (and gave it partitions), the consumer never did."""
    consumer, clock = Consumer(), Clock()
    consumer.state = MemberState.REBALANCING
    admin = Admin(stable({ME: TPS}))
    w = watch(consumer, admin, clock)
    assert w.check(frozenset()) is None  # just unsettled: a rebalance takes a moment
    clock.now += 4.9
    assert w.check(frozenset()) is None
    assert admin.described == 0  # the coordinator is not asked before settle_s
    clock.now += 0.2
    reason = w.check(frozenset())
    assert reason is not None
    assert "finished its rebalance" in reason


def test_a_consumer_the_group_no_longer_knows_rejoins() -> None:
    consumer, clock = Consumer(), Clock()
    consumer.state = MemberState.UNJOINED
    admin = Admin(stable({"member-other": TPS}))
    w = watch(consumer, admin, clock)
    w.check(frozenset())
    clock.now += 6
    reason = w.check(frozenset())
    assert reason is not None
    assert "Stable without this member" in reason


def test_a_consumer_whose_session_lapsed_in_an_emptied_group_rejoins() -> None:
    """Stuck rebalancing with heartbeats off: the coordinator dropped it and the group is empty."""
    consumer, clock = Consumer(), Clock()
    consumer.state = MemberState.REBALANCING
    w = watch(consumer, Admin(GroupView("Empty", {})), clock)
    w.check(frozenset())
    clock.now += 6
    reason = w.check(frozenset())
    assert reason is not None
    assert "Empty without this member" in reason


def test_a_rebalance_under_way_is_waited_for() -> None:
    consumer, clock = Consumer(), Clock()
    consumer.state = MemberState.REBALANCING
    admin = Admin(GroupView("PreparingRebalance", {ME: frozenset(), "member-other": frozenset(TPS)}))
    w = watch(consumer, admin, clock)
    w.check(frozenset())
    clock.now += 6
    assert w.check(frozenset()) is None
    assert admin.described == 1
    clock.now += 5
    assert w.check(frozenset()) is None
    assert admin.described == 1  # at most once every `every_s`


def test_partitions_that_belong_to_no_member_make_the_idle_member_rejoin() -> None:
    """An assignment computed before the topic's metadata arrived: stable, but nobody consumes the partitions."""
    consumer, clock = Consumer(), Clock()
    admin = Admin(stable({ME: [], "member-other": []}))
    w = watch(consumer, admin, clock)
    w.check(frozenset())
    clock.now += 10
    reason = w.check(frozenset())
    assert reason is not None
    assert "belong to no member" in reason
    assert "jobs[0]" in reason


def test_partitions_the_coordinator_gave_but_the_consumer_does_not_hold_make_it_rejoin() -> None:
    consumer, clock = Consumer(), Clock()
    admin = Admin(stable({ME: TPS[:2], "member-other": TPS[2:]}))
    w = watch(consumer, admin, clock)
    w.check(frozenset())
    clock.now += 10
    reason = w.check(frozenset())
    assert reason is not None
    assert "does not consume" in reason


def test_an_idle_member_of_a_full_group_is_left_alone_and_counts_the_jobs_waiting() -> None:
    """More members than partitions: this one idles legitimately; the jobs waiting are counted for the metric."""
    consumer, clock = Consumer(), Clock()
    committed = {TPS[0]: 10, TPS[1]: 7, TPS[2]: 10}  # partition 3: nothing committed, read from its start (0)
    admin = Admin(stable({ME: [], "member-a": TPS[:2], "member-b": TPS[2:]}), committed)
    w = watch(consumer, admin, clock)
    assert w.check(frozenset()) is None
    assert w.idle_lag is None  # not idle long enough yet
    clock.now += 10
    assert w.check(frozenset()) is None
    assert w.idle_lag == 3 + 10
    assert w.idle_members == 3
    assert w.check(frozenset({TPS[0]})) is None  # partitions again: no longer idle
    assert w.idle_lag is None


def test_a_member_holding_partitions_is_not_watched() -> None:
    consumer, clock = Consumer(), Clock()
    admin = Admin(stable({ME: TPS}))
    w = watch(consumer, admin, clock)
    for _ in range(5):
        clock.now += 20
        assert w.check(frozenset(TPS)) is None
    assert admin.described == 0


def test_rejoining_gives_up_what_the_consumer_held_and_joins_again() -> None:
    consumer, clock = Consumer(), Clock()
    consumer.assigned = {TPS[0]}
    released: list[tuple[set[TopicPartition], bool]] = []

    class Handler:
        def release(self, partitions: set[TopicPartition], *, commit: bool) -> dict[TopicPartition, int | None]:
            released.append((set(partitions), commit))
            return dict.fromkeys(partitions)

        def acquired(self, partitions: set[TopicPartition]) -> None:
            pass

    w = watch(consumer, Admin(stable({})), clock)
    source = GroupSource(consumer, TOPIC, Fatal(), watch=w)
    source.bind(Handler())
    source.assigned({TPS[0]})
    source.rejoin("test")
    assert released == [({TPS[0]}, False)]  # as lost: never committed from here
    assert source.ownership.owned == frozenset()
    assert consumer.calls == ["subscribe", "unsubscribe", "subscribe"]
    assert source.metrics.sample("rerank_group_rejoins_total") == 1


@pytest.mark.parametrize("state", ["Stable", "PreparingRebalance"])
def test_the_coordinators_answer_becomes_a_group_view(state: str) -> None:
    described = {
        "group_state": state,
        "members": [
            {"member_id": "a", "member_assignment": {"assigned_partitions": [{"topic": TOPIC, "partitions": [0, 2]}]}},
            {"member_id": "b", "member_assignment": None},
        ],
    }
    view = group_view(described)
    assert view.state == state
    assert view.members == {"a": frozenset({TPS[0], TPS[2]}), "b": frozenset()}
    assert view.assigned() == frozenset({TPS[0], TPS[2]})
