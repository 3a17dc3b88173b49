"""Old public names keep working for one release, with a warning (CHANGELOG.md lists them; remove this file's
tests with the names)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from datetime import UTC, datetime

import pytest

from worker.engine.api import EngineInfo, JobScores, JobStats
from worker.messages import RerankJob, RerankResult, json_schemas
from worker.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("RERANK_", "KAFKA_")):
            monkeypatch.delenv(key)


def test_the_old_name_of_the_pack_budget_is_read_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_MAX_BATCH_TOKENS", "5000")
    with pytest.warns(FutureWarning, match="RERANK_MAX_BATCH_TOKENS is deprecated.*RERANK_MAX_PACK_TOKENS"):
        assert Settings().max_pack_tokens == 5000
    monkeypatch.setenv("RERANK_MAX_PACK_TOKENS", "6000")
    with pytest.warns(FutureWarning, match="ignored, since it is set too"):
        assert Settings().max_pack_tokens == 6000


def test_the_new_name_alone_warns_nothing(monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder) -> None:
    monkeypatch.setenv("RERANK_MAX_PACK_TOKENS", "6000")
    assert Settings().max_pack_tokens == 6000
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_results_carry_the_old_meta_names_beside_the_new_and_the_schema_marks_them() -> None:
    job = RerankJob(job_id="j", query="q", documents=["a", "b"])
    stats = JobStats(2, 2, 2, 0.0, 0, False, 30, 3, 17, 12.5, 0.1, 0.2, 0.3)
    info = EngineInfo("m", "cpu", "float32", "sdpa", "packed-qwen3", False, 4096, 512, 512)
    result = RerankResult.from_scores(job, JobScores([0.2, 0.8], stats), info, scored_at=datetime.now(UTC))
    meta = result.model_dump(mode="json")["meta"]
    old_and_new = {
        "packed_batches": "packs",
        "packed_max_seq_len": "longest_pack_tokens",
        "packed_avg_seq_len": "mean_pack_tokens",
        "max_batch_tokens": "max_pack_tokens",
    }
    assert {old: meta[old] for old in old_and_new} == {old: meta[new] for old, new in old_and_new.items()}
    assert (meta["packs"], meta["longest_pack_tokens"], meta["mean_pack_tokens"], meta["max_pack_tokens"]) == (
        3,
        17,
        12.5,
        4096,
    )
    schema = json.loads(json_schemas()["rerank-result.schema.json"])["$defs"]["RerankMeta"]["properties"]
    assert {name for name, field in schema.items() if field.get("deprecated")} == set(old_and_new)


def test_the_old_import_path_of_the_client_works_with_a_warning() -> None:
    sys.modules.pop("worker.kafka.client", None)
    with pytest.warns(FutureWarning, match="import RerankClient from worker.client"):
        old = importlib.import_module("worker.kafka.client")
    from worker.client import RerankClient

    assert old.RerankClient is RerankClient
