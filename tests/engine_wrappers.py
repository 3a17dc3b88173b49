"""For tests that wrap the engine to inject failures or delays into the pipeline's GPU thread."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Any


class ScoresAtResult:
    """`submit` as the GPU thread calls it, for a wrapper of an engine (`self.inner`) that defines `score_prepared`:
    nothing is queued ahead, the batch is scored when its `result()` is called, so the wrapper's failures surface
    where an engine's queued batch raises its own. The pack count is the inner engine's plan."""

    def submit(self, jobs: Any, *, batch_started: float | None = None) -> Any:
        score_prepared = self.score_prepared  # type: ignore[attr-defined]
        num_packs = len(self.inner.plan_packs(jobs))  # type: ignore[attr-defined]
        return SimpleNamespace(
            result=partial(score_prepared, jobs, batch_started=batch_started),
            fully_queued=True,
            num_packs=num_packs,
            passes=[],
        )
