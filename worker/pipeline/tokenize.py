"""Stage tokenize (consumer thread): parsed jobs wait in a backlog and are tokenized (`Engine.prepare`: blank
documents dropped, duplicates folded, exact token ids) right before they enter the bounded work queue of the GPU
thread, so the next batch is tokenized while the GPU runs the current one.

While jobs wait in the backlog because the work queue is full, the source is paused (`blocked`): the consumer keeps
polling, so the group sees a live member however long a batch takes, and nothing more is fetched. A job the engine
refuses (an instruction over RERANK_MAX_QUERY_TOKENS) is handed back as a rejection.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Collection

from kafka.structs import TopicPartition

from worker.engine.api import Engine, InvalidJobError
from worker.pipeline.records import Failure, WorkItem

FEED_SLICE_S = 0.5  # at most this long tokenizing before the consumer thread polls again


class Tokenizer:
    def __init__(self, engine: Engine, work: queue.Queue[WorkItem], *, slice_s: float = FEED_SLICE_S) -> None:
        self.engine = engine
        self.work = work
        self.slice_s = slice_s
        self.backlog: deque[WorkItem] = deque()  # parsed, not yet tokenized

    def add(self, item: WorkItem) -> None:
        self.backlog.append(item)

    def feed(self) -> list[tuple[WorkItem, Failure]]:
        """Tokenize backlog jobs into the work queue while it has room (for one time slice); returns the jobs the
        engine refused, with why."""
        rejected = []
        until = time.monotonic() + self.slice_s
        while self.backlog and not self.work.full() and time.monotonic() < until:
            item = self.backlog.popleft()
            try:
                item.prepared = self.engine.prepare(item.job.to_score_request())
            except InvalidJobError as e:
                rejected.append((item, Failure.of(e, stage="prepare")))
                continue
            self.work.put_nowait(item)
        return rejected

    @property
    def blocked(self) -> bool:
        """Jobs are waiting for room in the work queue: fetch nothing more."""
        return bool(self.backlog) or self.work.full()

    @property
    def waiting(self) -> int:
        return len(self.backlog) + self.work.qsize()

    def give_up(self, partitions: Collection[TopicPartition]) -> list[WorkItem]:
        """Take the jobs of `partitions` that the GPU thread has not started out of the backlog, and list those in
        the work queue (the GPU thread skips them when it gets there): a snapshot under the queue's lock, since it
        may be taking one now."""
        given_up = [item for item in self.backlog if item.record.tp in partitions]
        self.backlog = deque(item for item in self.backlog if item.record.tp not in partitions)
        with self.work.mutex:
            given_up += [item for item in self.work.queue if item.record.tp in partitions]
        return given_up

    def clear_backlog(self) -> int:
        """Drop every job not yet tokenized (at shutdown: they are redelivered); returns how many."""
        dropped = len(self.backlog)
        self.backlog.clear()
        return dropped
