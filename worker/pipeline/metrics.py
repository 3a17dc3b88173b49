"""The worker's Prometheus metrics (prometheus_client): every name, help text and bucket layout in one place.

Each `WorkerMetrics` has its own registry (a worker, a replay and the tests each build one), which also carries
prometheus_client's process, platform and garbage-collector collectors. `exposition` renders it in the format the
scraper asks for: OpenMetrics when its Accept header offers it, else the Prometheus text format 0.0.4.

Updated from several threads (prometheus_client's metrics are thread-safe): the consumer thread (lag, assignment,
pauses, commits, queue wait), the tokenizer (tokenize time), the GPU thread (passes, batches, retries) and the
producer's callbacks or the consumer thread (publish time, job latency, outcomes). GPU memory is read at scrape time.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from worker.pipeline.errors import reason_of, retry_error

if TYPE_CHECKING:
    import tenacity

    from worker.engine.api import EngineInfo, PassStats

# Seconds from a job's record timestamp to its answer's acknowledgement: milliseconds on a warm GPU worker, up to
# many minutes when a backlog drains.
JOB_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKENIZE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
# One pass of a full 32k-token pack is tens of milliseconds on an H100 and seconds on a CPU.
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DOCUMENT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 400, 600, 800, 1000, 2000)
BATCH_JOB_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FILL_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

OUTCOMES = ("result", "dead_letter")


def package_version() -> str:
    try:
        return version("rerank-worker")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class _GpuMemory:
    """CUDA memory per device, read at scrape time; nothing on a worker that has not started CUDA."""

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")  # loaded by the engine; the loop itself never imports it
        cuda = getattr(torch, "cuda", None)
        if cuda is None or not cuda.is_available() or not cuda.is_initialized():
            return
        allocated = GaugeMetricFamily(
            "rerank_gpu_memory_allocated_bytes", "CUDA memory held by tensors.", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "rerank_gpu_memory_reserved_bytes", "CUDA memory reserved by torch's caching allocator.", labels=["device"]
        )
        for i in range(cuda.device_count()):
            allocated.add_metric([f"cuda:{i}"], cuda.memory_allocated(i))
            reserved.add_metric([f"cuda:{i}"], cuda.memory_reserved(i))
        yield allocated
        yield reserved

    def describe(self) -> list[Metric]:
        return []  # labelled by device at scrape time; nothing to check at registration


class WorkerMetrics:
    """Every metric of the worker, by name, on a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(_GpuMemory())
        # -- outcomes
        self.jobs = Counter(
            "rerank_jobs_total", "Jobs finished (their answer acknowledged), by outcome.", ["outcome"], registry=r
        )
        self.documents = Counter("rerank_documents_total", "Documents of the jobs answered with a result.", registry=r)
        self.dead_letters = Counter(
            "rerank_dead_letters_total", "Dead letters published, by reason.", ["reason"], registry=r
        )
        self.retries = Counter(
            "rerank_retries_total", "Tries repeated after a transient error, by reason.", ["reason"], registry=r
        )
        self.job_latency = Histogram(
            "rerank_job_latency_seconds",
            "From a job's record timestamp to its answer's acknowledgement (exactly-once: its transaction's commit), "
            "by outcome.",
            ["outcome"],
            buckets=JOB_LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_seconds = Histogram(
            "rerank_publish_seconds",
            "From sending a result or dead letter to the broker's acknowledgement.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        # -- stages
        self.queue_wait = Histogram(
            "rerank_queue_wait_seconds",
            "From a job's poll to the start of the batch that scores it.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "rerank_tokenize_seconds", "Tokenizing one job.", buckets=TOKENIZE_BUCKETS, registry=r
        )
        self.job_documents = Histogram(
            "rerank_job_documents", "Documents per scored job, as sent.", buckets=DOCUMENT_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "rerank_batch_seconds",
            "Wall time of one scored batch (all its forward passes).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_jobs = Histogram(
            "rerank_batch_jobs", "Jobs per scored batch.", buckets=BATCH_JOB_BUCKETS, registry=r
        )
        self.pass_seconds = Histogram(
            "rerank_gpu_seconds",
            "One forward pass (one pack): its device time on CUDA, the host's time elsewhere.",
            buckets=PASS_BUCKETS,
            registry=r,
        )
        self.pass_fill = Histogram(
            "rerank_pass_fill_ratio",
            "Tokens of one forward pass's pack over RERANK_MAX_PACK_TOKENS.",
            buckets=FILL_BUCKETS,
            registry=r,
        )
        self.pack_fill = Gauge(
            "rerank_pack_fill_ratio",
            "Tokens of the last batch over its passes times RERANK_MAX_PACK_TOKENS (rerank_pass_fill_ratio: all).",
            registry=r,
        )
        self.tokens = Counter("rerank_tokens_total", "Tokens put through the model.", registry=r)
        self.tokens_per_second = Gauge("rerank_tokens_per_second", "Model throughput of the last batch.", registry=r)
        # -- the consumer and its group
        self.lag = Gauge(
            "rerank_consumer_lag", "Jobs not yet committed, per assigned partition.", ["topic", "partition"], registry=r
        )
        self.assigned = Gauge("rerank_assigned_partitions", "Partitions assigned to this worker.", registry=r)
        self.rebalances = Counter("rerank_rebalances_total", "Partition assignments received.", registry=r)
        self.revoked = Counter(
            "rerank_partitions_revoked_total", "Partitions taken away by rebalances (a storm shows here).", registry=r
        )
        self.rejoins = Counter(
            "rerank_group_rejoins_total",
            "Times this worker left and rejoined its group after finding itself outside the group's current "
            "generation (see the log line for why).",
            registry=r,
        )
        self.idle_with_lag = Gauge(
            "rerank_idle_with_lag",
            "1 while this worker has held no partitions for longer than a rebalance and jobs wait in its group.",
            registry=r,
        )
        self.in_flight = Gauge("rerank_in_flight_jobs", "Jobs polled and not yet acknowledged.", registry=r)
        self.queued = Gauge("rerank_queued_jobs", "Jobs waiting for the GPU thread.", registry=r)
        self.paused = Gauge(
            "rerank_consumer_paused", "1 while the consumer pauses its partitions (GPU busy).", registry=r
        )
        self.commits = Counter(
            "rerank_commits_total", "Offset commits (exactly-once: transactions), by result.", ["result"], registry=r
        )
        self.ready = Gauge(
            "rerank_ready", "1 while /readyz answers 200: model loaded and partitions assigned.", registry=r
        )
        # -- the model
        self.model_load_seconds = Gauge(
            "rerank_model_load_seconds",
            "Seconds from the start of the model's load to the engine warm (compiled, CUDA graphs captured).",
            registry=r,
        )
        self.build_info = Gauge(
            "rerank_build_info",
            "1, labelled with the worker's version and its engine (set once the model is loaded).",
            ["version", "model", "dtype", "attention", "device"],
            registry=r,
        )
        # Series that alerts and dashboards divide by or take rates of exist from the start, at zero.
        for outcome in OUTCOMES:
            self.jobs.labels(outcome=outcome)
            self.job_latency.labels(outcome=outcome)
        for result in ("ok", "failed"):
            self.commits.labels(result=result)

    # -- what the stages report -----------------------------------------------------------------------------------

    def count_retry(self, state: tenacity.RetryCallState) -> None:
        """tenacity's `before_sleep` for the scoring and publishing retries: one more try, counted by the reason of
        the failure that caused it (so the last, unrepeated try is not counted)."""
        error = retry_error(state)
        self.retries.labels(reason=reason_of(error) if error else "unknown").inc()

    def answered(
        self, outcome: str, record_timestamp_ms: int, *, reason: str | None = None, documents: int = 0
    ) -> None:
        """A job's result or dead letter was acknowledged (`record_timestamp_ms`: its Kafka record's, -1 unknown)."""
        self.jobs.labels(outcome=outcome).inc()
        if outcome == "result":
            self.documents.inc(documents)
        elif reason is not None:
            self.dead_letters.labels(reason=reason).inc()
        if record_timestamp_ms >= 0:
            # Producers' clocks may run ahead of ours: a negative latency is clock skew, counted as none.
            self.job_latency.labels(outcome=outcome).observe(max(0.0, time.time() - record_timestamp_ms / 1000))

    def scored_batch(
        self, passes: Sequence[PassStats], documents: Sequence[int], tokens: int, seconds: float, max_pack_tokens: int
    ) -> None:
        """A batch scored: its passes, each job's document count, its tokens and wall time."""
        self.batch_seconds.observe(seconds)
        self.batch_jobs.observe(len(documents))
        for n in documents:
            self.job_documents.observe(n)
        self.tokens.inc(tokens)
        for p in passes:
            self.pass_seconds.observe(p.seconds)
            self.pass_fill.observe(p.tokens / max_pack_tokens)
        busy = sum(p.seconds for p in passes)
        if busy > 0:
            self.tokens_per_second.set(tokens / busy)
        if passes:
            self.pack_fill.set(sum(p.tokens for p in passes) / (len(passes) * max_pack_tokens))

    def describe_engine(self, info: EngineInfo) -> None:
        self.build_info.labels(
            version=package_version(), model=info.model, dtype=info.dtype, attention=info.attention, device=info.device
        ).set(1)

    def forget_partition(self, topic: str, partition: int) -> None:
        """A revoked partition's lag is another worker's to report."""
        with contextlib.suppress(KeyError):  # never reported
            self.lag.remove(topic, str(partition))

    # -- reading --------------------------------------------------------------------------------------------------

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one sample (`rerank_jobs_total`, outcome="result"); 0 when it does not exist yet."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The body and content type of a scrape: OpenMetrics if `accept` (the Accept header) asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
