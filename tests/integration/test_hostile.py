"""The hostile corpus (tests/hostile.py), 20 times through one worker process: every message ends as it must, the
worker stays alive and its resident memory stays bounded."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hostile import CASES, MAX_DOCS, MAX_MESSAGE_BYTES, RESULT, Case
from tests.integration.conftest import Topics, WorkerProcess, free_port, produce, read_topic
from worker.pipeline.deadletter import header_map
from worker.settings import Settings

pytestmark = pytest.mark.integration

ROUNDS = 20
# Resident memory may grow this much from the end of round 2 (caches, allocator pools warmed by round 1 and 2) to
# the end of round 20. A leak of one job's documents per hostile message would be 18 rounds x tens of MiB.
GROWTH_BOUND_MIB = 64


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_the_parser_sorts_every_case_as_expected() -> None:
    """The corpus's own check, without a broker: what the parser says of each case (the engine finds
    `instruction_too_long`, so the parser lets that one through)."""
    import re

    from worker.engine.api import InvalidJobError
    from worker.pipeline.errors import PermanentError
    from worker.pipeline.parse import Parser
    from worker.pipeline.records import SourceRecord

    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    parser = Parser(max_message_bytes=MAX_MESSAGE_BYTES, max_docs=MAX_DOCS, reply_topics=re.compile(r"rerank\.results"))
    for case in CASES:
        record = SourceRecord("jobs", 0, 0, 0, 0, case.key, case.value, tuple(case.headers))
        try:
            parser.check(parser.parse(record))
            said = RESULT
        except (InvalidJobError, PermanentError) as e:
            said = e.reason
        expected = RESULT if case.outcome == "instruction_too_long" else case.outcome
        assert said == expected, case.name


def test_twenty_rounds_of_the_corpus_end_as_expected_with_bounded_memory(
    kafka_bootstrap: str, topics: Topics, make_settings: Callable[..., Settings], spawn: Callable[..., WorkerProcess]
) -> None:
    port = free_port()
    settings = make_settings(
        worker_id="w-hostile", http_port=port, max_docs=MAX_DOCS, max_message_bytes=MAX_MESSAGE_BYTES
    )
    worker = spawn(settings)
    worker.wait_for_log("worker started", timeout_s=120)
    answers = [c for c in CASES if c.outcome == RESULT]
    letters = [c for c in CASES if c.outcome != RESULT]
    samples: list[tuple[float, bool]] = []

    def send_rounds(first: int, last: int) -> None:
        """Rounds first..last (inclusive), then wait until every one of them is answered, sampling all along."""
        for n in range(first, last + 1):
            produce(kafka_bootstrap, topics.jobs, [(c.keyed(n).key, c.value, c.headers) for c in CASES])
        deadline = time.monotonic() + 300
        while True:
            samples.append((rss_mib(worker.proc.pid), healthy(port)))
            assert worker.proc.poll() is None, worker.log()[-3000:]
            done_letters = len(read_topic(kafka_bootstrap, topics.dlq))
            done_results = len(read_topic(kafka_bootstrap, topics.results))
            if done_letters >= len(letters) * last and done_results >= len(answers) * last:
                return
            assert time.monotonic() < deadline, f"round {last}: {done_letters} letters, {done_results} results"
            time.sleep(1)

    send_rounds(1, 2)
    after_round_2 = rss_mib(worker.proc.pid)
    send_rounds(3, ROUNDS)
    after_last = rss_mib(worker.proc.pid)

    assert all(ok for _, ok in samples), "/healthz failed while the corpus was being answered"
    growth = after_last - after_round_2
    peak = max(rss for rss, _ in samples)
    print(f"resident memory: {after_round_2:.0f} MiB after round 2, {after_last:.0f} after {ROUNDS}, peak {peak:.0f}")
    assert growth <= GROWTH_BOUND_MIB, f"resident memory grew {growth:.0f} MiB over {ROUNDS - 2} rounds"

    by_name = {c.name: c for c in CASES}
    dead = read_topic(kafka_bootstrap, topics.dlq)
    reasons: dict[str, Counter[str]] = {}
    for letter in dead:
        name = letter.key.decode().split(":")[0]
        reasons.setdefault(name, Counter())[header_map(letter.headers)["rerank.error.reason"]] += 1
    assert reasons == {c.name: Counter({c.outcome: ROUNDS}) for c in letters}
    results = read_topic(kafka_bootstrap, topics.results)
    job_ids = Counter(r.key.decode() for r in results)
    expected_ids = Counter({_job_id(by_name[c.name]): ROUNDS for c in answers})
    assert job_ids == expected_ids


def _job_id(case: Case) -> str:
    import orjson

    assert case.value is not None
    return str(orjson.loads(case.value)["job_id"])
