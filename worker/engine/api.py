"""The engine's types and protocols, torch-free: what the wire models, the pipeline, the tools and the client import.

Two contracts live here, and nothing that computes:
- the engine's API: `ScoreRequest` in; `PreparedJob` (tokenized, de-duplicated) in between; `JobScores` with its
  `JobStats` out; `EngineInfo` describes the loaded engine; `Engine` is what a caller needs of one, and
  `QueuedBatch` a batch queued on the device. `InvalidJobError` is the one error a job itself can cause.
- the backend contract, TEI style: `PackArrays` (one pack laid out as flat arrays) goes to a `PackScorer`, which
  returns a `PendingPack` (the pack's scores on their way to the host). `worker.engine.engine.RerankEngine` drives
  any `PackScorer`; `worker.engine.load` picks and builds one with torch.

Vocabulary: a *pack* is one packed sequence (a job's head, then its documents, each with the suffix; several jobs
can share a pack), run by one forward *pass*; a *batch* is the jobs scored together, in one or more packs.

Importing this module loads numpy and nothing of torch or transformers (tests/test_layout.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from worker.engine.errors import InvalidJobError

TokenIds = npt.NDArray[np.int32]
IntArray = npt.NDArray[np.int64]

__all__ = [
    "BackendInfo",
    "Engine",
    "EngineInfo",
    "IntArray",
    "InvalidJobError",
    "JobScores",
    "JobStats",
    "PackArrays",
    "PackScorer",
    "PassStats",
    "PendingPack",
    "PreparedJob",
    "QueuedBatch",
    "ScoreRequest",
    "TokenIds",
]


# -- the engine's API ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreRequest:
    query: str
    documents: Sequence[str | None]
    instruction: str | None = None


@dataclass
class PreparedJob:
    """One job's texts as token ids, de-duplicated; `doc_slot[i]` is input document i's unique document, or -1 if
    blank. `tokens`: what the job puts through the model when its documents share one pack (the head once, each
    document and the suffix): the size a batch's token budget counts."""

    head_ids: TokenIds
    unique_docs: list[TokenIds]
    doc_slot: IntArray
    query_truncated: bool
    truncated_docs: int
    tokens: int
    tokenize_ms: float = 0.0


@dataclass(frozen=True)
class JobStats:
    input_docs: int
    usable_docs: int
    unique_docs: int
    dedup_ratio: float  # 1 - unique_docs / usable_docs: the share of usable documents not scored again
    truncated_docs: int
    query_truncated: bool
    tokens: int  # tokens this job put through the model (head copies, documents, suffixes)
    packs: int  # packs (forward passes) that carried this job's documents
    longest_pack_tokens: int  # the longest of those packs, all jobs in it
    mean_pack_tokens: float
    tokenize_ms: float
    inference_ms: float
    elapsed_ms: float


@dataclass(frozen=True)
class PassStats:
    """One forward pass of a batch: the tokens of its pack (before padding) and its time: on CUDA the device time of
    its own forward (events around it), elsewhere the host's time queuing and waiting for it."""

    tokens: int
    seconds: float


@dataclass(frozen=True)
class JobScores:
    scores: list[float | None]  # per input document; None for blank documents
    stats: JobStats


@dataclass(frozen=True)
class BackendInfo:
    device: str
    dtype: str
    attention: str  # triton, flash_varlen, flex_attention, sdpa or eager
    forward: str = "transformers"  # "packed-qwen3": worker.engine.qwen3; "transformers": the model's own decoder
    compiled: bool = False
    cuda_graphs: int = 0  # pack-length buckets captured as CUDA graphs
    quantization: str = "none"  # "fp8": the linear layers on FP8 tensor cores (worker.engine.fp8)


@dataclass(frozen=True)
class EngineInfo:
    model: str
    device: str
    dtype: str
    attention: str
    forward: str
    compiled: bool
    max_pack_tokens: int
    max_doc_tokens: int
    max_query_tokens: int
    cuda_graphs: int = 0  # pack-length buckets replayed as CUDA graphs (captured by warm_up)
    quantization: str = "none"  # "fp8": the linear layers on FP8 tensor cores (worker.engine.fp8)


class QueuedBatch(Protocol):
    """A batch whose first pack is queued on the device (`Engine.submit`)."""

    @property
    def fully_queued(self) -> bool:
        """Whether every pack is queued (then a caller may queue the next batch behind it)."""
        ...

    @property
    def num_packs(self) -> int:
        """How many packs (forward passes) the batch takes."""
        ...

    def result(self) -> list[JobScores]:
        """Per job of the batch, in order: its scores. Raises what the forward raised (CUDA out of memory...)."""
        ...

    @property
    def passes(self) -> Sequence[PassStats]:
        """Each forward pass of the batch, once `result()` returned (empty before)."""
        ...


class Engine(Protocol):
    """What the pipeline needs of an engine (`RerankEngine`; tests pass wrappers that inject failures)."""

    @property
    def info(self) -> EngineInfo: ...

    def prepare(self, request: ScoreRequest) -> PreparedJob:
        """Drop blank documents, de-duplicate, tokenize; InvalidJobError for a job that can never be scored."""
        ...

    def submit(self, jobs: Sequence[PreparedJob], *, batch_started: float | None = None) -> QueuedBatch:
        """Plan the jobs' packs and queue the first on the device."""
        ...

    def with_max_pack_tokens(self, max_pack_tokens: int) -> Engine | None:
        """The same model and tokenizer under a smaller pack budget (after CUDA ran out of memory), or None when
        that budget cannot hold one longest prompt."""
        ...


# -- the backend contract ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackArrays:
    """One pack laid out as flat host arrays, all int64 (what torch indexing wants)."""

    input_ids: IntArray  # [L]
    position_ids: IntArray  # [L]
    group: IntArray  # [L]: group number within the pack, -1 for padding
    doc: IntArray  # [L]: 0 for head tokens, 1.. per document, -1 for padding
    doc_ends: IntArray  # [num_docs]: index of each document's last token (the last suffix token)
    num_tokens: int  # unpadded length
    # The same rules as intervals (see masks.interval_mask): token q may see [head_start, head_end) up to q, and
    # [segment_start, q]. Padding is one segment with an empty head range.
    head_start: IntArray  # [L]: first token of the group's head
    head_end: IntArray  # [L]: one past the group's last head token
    segment_start: IntArray  # [L]: first token of the token's own segment (its head, or its document)


class PendingPack(Protocol):
    """One pack's P(yes) per document on its way to the host."""

    def result(self) -> npt.NDArray[np.float32]:
        """float32 [num_docs] in pack order; waits for the device where it must."""
        ...

    def device_ms(self, first: PendingPack) -> float | None:
        """Device time from the start of `first`'s work to the end of this pack's; None where not measured."""
        ...


class PackScorer(Protocol):
    """What the engine needs of a model backend: score one pack's document ends."""

    pad_to_multiple: int  # packs are padded to a multiple of this many tokens

    @property
    def info(self) -> BackendInfo: ...

    def launch_pack(self, arrays: PackArrays) -> PendingPack:
        """Queue the pack's forward on the device; the scores arrive through the returned handle."""
        ...

    def capture_graphs(self, max_tokens: int) -> int:
        """Capture CUDA graphs for packs up to `max_tokens` where the backend can; returns how many (0: none)."""
        ...
