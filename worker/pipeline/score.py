"""Stage score (the GPU thread): batches from the batcher scored by the engine, results handed to the outbox.

One batch ahead: the thread queues the next batch on the device (`Engine.submit`) before it waits for the one
already there, so the device goes from one batch to the next without waiting for the host to collect, publish and
launch in between. It takes only jobs already waiting for that (no RERANK_BATCH_WAIT_MS), and with none it waits for
the batch in flight at once: its results are never held back. Not for a batch of several packs (the engine queues
those one ahead itself while its result is taken, so its packs run in order and before the next batch's), and not
on CPU, where the forward runs inside `submit`. That queued run is each batch's first try.

The one scoring-failure policy of the worker and the replay, per batch:
- CUDA out of memory (transient): tried again with half the pack budget (smaller packs), with backoff and jitter, up
  to RERANK_MAX_ATTEMPTS; then every job of the batch is rejected with the attempt count.
- InvalidJobError from the engine (permanent): the batch is split to find the job, which is rejected.
- anything else (a bug, or a broken device): the batch is split and each job scored alone; a job that fails alone
  is rejected as `scoring_error`, so one poison job never stops the thread. When FATAL_AFTER_FAILED_JOBS jobs in a
  row fail alone, the device is broken, not the jobs: the run stops (nothing of theirs was committed, so they are
  redelivered).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from worker.engine.api import Engine, InvalidJobError, JobScores, PassStats, PreparedJob, QueuedBatch
from worker.pipeline.batch import Batcher
from worker.pipeline.errors import Fatal, is_out_of_memory, is_transient, one_line, transient_retries
from worker.pipeline.logs import job_fields
from worker.pipeline.metrics import WorkerMetrics
from worker.pipeline.records import Failure, WorkItem
from worker.pipeline.sink import Outbox
from worker.settings import Settings

log = logging.getLogger(__name__)

FATAL_AFTER_FAILED_JOBS = 3


@dataclass(frozen=True)
class InFlight:
    """A batch queued on the device, or the error queuing it raised (raised again where its result is taken)."""

    batch: list[WorkItem]
    started: float
    queued: QueuedBatch | None
    error: Exception | None = None

    @property
    def fully_queued(self) -> bool:
        return self.queued is None or self.queued.fully_queued

    @property
    def num_packs(self) -> int:
        return self.queued.num_packs if self.queued is not None else 0

    @property
    def passes(self) -> Sequence[PassStats]:
        return self.queued.passes if self.queued is not None else ()

    def result(self) -> list[JobScores]:
        if self.queued is None:
            raise self.error or RuntimeError("a batch neither queued nor failed. This is a bug.")
        return self.queued.result()


class Scorer(threading.Thread):
    def __init__(
        self,
        engine: Engine,
        batcher: Batcher,
        outbox: Outbox,
        settings: Settings,
        metrics: WorkerMetrics,
        fatal: Fatal,
    ) -> None:
        super().__init__(name="rerank-gpu", daemon=True)
        self.engine = engine
        self.batcher = batcher
        self.outbox = outbox
        self.settings = settings
        self.metrics = metrics
        self.fatal = fatal
        # set: finish the batches in hand (the one being scored, and one already queued behind it), start no other
        self.stopping = batcher.stopping
        self.busy = threading.Event()  # set while a batch is queued on the device or being scored
        # When the thread last showed it was not stuck: each idle turn (at least every 0.1 s), each batch taken and
        # each batch scored. Read by the consumer thread for liveness (Pipeline.stalled).
        self.progress_at = time.monotonic()
        self._abandoned: list[WorkItem] = []  # queued when a fatal error stopped the thread
        self._failed_alone = 0

    # -- the thread -----------------------------------------------------------------------------------------------

    def run(self) -> None:
        # One batch ahead only where queuing returns before the device is done (CUDA): on CPU the forward runs
        # inside `submit`, so queuing the next batch first would only delay this one's results.
        ahead = self.engine.info.device.startswith("cuda")
        in_flight: InFlight | None = None
        try:
            while not self.fatal.is_set():
                self.progress_at = time.monotonic()
                if in_flight is None:
                    if self.stopping.is_set():
                        return
                    batch = self.batcher.gather()
                    self.progress_at = time.monotonic()
                    in_flight = self.submit(batch) if batch else None
                    continue
                self.busy.set()
                queued = None
                if ahead and in_flight.fully_queued and not self.stopping.is_set():
                    # only jobs already waiting: gathering must not hold back the results of the batch in flight
                    batch = self.batcher.gather(first_wait_s=0.0, fill_wait_s=0.0)
                    queued = self.submit(batch) if batch else None
                self.score_batch(in_flight.batch, in_flight)
                in_flight = queued
                if in_flight is None:
                    self.busy.clear()
        except Exception as e:  # a bug: stop (nothing of the batch was committed) rather than hang
            log.exception("the GPU thread crashed")
            self.fatal.fail(f"the GPU thread crashed: {one_line(e)}. This is a bug.")
        finally:
            self.busy.clear()
            if in_flight is not None:  # after a fatal error or a crash: never scored or committed, so redelivered
                self._abandoned = in_flight.batch

    def drain(self) -> list[WorkItem]:
        """After a stop: the jobs that were queued but never scored (they will be redelivered)."""
        left, self._abandoned = self._abandoned, []
        return [*left, *self.batcher.drain()]

    # -- scoring --------------------------------------------------------------------------------------------------

    def submit(self, batch: list[WorkItem]) -> InFlight:
        """Queue the batch on the device; an error here is kept for `score_batch` (the batch's first try)."""
        started = time.perf_counter()
        now = time.monotonic()
        for item in batch:
            self.metrics.queue_wait.observe(now - item.polled_at)
        try:
            return InFlight(batch, started, self.engine.submit(_prepared(batch)))
        except Exception as e:
            return InFlight(batch, started, None, e)

    def score_batch(self, batch: list[WorkItem], queued: InFlight | None = None) -> None:
        """Score every job of the batch and hand each on (result or rejection); `queued`: its first try."""
        started = queued.started if queued is not None else time.perf_counter()
        try:
            engine, passes, scored = self._score_with_retries(batch, queued)
        except InvalidJobError as e:
            if len(batch) == 1:
                self._reject(batch[0], Failure.of(e, stage="score"))
                return
            self._split(batch)
            return
        except Exception as e:
            if is_transient(e):  # out of memory on every try
                for item in batch:
                    self._reject(item, Failure.of(e, stage="score", attempts=self.settings.max_attempts))
                return
            if len(batch) > 1:
                log.warning("batch of %d jobs failed (%s); scoring them one by one", len(batch), one_line(e))
                self._split(batch)
                return
            self._failed_alone += 1
            log.error("job failed alone: %s", one_line(e), extra=job_fields(batch[0].record, batch[0].job.job_id))
            self._reject(batch[0], Failure.of(e, stage="score"))
            if self._failed_alone >= FATAL_AFTER_FAILED_JOBS:
                self.fatal.fail(
                    f"{self._failed_alone} jobs in a row failed to score; the device or model is broken: {e}"
                )
            return
        self._failed_alone = 0
        self._record_batch(engine, batch, passes, scored, time.perf_counter() - started)
        for item, job_scores in zip(batch, scored, strict=True):
            self.outbox.result(item, job_scores, engine.info)

    def _reject(self, item: WorkItem, failure: Failure) -> None:
        self.outbox.reject(item.record, failure, item.job.job_id)

    def _split(self, batch: Sequence[WorkItem]) -> None:
        for item in batch:
            if self.fatal.is_set():  # the rest is not committed: the next owner scores it
                return
            self.score_batch([item])

    def _score_with_retries(
        self, batch: Sequence[WorkItem], queued: InFlight | None = None
    ) -> tuple[Engine, Sequence[PassStats], list[JobScores]]:
        """The engine that scored the batch (a smaller-budget one after CUDA ran out of memory), its forward passes,
        and the scores."""
        engine = self.engine
        tokens = engine.info.max_pack_tokens
        retrying = transient_retries(self.settings, sleep=self._sleep, before_sleep=self.metrics.count_retry)
        for attempt in retrying:
            with attempt:
                try:
                    if queued is not None:  # the first try, queued on the device ahead of time
                        first, queued = queued, None
                        scored = first.result()
                        return engine, first.passes, scored
                    again = engine.submit(_prepared(batch))
                    scored = again.result()
                    return engine, again.passes, scored
                except Exception as e:
                    if is_out_of_memory(e):
                        tokens //= 2
                        engine = self.engine.with_max_pack_tokens(tokens) or engine
                        log.warning(
                            "CUDA out of memory on a batch of %d jobs (try %d); next try with %d tokens per pack",
                            len(batch),
                            attempt.retry_state.attempt_number,
                            engine.info.max_pack_tokens,
                        )
                    raise
        raise RuntimeError("tenacity returned without a result. This is a bug.")

    def _sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)  # a stop cuts the backoff short; the try after it still runs once

    def _record_batch(
        self,
        engine: Engine,
        batch: Sequence[WorkItem],
        passes: Sequence[PassStats],
        scored: Sequence[JobScores],
        seconds: float,
    ) -> None:
        for item in batch:
            if item.prepared is not None:
                self.metrics.tokenize_seconds.observe(item.prepared.tokenize_ms / 1000)
        self.metrics.scored_batch(
            passes,
            [js.stats.input_docs for js in scored],
            tokens=sum(js.stats.tokens for js in scored),
            seconds=seconds,
            max_pack_tokens=engine.info.max_pack_tokens,
        )


def _prepared(batch: Sequence[WorkItem]) -> list[PreparedJob]:
    prepared = [item.prepared for item in batch if item.prepared is not None]
    if len(prepared) != len(batch):
        raise RuntimeError("a job reached the GPU thread untokenized. This is a bug.")
    return prepared
