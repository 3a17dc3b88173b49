"""RerankEngine: queries and documents in, scores and pack statistics out. Knows nothing of Kafka.

Steps, each a method: `prepare` (drop blanks, de-duplicate, tokenize), `plan_packs` (cross-job packing under the
token budget), `run_packs` (one forward per pack, each queued on the device before the host waits for the one
ahead), `collect` (scores back to every input document, statistics). `score` does all of them; `submit` plans and
queues the first pack and returns a `ScoringBatch` whose `result()` does the rest, so a caller can queue the next
one-pack batch before it waits for this one and the device never idles between batches (the worker's GPU thread
and the stream benchmark do). The worker calls `prepare` on another thread while the GPU runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from worker.engine.api import (
    EngineInfo,
    IntArray,
    JobScores,
    JobStats,
    PackScorer,
    PassStats,
    PendingPack,
    PreparedJob,
    ScoreRequest,
    TokenIds,
)
from worker.engine.plan import Pack, build_pack_arrays, plan_packs
from worker.engine.prompt import DEFAULT_INSTRUCTION, query_head
from worker.engine.tokenize import PromptTokenizer


def check_budget(tok: PromptTokenizer, max_pack_tokens: int) -> None:
    """ValueError when one pack of `max_pack_tokens` cannot hold one longest prompt."""
    empty_head = len(tok.prefix_ids) + tok.count_plain_tokens(query_head("", ""))
    # instruction and query are each at most max_query_tokens; a few tokens of slack for merges at the seams
    worst = empty_head + 2 * tok.max_query_tokens + 8 + tok.max_doc_tokens + len(tok.suffix_ids)
    if max_pack_tokens < worst:
        raise ValueError(
            f"RERANK_MAX_PACK_TOKENS={max_pack_tokens} cannot hold one longest prompt: it must be at least {worst} "
            f"(RERANK_MAX_QUERY_TOKENS={tok.max_query_tokens} for the query and for the instruction, "
            f"RERANK_MAX_DOC_TOKENS={tok.max_doc_tokens}, {empty_head + len(tok.suffix_ids)} template tokens)"
        )


@dataclass
class ScoringBatch:
    """A planned batch whose first pack is queued on the device (`RerankEngine.submit`); `result()` queues the
    others, each before waiting for the one ahead, and collects. The host never runs more than a pack ahead of the
    device: queuing many packs at once makes `submit` block for most of the batch. A caller that pipelines batches
    queues the next one only once this one is `fully_queued`, so that a batch's packs run in order and its results
    never wait for the next batch's."""

    engine: RerankEngine
    jobs: Sequence[PreparedJob]
    packs: Sequence[Pack]
    first: PendingPack | None
    submitted: float  # perf_counter() when `submit` began
    batch_started: float
    passes: list[PassStats] = field(default_factory=list)  # filled by `result()`

    @property
    def fully_queued(self) -> bool:
        """Whether `submit` queued every pack (batches of one pack, the common case)."""
        return len(self.packs) <= 1

    @property
    def num_packs(self) -> int:
        return len(self.packs)

    def result(self) -> list[JobScores]:
        """Per job, its scores and statistics. `inference_ms`: on CUDA the device time from the first pack's start
        to the last pack's end (not the wait behind a batch queued before it); elsewhere `submit` to here."""
        unique_scores, device_ms, self.passes = self.engine._run_packs(
            self.jobs, self.packs, self.first, since=self.submitted
        )
        inference_ms = device_ms if device_ms is not None else (time.perf_counter() - self.submitted) * 1e3
        return self.engine.collect(
            self.jobs, self.packs, unique_scores, inference_ms=inference_ms, batch_started=self.batch_started
        )


class RerankEngine:
    """Drives any `PackScorer` (worker.engine.api); `worker.engine.load.load_engine` builds one with its model."""

    def __init__(
        self,
        tokenizer: PromptTokenizer,
        scorer: PackScorer,
        *,
        model_name: str,
        max_pack_tokens: int,
        default_instruction: str = DEFAULT_INSTRUCTION,
    ) -> None:
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.model_name = model_name
        self.max_pack_tokens = max_pack_tokens
        self.default_instruction = default_instruction
        self._check_budget()

    def _check_budget(self) -> None:
        check_budget(self.tokenizer, self.max_pack_tokens)

    def with_max_pack_tokens(self, max_pack_tokens: int) -> RerankEngine | None:
        """The same model and tokenizer under another pack budget, or None when it cannot hold one prompt."""
        try:
            return RerankEngine(
                self.tokenizer,
                self.scorer,
                model_name=self.model_name,
                max_pack_tokens=max_pack_tokens,
                default_instruction=self.default_instruction,
            )
        except ValueError:
            return None

    @property
    def info(self) -> EngineInfo:
        backend = self.scorer.info
        return EngineInfo(
            model=self.model_name,
            device=backend.device,
            dtype=backend.dtype,
            attention=backend.attention,
            forward=backend.forward,
            compiled=backend.compiled,
            max_pack_tokens=self.max_pack_tokens,
            max_doc_tokens=self.tokenizer.max_doc_tokens,
            max_query_tokens=self.tokenizer.max_query_tokens,
            cuda_graphs=backend.cuda_graphs,
            quantization=backend.quantization,
        )

    def warm_up(self) -> float:
        """Run synthetic packs of three lengths (the whole budget; a few jobs; one document) so that compilation
        and the allocator's first growth happen before the first job, then capture CUDA graphs where the backend
        can; returns the seconds it took.

        The compiled forward treats the pack length as dynamic: the first pack compiles, the second length
        compiles the dynamic graph, later lengths reuse it (bench/warmup.py counts compiles after warm-up).
        """
        started = time.perf_counter()
        tok = self.tokenizer
        head = np.concatenate([tok.prefix_ids, tok.prefix_ids[-8:]])
        doc_len = max(1, min(tok.max_doc_tokens, 64))
        filler = np.full(doc_len, tok.yes_id, dtype=tok.prefix_ids.dtype)
        per_doc = doc_len + len(tok.suffix_ids)
        fill_docs = max(1, (self.max_pack_tokens - len(head)) // per_doc)
        # Largest first: the compiled kernels autotune on the first shape they see, and full packs are what matter.
        for jobs_docs in ([fill_docs], [3, 5, 2], [1]):
            jobs = [self._prepared_job(head, [filler] * n) for n in jobs_docs]
            self.run_packs(jobs, self.plan_packs(jobs))
        # then, with every kernel compiled and tuned, one CUDA graph per pack-length bucket where the backend can
        self.scorer.capture_graphs(self.max_pack_tokens)
        return time.perf_counter() - started

    # -- steps -------------------------------------------------------------------------------------------------

    def prepare(self, request: ScoreRequest) -> PreparedJob:
        """Drop blank documents, de-duplicate by text and then by token ids, tokenize head and documents.

        Raises InvalidJobError for a job that can never be scored (for example an over-long instruction).
        """
        started = time.perf_counter()
        instruction = request.instruction if request.instruction is not None else self.default_instruction
        head_ids, query_truncated = self.tokenizer.encode_head(instruction, request.query)
        text_slot: dict[str, int] = {}
        doc_text = np.full(len(request.documents), -1, dtype=np.int64)  # input document -> unique text
        for i, text in enumerate(request.documents):
            if text is not None and text.strip():  # blank documents get no score (null)
                doc_text[i] = text_slot.setdefault(text, len(text_slot))
        texts = list(text_slot)  # dicts keep insertion order: texts[slot] is the text of that slot
        encoded = self.tokenizer.encode_documents(texts)
        # Texts that differ only past the truncation point have the same ids and so the same score: score once.
        ids_slot: dict[bytes, int] = {}
        unique_docs: list[TokenIds] = []
        text_to_unique = np.empty(len(texts), dtype=np.int64)
        for t, enc in enumerate(encoded):
            text_to_unique[t] = ids_slot.setdefault(enc.ids.tobytes(), len(ids_slot))
            if text_to_unique[t] == len(unique_docs):
                unique_docs.append(enc.ids)
        doc_slot = doc_text.copy()
        usable = doc_text >= 0
        doc_slot[usable] = text_to_unique[doc_text[usable]]
        return self._prepared_job(
            head_ids,
            unique_docs,
            doc_slot=doc_slot,
            query_truncated=query_truncated,
            truncated_docs=sum(enc.truncated for enc in encoded),
            tokenize_ms=(time.perf_counter() - started) * 1e3,
        )

    def _prepared_job(
        self,
        head_ids: TokenIds,
        unique_docs: list[TokenIds],
        *,
        doc_slot: IntArray | None = None,
        query_truncated: bool = False,
        truncated_docs: int = 0,
        tokenize_ms: float = 0.0,
    ) -> PreparedJob:
        """A PreparedJob with its token count; `doc_slot` defaults to one input document per unique one."""
        suffix_len = len(self.tokenizer.suffix_ids)
        return PreparedJob(
            head_ids=head_ids,
            unique_docs=unique_docs,
            doc_slot=doc_slot if doc_slot is not None else np.arange(len(unique_docs), dtype=np.int64),
            query_truncated=query_truncated,
            truncated_docs=truncated_docs,
            tokens=len(head_ids) + sum(len(d) + suffix_len for d in unique_docs),
            tokenize_ms=tokenize_ms,
        )

    def plan_packs(self, jobs: Sequence[PreparedJob]) -> list[Pack]:
        return plan_packs(jobs, len(self.tokenizer.suffix_ids), self.max_pack_tokens)

    def launch_pack(self, jobs: Sequence[PreparedJob], pack: Pack) -> PendingPack:
        """Queue one pack's forward on the device (on the graph path without waiting for the device)."""
        arrays = build_pack_arrays(pack, jobs, self.tokenizer.suffix_ids, self.scorer.pad_to_multiple, pad_id=0)
        return self.scorer.launch_pack(arrays)

    def run_packs(
        self, jobs: Sequence[PreparedJob], packs: Sequence[Pack], first: PendingPack | None = None
    ) -> list[np.ndarray]:
        """Forward every pack; returns per job the scores of its unique documents (float32). Each pack is queued
        before the host waits for the one ahead of it: the device goes from pack to pack without waiting for the
        host, and the host runs one pack ahead at most. `first`: the first pack, where `submit` queued it."""
        return self._run_packs(jobs, packs, first, since=time.perf_counter())[0]

    def _run_packs(
        self, jobs: Sequence[PreparedJob], packs: Sequence[Pack], first: PendingPack | None, *, since: float
    ) -> tuple[list[np.ndarray], float | None, list[PassStats]]:
        """`run_packs`, the device time of the packs' forwards (None off CUDA), and each pass's `PassStats` (off
        CUDA the host's time per pass, counted from `since`, the perf_counter() before the first pack was queued)."""
        unique_scores = [np.full(len(job.unique_docs), np.nan, dtype=np.float32) for job in jobs]
        pending = [first if first is not None else self.launch_pack(jobs, packs[0])] if packs else []
        passes: list[PassStats] = []
        host_from = since
        for i, pack in enumerate(packs):
            if i + 1 < len(packs):
                pending.append(self.launch_pack(jobs, packs[i + 1]))  # queued before waiting for pack i
            scores = pending[i].result()  # [num_docs in pack order]
            host_to = time.perf_counter()
            own_ms = pending[i].device_ms(pending[i])
            passes.append(PassStats(pack.num_tokens, own_ms / 1e3 if own_ms is not None else host_to - host_from))
            host_from = host_to
            offset = 0
            for group in pack.groups:
                n = len(group.docs)
                unique_scores[group.job][list(group.docs)] = scores[offset : offset + n]
                offset += n
        for scores in unique_scores:
            if np.isnan(scores).any():
                raise RuntimeError(
                    "a document was planned into no pack or scored NaN: with RERANK_DTYPE=float16 an activation past "
                    "65,504 overflows (use bfloat16); otherwise this is a bug."
                )
        return unique_scores, pending[-1].device_ms(pending[0]) if pending else None, passes

    def collect(
        self,
        jobs: Sequence[PreparedJob],
        packs: Sequence[Pack],
        unique_scores: Sequence[np.ndarray],
        *,
        inference_ms: float,
        batch_started: float,
    ) -> list[JobScores]:
        pack_lengths: list[list[int]] = [[] for _ in jobs]
        job_tokens = [0] * len(jobs)
        suffix_len = len(self.tokenizer.suffix_ids)
        for pack in packs:
            for group in pack.groups:
                job = jobs[group.job]
                pack_lengths[group.job].append(pack.num_tokens)
                job_tokens[group.job] += len(job.head_ids) + sum(
                    len(job.unique_docs[d]) + suffix_len for d in group.docs
                )
        elapsed_ms = (time.perf_counter() - batch_started) * 1e3
        results = []
        for j, job in enumerate(jobs):
            usable = int((job.doc_slot >= 0).sum())
            unique = len(job.unique_docs)
            per_doc = [None if slot < 0 else float(unique_scores[j][slot]) for slot in job.doc_slot.tolist()]
            lengths = pack_lengths[j]
            results.append(
                JobScores(
                    scores=per_doc,
                    stats=JobStats(
                        input_docs=len(job.doc_slot),
                        usable_docs=usable,
                        unique_docs=unique,
                        dedup_ratio=round(1.0 - unique / usable, 6) if usable else 0.0,
                        truncated_docs=job.truncated_docs,
                        query_truncated=job.query_truncated,
                        tokens=job_tokens[j],
                        packs=len(lengths),
                        longest_pack_tokens=max(lengths, default=0),
                        mean_pack_tokens=round(float(np.mean(lengths)), 1) if lengths else 0.0,
                        tokenize_ms=round(job.tokenize_ms, 3),
                        inference_ms=round(inference_ms, 3),
                        elapsed_ms=round(elapsed_ms, 3),
                    ),
                )
            )
        return results

    def score(self, requests: Sequence[ScoreRequest]) -> list[JobScores]:
        """Score several jobs together: their documents share forward passes, each job's scores are its own."""
        started = time.perf_counter()
        jobs = [self.prepare(r) for r in requests]
        return self.score_prepared(jobs, batch_started=started)

    def score_prepared(self, jobs: Sequence[PreparedJob], *, batch_started: float | None = None) -> list[JobScores]:
        return self.submit(jobs, batch_started=batch_started).result()

    def submit(self, jobs: Sequence[PreparedJob], *, batch_started: float | None = None) -> ScoringBatch:
        """Plan the batch and queue its first pack on the device; `result()` of the returned batch queues the
        others, waits and collects. Errors of planning and of the first pack's queuing raise here, the rest (CUDA
        out of memory outside the graphs, errors the device reports) from `result()`."""
        started = time.perf_counter()
        packs = self.plan_packs(jobs)
        first = self.launch_pack(jobs, packs[0]) if packs else None
        return ScoringBatch(self, jobs, packs, first, started, batch_started or started)
