"""The command line: `rerank-worker score` end to end in a subprocess (the tiny model through from_pretrained, JSON
in, JSON out), and the `enqueue` command's job building and ranked table."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.reference import official_score
from worker.cli import _job_from_args, build_parser, ranked_table
from worker.engine.api import EngineInfo, JobScores, JobStats
from worker.messages import RerankJob, RerankResult


def run_cli(
    args: list[str], stdin: bytes, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], input=stdin, capture_output=True, env=env, timeout=300
    )


def test_score_prints_the_ranked_result(tiny_model_dir: Path, reference_model: Any, hf_tokenizer: Any) -> None:
    job = {
        "job_id": "cli-1",
        "query": "what is rust?",
        "documents": ["Rust is a systems language.", {"id": "b", "text": "Iron oxide."}, None, "Tea."],
        "top_n": 3,
        "return_documents": True,
        "metadata": {"source": "test"},
    }
    done = run_cli(["score", "--model", str(tiny_model_dir), "--device", "cpu"], orjson.dumps(job))
    assert done.returncode == 0, done.stderr.decode()
    result = orjson.loads(done.stdout)
    assert result["job_id"] == "cli-1"
    assert result["metadata"] == {"source": "test"}
    assert len(result["results"]) == 3
    scores = [r["relevance_score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True)
    for r in result["results"]:
        text = job["documents"][r["index"]]
        text = text["text"] if isinstance(text, dict) else text
        assert r["document"] == text
        assert r["relevance_score"] == pytest.approx(
            official_score(reference_model, hf_tokenizer, job["query"], text), abs=1e-4
        )
    assert result["meta"]["input_docs"] == 4
    assert result["meta"]["usable_docs"] == 3
    assert result["meta"]["device"] == "cpu"
    assert result["meta"]["attention"] == "sdpa"


def test_score_reads_a_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_bytes(orjson.dumps({"job_id": "f", "query": "q", "documents": ["a", "b"]}))
    done = run_cli(["score", "--input", str(path)], b"", {"RERANK_MODEL": str(tiny_model_dir), "RERANK_DEVICE": "cpu"})
    assert done.returncode == 0, done.stderr.decode()
    assert orjson.loads(done.stdout)["job_id"] == "f"


@pytest.mark.parametrize(
    ("stdin", "expected"),
    [
        (b"{not json", "invalid job (not_json)"),
        (orjson.dumps({"job_id": "x", "query": " ", "documents": ["a"]}), "invalid job (blank_query)"),
    ],
)
def test_a_bad_job_is_one_line_on_stderr_and_exit_1(tiny_model_dir: Path, stdin: bytes, expected: str) -> None:
    done = run_cli(["score", "--model", str(tiny_model_dir), "--device", "cpu"], stdin)
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert expected in lines[0]
    assert done.stdout == b""


def test_bad_settings_exit_2(tiny_model_dir: Path) -> None:
    done = run_cli(["score", "--model", str(tiny_model_dir)], b"{}", {"RERANK_MAX_DOC_TOKEN": "5"})
    assert done.returncode == 2
    assert "RERANK_MAX_DOC_TOKEN" in done.stderr.decode()


def test_a_missing_model_exits_3(tmp_path: Path) -> None:
    job = orjson.dumps({"job_id": "x", "query": "q", "documents": ["a"]})
    done = run_cli(["score", "--model", str(tmp_path / "no-such-model"), "--device", "cpu"], job)
    assert done.returncode == 3
    assert "cannot load model" in done.stderr.decode()


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


def test_ranked_table_says_what_it_shows(tmp_path: Path) -> None:
    job = RerankJob(job_id="j", query="q", documents=["alpha", "", {"id": 7, "text": "gamma " * 30}])
    stats = JobStats(3, 2, 2, 0.0, 0, False, 10, 1, 10, 10.0, 0.1, 0.2, 1.5)
    info = EngineInfo("m", "cpu", "float32", "sdpa", "packed-qwen3", False, 4096, 512, 512)
    result = RerankResult.from_scores(job, JobScores([0.25, None, 0.75], stats), info, scored_at=datetime.now(UTC))
    lines = ranked_table(result, job).splitlines()
    assert lines[0] == "job j: 3 of 3 documents; 1 blank, 0 duplicates scored once; scored in 1.5 ms on the CPU"
    assert lines[1] == "model m"
    assert lines[3].split()[:4] == ["1", "0.750000", "2", "7"]
    assert lines[3].endswith("...")
    assert lines[4].split() == ["2", "0.250000", "0", "alpha"]
    assert lines[5].split() == ["3", "-", "1"]

    # top_n, duplicates, a GPU, and a model with random weights (a directory the offline builder wrote)
    (tmp_path / "rerank-worker-offline.json").write_text("{}")
    job = RerankJob(job_id="k", query="q", documents=["a", "b", "a", " ", "c", "b"], top_n=4)
    stats = JobStats(6, 5, 3, 0.4, 0, False, 10, 1, 10, 10.0, 0.1, 0.2, 10.08)
    info = EngineInfo(str(tmp_path), "cuda:0", "bfloat16", "flex", "packed-qwen3", True, 4096, 512, 512)
    scores = JobScores([0.9, 0.5, 0.9, None, 0.1, 0.5], stats)
    lines = ranked_table(RerankResult.from_scores(job, scores, info), job).splitlines()
    assert lines[0] == (
        "job k: 4 of 6 documents (top_n=4); 1 blank, 2 duplicates scored once; scored in 10.1 ms on the GPU"
    )
    assert lines[1] == f"model {tmp_path} (RANDOM WEIGHTS: the scores are meaningless)"
    assert len(lines) == 3 + 4


MODEL_FREE = """
import sys
from worker import cli
try:
    cli.main(sys.argv[1:])
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
loaded = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("LOADED", ",".join(loaded), "CODE", code, file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("args", "env", "code"),
    [
        (["--help"], {}, 0),
        (["enqueue", "--help"], {}, 0),
        (["dlq", "list", "--help"], {}, 0),
        (["dlq", "requeue", "--help"], {}, 0),
        (["replay", "--help"], {}, 0),
        (["schemas", "--out", "{tmp}"], {}, 0),
        (["enqueue", "--query", "q", "--doc", "a"], {"RERANK_DEVICE": "gpu"}, 2),
        (["score"], {"RERANK_MAX_DOC_TOKEN": "5"}, 2),
    ],
    ids=["help", "enqueue-help", "dlq-list-help", "dlq-requeue-help", "replay-help", "schemas", "bad-setting", "typo"],
)
def test_commands_that_need_no_model_import_no_torch(
    args: list[str], env: dict[str, str], code: int, tmp_path: Path
) -> None:
    """`--help`, `schemas` and settings errors answer without loading torch or transformers (seconds of imports)."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_", "KAFKA_"))}
    done = subprocess.run(
        [sys.executable, "-c", MODEL_FREE, *argv], capture_output=True, env={**clean, **env}, timeout=120, text=True
    )
    assert f"LOADED  CODE {code}" in done.stderr, done.stderr[-2000:]
    if code == 2:
        lines = [line for line in done.stderr.splitlines() if not line.startswith("LOADED")]
        assert len(lines) == 1, lines
        assert lines[0].startswith("rerank-worker: invalid settings: RERANK_")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RERANK_DEVICE": "gpu"}, "RERANK_DEVICE='gpu': expected auto, cpu, cuda or cuda:N"),
        ({"RERANK_MAX_PACK_TOKENS": "abc"}, "RERANK_MAX_PACK_TOKENS='abc': expected an integer >= 1"),
        ({"RERANK_DTYPE": "fp8"}, "RERANK_DTYPE='fp8': expected one of auto, float32, bfloat16, float16"),
        ({"RERANK_HTTP_PORT": "99999"}, "RERANK_HTTP_PORT='99999': expected an integer from 0 to 65535"),
        ({"RERANK_CUDA_GRAPHS": "maybe"}, "RERANK_CUDA_GRAPHS='maybe': expected true or false"),
        ({"RERANK_MAX_DOC_TOKEN": "5"}, "RERANK_MAX_DOC_TOKEN is not a setting (did you mean RERANK_MAX_DOC_TOKENS?)"),
        ({"RERANK_JOBS_TOPIC": "a b"}, "RERANK_JOBS_TOPIC='a b': expected a topic name"),
    ],
)
def test_a_settings_error_names_the_variable_the_value_and_what_is_allowed(
    env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    from worker.settings import Settings, describe_settings_error

    for key in list(os.environ):
        if key.startswith(("RERANK_", "KAFKA_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as e:
        Settings()
    assert expected in describe_settings_error(e.value)


def test_a_secret_in_a_settings_error_is_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from worker.settings import Settings, describe_settings_error

    for key in list(os.environ):
        if key.startswith(("RERANK_", "KAFKA_")):
            monkeypatch.delenv(key)
    with pytest.raises(ValidationError) as e:
        Settings(sasl_password=12345)  # type: ignore[arg-type]  # not a string: refused, and never echoed
    assert "12345" not in describe_settings_error(e.value)
    assert "KAFKA_SASL_PASSWORD='***'" in describe_settings_error(e.value)


def test_a_local_model_path_that_does_not_exist_says_so(tmp_path: Path) -> None:
    job = orjson.dumps({"job_id": "x", "query": "q", "documents": ["a"]})
    done = run_cli(["score", "--model", str(tmp_path / "missing"), "--device", "cpu"], job)
    assert done.returncode == 3
    assert f"model directory {tmp_path / 'missing'} does not exist" in done.stderr.decode()
    (tmp_path / "empty").mkdir()
    done = run_cli(["score", "--model", str(tmp_path / "empty"), "--device", "cpu"], job)
    assert done.returncode == 3
    assert "is a directory without config.json" in done.stderr.decode()


def test_a_pack_budget_too_small_is_refused_before_the_weights_load(tiny_model_dir: Path) -> None:
    job = orjson.dumps({"job_id": "x", "query": "q", "documents": ["a"]})
    done = run_cli(["score", "--model", str(tiny_model_dir), "--device", "cpu"], job, {"RERANK_MAX_PACK_TOKENS": "10"})
    assert done.returncode == 2
    assert "RERANK_MAX_PACK_TOKENS=10 cannot hold one longest prompt" in done.stderr.decode()
    assert b"Loading weights" not in done.stderr
