"""Session fixtures: a tiny random-weight Qwen3 reranker with the real Qwen3 tokenizer, built once, offline."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from worker.engine.engine import RerankEngine
from worker.engine.load import load_engine
from worker.testing.offline_model import build_random_reranker

settings.register_profile(
    "default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
# On the GPU machine every new pack length compiles FlexAttention kernels: fewer examples keep the run short.
settings.register_profile("gpu", parent=settings.get_profile("default"), max_examples=6)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_reranker(tmp_path_factory.mktemp("tiny-qwen3-reranker"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> RerankEngine:
    """CPU unless RERANK_DEVICE says otherwise: the GPU machine runs this suite with RERANK_DEVICE=cuda."""
    device = os.environ.get("RERANK_DEVICE", "cpu")
    return load_engine(str(tiny_model_dir), device=device, dtype=os.environ.get("RERANK_DTYPE", "float32"))


@pytest.fixture(scope="session")
def make_engine(engine: RerankEngine) -> Callable[..., RerankEngine]:
    """Engines with other limits over the same loaded model (loading once keeps the suite fast)."""

    def make(*, max_pack_tokens: int, max_doc_tokens: int = 512, max_query_tokens: int = 512) -> RerankEngine:
        tokenizer = engine.tokenizer.with_limits(max_query_tokens=max_query_tokens, max_doc_tokens=max_doc_tokens)
        return RerankEngine(tokenizer, engine.scorer, model_name=engine.model_name, max_pack_tokens=max_pack_tokens)

    return make


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def reference_model(tiny_model_dir: Path) -> Any:
    """The same weights loaded independently, with transformers' default (non-packed) attention path."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype="float32")
    return model.eval()
