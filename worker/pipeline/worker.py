"""`rerank-worker run`: the pipeline with the worker's ends, in the main thread until SIGTERM or SIGINT.

Starts, in order: the health server (`/healthz`, `/readyz`, `/metrics`); a check that the cluster answers and the
jobs, results and dead-letter topics exist (before the model loads, so a misconfiguration costs no load); the model,
when the worker was given a function that loads it; the producer and the consumer in the workers' group. The check
and the clients wait for an unreachable cluster up to RERANK_KAFKA_STARTUP_TIMEOUT_S each (worker.kafka.startup),
alive and not ready meanwhile. Then it runs a `Pipeline` of a `GroupSource` (subscribed to RERANK_JOBS_TOPIC) and a
`WorkerSink` (results, dead letters). Signal handlers only set the stop flag; a second Ctrl+C exits at once, and
should closing hang (an unreachable coordinator), a watchdog exits shortly after RERANK_SHUTDOWN_TIMEOUT_S. Closing
the consumer leaves the group.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from types import FrameType
from typing import Any

from kafka import KafkaConsumer

from worker.engine.api import Engine
from worker.kafka.config import compression, consumer_kwargs
from worker.kafka.groups import GroupAdmin
from worker.kafka.startup import StopRequested, reach
from worker.kafka.topics import TopicCatalog, open_producer, require_topics
from worker.pipeline.consume import GroupSource, GroupWatch
from worker.pipeline.errors import Fatal, FatalError, one_line
from worker.pipeline.http import HealthServer
from worker.pipeline.metrics import WorkerMetrics
from worker.pipeline.parse import Parser
from worker.pipeline.runner import EXIT_FATAL, EXIT_OK, Pipeline
from worker.pipeline.sink import WorkerSink
from worker.settings import Settings

log = logging.getLogger(__name__)

STUCK_AFTER_S = 30.0  # /healthz fails when the loop has not turned for this long


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """`engine`: a loaded engine, or `load`: a function that loads one, called once the cluster has answered."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        *,
        load: Callable[[], Engine] | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        if (engine is None) == (load is None):
            raise TypeError("give the Worker an engine or a function that loads one")
        self.settings = settings
        self._engine = engine
        self._load = load
        self.worker_id = settings.worker_id or default_worker_id()
        self.metrics = metrics or WorkerMetrics()
        self.metrics.ready.set_function(lambda: float(self.ready()))
        self.fatal_error = Fatal()
        self.stopping = threading.Event()
        self.started = threading.Event()  # set once partitions are assigned (tests wait on it)
        self.pipeline: Pipeline | None = None
        self.http_port: int | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the engine is not loaded yet")
        return self._engine

    @property
    def fatal(self) -> str | None:
        return self.fatal_error.message

    def stop(self) -> None:
        """Ask for a clean shutdown (what SIGTERM does)."""
        self.stopping.set()
        if self.pipeline is not None:
            self.pipeline.stop()

    def run(self, *, install_signals: bool = False) -> int:
        """Run until stopped; returns the exit code. Signal handlers need the main thread (the CLI)."""
        previous = self._install_signals() if install_signals else {}
        try:
            with ExitStack() as stack:
                try:
                    self.serve_health(stack)
                    self.check_cluster()
                    if self._engine is None and self._load is not None:
                        started = time.perf_counter()
                        self._engine = self._load()
                        self.metrics.model_load_seconds.set(time.perf_counter() - started)
                    self.metrics.describe_engine(self.engine.info)
                    pipeline, clients = reach(
                        self.settings, self.open, what="opening the Kafka clients", stopping=self.stopping
                    )
                    stack.enter_context(clients)
                    self.pipeline = pipeline
                except FatalError as e:
                    self.fatal_error.fail(str(e))
                    return EXIT_FATAL
                except StopRequested:
                    log.info("stopped while waiting for Kafka")
                    return EXIT_OK
                if self.stopping.is_set():
                    self.pipeline.stop()
                log.info(
                    "worker started",
                    extra={
                        "worker_id": self.worker_id,
                        "group_id": self.settings.group_id,
                        "jobs_topic": self.settings.jobs_topic,
                        "model": self.engine.info.model,
                        "http_port": self.http_port,
                    },
                )
                return self.pipeline.run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def serve_health(self, stack: ExitStack) -> None:
        s = self.settings
        try:
            server = HealthServer(
                s.http_host, s.http_port, alive=self.alive, ready=self.ready, metrics=self.metrics.exposition
            )
        except OSError as e:
            raise FatalError(
                f"cannot serve /healthz, /readyz and /metrics on {s.http_host}:{s.http_port} "
                f"(RERANK_HTTP_HOST, RERANK_HTTP_PORT): {one_line(e)}"
            ) from None
        stack.callback(server.close)
        self.http_port = server.start().port

    def check_cluster(self) -> None:
        """The cluster answers and the worker's topics exist, or FatalError; waits while it is unreachable."""
        s = self.settings
        try:
            compression(s)
        except ValueError as e:
            raise FatalError(str(e)) from None
        reach(
            s,
            lambda: require_topics(s, self.topics, client_id=f"{self.worker_id}-check"),
            what="checking the Kafka cluster",
            stopping=self.stopping,
        )

    @property
    def topics(self) -> tuple[str, str, str]:
        s = self.settings
        return (s.jobs_topic, s.results_topic, s.dlq_topic)

    def open(self) -> tuple[Pipeline, ExitStack]:
        """The pipeline, and the stack that closes its clients; on failure nothing is left open."""
        s = self.settings
        with ExitStack() as stack:
            transactional_id = f"{s.group_id}.{self.worker_id}" if s.delivery == "exactly_once" else None
            producer = open_producer(s, client_id=f"{self.worker_id}-producer", transactional_id=transactional_id)
            stack.callback(self._close_producer, producer)
            require_topics(s, self.topics, client_id=f"{self.worker_id}-producer")
            consumer = KafkaConsumer(**consumer_kwargs(s, client_id=f"{self.worker_id}-consumer", group_id=s.group_id))
            stack.callback(self._close_consumer, consumer)
            pipeline = self._pipeline_of(stack, producer, consumer)
            return pipeline, stack.pop_all()

    def _pipeline_of(self, stack: ExitStack, producer: Any, consumer: Any) -> Pipeline:
        s = self.settings
        admin = GroupAdmin(s, s.group_id, client_id=f"{self.worker_id}-group-watch")
        stack.callback(admin.close)
        watch = GroupWatch(
            consumer,
            s.jobs_topic,
            admin,
            # long enough for a rebalance that needs nothing from a slow member, and for a session to lapse
            settle_s=max(5.0, 3 * s.heartbeat_interval_ms / 1000),
            idle_after_s=max(10.0, s.session_timeout_ms / 1000),
        )
        catalog = TopicCatalog(s, client_id=f"{self.worker_id}-topics")
        stack.callback(catalog.close)
        pipeline = Pipeline(
            s,
            self.engine,
            GroupSource(consumer, s.jobs_topic, self.fatal_error, watch=watch, metrics=self.metrics),
            WorkerSink(s, worker_id=self.worker_id, model=self.engine.info.model),
            producer,
            parser=Parser(
                max_message_bytes=s.max_message_bytes,
                max_docs=s.max_docs,
                reply_topics=s.reply_topic_pattern(),
                topic_exists=catalog.exists,
            ),
            metrics=self.metrics,
            fatal=self.fatal_error,
            started=self.started,
            transactional=s.delivery == "exactly_once",
        )
        return pipeline

    # -- health ---------------------------------------------------------------------------------------------------

    def alive(self) -> bool:
        """False once a fatal error happened, the consumer loop has not turned for STUCK_AFTER_S, or the GPU thread
        has not finished a batch for RERANK_STALL_TIMEOUT_S (the log says which)."""
        if self.fatal_error.is_set():
            return False
        pipeline = self.pipeline
        if pipeline is None:
            return True
        return time.monotonic() - pipeline.last_turn < STUCK_AFTER_S and pipeline.stall is None

    def ready(self) -> bool:
        return self.pipeline is not None and self.pipeline.ready()

    # -- signals and closing --------------------------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self.stopping.is_set() and signum == signal.SIGINT:
                os._exit(130)  # a second Ctrl+C: out now
            log.info("signal %s: shutting down", signal.Signals(signum).name)
            self.stop()
            self._arm_watchdog()

        return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _arm_watchdog(self) -> None:
        """Should closing hang (an unreachable coordinator), exit anyway shortly after the shutdown timeout."""

        def expire() -> None:
            timeout = self.settings.shutdown_timeout_s
            log.error("shutdown took longer than RERANK_SHUTDOWN_TIMEOUT_S=%s; exiting", timeout)
            logging.shutdown()
            os._exit(1)

        timer = threading.Timer(self.settings.shutdown_timeout_s + 2, expire)
        timer.daemon = True
        timer.start()

    def _close_consumer(self, consumer: Any) -> None:
        timeout_ms = int(min(5.0, self.settings.shutdown_timeout_s / 4) * 1000)
        try:
            consumer.close(autocommit=False, timeout_ms=timeout_ms)  # leaves the group
        except Exception as e:
            log.warning("closing the consumer failed: %s", one_line(e))

    def _close_producer(self, producer: Any) -> None:
        try:
            producer.close(timeout=min(5.0, self.settings.shutdown_timeout_s / 4))
        except Exception as e:
            log.warning("closing the producer failed: %s", one_line(e))
