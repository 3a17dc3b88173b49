"""The `enqueue` command's job building and table, and the RerankJob `reply_topic` field."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.cli import _job_from_args, build_parser, ranked_table
from worker.engine import EngineInfo, InvalidJobError, JobScores, JobStats
from worker.messages import RerankJob, RerankResult, json_schemas, parse_job


def test_enqueue_builds_a_job_from_arguments() -> None:
    args = build_parser().parse_args(
        ["enqueue", "--query", "q", "--doc", "a", "--doc", "b", "--top-n", "1", "--job-id", "j", "--reply-topic", "r.x"]
    )
    job = _job_from_args(args)
    assert job == {"query": "q", "documents": ["a", "b"], "job_id": "j", "top_n": 1, "reply_topic": "r.x"}
    RerankJob.model_validate(job)


def test_enqueue_needs_a_job() -> None:
    with pytest.raises(SystemExit) as e:
        _job_from_args(build_parser().parse_args(["enqueue", "--query", "q"]))
    assert e.value.code == 2


def test_reply_topic_is_validated_like_a_kafka_topic_name() -> None:
    ok = parse_job(b'{"job_id": "j", "query": "q", "documents": ["a"], "reply_topic": "replies.team-1"}')
    assert ok.reply_topic == "replies.team-1"
    with pytest.raises(InvalidJobError) as e:
        parse_job(b'{"job_id": "j", "query": "q", "documents": ["a"], "reply_topic": "bad topic!"}')
    assert e.value.reason == "schema_violation"
    assert '"reply_topic"' in json_schemas()["rerank-job.schema.json"]


def test_ranked_table() -> None:
    job = RerankJob(job_id="j", query="q", documents=["alpha", "", {"id": 7, "text": "gamma " * 30}])
    stats = JobStats(3, 2, 2, 0.0, 0, False, 10, 1, 10, 10.0, 0.1, 0.2, 1.5)
    info = EngineInfo("m", "cpu", "float32", "sdpa", "packed-qwen3", False, 4096, 512, 512)
    result = RerankResult.from_scores(job, JobScores([0.25, None, 0.75], stats), info, scored_at=datetime.now(UTC))
    lines = ranked_table(result, job.document_texts()).splitlines()
    assert lines[0] == "job j: 3 documents, model m, 1.5 ms"
    assert lines[2].split()[:4] == ["1", "0.750000", "2", "7"]
    assert lines[2].endswith("...")
    assert lines[3].split() == ["2", "0.250000", "0", "alpha"]
    assert lines[4].split() == ["3", "-", "1"]
