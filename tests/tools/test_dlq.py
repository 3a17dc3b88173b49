"""Dead letters without a broker: what a dead letter says, which ones are chosen, the summary, requeue headers."""

from __future__ import annotations

import orjson

from worker.pipeline.deadletter import dead_letter, header_map
from worker.pipeline.records import Failure, SourceRecord
from worker.tools.dlq import DeadLetter, DlqSummary, Requeued, RequeueReport, selector

T0 = 1_795_860_000_000


def letter_of(
    offset: int,
    reason: str,
    *,
    ts: int = T0,
    key: bytes | None = b"job-1",
    value: bytes | None = b"{not json",
    own_headers: tuple[tuple[str, bytes], ...] = (("trace-id", b"t1"),),
) -> DeadLetter:
    """A dead letter exactly as the worker writes it (worker.pipeline.deadletter), read back from the topic."""
    record = SourceRecord("jobs", 2, 40 + offset, ts - 5, 0, key, value, own_headers)
    failure = Failure(reason, "permanent", "validate", "worker.engine.errors.InvalidJobError", f"bad {reason}")
    out = dead_letter(record, failure, topic="dlq", group_id="g", worker_id="w1", model="m", job_id=None)
    return DeadLetter("dlq", 0, offset, ts, 0, out.key, out.value, tuple(out.headers))


def test_a_dead_letter_says_why_and_where_from() -> None:
    letter = letter_of(7, "not_json")
    assert letter.reason == "not_json"
    assert letter.message == "bad not_json"
    assert letter.job_id == "job-1"
    assert letter.where == "dlq[0]@7"
    assert letter.original_where == "jobs[2]@47"
    assert not letter.value_dropped
    data = letter.as_json()
    assert data["original_offset"] == 47
    assert data["original_timestamp"] == T0 - 5
    assert data["attempts"] == 1
    assert data["stage"] == "validate"
    assert data["time"] == "2026-11-28T10:00:00.000Z"
    orjson.dumps(data)
    assert DeadLetter("dlq", 0, 1, -1, 0, None, b"", ()).reason == "unknown"
    assert DeadLetter("dlq", 0, 1, -1, 0, None, b"", ()).job_id is None


def test_requeue_headers_are_the_jobs_own_plus_where_it_came_from() -> None:
    letter = letter_of(7, "disallowed_reply_topic", own_headers=(("trace-id", b"t1"), ("rerank.correlation.id", b"c")))
    headers = letter.requeue_headers()
    assert headers == [("trace-id", b"t1"), ("rerank.correlation.id", b"c"), ("rerank.requeued.from", b"dlq[0]@7")]
    # Requeued, dead-lettered again, requeued again: one `rerank.requeued.from`, the newest.
    again = letter_of(9, "not_json", own_headers=tuple(headers))
    assert again.requeue_headers() == [*headers[:2], ("rerank.requeued.from", b"dlq[0]@9")]
    assert header_map(again.headers)["rerank.requeued.from"] == "dlq[0]@7"


def test_selector_by_reason_and_time() -> None:
    a, b, c = letter_of(1, "not_json", ts=T0), letter_of(2, "disallowed_reply_topic", ts=T0 + 10), letter_of(3, "x")
    assert all(selector()(x) for x in (a, b, c))
    assert [selector(["not_json", "x"])(x) for x in (a, b, c)] == [True, False, True]
    assert [selector(None, T0 + 1)(x) for x in (a, b, c)] == [False, True, False]
    assert [selector(["disallowed_reply_topic"], T0 + 1)(x) for x in (a, b, c)] == [False, True, False]


def test_summary_counts_every_letter_and_keeps_the_newest() -> None:
    summary = DlqSummary("dlq", limit=2)
    for i, reason in enumerate(["not_json", "not_json", "blank_query", "not_json"]):
        summary.add(letter_of(i, reason, ts=T0 + [30, 10, 40, 20][i]))
    assert summary.total == 4
    assert summary.by_reason == {"not_json": 3, "blank_query": 1}
    assert [e.offset for e in summary.entries] == [0, 2]  # the newest two by time, oldest first
    text = summary.describe()
    lines = text.splitlines()
    assert lines[0] == "4 dead letters in dlq:"
    assert lines[1].split() == ["not_json", "3"]
    assert lines[2].split() == ["blank_query", "1"]
    assert "newest 2:" in text
    assert lines[-1].split()[1:5] == ["blank_query", "jobs[2]@42", "job-1", "dlq[0]@2"]
    data = summary.as_json()
    assert data["by_reason"] == {"not_json": 3, "blank_query": 1}
    assert [e["offset"] for e in data["entries"]] == [0, 2]
    everything = DlqSummary("dlq", limit=0)
    for i in range(5):
        everything.add(letter_of(i, "x", ts=T0 - i))
    assert [e.offset for e in everything.entries] == [4, 3, 2, 1, 0]
    assert "all:" in everything.describe()
    assert DlqSummary("dlq", limit=5).describe() == "0 dead letters in dlq"


def test_requeue_report() -> None:
    dropped = DeadLetter("dlq", 0, 3, T0, 0, b"k", b"", (("rerank.original.value.dropped", b"99"),))
    assert dropped.value_dropped
    report = RequeueReport("dlq", "jobs", dry_run=True)
    report.items = [Requeued(letter_of(1, "not_json")), Requeued(dropped, skipped="its value was dropped")]
    assert [i.letter.offset for i in report.requeued] == [1]
    lines = report.describe().splitlines()
    assert lines[0] == "would requeue dlq[0]@1 (not_json, job job-1) -> jobs"
    assert lines[1].startswith("skipped dlq[0]@3")
    assert lines[-1] == "would requeue 1 dead letters of dlq to jobs, 1 skipped"
