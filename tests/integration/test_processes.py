"""`rerank-worker run` as real processes: killed, terminated, and two of them sharing one group."""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.conftest import Topics, WorkerProcess, committed_offsets, free_port, read_topic, worker_thread
from tests.integration.jobs import answered, make_jobs, source_of
from worker.client import RerankClient
from worker.engine.engine import RerankEngine
from worker.pipeline.deadletter import header_map
from worker.settings import Settings

pytestmark = pytest.mark.integration

Spawn = Callable[[Settings], WorkerProcess]


def submit(settings: Settings, jobs: list[dict[str, Any]]) -> list[str]:
    with RerankClient(settings) as client:
        return client.submit_many(jobs, listen=False)


def wait_answered(bootstrap: str, topic: str, n: int, timeout_s: float = 120) -> list[Any]:
    return read_topic(bootstrap, topic, until=lambda rs: len(answered(rs)) >= n, timeout_s=timeout_s)


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def test_sigkill_mid_batch_then_restart_answers_every_job(
    kafka_bootstrap: str, topics: Topics, make_settings: Callable[..., Settings], spawn: Spawn
) -> None:
    jobs = make_jobs(24, min_docs=30, max_docs=50, seed=5, prefix="kill")
    ids = submit(make_settings(), jobs)
    victim = spawn(make_settings(worker_id="victim", batch_max_packs=1))
    early = read_topic(kafka_bootstrap, topics.results, until=lambda rs: len(rs) >= 2, timeout_s=90)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    done_at_kill = len(answered(read_topic(kafka_bootstrap, topics.results)))
    assert len(early) >= 2
    assert done_at_kill < len(ids), "the victim finished everything before it was killed: nothing was tested"
    assert "worker stopped" not in victim.log()

    survivor = spawn(make_settings(worker_id="survivor", batch_max_packs=1))
    results = wait_answered(kafka_bootstrap, topics.results, len(ids))
    by_job = answered(results)
    assert sorted(by_job) == sorted(ids)  # every job has a result
    workers = {header_map(r.headers)["rerank.worker.id"] for r in results}
    assert workers == {"victim", "survivor"}
    survivor.proc.send_signal(signal.SIGTERM)
    assert survivor.proc.wait(30) == 0


def test_sigterm_finishes_the_batch_commits_and_loses_nothing(
    kafka_bootstrap: str,
    topics: Topics,
    make_settings: Callable[..., Settings],
    spawn: Spawn,
    engine: RerankEngine,
) -> None:
    jobs = make_jobs(24, min_docs=30, max_docs=50, seed=6, prefix="term")
    ids = submit(make_settings(), jobs)
    settings = make_settings(worker_id="terminated", batch_max_packs=1, shutdown_timeout_s=15.0)
    worker = spawn(settings)
    read_topic(kafka_bootstrap, topics.results, until=lambda rs: len(rs) >= 2, timeout_s=90)
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    code = worker.proc.wait(30)
    took = time.monotonic() - started
    assert code == 0, worker.log()[-3000:]
    assert took < settings.shutdown_timeout_s
    assert "worker stopped" in worker.log()

    # Nothing committed without its result: every job below a committed offset has been answered.
    committed = committed_offsets(kafka_bootstrap, topics.group, topics.jobs)
    results = read_topic(kafka_bootstrap, topics.results)
    done = {source_of(r) for r in results}
    sent = read_topic(kafka_bootstrap, topics.jobs, until=lambda rs: len(rs) >= len(ids))
    for r in sent:
        if r.offset < committed.get(r.partition, 0):
            assert (r.partition, r.offset) in done, f"job {r.key!r} committed without a result"
    assert len(answered(results)) < len(ids), "the worker finished everything before SIGTERM: nothing was tested"

    # A new worker of the same group answers the rest.
    with worker_thread(make_settings(worker_id="after"), engine):
        results = wait_answered(kafka_bootstrap, topics.results, len(ids))
    assert sorted(answered(results)) == sorted(ids)


def test_two_workers_share_the_partitions_and_answer_every_job(
    kafka_bootstrap: str, topics: Topics, make_settings: Callable[..., Settings], spawn: Spawn
) -> None:
    """Two workers split the partitions and both answer; then one leaves mid-stream (SIGTERM) and the other takes
    its partitions over in a rebalance with jobs in flight. Every job is answered."""
    ports = [free_port(), free_port()]
    # A short work queue keeps jobs in each worker's backlog, so the rebalance gives some up: a partition handed
    # straight back must read them again (without the seek back, 11 of 80 were never answered).
    settings = [
        make_settings(worker_id=f"w-{i}", http_port=p, batch_max_packs=1, max_queued_jobs=4)
        for i, p in enumerate(ports)
    ]
    workers = [spawn(s) for s in settings]
    deadline = time.monotonic() + 120
    while True:  # both loaded, joined, and the rebalance settled: 2 + 2 of the 4 partitions
        try:
            assigned = [metric(p, "rerank_assigned_partitions") for p in ports]
        except OSError:
            assigned = []
        if assigned == [2.0, 2.0]:
            break
        assert time.monotonic() < deadline, f"partitions never shared: {assigned}\n{workers[0].log()[-2000:]}"
        for w in workers:
            assert w.proc.poll() is None, w.log()[-3000:]
        time.sleep(0.5)
    for p in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{p}/readyz", timeout=5) as resp:
            assert resp.status == 200

    jobs = make_jobs(80, min_docs=30, max_docs=50, seed=7, prefix="pair")
    ids = submit(make_settings(), jobs)

    def by_worker(records: list[Any]) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for r in records:
            out.setdefault(header_map(r.headers)["rerank.worker.id"], set()).add(source_of(r)[0])
        return out

    early = read_topic(kafka_bootstrap, topics.results, until=lambda rs: len(by_worker(rs)) == 2, timeout_s=90)
    shared = by_worker(early)
    assert not shared["w-0"] & shared["w-1"], "two workers answered jobs of the same partition"

    workers[1].proc.send_signal(signal.SIGTERM)  # leaves mid-stream: w-0 takes all four partitions
    assert workers[1].proc.wait(30) == 0
    results = wait_answered(kafka_bootstrap, topics.results, len(ids))
    assert sorted(answered(results)) == sorted(ids)
    assert metric(ports[0], "rerank_assigned_partitions") == 4.0
    assert workers[0].log().count('"msg":"partitions revoked"') >= 1
    workers[0].proc.send_signal(signal.SIGTERM)
    assert workers[0].proc.wait(30) == 0
