"""Stage batch (GPU thread): tokenized jobs from the work queue gathered into one batch under a token budget.

The one batching policy of the worker and the replay: the first job waits as long as it must; after it, jobs join
until their tokens (`WorkItem.tokens`, the engine's count) would pass RERANK_BATCH_MAX_PACKS packs of
RERANK_MAX_PACK_TOKENS, or RERANK_BATCH_WAIT_MS passes. The job that would overflow is pushed back: it opens the next
batch. The engine then packs the batch's documents across jobs.

A job whose partition is no longer this consumer's (revoked, or assigned again since it was polled) is never
batched: it is given back to the consumer thread, and the partition's owner reads it again.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from worker.pipeline.records import WorkItem


class Batcher:
    def __init__(
        self,
        work: queue.Queue[WorkItem],
        *,
        budget_tokens: int,
        wait_ms: int,
        owns: Callable[[WorkItem], bool],
        give_back: Callable[[WorkItem], None],
        stopping: threading.Event,
    ) -> None:
        self.work = work
        self.budget_tokens = budget_tokens
        self.wait_s = wait_ms / 1000
        self.owns = owns
        self.give_back = give_back
        self.stopping = stopping  # stop gathering: the batch in hand is all there is
        self.carry: WorkItem | None = None  # pushed back by the budget: it opens the next batch

    def gather(self, first_wait_s: float = 0.1, fill_wait_s: float | None = None) -> list[WorkItem]:
        """Jobs for one batch: the first waits up to `first_wait_s` (briefly, to notice a stop), the rest until the
        token budget or `fill_wait_s` (RERANK_BATCH_WAIT_MS unless given)."""
        first = self.carry if self.carry is not None and self._still_owned(self.carry) else None
        self.carry = None
        first = first or self._get(first_wait_s)
        if first is None:
            return []
        batch, tokens = [first], first.tokens
        deadline = time.monotonic() + (self.wait_s if fill_wait_s is None else fill_wait_s)
        while tokens < self.budget_tokens and not self.stopping.is_set():
            item = self._get(max(0.0, deadline - time.monotonic()))
            if item is None:
                break
            if tokens + item.tokens > self.budget_tokens:
                self.carry = item
                break
            batch.append(item)
            tokens += item.tokens
        return batch

    def drain(self) -> list[WorkItem]:
        """After a stop: the jobs queued and never batched (they are redelivered)."""
        left = [self.carry] if self.carry is not None else []
        self.carry = None
        while (item := self._get(0)) is not None:
            left.append(item)
        return left

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
        if self.owns(item):
            return True
        self.give_back(item)
        return False
