"""The worker in a thread of the test process (the session's tiny model on CPU) against a real Kafka broker."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka.admin import KafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from tests.engine_wrappers import ScoresAtResult
from tests.integration.conftest import (
    ROOT,
    Topics,
    committed_offsets,
    produce,
    read_topic,
    worker_env,
    worker_thread,
)
from tests.integration.jobs import (
    PACKING_TOLERANCE,
    answered,
    assert_scores_equal_engine,
    make_jobs,
    source_of,
    value,
)
from worker.client import DeadLettered, RerankClient
from worker.engine.api import JobScores, PreparedJob, ScoreRequest
from worker.engine.engine import RerankEngine
from worker.kafka.topics import ensure_topics
from worker.pipeline.deadletter import header_map
from worker.pipeline.metrics import package_version
from worker.settings import Settings

pytestmark = pytest.mark.integration


def test_many_jobs_get_the_scores_of_the_score_command(
    kafka_bootstrap: str,
    topics: Topics,
    make_settings: Callable[..., Settings],
    engine: RerankEngine,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    settings = make_settings(worker_id="w-many")
    jobs = make_jobs(30, min_docs=1, max_docs=40, seed=1)
    with worker_thread(settings, engine) as worker, RerankClient(settings) as client:
        ids = client.submit_many(jobs, correlation_id="batch-7")
        outcomes = client.wait(ids, timeout_s=180)
        batches = worker.metrics.sample("rerank_batch_seconds_count")
    assert all(not isinstance(o, DeadLettered) for o in outcomes.values()), outcomes
    assert batches < len(jobs), "jobs were not batched together"
    for job in jobs:
        assert_scores_equal_engine(engine, job, outcomes[job["job_id"]])
        assert outcomes[job["job_id"]].metadata == job.get("metadata", {})

    # The same jobs through `rerank-worker score` (a real process): the same scores.
    for job in jobs[:2]:
        path = tmp_path / f"{job['job_id']}.json"
        path.write_bytes(orjson.dumps(job))
        env = worker_env(settings, tiny_model_dir)
        out = subprocess.run(
            [sys.executable, "-m", "worker.cli", "score", "--input", str(path)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=120,
            check=True,
        )
        printed = orjson.loads(out.stdout)
        got = outcomes[job["job_id"]].model_dump(mode="json")
        assert [r["index"] for r in printed["results"]] == [r["index"] for r in got["results"]]
        for a, b in zip(printed["results"], got["results"], strict=True):
            assert (a["relevance_score"] is None) == (b["relevance_score"] is None)
            if a["relevance_score"] is not None:
                assert abs(a["relevance_score"] - b["relevance_score"]) <= PACKING_TOLERANCE

    # Result records: key = job_id, headers name the correlation id and the job's topic, partition and offset.
    sent = read_topic(kafka_bootstrap, topics.jobs, until=lambda rs: len(rs) >= len(jobs))
    job_at = {(r.partition, r.offset): r.key.decode() for r in sent}
    results = read_topic(kafka_bootstrap, topics.results, until=lambda rs: len(answered(rs)) >= len(jobs))
    for r in results:
        h = header_map(r.headers)
        assert h["rerank.correlation.id"] == "batch-7"
        assert h["rerank.source.topic"] == topics.jobs
        assert job_at[source_of(r)] == r.key.decode() == value(r)["job_id"]
        assert h["rerank.worker.id"] == "w-many"
    # After a clean stop every partition is committed up to its end.
    ends: dict[int, int] = {}
    for r in sent:
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    assert committed_offsets(kafka_bootstrap, topics.group, topics.jobs) == ends


def _job(job_id: str, **extra: Any) -> bytes:
    return orjson.dumps({"job_id": job_id, "query": "red shoes", "documents": ["a red shoe", "a blue boot"], **extra})


def test_malformed_messages_are_dead_lettered_with_their_headers(
    kafka_bootstrap: str, topics: Topics, make_settings: Callable[..., Settings], engine: RerankEngine
) -> None:
    settings = make_settings(worker_id="w-dlq", max_docs=5, max_message_bytes=64 * 1024)
    cases: dict[str, tuple[bytes | None, str]] = {
        "k-utf8": (b"\xff\xfe{}", "not_utf8"),
        "k-json": (b"{not json", "not_json"),
        "k-schema": (_job("s", top_k=3), "schema_violation"),
        "k-array": (b"[1, 2]", "schema_violation"),
        "k-blank": (orjson.dumps({"job_id": "b", "query": "  ", "documents": ["x"]}), "blank_query"),
        "k-many": (orjson.dumps({"job_id": "m", "query": "q", "documents": ["x"] * 6}), "too_many_documents"),
        "k-version": (_job("v", schema_version=2), "unknown_schema_version"),
        "k-large": (_job("l", metadata={"pad": "x" * 70_000}), "message_too_large"),
        "k-reply": (_job("r", reply_topic="somewhere.else"), "disallowed_reply_topic"),
        "k-instruction": (_job("i", instruction="word " * 3000), "instruction_too_long"),
    }
    messages = [(k.encode(), v, [("trace-id", f"t-{k}".encode())]) for k, (v, _) in cases.items()]
    messages.append((b"k-good", _job("good"), []))  # after all the bad ones: the worker still answers
    # A retrieval that found nothing is not an error: an empty ranking, as the seed answered it.
    messages.append((b"k-empty", orjson.dumps({"job_id": "empty", "query": "q", "documents": []}), []))
    metas = produce(kafka_bootstrap, topics.jobs, messages)
    meta_by_key = {k.decode(): m for (k, _, _), m in zip(messages, metas, strict=True)}
    with worker_thread(settings, engine) as worker:
        letters = read_topic(kafka_bootstrap, topics.dlq, until=lambda rs: len(rs) >= len(cases))
        results = read_topic(kafka_bootstrap, topics.results, until=lambda rs: len(rs) >= 2)
        metrics = worker.metrics
    assert sorted(r.key for r in results) == [b"empty", b"good"]
    empty = next(value(r) for r in results if r.key == b"empty")
    assert empty["results"] == []
    assert (empty["meta"]["input_docs"], empty["meta"]["packs"], empty["meta"]["tokens"]) == (0, 0, 0)
    assert len(letters) == len(cases)
    for letter in letters:
        key = letter.key.decode()
        original, reason = cases[key]
        meta = meta_by_key[key]
        h = header_map(letter.headers)
        if reason == "instruction_too_long":  # found by the engine's tokenizer, not the parser
            assert h["rerank.error.stage"] == "prepare"
            reason = h["rerank.error.reason"]
            assert "instruction" in reason or "instruction" in h["rerank.error.message"].lower()
        else:
            assert h["rerank.error.stage"] == "validate"
        assert letter.value == original  # the original bytes, unchanged
        assert h["rerank.error.reason"] == reason
        assert h["rerank.error.category"] == "permanent"
        assert h["rerank.error.class"].endswith(("InvalidJobError", "PermanentError"))
        assert h["rerank.error.message"]
        assert h["rerank.original.topic"] == topics.jobs
        assert (int(h["rerank.original.partition"]), int(h["rerank.original.offset"])) == (meta.partition, meta.offset)
        assert int(h["rerank.original.timestamp"]) == meta.timestamp
        assert h["rerank.consumer.group"] == topics.group
        assert h["rerank.attempts"] == "1"
        assert h["rerank.worker.id"] == "w-dlq"
        assert h["rerank.model"] == engine.info.model
        assert h["trace-id"] == f"t-{key}"  # the job's own headers travel along
        assert metrics.sample("rerank_dead_letters_total", reason=h["rerank.error.reason"]) >= 1
    assert metrics.sample("rerank_jobs_total", outcome="dead_letter") == len(cases)
    assert metrics.sample("rerank_jobs_total", outcome="result") == 2


def test_metrics_scrape_after_real_jobs(
    kafka_bootstrap: str, topics: Topics, make_settings: Callable[..., Settings], engine: RerankEngine
) -> None:
    """/metrics of a worker that answered real jobs, read over HTTP and parsed by prometheus_client's parser: every
    job is counted once by outcome, timed from its record's timestamp, and its stages observed."""
    settings = make_settings(worker_id="w-metrics")
    jobs = make_jobs(6, min_docs=1, max_docs=12, seed=3)
    with worker_thread(settings, engine) as worker, RerankClient(settings) as client:
        produce(kafka_bootstrap, topics.jobs, [(b"bad", b"{not json", [])])
        outcomes = client.wait(client.submit_many(jobs), timeout_s=120)
        deadline = time.monotonic() + 30  # the client can read a result before the worker's producer is told
        while time.monotonic() < deadline and (
            worker.metrics.sample("rerank_jobs_total", outcome="dead_letter") < 1
            or worker.metrics.sample("rerank_jobs_total", outcome="result") < len(jobs)
        ):
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.http_port}/metrics", timeout=5) as resp:
            content_type = resp.headers["Content-Type"]
            text = resp.read().decode()
    assert all(not isinstance(o, DeadLettered) for o in outcomes.values())
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def sample(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    documents = sum(len(job["documents"]) for job in jobs)
    assert sample("rerank_jobs_total", outcome="result") == len(jobs)
    assert sample("rerank_jobs_total", outcome="dead_letter") == 1
    assert sample("rerank_dead_letters_total", reason="not_json") == 1
    assert sample("rerank_documents_total") == documents
    assert sample("rerank_job_latency_seconds_count", outcome="result") == len(jobs)
    assert sample("rerank_job_latency_seconds_bucket", outcome="result", le="+Inf") == len(jobs)
    assert 0 < sample("rerank_job_latency_seconds_sum", outcome="result") < 120 * len(jobs)
    assert sample("rerank_job_latency_seconds_count", outcome="dead_letter") == 1
    assert sample("rerank_publish_seconds_count") == len(jobs) + 1
    assert sample("rerank_queue_wait_seconds_count") == len(jobs)
    assert sample("rerank_tokenize_seconds_count") == len(jobs)
    assert sample("rerank_job_documents_count") == len(jobs)
    assert sample("rerank_job_documents_sum") == documents
    batches = sample("rerank_batch_seconds_count")
    assert 1 <= batches <= len(jobs)
    assert sample("rerank_batch_jobs_count") == batches
    assert sample("rerank_batch_jobs_sum") == len(jobs)
    passes = sample("rerank_gpu_seconds_count")
    assert passes >= batches
    assert sample("rerank_pass_fill_ratio_count") == passes
    assert 0 < sample("rerank_pass_fill_ratio_sum") <= passes
    assert sample("rerank_tokens_total") > 0
    assert sample("rerank_commits_total", result="ok") >= 1
    assert sample("rerank_ready") == 1
    assert sample("rerank_assigned_partitions") > 0
    info = engine.info
    assert (
        sample(
            "rerank_build_info",
            version=package_version(),
            model=info.model,
            dtype=info.dtype,
            attention=info.attention,
            device=info.device,
        )
        == 1
    )
    assert sample("process_resident_memory_bytes") > 0


def test_reply_topic_allowlist(
    kafka_bootstrap: str, topics: Topics, make_settings: Callable[..., Settings], engine: RerankEngine
) -> None:
    prefix = topics.jobs.removesuffix(".jobs")
    allowed, other = f"{prefix}.replies.alpha", f"{prefix}.elsewhere"
    ensure_topics(Settings(bootstrap_servers=kafka_bootstrap), {allowed: 1, other: 1})
    missing = f"{prefix}.replies.missing"  # allowed, but nobody created it (and the broker creates no topics)
    # A producer waits up to its max_block_ms for a topic's metadata: 30 s here, twice that with the retry.
    settings = make_settings(reply_topic_allowlist=rf"{re.escape(prefix)}\.replies\.[a-z]+", produce_timeout_ms=30000)
    docs = ["a red shoe", "a blue boot"]
    with worker_thread(settings, engine), RerankClient(settings) as client:
        started = time.monotonic()
        ids = [
            client.submit({"job_id": "to-missing", "query": "q", "documents": docs, "reply_topic": missing}),
            client.submit({"job_id": "to-allowed", "query": "q", "documents": docs, "reply_topic": allowed}),
            client.submit({"job_id": "to-other", "query": "q", "documents": docs, "reply_topic": other}),
            client.submit({"job_id": "default", "query": "q", "documents": docs}),
            client.submit(
                {"job_id": "explicit-results", "query": "q", "documents": docs, "reply_topic": topics.results}
            ),
        ]
        outcomes = client.wait(ids, timeout_s=60)
        waited_s = time.monotonic() - started
    assert isinstance(outcomes["to-missing"], DeadLettered)
    assert outcomes["to-missing"].reason == "unknown_reply_topic"
    assert waited_s < 25, f"answers took {waited_s:.1f} s: something waited on the missing topic's metadata"
    assert missing not in set(KafkaAdminClient(bootstrap_servers=kafka_bootstrap).list_topics())
    assert isinstance(outcomes["to-other"], DeadLettered)
    assert outcomes["to-other"].reason == "disallowed_reply_topic"
    assert outcomes["explicit-results"].__class__.__name__ == "DeadLettered"  # the allowlist replaces the default
    replies = read_topic(kafka_bootstrap, allowed, until=lambda rs: len(rs) >= 1)
    assert [r.key for r in replies] == [b"to-allowed"]
    results = read_topic(kafka_bootstrap, topics.results, until=lambda rs: len(rs) >= 1)
    assert [r.key for r in results] == [b"default"]
    assert read_topic(kafka_bootstrap, other) == []


def test_the_client_keeps_only_answers_to_its_own_jobs_until_handed_out(
    kafka_bootstrap: str, topics: Topics, make_settings: Callable[..., Settings], engine: RerankEngine
) -> None:
    """The results and dead-letter topics are shared: another client's answers, or a record that is not a result
    at all, must neither be kept nor break `wait`."""
    settings = make_settings()
    with worker_thread(settings, engine), RerankClient(settings) as client:
        client.listen(topics.results)
        produce(kafka_bootstrap, topics.results, [(b"someone-else", b"not a result", []), (b"mine", b"{}", [])])
        outcome = client.wait([client.submit({"job_id": "mine", "query": "q", "documents": ["a", "b"]})])["mine"]
        assert not isinstance(outcome, DeadLettered), outcome
        assert len(outcome.results) == 2  # the malformed record keyed "mine" was ignored; the worker's result kept
        assert client.outcomes == {}  # handed out once: a long-running client keeps no history
        # A duplicate of that answer (at-least-once) read while waiting for a later job is not kept either
        produce(kafka_bootstrap, topics.results, [(b"mine", outcome.model_dump_json().encode(), [])])
        later = client.wait([client.submit({"job_id": "later", "query": "q", "documents": ["c"]})])["later"]
        assert not isinstance(later, DeadLettered), later
        assert client.outcomes == {}


def test_jobs_and_results_larger_than_one_megabyte(
    kafka_bootstrap: str,
    topics: Topics,
    make_settings: Callable[..., Settings],
    make_engine: Callable[..., RerankEngine],
) -> None:
    engine = make_engine(max_pack_tokens=4096, max_doc_tokens=16)
    settings = make_settings()
    docs = [f"document {i} " + "lorem ipsum dolor sit amet " * 200 for i in range(300)]  # ~1.6 MB of text
    job = {"job_id": "big", "query": "lorem", "documents": docs, "return_documents": True}
    assert len(orjson.dumps(job)) > 1_500_000
    with worker_thread(settings, engine), RerankClient(settings) as client:
        outcome = client.wait([client.submit(job, timeout_s=60)], timeout_s=120)["big"]
    assert not isinstance(outcome, DeadLettered), outcome
    assert len(outcome.results) == 300
    assert {r.document for r in outcome.results} == set(docs)
    (record,) = read_topic(kafka_bootstrap, topics.results, until=lambda rs: len(rs) >= 1)
    assert len(record.value) > 1_500_000  # the result itself passed Kafka's default 1 MB limit


class SlowFirstBatch(ScoresAtResult):
    """The engine, but its first batch takes longer than max_poll_interval_ms (a 1,000-document job on a GPU)."""

    def __init__(self, inner: RerankEngine, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds
        self.calls = 0

    @property
    def info(self) -> Any:
        return self.inner.info

    def prepare(self, request: Any) -> PreparedJob:
        return self.inner.prepare(request)

    def score_prepared(self, jobs: Sequence[PreparedJob], *, batch_started: float | None = None) -> list[JobScores]:
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.seconds)
        return self.inner.score_prepared(jobs)


def test_a_batch_longer_than_max_poll_interval_causes_no_rebalance(
    kafka_bootstrap: str, topics: Topics, make_settings: Callable[..., Settings], engine: RerankEngine
) -> None:
    settings = make_settings(max_poll_interval_ms=3000, max_queued_jobs=1, batch_max_packs=1, batch_wait_ms=0)
    jobs = make_jobs(6, min_docs=2, max_docs=5, seed=3, prefix="slow")
    produce(kafka_bootstrap, topics.jobs, [(j["job_id"].encode(), orjson.dumps(j), []) for j in jobs])
    slow = SlowFirstBatch(engine, seconds=5.0)
    paused_seen = False
    with worker_thread(settings, slow) as worker:
        deadline = time.monotonic() + 60
        results: list[Any] = []
        while len(answered(results)) < len(jobs) and time.monotonic() < deadline:
            paused_seen = paused_seen or worker.metrics.sample("rerank_consumer_paused") == 1
            results = read_topic(kafka_bootstrap, topics.results, timeout_s=5)
            time.sleep(0.2)
        assert sorted(answered(results)) == sorted(j["job_id"] for j in jobs)
        assert (
            worker.metrics.sample("rerank_partitions_revoked_total") == 0
        )  # never left the group, never lost a partition
        assert worker.metrics.sample("rerank_assigned_partitions") == 4
        assert worker.metrics.sample("rerank_batch_seconds_count") >= 2
        assert worker.metrics.sample("rerank_commits_total", result="failed") == 0
    assert paused_seen, "the consumer never paused while the GPU thread was busy"
    assert all(len(v) == 1 for v in answered(results).values())  # no redelivery: nothing was revoked


def test_enqueue_command_waits_and_prints_a_ranked_table(
    kafka_bootstrap: str,
    topics: Topics,
    make_settings: Callable[..., Settings],
    engine: RerankEngine,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    settings = make_settings()
    env = worker_env(settings, tiny_model_dir)
    docs = ["cats purr", "the moon is rock", "", "dogs bark"]
    args = ["--query", "what is a cat", *[a for d in docs for a in ("--doc", d)], "--job-id", "cli-1"]
    with worker_thread(settings, engine):
        out = subprocess.run(
            [sys.executable, "-m", "worker.cli", "enqueue", *args, "--wait", "--timeout", "60"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        job_file = tmp_path / "job.json"
        job_file.write_bytes(orjson.dumps({"job_id": "cli-2", "query": "q", "documents": ["x", "y"]}))
        queued = subprocess.run(
            [sys.executable, "-m", "worker.cli", "enqueue", "--file", str(job_file)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert queued.returncode == 0, queued.stderr
        assert queued.stdout.strip() == "cli-2"
        read_topic(kafka_bootstrap, topics.results, until=lambda rs: {r.key for r in rs} >= {b"cli-1", b"cli-2"})
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("job cli-1: 4 of 4 documents; 1 blank, 0 duplicates scored once; scored in ")
    assert lines[0].endswith(" ms on the CPU")
    assert lines[1].startswith("model ")
    rows = [line.split() for line in lines[3:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    (expected,) = engine.score([ScoreRequest("what is a cat", docs)])
    for row in rows[:3]:
        index, score = int(row[2]), float(row[1])
        assert abs(score - (expected.scores[index] or 0.0)) <= 1e-6
    assert rows[3][1] == "-"
    assert int(rows[3][2]) == 2


class Hangs:
    """An engine whose device hangs: `submit` blocks until `release` is set (on CPU the forward runs inside it)."""

    def __init__(self, inner: RerankEngine) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.entered = threading.Event()

    @property
    def info(self) -> Any:
        return self.inner.info

    def prepare(self, request: ScoreRequest) -> PreparedJob:
        return self.inner.prepare(request)

    def submit(self, jobs: Any, *, batch_started: float | None = None) -> Any:
        self.entered.set()
        self.release.wait(120)
        return self.inner.submit(jobs, batch_started=batch_started)

    def with_max_pack_tokens(self, budget: int) -> Any:
        return self


def test_healthz_fails_when_the_gpu_thread_hangs_and_says_where(
    kafka_bootstrap: str,
    topics: Topics,
    make_settings: Callable[..., Settings],
    engine: RerankEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(stall_timeout_s=2.0)
    hangs = Hangs(engine)
    with worker_thread(settings, hangs) as worker, RerankClient(settings) as client:
        assert worker.alive()
        client.submit({"job_id": "hung", "query": "q", "documents": ["a", "b"]})
        assert hangs.entered.wait(60)
        deadline = time.monotonic() + 30
        while worker.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not worker.alive(), "/healthz still passes with the GPU thread hung"
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.http_port}/readyz", timeout=5) as resp:
            assert resp.status == 200  # ready stays as it is: only liveness restarts a stuck worker
        stuck = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stuck:")]
        assert len(stuck) == 1
        assert "stage score" in stuck[0]
        assert "RERANK_STALL_TIMEOUT_S=2" in stuck[0]
        hangs.release.set()  # the device comes back: the job is answered and the worker is alive again
        outcome = client.wait(["hung"], timeout_s=60)["hung"]
        assert not isinstance(outcome, DeadLettered)
        deadline = time.monotonic() + 10
        while not worker.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert worker.alive()
