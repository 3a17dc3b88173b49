"""The GPU thread: gather prepared jobs into a batch under a token budget, score it, hand results on.

Batching: the first job waits as long as it must; after it, jobs join until their estimated tokens would pass
RERANK_BATCH_MAX_PACKS passes of RERANK_MAX_BATCH_TOKENS (the job that would overflow is held for the next batch)
or RERANK_BATCH_WAIT_MS passes. The engine then packs the batch's documents across jobs into passes.
Tokenizing happens in the consumer thread, so the next batch is prepared while this one runs on the GPU.

One batch ahead: the thread queues the next batch on the device (`engine.submit`) before it waits for the one
already there, so the device goes from one batch to the next without waiting for the host to collect, publish
and launch in between. It takes only jobs already waiting for that (no `RERANK_BATCH_WAIT_MS`), and with none it
waits for the batch in flight at once: its results are never held back. Not for a batch of several packs (the
engine queues them one ahead while its result is taken: its packs run in order and before the next batch's), and
not on CPU, where the forward runs inside `submit`.
That queued run is each batch's first try; any error in it sends the batch down the path below.

Errors, per batch:
- CUDA out of memory (transient): tried again with half the token budget per pass (smaller packs), with backoff
  and jitter, up to RERANK_MAX_ATTEMPTS; then every job of the batch is dead-lettered with the attempt count.
- InvalidJobError from the engine (permanent): the batch is split to find the job, which is dead-lettered.
- anything else (a bug, or a broken device): the batch is split and each job scored alone; a job that fails
  alone is dead-lettered as `scoring_error`, so one poison job never stops the worker. When
  FATAL_AFTER_FAILED_JOBS jobs in a row fail alone, the device is broken, not the jobs: the worker exits
  (nothing of theirs was committed, so they are redelivered).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import tenacity

from worker.engine import InvalidJobError, JobScores
from worker.engine.plan import PreparedJob
from worker.kafka.deadletter import failure_from
from worker.kafka.errors import PermanentError, error_class, is_out_of_memory, is_transient, one_line
from worker.kafka.logs import job_fields
from worker.kafka.metrics import WorkerMetrics
from worker.kafka.records import Engine, Failure, Outgoing, Submitted, WorkItem, encode_result
from worker.messages import RerankResult
from worker.settings import Settings

log = logging.getLogger(__name__)

FATAL_AFTER_FAILED_JOBS = 3


def engine_with_budget(engine: Engine, max_batch_tokens: int) -> Engine | None:
    """The same model and tokenizer under a smaller pass budget, or None when it cannot hold one prompt.

    Builds a sibling RerankEngine from the engine's public parts (its constructor, `tokenizer`, `scorer`), as the
    test fixtures do; a fake engine without them simply keeps its budget.
    """
    from worker.engine import RerankEngine

    if not isinstance(engine, RerankEngine):
        return None
    try:
        return RerankEngine(
            engine.tokenizer,
            engine.scorer,
            model_name=engine.model_name,
            max_batch_tokens=max_batch_tokens,
            default_instruction=engine.default_instruction,
        )
    except ValueError:
        return None


@dataclass(frozen=True)
class InFlight:
    """A batch queued on the device, or the error queuing it raised (raised again where its result is taken)."""

    batch: list[WorkItem]
    started: float
    submitted: Submitted | None
    error: Exception | None = None

    @property
    def fully_queued(self) -> bool:
        return self.submitted is None or self.submitted.fully_queued

    def result(self) -> list[JobScores]:
        if self.submitted is None:
            raise self.error or RuntimeError("a batch neither queued nor failed. This is a bug.")
        return self.submitted.result()


class Scorer(threading.Thread):
    def __init__(
        self,
        engine: Engine,
        work: queue.Queue[WorkItem],
        publish: Callable[[Outgoing], None],
        dead_letter: Callable[[WorkItem, Failure], None],
        settings: Settings,
        metrics: WorkerMetrics,
        *,
        worker_id: str,
        on_fatal: Callable[[str], None],
        owned: Callable[[WorkItem], bool] = lambda item: True,
        on_skipped: Callable[[WorkItem], None] = lambda item: None,
        shrink: Callable[[Engine, int], Engine | None] = engine_with_budget,
    ) -> None:
        super().__init__(name="rerank-gpu", daemon=True)
        self.engine = engine
        self.work = work
        self.publish = publish
        self.dead_letter = dead_letter
        self.settings = settings
        self.metrics = metrics
        self.worker_id = worker_id
        self.on_fatal = on_fatal
        # Jobs of revoked partitions (or of an earlier assignment of a partition that came back) are skipped and
        # reported to `on_skipped`: the partition's owner reads them again.
        self.owned = owned
        self.on_skipped = on_skipped
        self.shrink = shrink
        # finish the batches in hand (the one being scored, and one already queued behind it on the device)
        self.stop_event = threading.Event()
        self.busy = threading.Event()  # set while a batch is queued on the device or being scored
        self._carry: WorkItem | None = None
        self._abandoned: list[WorkItem] = []  # queued when a fatal error stopped the thread
        self._failed_alone = 0
        self._fatal = False
        self.budget_tokens = engine.info.max_batch_tokens * settings.batch_max_packs

    # -- the thread -----------------------------------------------------------------------------------------------

    def run(self) -> None:
        # One batch ahead only where queuing returns before the device is done (CUDA): on CPU the forward runs
        # inside `submit`, so queuing the next batch first would only delay this one's results.
        ahead = self.engine.info.device.startswith("cuda")
        in_flight: InFlight | None = None
        try:
            while not self._fatal:
                if in_flight is None:
                    if self.stop_event.is_set():
                        return
                    batch = self.gather()
                    in_flight = self.submit(batch) if batch else None
                    continue
                self.busy.set()
                queued = None
                if ahead and in_flight.fully_queued and not self.stop_event.is_set():
                    # only jobs already waiting: gathering must not hold back the results of the batch in flight
                    batch = self.gather(first_wait_s=0.0, fill_wait_s=0.0)
                    queued = self.submit(batch) if batch else None
                self.score_batch(in_flight.batch, in_flight)
                in_flight = queued
                if in_flight is None:
                    self.busy.clear()
        except Exception as e:  # a bug: exit (nothing of the batch was committed) rather than hang
            log.exception("the GPU thread crashed")
            self._fail(f"the GPU thread crashed: {one_line(e)}. This is a bug.")
        finally:
            self.busy.clear()
            if in_flight is not None:  # after a fatal error or a crash: never scored or committed, so redelivered
                self._abandoned = in_flight.batch

    def _fail(self, message: str) -> None:
        self._fatal = True  # score nothing more: what is left is not committed and will be redelivered
        self.on_fatal(message)

    def gather(self, first_wait_s: float = 0.1, fill_wait_s: float | None = None) -> list[WorkItem]:
        """Jobs for one batch: the first waits up to `first_wait_s` (briefly, to notice a stop), the rest until
        the token budget or `fill_wait_s` (RERANK_BATCH_WAIT_MS unless given)."""
        first = self._carry if self._carry is not None and self._still_owned(self._carry) else None
        self._carry = None
        first = first or self._get(first_wait_s)
        if first is None:
            return []
        batch, tokens = [first], first.tokens
        fill_s = self.settings.batch_wait_ms / 1000 if fill_wait_s is None else fill_wait_s
        deadline = time.monotonic() + fill_s
        while tokens < self.budget_tokens and not self.stop_event.is_set():
            item = self._get(max(0.0, deadline - time.monotonic()))
            if item is None:
                break
            if tokens + item.tokens > self.budget_tokens:
                self._carry = item  # pushed back: it opens the next batch
                break
            batch.append(item)
            tokens += item.tokens
        return batch

    def _get(self, timeout_s: float) -> WorkItem | None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                left = deadline - time.monotonic()
                item = self.work.get(timeout=left) if left > 0 else self.work.get_nowait()
            except queue.Empty:
                return None
            if self._still_owned(item):
                return item

    def _still_owned(self, item: WorkItem) -> bool:
        if self.owned(item):
            return True
        self.on_skipped(item)
        return False

    def drain(self) -> list[WorkItem]:
        """After a stop: the jobs that were queued but never scored (they will be redelivered)."""
        left = [*self._abandoned, *([self._carry] if self._carry else [])]
        self._abandoned, self._carry = [], None
        while (item := self._get(0)) is not None:
            left.append(item)
        return left

    # -- scoring --------------------------------------------------------------------------------------------------

    def submit(self, batch: list[WorkItem]) -> InFlight:
        """Queue the batch on the device; an error here is kept for `score_batch` (the batch's first try)."""
        started = time.perf_counter()
        try:
            return InFlight(batch, started, self.engine.submit(self._prepared(batch)))
        except Exception as e:
            return InFlight(batch, started, None, e)

    def score_batch(self, batch: list[WorkItem], queued: InFlight | None = None) -> None:
        """Score, publish or dead-letter every job of the batch; `queued` is its first try, already submitted."""
        started = queued.started if queued is not None else time.perf_counter()
        try:
            engine, scored = self._score_with_retries(batch, queued)
        except InvalidJobError as e:
            if len(batch) == 1:
                self.dead_letter(batch[0], failure_from(e, stage="score", attempts=1))
                return
            self._split(batch)
            return
        except Exception as e:
            if is_transient(e):  # out of memory on every try: dead-letter with the attempt count
                for item in batch:
                    self.dead_letter(item, failure_from(e, stage="score", attempts=self.settings.max_attempts))
                return
            if len(batch) > 1:
                log.warning("batch of %d jobs failed (%s); scoring them one by one", len(batch), one_line(e))
                self._split(batch)
                return
            self._failed_alone += 1
            log.error("job failed alone: %s", one_line(e), extra=job_fields(batch[0].record, batch[0].job.job_id))
            self.dead_letter(batch[0], failure_from(e, stage="score", attempts=1))
            if self._failed_alone >= FATAL_AFTER_FAILED_JOBS:
                self._fail(f"{self._failed_alone} jobs in a row failed to score; the device or model is broken: {e}")
            return
        self._failed_alone = 0
        self._record_batch(engine, batch, scored, time.perf_counter() - started)
        for item, job_scores in zip(batch, scored, strict=True):
            self.publish_result(engine, item, job_scores)

    def _split(self, batch: Sequence[WorkItem]) -> None:
        for item in batch:
            if self._fatal:  # the rest is not committed: the next owner scores it
                return
            self.score_batch([item])

    @staticmethod
    def _prepared(batch: Sequence[WorkItem]) -> list[PreparedJob]:
        prepared = [item.prepared for item in batch if item.prepared is not None]
        if len(prepared) != len(batch):
            raise RuntimeError("a job reached the GPU thread unprepared. This is a bug.")
        return prepared

    def _score_with_retries(
        self, batch: Sequence[WorkItem], queued: InFlight | None = None
    ) -> tuple[Engine, list[JobScores]]:
        engine = self.engine
        tokens = engine.info.max_batch_tokens
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.settings.max_attempts),
            wait=tenacity.wait_random_exponential(
                multiplier=self.settings.retry_initial_ms / 1000, max=self.settings.retry_max_ms / 1000
            ),
            retry=tenacity.retry_if_exception(is_transient),
            sleep=self._sleep,
            before_sleep=self.metrics.count_retry,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                try:
                    if queued is not None:  # the first try, queued on the device ahead of time
                        first, queued = queued, None
                        return engine, first.result()
                    return engine, engine.score_prepared(self._prepared(batch))
                except Exception as e:
                    if is_out_of_memory(e):
                        tokens //= 2
                        smaller = self.shrink(self.engine, tokens)
                        engine = smaller or engine
                        log.warning(
                            "CUDA out of memory on a batch of %d jobs (try %d); next try with %d tokens per pass",
                            len(batch),
                            attempt.retry_state.attempt_number,
                            engine.info.max_batch_tokens,
                        )
                    raise
        raise RuntimeError("tenacity returned without a result. This is a bug.")

    def _sleep(self, seconds: float) -> None:
        self.stop_event.wait(seconds)  # a stop cuts the backoff short; the try after it still runs once

    def _record_batch(self, engine: Engine, batch: Sequence[WorkItem], scored: Sequence[JobScores], s: float) -> None:
        tokens = sum(js.stats.tokens for js in scored)
        inference_s = max((js.stats.inference_ms for js in scored), default=0.0) / 1000
        self.metrics.batch_seconds.observe(s)
        self.metrics.batch_jobs.set(len(batch))
        self.metrics.tokens.inc(tokens)
        if inference_s > 0:
            self.metrics.tokens_per_second.set(tokens / inference_s)
        plan = getattr(engine, "plan_packs", None)
        if plan is not None and tokens:
            packs = len(plan([item.prepared for item in batch]))
            self.metrics.pack_fill.set(tokens / (packs * engine.info.max_batch_tokens) if packs else 0.0)

    def publish_result(self, engine: Engine, item: WorkItem, scored: JobScores) -> None:
        job = item.job
        try:
            value = encode_result(
                lambda: RerankResult.from_scores(job, scored, engine.info),
                max_message_bytes=self.settings.max_message_bytes,
            )
        except PermanentError as e:
            failure = failure_from(e, stage="publish")
            if e.__cause__ is not None:  # the error that made the result unwritable, as the dead letter's class
                failure = replace(failure, error_class=error_class(e.__cause__))
            self.dead_letter(item, failure)
            return
        record = item.record
        headers = [
            ("rerank.correlation.id", record.correlation_id(job.job_id).encode()),
            ("rerank.source.topic", record.topic.encode()),
            ("rerank.source.partition", str(record.partition).encode()),
            ("rerank.source.offset", str(record.offset).encode()),
            ("rerank.worker.id", self.worker_id.encode()),
            ("rerank.model", engine.info.model.encode()),
            ("content-type", b"application/json"),
        ]
        self.publish(
            Outgoing(
                kind="result",
                record=record,
                topic=job.reply_topic or self.settings.results_topic,
                key=job.job_id.encode(),
                value=value,
                headers=headers,
                job_id=job.job_id,
                documents=len(job.documents),
            )
        )
