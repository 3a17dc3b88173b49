"""Crash soak: two worker processes on a broker of their own, SIGKILLed and restarted while jobs stream in, the
broker stopped once while a restarted worker is still loading, one worker SIGTERMed under load at the end. Nothing
may be lost.

    python -m tests.soak --jobs 5000 --rate 40      # the full size; figures in docs/RELIABILITY.md
    python -m tests.soak --jobs 300 --rate 5        # what CI runs (tests/integration/test_soak.py)

Jobs are produced with an independent client, confluent-kafka (librdkafka): the wire format must not depend on
kafka-python's quirks. One job in 50 is malformed and must be dead-lettered. At the end the results and dead-letter
topics are read from the beginning with a fresh consumer group (`isolation.level=read_committed`), and the script
prints jobs sent, results, duplicates, dead letters, lost (jobs with neither: must be 0), the largest score
difference between two results of one job, and the wall time; it exits 1 when a job was lost or ended wrongly.

The workers run the tiny random-weight model on CPU (built offline unless --model-dir names one). Their logs are
kept in --work-dir (a temporary directory by default, kept when the run fails).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from tests.integration.conftest import FAST, LocalBroker, WorkerProcess
from tests.integration.jobs import make_jobs
from worker.kafka.topics import ensure_topics
from worker.settings import Settings

BAD_EVERY = 50  # one job in BAD_EVERY is malformed: it must end as a dead letter
QUIET = logging.getLogger("tests.soak.librdkafka")
QUIET.setLevel(logging.CRITICAL)


@dataclass
class Report:
    delivery: str = "at_least_once"
    jobs_sent: int = 0
    malformed_sent: int = 0
    results: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    lost: int = 0
    wrong: list[str] = field(default_factory=list)  # a good job dead-lettered, a malformed one answered
    max_duplicate_score_diff: float = 0.0
    kills: int = 0
    broker_stops: int = 0
    worker_exits: list[int] = field(default_factory=list)  # exit codes of workers that ended on their own
    answers_per_s: float = 0.0  # results and dead letters over the time between the first and the last one
    wall_s: float = 0.0

    def ok(self) -> bool:
        once = self.delivery != "exactly_once" or self.duplicates == 0
        return self.lost == 0 and not self.wrong and once


class Workers:
    """The two worker processes; `restart(i)` replaces one (after a SIGKILL, or after it ended on its own)."""

    def __init__(self, settings: list[Settings], model_dir: Path, work_dir: Path, report: Report) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.work_dir = work_dir
        self.report = report
        self.started = 0
        self.procs = [self._start(i) for i in range(len(settings))]
        self.retired: set[int] = set()  # SIGTERMed at the end: not restarted

    def _start(self, i: int) -> WorkerProcess:
        self.started += 1
        return WorkerProcess(self.settings[i], self.model_dir, self.work_dir / f"worker-{i}-{self.started}.log")

    def kill_and_restart(self, i: int) -> None:
        self.procs[i].proc.send_signal(signal.SIGKILL)
        self.procs[i].stop()
        self.report.kills += 1
        self.procs[i] = self._start(i)

    def restart_ended(self) -> None:
        for i, w in enumerate(self.procs):
            code = w.proc.poll()
            if code is not None and i not in self.retired:
                self.report.worker_exits.append(code)
                print(f"soak: worker {i} exited {code} on its own; restarting it", file=sys.stderr)
                w.stop()
                self.procs[i] = self._start(i)

    def terminate(self, i: int, timeout_s: float) -> int:
        self.retired.add(i)
        self.procs[i].proc.send_signal(signal.SIGTERM)
        code = self.procs[i].proc.wait(timeout_s)
        self.procs[i].stop()
        return code


def produce_jobs(bootstrap: str, topic: str, jobs: list[tuple[str, bytes]], rate: float, done: threading.Event) -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "gzip",
            "message.timeout.ms": 600_000,  # the broker is stopped once: keep the jobs, do not drop them
            "linger.ms": 5,
        },
        logger=QUIET,  # librdkafka's connection errors while the broker is stopped: the report says what matters
    )
    failures: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    started = time.monotonic()
    for n, (key, value) in enumerate(jobs):
        while time.monotonic() < started + n / rate:
            producer.poll(0.01)
        producer.produce(topic, key=key.encode(), value=value, on_delivery=delivered)
        producer.poll(0)
    left = producer.flush(600)
    if left or failures:
        raise RuntimeError(f"{left} jobs not delivered, failures: {failures[:3]}")
    done.set()


def read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record of `topic` from the beginning, with a fresh group, read-committed."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"soak-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        },
        logger=QUIET,
    )
    try:
        metadata = consumer.list_topics(topic, timeout=30)
        partitions = [TopicPartition(topic, p) for p in metadata.topics[topic].partitions]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in partitions}
        assigned = [TopicPartition(topic, p, 0) for p in ends]
        consumer.assign(assigned)
        records = []
        deadline = time.monotonic() + 120

        def behind() -> bool:
            # The position, not the last record's offset: a transaction's commit marker takes the last offset and
            # is never handed out as a record.
            positions = consumer.position([TopicPartition(topic, p) for p in ends])
            return any(tp.offset < ends[tp.partition] for tp in positions if ends[tp.partition] > 0)

        while behind() and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                records.append(msg)
        return records
    finally:
        consumer.close()


def scores(value: bytes) -> dict[int, float | None]:
    return {r["index"]: r["relevance_score"] for r in orjson.loads(value)["results"]}


def tally(bootstrap: str, results_topic: str, dlq_topic: str, good: set[str], bad: set[str], report: Report) -> None:
    by_job: dict[str, list[dict[int, float | None]]] = {}
    results = read_all(bootstrap, results_topic)
    dead = read_all(bootstrap, dlq_topic)
    for msg in results:
        by_job.setdefault(msg.key().decode(), []).append(scores(msg.value()))
    letters = Counter(msg.key().decode() for msg in dead)
    stamps = [msg.timestamp()[1] for msg in results + dead]
    if len(stamps) > 1 and max(stamps) > min(stamps):
        report.answers_per_s = round(len(stamps) / ((max(stamps) - min(stamps)) / 1000), 1)
    report.results = len(by_job)
    report.duplicates = sum(len(v) - 1 for v in by_job.values()) + sum(n - 1 for n in letters.values())
    report.dead_letters = len(letters)
    report.lost = len((good | bad) - set(by_job) - set(letters))
    report.wrong = sorted((set(letters) & good) | (set(by_job) & bad))[:20]
    for copies in by_job.values():
        for other in copies[1:]:
            for i, s in copies[0].items():
                t = other.get(i)
                if s is not None and t is not None:
                    report.max_duplicate_score_diff = max(report.max_duplicate_score_diff, abs(s - t))


def soak(args: argparse.Namespace, work_dir: Path) -> Report:
    report = Report(delivery=args.delivery)
    started = time.monotonic()
    rng = random.Random(args.seed)
    broker = LocalBroker(work_dir)
    broker.start()
    try:
        tag = uuid.uuid4().hex[:8]
        jobs_topic, results_topic, dlq_topic = f"soak{tag}.jobs", f"soak{tag}.results", f"soak{tag}.dlq"
        ensure_topics(Settings(bootstrap_servers=broker.bootstrap), {jobs_topic: 4, results_topic: 2, dlq_topic: 1})
        model_dir = args.model_dir or _tiny_model(work_dir)
        base: dict[str, Any] = {
            **FAST,
            "bootstrap_servers": broker.bootstrap,
            "jobs_topic": jobs_topic,
            "results_topic": results_topic,
            "dlq_topic": dlq_topic,
            "group_id": f"soak{tag}",
            "kafka_startup_timeout_s": 120.0,
            "delivery": args.delivery,
            "max_attempts": 8,  # the broker is down for about 10 s once: publishing waits it out
            "retry_max_ms": 4000,
        }
        workers = Workers([Settings(**base, worker_id=f"soak-{i}") for i in range(2)], model_dir, work_dir, report)

        messages: list[tuple[str, bytes]] = []
        good: set[str] = set()
        bad: set[str] = set()
        for n, job in enumerate(make_jobs(args.jobs, min_docs=1, max_docs=20, seed=args.seed, prefix="soak")):
            if n % BAD_EVERY == BAD_EVERY - 1:
                messages.append((job["job_id"], b'{"job_id": "' + job["job_id"].encode() + b'", "query": '))
                bad.add(job["job_id"])
            else:
                messages.append((job["job_id"], orjson.dumps(job)))
                good.add(job["job_id"])
        report.jobs_sent, report.malformed_sent = len(good), len(bad)

        produced = threading.Event()
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                produce_jobs(broker.bootstrap, jobs_topic, messages, args.rate, produced)
            except BaseException as e:
                errors.append(e)
                produced.set()

        producer = threading.Thread(target=produce, name="soak-producer", daemon=True)
        producer.start()
        send_s = len(messages) / args.rate
        next_kill = started + args.kill_every
        broker_stop_at = started + send_s / 3
        while not produced.is_set():
            time.sleep(0.2)
            workers.restart_ended()
            now = time.monotonic()
            if now >= next_kill and not args.no_faults:
                victim = rng.randrange(2)
                workers.kill_and_restart(victim)
                print(f"soak: {now - started:.0f} s: SIGKILL worker {victim}, restarted", file=sys.stderr)
                next_kill = now + args.kill_every
                if report.broker_stops == 0 and now >= broker_stop_at:
                    # the restarted worker is loading its model right now
                    broker.stop()
                    report.broker_stops += 1
                    print(f"soak: broker stopped for {args.broker_down_s:g} s", file=sys.stderr)
                    time.sleep(args.broker_down_s)
                    broker.start()
        producer.join()
        if errors:
            raise errors[0]
        # Under load: jobs are still queued when the first worker is asked to stop.
        code = workers.terminate(0, timeout_s=60)
        print(f"soak: SIGTERM worker 0 under load: exit {code}", file=sys.stderr)
        if code != 0:
            report.worker_exits.append(code)
        deadline = time.monotonic() + args.drain_timeout_s
        while time.monotonic() < deadline:
            workers.restart_ended()
            tally(broker.bootstrap, results_topic, dlq_topic, good, bad, report)
            if report.lost == 0:
                break
            time.sleep(5)
        code = workers.terminate(1, timeout_s=60)
        if code != 0:
            report.worker_exits.append(code)
        tally(broker.bootstrap, results_topic, dlq_topic, good, bad, report)
    finally:
        broker.stop()
    report.wall_s = round(time.monotonic() - started, 1)
    return report


def _tiny_model(work_dir: Path) -> Path:
    from worker.testing.offline_model import build_random_reranker

    return build_random_reranker(work_dir / "tiny-qwen3-reranker", size="tiny", seed=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5000, help="jobs to send (default 5000)")
    parser.add_argument("--rate", type=float, default=40.0, help="jobs per second (default 40)")
    parser.add_argument("--kill-every", type=float, default=15.0, help="seconds between SIGKILLs (default 15)")
    parser.add_argument("--broker-down-s", type=float, default=10.0, help="seconds the broker is down (default 10)")
    parser.add_argument("--drain-timeout-s", type=float, default=300.0, help="wait for answers after the last job")
    parser.add_argument("--model-dir", type=Path, default=None, help="model directory (default: the tiny model)")
    parser.add_argument("--work-dir", type=Path, default=None, help="broker data and worker logs (default: temp)")
    parser.add_argument("--delivery", choices=["at_least_once", "exactly_once"], default="at_least_once")
    parser.add_argument("--no-faults", action="store_true", help="no kills, no broker stop: throughput only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = parser.parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="rerank-soak-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    report = soak(args, work_dir)
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print(
            f"{report.delivery}: jobs sent {report.jobs_sent} (+{report.malformed_sent} malformed), "
            f"results {report.results}, "
            f"duplicates {report.duplicates}, dead letters {report.dead_letters}, lost {report.lost}, "
            f"wrong {len(report.wrong)}; largest score difference between duplicates "
            f"{report.max_duplicate_score_diff:.2g}; {report.kills} SIGKILLs, {report.broker_stops} broker stop; "
            f"workers that exited on their own: {report.worker_exits or 'none'}; {report.answers_per_s:g} answers/s; "
            f"wall {report.wall_s:.0f} s"
        )
    if report.ok() and args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    elif not report.ok():
        print(f"soak: FAILED; logs in {work_dir}", file=sys.stderr)
    return 0 if report.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
