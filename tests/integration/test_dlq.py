"""`rerank-worker dlq list` and `dlq requeue` against a real Kafka broker: dead letters made by a worker, listed by
reason, and a fixed-up flow (a disallowed reply topic, then a widened allowlist) requeued with its original bytes."""

from __future__ import annotations

import re
from collections.abc import Callable

import orjson
import pytest

from tests.integration.conftest import CliRun, Topics, produce, read_topic, worker_thread
from worker.engine.engine import RerankEngine
from worker.kafka.topics import ensure_topics
from worker.pipeline.deadletter import header_map
from worker.settings import Settings

pytestmark = pytest.mark.integration


def test_dlq_list_counts_by_reason_and_requeue_sends_the_original_bytes(
    kafka_bootstrap: str,
    topics: Topics,
    make_settings: Callable[..., Settings],
    engine: RerankEngine,
    run_cli: Callable[..., CliRun],
) -> None:
    prefix = topics.jobs.removesuffix(".jobs")
    replies = f"{prefix}.replies.alpha"
    ensure_topics(Settings(bootstrap_servers=kafka_bootstrap), {replies: 1})
    strict = make_settings(worker_id="w-strict")  # reply topics: only the results topic

    def job(job_id: str, **extra: object) -> bytes:
        return orjson.dumps({"job_id": job_id, "query": "red shoes", "documents": ["a red shoe", "a boot"], **extra})

    messages = [
        (b"bad-1", b"{not json", [("trace-id", b"t-bad-1")]),
        (b"bad-2", b"[1, 2]", []),
        (b"bad-3", b"{oops", []),
        (b"r-1", job("r-1", reply_topic=replies), [("trace-id", b"t-r-1")]),
        (b"r-2", job("r-2", reply_topic=replies), [("rerank.correlation.id", b"corr-r-2")]),
        (b"ok", job("ok"), []),
    ]
    produce(kafka_bootstrap, topics.jobs, messages)
    with worker_thread(strict, engine):
        read_topic(kafka_bootstrap, topics.dlq, until=lambda rs: len(rs) >= 5)
        read_topic(kafka_bootstrap, topics.results, until=lambda rs: len(rs) >= 1)

    # list: counts by reason, a table, JSON, filters.
    listed = run_cli(strict, "dlq", "list")
    assert listed.code == 0, listed.err
    lines = listed.out.splitlines()
    assert lines[0] == f"5 dead letters in {topics.dlq}:"
    counts = {line.split()[0]: int(line.split()[1]) for line in lines[1:4]}
    assert counts == {"not_json": 2, "disallowed_reply_topic": 2, "schema_violation": 1}
    assert "all:" in listed.out
    table = lines[lines.index("all:") + 1 :]
    assert table[0].split()[:5] == ["time", "reason", "original", "job_id", "where"]
    assert sorted(row.split()[3] for row in table[1:]) == ["bad-1", "bad-2", "bad-3", "r-1", "r-2"]
    as_json = orjson.loads(run_cli(strict, "dlq", "list", "--json", "--reason", "not_json").out)
    assert as_json["total"] == 2
    assert as_json["by_reason"] == {"not_json": 2}
    assert sorted(e["job_id"] for e in as_json["entries"]) == ["bad-1", "bad-3"]
    assert all(e["original_topic"] == topics.jobs for e in as_json["entries"])
    limited = orjson.loads(run_cli(strict, "dlq", "list", "--json", "--limit", "1").out)
    assert limited["total"] == 5
    assert len(limited["entries"]) == 1
    assert orjson.loads(run_cli(strict, "dlq", "list", "--json", "--since", "now").out)["total"] == 0

    # requeue: a dry run sends nothing; a choice is needed; then the two jobs go back with their original bytes.
    jobs_before = read_topic(kafka_bootstrap, topics.jobs)
    dry = run_cli(strict, "dlq", "requeue", "--reason", "disallowed_reply_topic", "--dry-run")
    assert dry.code == 0, dry.err
    assert dry.out.splitlines()[-1] == f"would requeue 2 dead letters of {topics.dlq} to {topics.jobs}"
    assert run_cli(strict, "dlq", "requeue").code == 2
    assert len(read_topic(kafka_bootstrap, topics.jobs)) == len(jobs_before)

    allowlist = rf"{re.escape(prefix)}\.replies\.[a-z]+|{re.escape(topics.results)}"
    widened = make_settings(worker_id="w-widened", reply_topic_allowlist=allowlist)
    with worker_thread(widened, engine):
        done = run_cli(strict, "dlq", "requeue", "--reason", "disallowed_reply_topic")
        assert done.code == 0, done.err
        answered = read_topic(kafka_bootstrap, replies, until=lambda rs: len(rs) >= 2)
    assert done.out.splitlines()[-1] == f"requeued 2 dead letters of {topics.dlq} to {topics.jobs}"
    assert sorted(r.key for r in answered) == [b"r-1", b"r-2"]
    assert header_map(next(r for r in answered if r.key == b"r-2").headers)["rerank.correlation.id"] == "corr-r-2"

    jobs_after = read_topic(kafka_bootstrap, topics.jobs)
    requeued = [r for r in jobs_after if "rerank.requeued.from" in header_map(r.headers)]
    assert len(jobs_after) == len(jobs_before) + 2
    original = {k: (v, h) for k, v, h in messages}
    assert sorted(r.key for r in requeued) == [b"r-1", b"r-2"]
    letters = {r.key: r for r in read_topic(kafka_bootstrap, topics.dlq)}
    for r in requeued:
        want_value, want_headers = original[r.key]
        assert r.value == want_value  # the original bytes
        letter = letters[r.key]
        assert list(r.headers) == [*want_headers, ("rerank.requeued.from", f"{topics.dlq}[0]@{letter.offset}".encode())]
    assert len(read_topic(kafka_bootstrap, topics.dlq)) == 5  # nothing was dead-lettered again
