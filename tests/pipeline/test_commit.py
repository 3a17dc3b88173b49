"""The commit rule: the committed offset never passes a job that is not done, and reaches the end once all are."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.pipeline.commit import OffsetTracker


@st.composite
def polled_and_finished(draw: st.DrawFn) -> tuple[dict[int, list[int]], list[tuple[int, int]], list[bool]]:
    """Offsets per partition (increasing, with gaps as compaction leaves them), an order in which the jobs finish,
    and after which completions a commit happens."""
    partitions: dict[int, list[int]] = {}
    for p in range(draw(st.integers(1, 3))):
        gaps = draw(st.lists(st.integers(1, 3), min_size=1, max_size=25))
        start = draw(st.integers(0, 1000))
        offsets, at = [], start
        for g in gaps:
            offsets.append(at)
            at += g
        partitions[p] = offsets
    jobs = [(p, o) for p, offsets in partitions.items() for o in offsets]
    order = draw(st.permutations(jobs))
    commits = draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)))
    return partitions, list(order), commits


@given(polled_and_finished())
def test_watermark_never_passes_an_unfinished_job(
    case: tuple[dict[int, list[int]], list[tuple[int, int]], list[bool]],
) -> None:
    partitions, order, commits = case
    tracker: OffsetTracker[int] = OffsetTracker()
    for p, offsets in partitions.items():
        for o in offsets:
            tracker.add(p, o)
    done: set[tuple[int, int]] = set()
    committed: dict[int, int] = {}
    for (p, o), commit_now in zip(order, commits, strict=True):
        assert tracker.done(p, o)
        assert not tracker.done(p, o), "a second completion of the same offset changes nothing"
        done.add((p, o))
        if commit_now:
            offsets = tracker.committable()
            for q, mark in offsets.items():
                # every polled offset below the committed one is done ...
                assert all((q, x) in done for x in partitions[q] if x < mark)
                # ... and the first offset not done is exactly the mark (nothing done is held back needlessly)
                not_done = [x for x in partitions[q] if (q, x) not in done]
                assert mark == (min(not_done) if not_done else partitions[q][-1] + 1)
                assert mark > committed.get(q, -1), "commits only move forward"
            tracker.mark_committed(offsets)
            committed.update(offsets)
    final = tracker.committable()
    committed.update(final)
    assert committed == {p: offsets[-1] + 1 for p, offsets in partitions.items()}
    assert tracker.in_flight() == 0


def test_dropped_partition_ignores_late_completions() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.add("a", 5)
    tracker.add("a", 6)
    tracker.drop(["a"])
    assert not tracker.done("a", 5)
    assert tracker.committable() == {}
    tracker.add("a", 6)  # assigned again: read from the committed offset, which needs no commit
    assert tracker.committable() == {}
    assert tracker.done("a", 6)
    assert tracker.committable() == {"a": 7}


def test_nothing_to_commit_twice() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.add("a", 0)
    assert tracker.committable() == {}
    tracker.done("a", 0)
    assert tracker.committable() == {"a": 1}
    tracker.mark_committed({"a": 1})
    assert tracker.committable() == {}
    assert tracker.in_flight(["a"]) == 0


def test_abandoned_records_are_not_waited_for_and_never_committed() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.add("a", offset)
    tracker.abandon("a", 11)  # its partition is being revoked and it never reached the GPU
    assert tracker.in_flight() == 2
    tracker.done("a", 10)
    tracker.done("a", 12)
    assert tracker.in_flight() == 0
    assert tracker.committable() == {"a": 11}  # not past the abandoned record: the next owner reads it
    tracker.abandon("a", 12)  # done already: nothing changes
    assert tracker.done("a", 11)  # acknowledged after all: done
    assert tracker.committable() == {"a": 13}


def test_exactly_once_sends_only_the_answered_run_from_the_watermark() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in (10, 11, 13, 14):  # 12 is a transaction marker of the jobs topic: never read
        tracker.add("p", offset)
    assert tracker.answered_run("p", {11, 13}) == ([], 10)  # 10 has no answer yet: nothing may go out
    assert tracker.answered_run("p", {10, 11, 14}) == ([10, 11], 13)
    assert tracker.answered_run("p", {10, 11, 13, 14}) == ([10, 11, 13, 14], 15)
    tracker.abandon("p", 13)  # given back in a rebalance: its answer, if any, is not this member's to send
    assert tracker.answered_run("p", {10, 11, 13, 14}) == ([10, 11], 13)
    assert tracker.is_pending("p", 10)
    assert not tracker.is_pending("p", 13)
    assert tracker.answered_run("unknown", {1}) == ([], 0)


@given(
    st.lists(st.integers(0, 60), min_size=1, max_size=40, unique=True),
    st.data(),
)
def test_an_answered_run_never_skips_a_record(offsets: list[int], data: st.DataObject) -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in offsets:
        tracker.add("p", offset)
    answered = set(data.draw(st.lists(st.sampled_from(offsets), unique=True)))
    run, end = tracker.answered_run("p", answered)
    ordered = sorted(offsets)
    assert run == ordered[: len(run)]  # a prefix, in order
    assert set(run) <= answered
    assert end == (ordered[len(run)] if len(run) < len(ordered) else ordered[-1] + 1)
    assert len(run) == len(ordered) or ordered[len(run)] not in answered
