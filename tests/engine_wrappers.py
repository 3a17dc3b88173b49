"""For tests that wrap the engine to inject failures or delays into the worker's GPU thread."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Any


class ScoresAtResult:
    """`submit` as the thread calls it, for a wrapper that defines `score_prepared`: nothing is queued ahead, the
    batch is scored when its `result()` is called, so the wrapper's failures surface where an engine's queued batch
    raises its own."""

    def submit(self, jobs: Any, *, batch_started: float | None = None) -> Any:
        score_prepared = self.score_prepared  # type: ignore[attr-defined]
        return SimpleNamespace(result=partial(score_prepared, jobs, batch_started=batch_started), fully_queued=True)
