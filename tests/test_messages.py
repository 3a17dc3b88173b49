"""Wire models: schema files in sync, job parsing with reasons, result ordering and options."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from worker.engine.api import EngineInfo, InvalidJobError, JobScores, JobStats
from worker.messages import MAX_METADATA_DEPTH, RerankJob, RerankResult, json_depth, json_schemas, parse_job

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
ENGINE = EngineInfo("m", "cpu", "float32", "sdpa", "packed-qwen3", False, 4096, 512, 512)


def stats(n: int) -> JobStats:
    return JobStats(n, n, n, 0.0, 0, False, 10, 1, 10, 10.0, 0.1, 0.2, 0.3)


def test_schema_files_match_the_models() -> None:
    generated = json_schemas()
    on_disk = {p.name: p.read_text() for p in SCHEMAS.glob("*.schema.json")}
    assert on_disk == generated, "schemas/ drifted: run `python -m worker.messages schemas`"
    job_schema = json.loads(generated["rerank-job.schema.json"])
    assert set(job_schema["required"]) == {"job_id", "query", "documents"}
    assert job_schema["additionalProperties"] is False


def job_bytes(**fields: object) -> bytes:
    return orjson.dumps({"job_id": "j1", "query": "q", "documents": ["a"], **fields})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe not utf-8", "not_utf8"),
        (b"{not json", "not_json"),
        (b"[1, 2]", "schema_violation"),
        (job_bytes(query="   "), "blank_query"),
        (job_bytes(documents=[1]), "schema_violation"),
        (job_bytes(top_k=3), "schema_violation"),
        (job_bytes(schema_version=2), "unknown_schema_version"),
        (job_bytes(documents=["a"] * 4), "too_many_documents"),
        (
            b'{"job_id": "j", "query": "q", "documents": ["a"], "metadata": ' + b'{"x": ' * 65 + b"1" + b"}" * 66,
            "metadata_too_deep",
        ),
        (orjson.dumps({"query": "q", "documents": ["a"]}), "schema_violation"),
    ],
)
def test_bad_jobs_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidJobError) as caught:
        parse_job(raw, max_docs=3)
    assert caught.value.reason == reason
    assert "\n" not in str(caught.value)


def test_a_job_accepts_strings_objects_and_nulls() -> None:
    job = parse_job(job_bytes(documents=["a", {"id": "d2", "text": "b"}, None, {"id": 7, "text": None}]))
    assert job.document_texts() == ["a", "b", None, None]
    request = job.to_score_request()
    assert request.documents == ["a", "b", None, None]
    assert request.instruction is None


def test_results_sorted_by_score_nulls_last_with_top_n_ids_and_documents() -> None:
    job = RerankJob.model_validate(
        {
            "job_id": "j",
            "query": "q",
            "documents": ["low", {"id": "x", "text": "high"}, None, "mid", "high too"],
            "return_documents": True,
            "top_n": 4,
            "metadata": {"tenant": "t1"},
        }
    )
    scored = JobScores([0.1, 0.9, None, 0.5, 0.9], stats(5))
    result = RerankResult.from_scores(job, scored, ENGINE)
    wire = result.model_dump(mode="json")
    assert [r["index"] for r in wire["results"]] == [1, 4, 3, 0]
    assert wire["results"][0] == {"index": 1, "id": "x", "relevance_score": 0.9, "document": "high"}
    assert "id" not in wire["results"][1]
    assert wire["metadata"] == {"tenant": "t1"}
    assert wire["meta"]["model"] == "m"
    assert wire["meta"]["attention"] == "sdpa"
    RerankResult.model_validate(wire)  # what the worker publishes parses back


def test_null_scores_come_last_and_documents_are_omitted_unless_asked() -> None:
    job = RerankJob.model_validate({"job_id": "j", "query": "q", "documents": [None, "a", ""]})
    wire = RerankResult.from_scores(job, JobScores([None, 0.3, None], stats(3)), ENGINE).model_dump(mode="json")
    assert [(r["index"], r["relevance_score"]) for r in wire["results"]] == [(1, 0.3), (0, None), (2, None)]
    assert all("document" not in r for r in wire["results"])


def test_metadata_as_deep_as_allowed_goes_into_the_result() -> None:
    """orjson reads 1,024 levels but writes ~255: metadata deeper than the limit is refused when the job is read (it
    would fail when its result is written); at the limit it round-trips into the result."""
    deepest = {"x": 1}
    for _ in range(MAX_METADATA_DEPTH - 1):
        deepest = {"x": deepest}
    assert json_depth(deepest) == MAX_METADATA_DEPTH
    assert json_depth([{"a": []}, 3]) == 3
    assert json_depth("flat") == 0
    job = parse_job(job_bytes(metadata=deepest))
    scored = JobScores(scores=[0.5], stats=stats(1))
    written = orjson.loads(orjson.dumps(RerankResult.from_scores(job, scored, ENGINE).model_dump(mode="json")))
    assert written["metadata"] == deepest


def test_reply_topic_is_validated_like_a_kafka_topic_name() -> None:
    ok = parse_job(b'{"job_id": "j", "query": "q", "documents": ["a"], "reply_topic": "replies.team-1"}')
    assert ok.reply_topic == "replies.team-1"
    with pytest.raises(InvalidJobError) as e:
        parse_job(b'{"job_id": "j", "query": "q", "documents": ["a"], "reply_topic": "bad topic!"}')
    assert e.value.reason == "schema_violation"
    assert '"reply_topic"' in json_schemas()["rerank-job.schema.json"]
