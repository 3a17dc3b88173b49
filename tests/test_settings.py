"""Settings come from the environment, reject unknown RERANK_* names, and the README lists every one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import Settings, settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("RERANK_", "KAFKA_")):
            monkeypatch.delenv(name)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.model == "Qwen/Qwen3-Reranker-0.6B"
    assert (s.device, s.dtype, s.max_doc_tokens, s.max_pack_tokens) == ("auto", "auto", 512, None)


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_MAX_DOC_TOKENS", "64")
    monkeypatch.setenv("RERANK_DEVICE", "cuda:1")
    monkeypatch.setenv("RERANK_INSTRUCTION", "Rank products")
    s = Settings()
    assert (s.max_doc_tokens, s.device, s.instruction) == (64, "cuda:1", "Rank products")


@pytest.mark.parametrize(("name", "value"), [("RERANK_MAX_DOC_TOKENS", "0"), ("RERANK_DEVICE", "tpu")])
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_unknown_rerank_variables_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_MAX_DOC_TOKEN", "64")
    with pytest.raises(ValidationError, match="RERANK_MAX_DOC_TOKEN"):
        Settings()


def test_readme_documents_every_setting() -> None:
    readme = README.read_text()
    assert settings_table() in readme, "README's settings table drifted: paste `python -m worker.settings`"
