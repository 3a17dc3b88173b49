"""Every subcommand's documented error paths, as a user meets them: a real `rerank-worker` process, its exit code,
one line on stderr (one critical log line for `run`, whose stderr is JSON log lines), and no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli-errors")
    (d / "not-json.json").write_text("{not json")
    (d / "job.json").write_bytes(orjson.dumps({"job_id": "j", "query": "q", "documents": ["a"]}))
    return {
        "not_json": str(d / "not-json.json"),
        "job": str(d / "job.json"),
        "missing": str(d / "missing.json"),
        "closed": str(closed_port()),
        "hf_home": str(d / "hf-home"),  # an empty model cache
    }


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def rerank_worker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_", "KAFKA_"))}
    unreachable = f"127.0.0.1:{closed_port()}"
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env={**clean, "KAFKA_BOOTSTRAP_SERVERS": unreachable, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("rerank-worker: ")
    for word in words:
        assert word in lines[0]


CASES = {
    "unknown command": (("frobnicate",), {}, 2, ("invalid choice",)),
    "bad option value": (("enqueue", "--top-n", "x"), {}, 2, ("--top-n", "--help")),
    "enqueue without a job": (("enqueue",), {}, 2, ("--file", "--query")),
    "enqueue, missing file": (("enqueue", "--file", "{missing}"), {}, 2, ("No such file",)),
    "enqueue, not JSON": (("enqueue", "--file", "{not_json}"), {}, 1, ("not_json",)),
    "enqueue, broker unreachable": (("enqueue", "--file", "{job}"), {}, 4, ("Kafka",)),
    "score, missing file": (("score", "--input", "{missing}"), {}, 2, ("No such file",)),
    "score, not JSON": (("score", "--input", "{not_json}"), {}, 1, ("not_json",)),
    "score, model path": (("score", "--input", "{job}", "--model", "/no/such/model"), {}, 3, ("does not exist",)),
    "score, hub unreachable": (
        ("score", "--input", "{job}", "--model", "Qwen/Qwen3-Reranker-0.6B"),
        {"HF_ENDPOINT": "http://127.0.0.1:{closed}", "HF_HOME": "{hf_home}"},
        3,
        ("does not answer", "not in the local cache"),
    ),
    "score, bad setting": (("score", "--input", "{job}"), {"RERANK_DEVICE": "gpu"}, 2, ("RERANK_DEVICE", "'gpu'")),
    "unknown setting": (("run",), {"RERANK_MAX_PACK_TOKEN": "4096"}, 2, ("RERANK_MAX_PACK_TOKENS",)),
    "replay, bad time": (("replay", "--from", "last tuesday"), {}, 2, ("--from",)),
    "replay, reversed range": (("replay", "--from", "-1h", "--to", "-2h"), {}, 2, ("--to",)),
    "replay, broker unreachable": (("replay", "--from", "-1h"), {}, 4, ("Kafka",)),
    "dlq list, bad time": (("dlq", "list", "--since", "soon"), {}, 2, ("--since",)),
    "dlq list, broker unreachable": (("dlq", "list"), {}, 4, ("Kafka",)),
    "dlq requeue, nothing chosen": (("dlq", "requeue"), {}, 2, ("--reason", "--all")),
    "schemas, unwritable folder": (("schemas", "--out", "/proc/rerank-schemas"), {}, 2, ("--out",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_paths_exit_with_one_line(case: str, files: dict[str, str]) -> None:
    args, env, code, words = CASES[case]
    env = {k: v.format(**files) for k, v in env.items()}
    one_line(rerank_worker(*(a.format(**files) for a in args), **env), code, *words)


def critical_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in done.stderr
    out = []
    for line in done.stderr.splitlines():
        record = orjson.loads(line)  # every line the worker writes is a JSON log line
        if record["level"] in ("critical", "error"):
            out.append(record["msg"])
    return out


def test_run_with_its_http_port_in_use_exits_4_before_anything_else(busy_port: int) -> None:
    done = rerank_worker("run", RERANK_HTTP_PORT=str(busy_port), RERANK_HTTP_HOST="127.0.0.1")
    assert done.returncode == 4, done.stderr
    (line,) = critical_lines(done)
    assert f"127.0.0.1:{busy_port}" in line
    assert "RERANK_HTTP_PORT" in line


def test_run_with_the_broker_unreachable_gives_up_after_the_startup_timeout() -> None:
    done = rerank_worker("run", RERANK_HTTP_PORT="0", RERANK_KAFKA_STARTUP_TIMEOUT_S="2")
    assert done.returncode == 4, done.stderr
    (line,) = critical_lines(done)
    assert "RERANK_KAFKA_STARTUP_TIMEOUT_S" in line
