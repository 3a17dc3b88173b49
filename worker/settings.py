"""Every setting of the worker, read from the environment (prefix RERANK_), in one pydantic-settings class.

Each field documents itself as `name (type): meaning. Default: X`; the README's table is generated from the same
descriptions (tests/test_settings.py checks that the two agree). Unknown RERANK_* variables are rejected at start,
so a typo such as RERANK_MAX_DOC_TOKEN fails loudly instead of silently running with the default.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "RERANK_"

PositiveInt = Annotated[int, Field(ge=1)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    model: str = Field(
        "Qwen/Qwen3-Reranker-0.6B",
        description="Model to load with `from_pretrained`: a hub name or a local directory.",
    )
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = Field(
        "auto", description="`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Model weights and activations: `auto` is bfloat16 on CUDA and float32 on CPU. "
        "The final yes/no projection always runs in float32.",
    )
    attention: Literal["auto", "flex_attention", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernel: `auto` is FlexAttention (BlockMask) on CUDA and SDPA with a dense mask on CPU.",
    )
    max_doc_tokens: PositiveInt = Field(512, description="Each document is cut to this many tokens.")
    max_query_tokens: PositiveInt = Field(
        512,
        description="The query is cut to this many tokens; a longer instruction rejects the job.",
    )
    max_batch_tokens: PositiveInt | None = Field(
        None,
        description="Token budget of one forward pass (one packed sequence); jobs share passes up to it and a "
        "bigger job spans several. Empty: 32768 on CUDA, 4096 on CPU.",
    )
    max_docs: PositiveInt = Field(1000, description="Most documents one job may carry; more rejects the job.")
    instruction: str | None = Field(
        None,
        description="Instruction for jobs that carry none. Empty: the official default, `Given a web search query, "
        "retrieve relevant passages that answer the query`.",
    )
    doc_cache_size: Annotated[int, Field(ge=0)] = Field(
        20000,
        description="Documents whose token ids are kept (least recently used first out); catalogues repeat "
        "documents across queries. 0 turns the cache off.",
    )

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> Settings:
        known = {ENV_PREFIX + name.upper() for name in type(self).model_fields}
        unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
        if unknown:
            raise ValueError(f"unknown settings in the environment: {', '.join(unknown)} (known: {sorted(known)})")
        return self


def settings_table() -> str:
    """A Markdown table of every setting: the README embeds it."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else f"`{field.default}`"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows)
