"""`rerank-worker replay` against a real Kafka broker: jobs answered by a worker, then a time range of them
re-scored by the replay command (in this process, the session's tiny model) into a topic of its own."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.integration.conftest import CliRun, Topics, committed_offsets, produce, read_topic, worker_thread
from tests.integration.jobs import answered, make_jobs, scores_by_index, value
from worker.engine.engine import RerankEngine
from worker.kafka.topics import ensure_topics
from worker.pipeline.deadletter import header_map
from worker.settings import Settings
from worker.tools.times import format_time

pytestmark = pytest.mark.integration

# Replayed and original scores of the same model: equal up to packing with different neighbours (~2e-6 on CPU).
REPLAY_TOLERANCE = 1e-5


def messages_of(job: dict[str, Any]) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    return [(job["job_id"].encode(), orjson.dumps(job), [("rerank.correlation.id", f"c-{job['job_id']}".encode())])]


def test_replay_rescores_a_time_range_with_the_same_scores(
    kafka_bootstrap: str,
    topics: Topics,
    make_settings: Callable[..., Settings],
    engine: RerankEngine,
    run_cli: Callable[..., CliRun],
) -> None:
    replays = topics.jobs.removesuffix(".jobs") + ".replays"
    ensure_topics(Settings(bootstrap_servers=kafka_bootstrap), {replays: 2})
    settings = make_settings(worker_id="w-live")
    early = make_jobs(2, max_docs=6, seed=21, prefix="early")
    inside = make_jobs(12, min_docs=2, max_docs=16, seed=22, prefix="in")
    late = make_jobs(2, max_docs=6, seed=23, prefix="late")

    produce(kafka_bootstrap, topics.jobs, [m for j in early for m in messages_of(j)])
    time.sleep(0.05)
    metas = produce(
        kafka_bootstrap,
        topics.jobs,
        [m for j in inside for m in messages_of(j)] + [(b"bad", b"{not json", [])],  # dead-lettered, then skipped
    )
    from_ms, to_ms = min(m.timestamp for m in metas), max(m.timestamp for m in metas) + 1
    time.sleep(0.05)
    late_metas = produce(kafka_bootstrap, topics.jobs, [m for j in late for m in messages_of(j)])
    assert min(m.timestamp for m in late_metas) >= to_ms  # produced after --to: must not be replayed
    where = {j["job_id"]: (m.partition, m.offset, m.timestamp) for j, m in zip(inside, metas, strict=False)}

    everything = early + inside + late
    with worker_thread(settings, engine):
        live = read_topic(kafka_bootstrap, topics.results, until=lambda rs: len(answered(rs)) >= len(everything))
        read_topic(kafka_bootstrap, topics.dlq, until=lambda rs: len(rs) >= 1)
    workers_offsets = committed_offsets(kafka_bootstrap, topics.group, topics.jobs)
    assert sum(workers_offsets.values()) == len(everything) + 1
    original = {r.key.decode(): value(r) for r in live}

    # --from as epoch milliseconds, --to as ISO-8601 (the same instant, rounded to the millisecond).
    started = time.monotonic()
    run = run_cli(settings, "replay", "--from", str(from_ms), "--to", format_time(to_ms), "--reply-topic", replays)
    run_json = run_cli(settings, "replay", "--from", str(to_ms), "--to", format_time(to_ms + 1), "--json")
    replay_s = time.monotonic() - started
    assert run.code == 0, run.err
    assert "13/13" in run.err  # the progress bar, on stderr, counted the whole range

    lines = run.out.strip().splitlines()
    assert lines[0].startswith("replay "), run.out
    assert f": 12 jobs of {topics.jobs}" in lines[0], run.out
    replay_id = lines[0].split()[1].rstrip(":")
    group = lines[0].rsplit("(group ", 1)[1].rstrip(")")
    assert group.startswith(f"{topics.group}.replay.")
    assert "skipped 1: not_json 1" in run.out

    # Every job of the range replayed exactly once, to the reply topic only; scores equal the live ones.
    replayed = read_topic(kafka_bootstrap, replays)
    assert sorted(r.key.decode() for r in replayed) == sorted(j["job_id"] for j in inside)
    for r in replayed:
        job_id = r.key.decode()
        h = header_map(r.headers)
        partition, offset, timestamp = where[job_id]
        assert h["rerank.replay"] == "true"
        assert h["rerank.replay.id"] == replay_id
        assert h["rerank.source.topic"] == topics.jobs
        assert (int(h["rerank.source.partition"]), int(h["rerank.source.offset"])) == (partition, offset)
        assert h["rerank.correlation.id"] == f"c-{job_id}"
        assert h["rerank.model"] == engine.info.model
        body = value(r)
        assert body["replay"] == {
            "replay_id": replay_id,
            "source_topic": topics.jobs,
            "source_partition": partition,
            "source_offset": offset,
            "source_timestamp": timestamp,
        }
        assert "replay" not in original[job_id]
        want, got = scores_by_index(original[job_id]), scores_by_index(body)
        assert sorted(got) == sorted(want)
        for i, score in want.items():
            if score is None:
                assert got[i] is None
            else:
                assert got[i] is not None, (job_id, i)
                assert abs(got[i] - score) <= REPLAY_TOLERANCE, (job_id, i, got[i], score)
    assert len(read_topic(kafka_bootstrap, topics.results)) == len(live)  # nothing replayed into the live topic

    # The workers' group did not move; the replay's own group is committed to the range's end.
    assert committed_offsets(kafka_bootstrap, topics.group, topics.jobs) == workers_offsets
    # Per partition of the range: up to the first late job there, else the end it had when the replay started.
    first_late: dict[int, int] = {}
    for m in late_metas:
        first_late[m.partition] = min(first_late.get(m.partition, m.offset), m.offset)
    in_range = {m.partition for m in metas}
    expected = {p: first_late.get(p, workers_offsets[p]) for p in in_range}
    assert committed_offsets(kafka_bootstrap, group, topics.jobs) == expected

    # A range that holds only late jobs' instant +1 ms: nothing; --json summary; defaults to the results topic.
    assert run_json.code == 0, run_json.err
    summary = orjson.loads(run_json.out)
    assert summary["reply_topic"] == topics.results
    assert summary["replayed"] == summary["total"] == 0
    assert replay_s < 30


def test_replay_refuses_bad_options(make_settings: Callable[..., Settings], run_cli: Callable[..., CliRun]) -> None:
    settings = make_settings()
    assert run_cli(settings, "replay", "--from", "yesterday").code == 2
    assert run_cli(settings, "replay", "--from", "-1h", "--to", "-2h").code == 2
    refused = run_cli(settings, "replay", "--from", "-1h", "--group-id", settings.group_id)
    assert refused.code == 2
    assert "workers' group" in refused.err
