"""A small Prometheus text exposition (format 0.0.4): counters, gauges and histograms, no dependency.

Every metric is thread-safe (one lock per registry); `render()` writes `# HELP`, `# TYPE` and samples in
registration order. Collectors registered with `on_scrape` refresh gauges just before rendering (GPU memory).
"""

from __future__ import annotations

import bisect
import math
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from worker.pipeline.errors import reason_of, retry_error

if TYPE_CHECKING:
    import tenacity

LabelValues = tuple[str, ...]

BATCH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, registry: Registry, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._lock = registry.lock
        registry.add(self)

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}. This is a bug.")
        return tuple(str(labels[n]) for n in self.label_names)

    def samples(self) -> list[str]:
        raise NotImplementedError


class _Scalar(_Metric):
    def __init__(self, registry: Registry, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(registry, name, help_text, labels)
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in sorted(self._values.items())]


class Counter(_Scalar):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up. This is a bug.")
        with self._lock:
            key = self._key(labels)
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Scalar):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[self._key(labels)] = float(value)

    def remove(self, **labels: str) -> None:
        with self._lock:
            self._values.pop(self._key(labels), None)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, registry: Registry, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(registry, name, help_text)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * len(self.buckets)  # per bucket (not cumulative)
        self._overflow = 0
        self._sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            i = bisect.bisect_left(self.buckets, value)
            if i < len(self.buckets):
                self._counts[i] += 1
            else:
                self._overflow += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts) + self._overflow

    def samples(self) -> list[str]:
        lines, running = [], 0
        for bound, n in zip(self.buckets, self._counts, strict=True):
            running += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        total = running + self._overflow
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {total}')
        lines.append(f"{self.name}_sum {_number(self._sum)}")
        lines.append(f"{self.name}_count {total}")
        return lines


class Registry:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._metrics: list[_Metric] = []
        self._collectors: list[Callable[[], None]] = []

    def add(self, metric: _Metric) -> None:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice. This is a bug.")
        self._metrics.append(metric)

    def on_scrape(self, collector: Callable[[], None]) -> None:
        self._collectors.append(collector)

    def render(self) -> str:
        for collect in self._collectors:
            collect()
        out = []
        with self.lock:
            for m in self._metrics:
                out.append(f"# HELP {m.name} {m.help}")
                out.append(f"# TYPE {m.name} {m.kind}")
                out.extend(m.samples())
        return "\n".join(out) + "\n"


class WorkerMetrics:
    """Every metric of the worker, by name."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.jobs = Counter(r, "rerank_jobs_total", "Jobs finished, by outcome (result or dead_letter).", ["outcome"])
        self.documents = Counter(r, "rerank_documents_total", "Documents of the jobs answered with a result.")
        self.dead_letters = Counter(r, "rerank_dead_letters_total", "Dead letters published, by reason.", ["reason"])
        self.retries = Counter(
            r, "rerank_retries_total", "Tries repeated after a transient error, by reason.", ["reason"]
        )
        self.batch_seconds = Histogram(
            r, "rerank_batch_seconds", "Wall time of one scored batch (all its forward passes).", BATCH_SECONDS_BUCKETS
        )
        self.batch_jobs = Gauge(r, "rerank_batch_jobs", "Jobs in the last scored batch.")
        self.pack_fill = Gauge(
            r, "rerank_pack_fill_ratio", "Tokens of the last batch over its passes times RERANK_MAX_BATCH_TOKENS."
        )
        self.tokens = Counter(r, "rerank_tokens_total", "Tokens put through the model.")
        self.tokens_per_second = Gauge(r, "rerank_tokens_per_second", "Model throughput of the last batch.")
        self.lag = Gauge(
            r, "rerank_consumer_lag", "Jobs not yet committed, per assigned partition.", ["topic", "partition"]
        )
        self.assigned = Gauge(r, "rerank_assigned_partitions", "Partitions assigned to this worker.")
        self.rebalances = Counter(r, "rerank_rebalances_total", "Partition assignments received.")
        self.revoked = Counter(
            r, "rerank_partitions_revoked_total", "Partitions taken away by rebalances (a storm shows here)."
        )
        self.rejoins = Counter(
            r,
            "rerank_group_rejoins_total",
            "Times this worker left and rejoined its group after finding itself outside the group's current "
            "generation (see the log line for why).",
        )
        self.idle_with_lag = Gauge(
            r,
            "rerank_idle_with_lag",
            "1 while this worker has held no partitions for longer than a rebalance and jobs wait in its group.",
        )
        self.in_flight = Gauge(r, "rerank_in_flight_jobs", "Jobs polled and not yet acknowledged.")
        self.queued = Gauge(r, "rerank_queued_jobs", "Jobs waiting for the GPU thread.")
        self.paused = Gauge(r, "rerank_consumer_paused", "1 while the consumer pauses its partitions (GPU busy).")
        self.commits = Counter(r, "rerank_commits_total", "Offset commits, by result (ok or failed).", ["result"])
        self.gpu_allocated = Gauge(r, "rerank_gpu_memory_allocated_bytes", "CUDA memory held by tensors.", ["device"])
        self.gpu_reserved = Gauge(r, "rerank_gpu_memory_reserved_bytes", "CUDA memory reserved by torch.", ["device"])
        r.on_scrape(self._collect_gpu_memory)

    def count_retry(self, state: tenacity.RetryCallState) -> None:
        """tenacity's `before_sleep` for the scoring and publishing retries: one more try, counted by the reason of
        the failure that caused it (so the last, unrepeated try is not counted)."""
        error = retry_error(state)
        self.retries.inc(reason=reason_of(error) if error else "unknown")

    def _collect_gpu_memory(self) -> None:
        torch = sys.modules.get("torch")  # loaded by the engine; the loop itself never imports it
        cuda = getattr(torch, "cuda", None)
        if cuda is None or not cuda.is_available() or not cuda.is_initialized():
            return
        for i in range(cuda.device_count()):
            device = f"cuda:{i}"
            self.gpu_allocated.set(cuda.memory_allocated(i), device=device)
            self.gpu_reserved.set(cuda.memory_reserved(i), device=device)

    def render(self) -> str:
        return self.registry.render()
