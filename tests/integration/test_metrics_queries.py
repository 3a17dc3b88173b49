"""The dashboard's and the alerts' PromQL against a real worker's /metrics (the session's tiny model, a real broker).

Proves: after a worker has answered jobs and dead-lettered one, every metric name that an expression of
deploy/helm/rerank-worker/files/dashboard.json or files/alerts.yaml reads (parsed by Prometheus's own parser,
tests/deploy/promtool/queries.py) is in its scrape, as samples (a histogram through its _bucket, _sum and _count),
and the labelled series the alerts aggregate exist with the labels they use. Allowed beyond the scrape: `up` and the
rules' own recordings; the series that need a failure to exist (retries) are declared; the GPU memory gauges
only on CUDA.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.promtool.queries import (
    PROMETHEUS_NAMES,
    dashboard,
    dashboard_queries,
    family_names,
    metric_names,
    recorded_names,
    rule_queries,
    rules,
    unknown_names,
)
from tests.integration.conftest import Topics, produce, read_topic, worker_thread
from worker.client import DeadLettered, RerankClient
from worker.engine.engine import RerankEngine
from worker.settings import Settings

pytestmark = pytest.mark.integration

# A transient failure makes the first rerank_retries_total series; a healthy run declares the family only.
NEED_A_FAILURE = {"rerank_retries_total"}
CUDA_ONLY = {"rerank_gpu_memory_allocated_bytes", "rerank_gpu_memory_reserved_bytes"}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def scrape_until_settled(port: int, finished: int, timeout_s: float = 30) -> str:
    """A scrape taken once `finished` jobs are counted and every assigned partition reports a lag of 0 (the broker's
    acknowledgement reaches the client before the worker's counters and commit)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = scrape(port)
        values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        done = sum(v for (name, _), v in values.items() if name == "rerank_jobs_total")
        lags = [v for (name, _), v in values.items() if name == "rerank_consumer_lag"]
        if done >= finished and lags and sum(lags) == 0:
            return text
        assert time.monotonic() < deadline, f"{done} of {finished} jobs counted, lag {lags}:\n{text}"
        time.sleep(0.2)


def test_every_queried_metric_is_in_a_real_scrape(
    kafka_bootstrap: str, topics: Topics, make_settings: Callable[..., Settings], engine: RerankEngine
) -> None:
    settings = make_settings(worker_id="w-metrics")
    jobs = [
        {"job_id": f"m-{i}", "query": "red shoes", "documents": ["a red shoe", "a blue boot", f"item {i}"]}
        for i in range(6)
    ]
    with worker_thread(settings, engine) as worker, RerankClient(settings) as client:
        produce(kafka_bootstrap, topics.jobs, [(b"k-bad", b"{not json", [])])  # dead-lettered as not_json
        outcomes = client.wait(client.submit_many(jobs), timeout_s=120)
        read_topic(kafka_bootstrap, topics.dlq, until=lambda records: len(records) >= 1)
        assert worker.http_port is not None
        text = scrape_until_settled(worker.http_port, finished=len(jobs) + 1)
    assert not any(isinstance(o, DeadLettered) for o in outcomes.values()), outcomes

    families = list(text_string_to_metric_families(text))
    sampled, declared = family_names(iter(families))
    samples = [s for family in families for s in family.samples]

    queries = dashboard_queries(dashboard()) + rule_queries(rules())
    names = metric_names(queries)
    allowed = PROMETHEUS_NAMES | recorded_names(rules())
    on_cuda = engine.info.device.startswith("cuda")
    assert unknown_names(names, sampled | allowed | NEED_A_FAILURE | (set() if on_cuda else CUDA_ONLY)) == []
    assert declared >= NEED_A_FAILURE
    if on_cuda:
        assert sampled >= CUDA_ONLY

    def labelled(name: str, **labels: str) -> list[float]:
        return [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]

    # the labelled series the alerts and panels aggregate
    assert labelled("rerank_dead_letters_total", reason="not_json") == [1.0]
    assert labelled("rerank_jobs_total", outcome="dead_letter") == [1.0]
    assert labelled("rerank_jobs_total", outcome="result") == [float(len(jobs))]
    assert sum(labelled("rerank_documents_total")) == 3 * len(jobs)
    assert labelled("rerank_commits_total", result="ok")[0] >= 1
    lags = [s for s in samples if s.name == "rerank_consumer_lag"]
    assert {s.labels["topic"] for s in lags} == {topics.jobs}
    assert {s.labels["partition"] for s in lags} <= {"0", "1", "2", "3"}
    assert lags, "no lag series: the worker holds no partition"
    assert labelled("rerank_ready") == [1.0]
    assert labelled("rerank_assigned_partitions") == [4.0]
    assert labelled("rerank_job_latency_seconds_count", outcome="result") == [float(len(jobs))]
    assert labelled("rerank_pass_fill_ratio_count")[0] >= 1
