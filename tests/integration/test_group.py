"""Group membership on a real broker: a worker never idles outside its group while jobs wait.

A second worker takes the first one's partitions over when it stops, also when it joined right after a broker
restart (before the broker had the jobs topic's metadata loaded); a worker whose session lapsed (stopped for longer
than the session timeout) rejoins, says so, and answers what arrived meanwhile; and a consumer whose joins never
fit in one poll (a slow broker or machine), which kafka-python leaves outside its group, is brought back by the
group watch.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient
from kafka.structs import MemberState

from tests.integration.conftest import LocalBroker, WorkerProcess, read_topic
from tests.integration.jobs import answered, make_jobs, source_of
from tests.integration.test_processes import free_port, metric, submit, wait_answered
from worker.kafka.config import consumer_kwargs
from worker.kafka.groups import GroupAdmin
from worker.kafka.topics import ensure_topics
from worker.pipeline.consume import GroupSource, GroupWatch
from worker.pipeline.deadletter import header_map
from worker.pipeline.errors import Fatal
from worker.settings import Settings

pytestmark = pytest.mark.integration

Spawn = Callable[[Settings], WorkerProcess]
SESSION_S = 6.0  # FAST settings in conftest: the broker's minimum session timeout
REBALANCE_S = 15.0  # a generous bound for the rebalance itself on a loaded 2-core machine


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, workers: list[WorkerProcess]) -> float:
    """Seconds until `check()` held; AssertionError (with the workers' logs) after `timeout_s`."""
    started = time.monotonic()
    while not check():
        for w in workers:
            assert w.proc.poll() is None, f"a worker exited while waiting for {what}:\n{w.log()[-3000:]}"
        if time.monotonic() - started > timeout_s:
            logs = "\n".join(w.log()[-2500:] for w in workers)
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}\n{logs}")
        time.sleep(0.2)
    return time.monotonic() - started


def assigned(port: int) -> float:
    try:
        return metric(port, "rerank_assigned_partitions")
    except OSError:
        return -1.0


def take_over(
    bootstrap: str, results_topic: str, settings: Callable[..., Settings], spawn: Spawn, *, restart: Any = None
) -> None:
    """A consumes; B joins (after `restart()` when given); both share the partitions; A is stopped with SIGTERM;
    B holds all four partitions within a session timeout plus a rebalance, and every job is answered."""
    ports = [free_port(), free_port()]
    a = spawn(settings(worker_id="a", http_port=ports[0], batch_max_packs=1, max_queued_jobs=4))
    wait_until(lambda: assigned(ports[0]) == 4.0, 120, "worker a holds all 4 partitions", [a])
    first = submit(settings(), make_jobs(8, max_docs=10, seed=11, prefix="before"))
    read_topic(bootstrap, results_topic, until=lambda rs: len(answered(rs)) >= 2, timeout_s=90)  # a is consuming
    if restart is not None:
        restart()
    b = spawn(settings(worker_id="b", http_port=ports[1], batch_max_packs=1, max_queued_jobs=4))
    wait_until(lambda: [assigned(p) for p in ports] == [2.0, 2.0], 150, "a and b share the partitions 2 + 2", [a, b])

    burst = submit(settings(), make_jobs(160, min_docs=30, max_docs=50, seed=12, prefix="burst"))
    read_topic(
        bootstrap, results_topic, until=lambda rs: any(j.startswith("burst") for j in answered(rs)), timeout_s=90
    )
    a.proc.send_signal(signal.SIGTERM)  # with jobs of its partitions in hand and in its backlog
    took = wait_until(lambda: assigned(ports[1]) == 4.0, SESSION_S + REBALANCE_S, "b holds all 4 partitions", [b])
    assert a.proc.wait(30) == 0, a.log()[-3000:]
    stopped = next(line for line in a.log().splitlines() if '"msg":"worker stopped"' in line)
    results = wait_answered(bootstrap, results_topic, len(first) + len(burst), timeout_s=240)
    assert sorted(answered(results)) == sorted(first + burst)
    after_a: dict[str, set[int]] = {}
    for r in results:
        if r.timestamp / 1000 > time.time() - 1000 and r.key.decode().startswith("burst"):
            after_a.setdefault(header_map(r.headers)["rerank.worker.id"], set()).add(source_of(r)[0])
    assert after_a.get("b") == {0, 1, 2, 3}, f"b answered burst jobs of {after_a}; a: {stopped}"
    assert took <= SESSION_S + REBALANCE_S
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(30) == 0, b.log()[-3000:]


def test_the_second_worker_takes_the_partitions_over_when_the_first_stops(
    kafka_bootstrap: str, topics: Any, make_settings: Callable[..., Settings], spawn: Spawn
) -> None:
    take_over(kafka_bootstrap, topics.results, make_settings, spawn)


def test_a_worker_that_joins_right_after_a_broker_restart_takes_the_partitions_over(
    local_broker: LocalBroker, make_settings: Callable[..., Settings], spawn: Spawn, topics: Any
) -> None:
    local_broker.start()
    bootstrap, restart = local_broker.bootstrap, local_broker.restart
    ensure_topics(Settings(bootstrap_servers=bootstrap), {topics.jobs: 4, topics.results: 2, topics.dlq: 1})

    def settings(**overrides: Any) -> Settings:
        return make_settings(bootstrap_servers=bootstrap, **overrides)

    take_over(bootstrap, topics.results, settings, spawn, restart=restart)


def test_a_worker_whose_session_lapsed_rejoins_says_so_and_answers(
    kafka_bootstrap: str, topics: Any, make_settings: Callable[..., Settings], spawn: Spawn
) -> None:
    port = free_port()
    w = spawn(make_settings(worker_id="sleeper", http_port=port))
    wait_until(lambda: assigned(port) == 4.0, 120, "the worker holds all 4 partitions", [w])
    w.proc.send_signal(signal.SIGSTOP)  # no heartbeat: the coordinator drops it after the session timeout
    try:
        ids = submit(make_settings(), make_jobs(12, max_docs=10, seed=13, prefix="sleep"))
        time.sleep(SESSION_S + 4)
    finally:
        w.proc.send_signal(signal.SIGCONT)
    results = wait_answered(kafka_bootstrap, topics.results, len(ids), timeout_s=120)
    assert sorted(answered(results)) == sorted(ids)
    wait_until(lambda: w.log().count('"msg":"partitions assigned"') >= 3, 60, "the worker rejoined its group", [w])
    log = w.log()
    assert '"msg":"partitions lost' in log or "rejoining consumer group" in log, log[-3000:]
    assert assigned(port) == 4.0
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0, w.log()[-3000:]


class NoHandler:
    def release(self, partitions: Any, *, commit: bool) -> dict[Any, int | None]:
        return dict.fromkeys(partitions)

    def acquired(self, partitions: Any) -> None:
        pass


def group_source(settings: Settings) -> tuple[GroupSource, KafkaConsumer, GroupAdmin]:
    """The worker's group source; its consumer refreshes metadata twice a second, so it sees new partitions soon."""
    kwargs = {
        **consumer_kwargs(settings, client_id="slow-join", group_id=settings.group_id),
        "metadata_max_age_ms": 500,
    }
    consumer = KafkaConsumer(**kwargs)
    admin = GroupAdmin(settings, settings.group_id, client_id="slow-join-watch")
    watch = GroupWatch(consumer, settings.jobs_topic, admin, settle_s=3.0, idle_after_s=10.0)
    source = GroupSource(consumer, settings.jobs_topic, Fatal(), watch=watch)
    source.bind(NoHandler())
    return source, consumer, admin


def run_turns(source: GroupSource, partitions: int, seconds: float) -> float | None:
    """Poll as the pipeline does (a turn of other work between polls) until the source owns `partitions`
    partitions; the seconds it took, or None."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        source.poll()
        if len(source.ownership.owned) == partitions:
            return time.monotonic() - started
        time.sleep(0.2)
    return None


@pytest.mark.parametrize("watched", [False, True], ids=["without-the-watch", "with-the-watch"])
def test_a_consumer_whose_join_outlasts_a_poll_is_brought_back_into_its_group(
    make_settings: Callable[..., Settings], watched: bool
) -> None:
    """kafka-python finishes a join only inside poll, and a rejoin triggered by new metadata (here: partitions added
    to the topic) stops asking for the join to be finished once the leader has computed the new assignment. A join
    that outlasts one poll (here every poll lasts 1 ms: a slow broker or machine) is then never finished: the
    consumer stays "rebalancing" with no partitions, heartbeats off, until the coordinator drops it. That is what
    happens without the watch; with it the source rejoins and gets the partitions."""
    settings = make_settings()
    source, consumer, admin = group_source(settings)
    try:
        assert run_turns(source, 4, 60.0) is not None, f"never got its 4 partitions: {consumer.group_metadata()}"
        rejoins_before = source.metrics.sample("rerank_group_rejoins_total")
        if not watched:
            source.watch = None
        poll = consumer.poll
        consumer.poll = lambda timeout_ms=0, **kwargs: poll(timeout_ms=1, **kwargs)  # type: ignore[method-assign]
        with KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers) as partitions_admin:
            partitions_admin.create_partitions({settings.jobs_topic: 6})
        took = run_turns(source, 6, 25.0 if watched else 15.0)
        if watched:
            assert took is not None, f"never got its 6 partitions: {consumer.group_metadata()}"
            assert source.metrics.sample("rerank_group_rejoins_total") > rejoins_before
            assert consumer.group_metadata().state == MemberState.STABLE
        else:
            assert took is None, "kafka-python finished the join: this test no longer shows what the watch is for"
            assert consumer.group_metadata().state != MemberState.STABLE
    finally:
        consumer.close(autocommit=False)
        admin.close()
