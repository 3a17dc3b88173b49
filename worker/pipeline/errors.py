"""Three kinds of failure, decided where the error is raised (never by matching messages later).

- permanent: the message itself is bad; retrying cannot help. Reject it now (`PermanentError`, and the engine's
  `InvalidJobError`).
- transient: the world is briefly bad (broker unavailable, produce timeout, CUDA out of memory). Retry with
  exponential backoff and jitter; after RERANK_MAX_ATTEMPTS reject it with the attempt count.
- fatal: the process is misconfigured or broken (bad credentials, missing model or topic, a device that fails every
  job). Stop with one clear log line (`Fatal`, `FatalError`); what was not committed is redelivered.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Literal

import tenacity
from kafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError, RecordListTooLargeError

from worker.engine.api import InvalidJobError
from worker.settings import Settings

log = logging.getLogger(__name__)

Category = Literal["permanent", "transient"]


class PermanentError(Exception):
    """A job that can never be answered as sent. `reason` is the dead-letter slug, `stage` where it was found."""

    def __init__(self, reason: str, message: str, *, stage: str = "validate") -> None:
        super().__init__(message)
        self.reason = reason
        self.stage = stage


class FatalError(Exception):
    """The process cannot go on as configured: the message is the one line logged before exiting non-zero."""


class Fatal:
    """The first fatal error of a run, set from any thread; every stage stops taking work once it is set."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.message: str | None = None

    def fail(self, message: str) -> None:
        with self._lock:
            if self.message is not None:
                return
            self.message = message
        log.critical("%s", message)
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to `timeout_s`, cut short by a fatal error (a backoff's sleep)."""
        return self._event.wait(timeout_s)


def out_of_memory_types() -> tuple[type[BaseException], ...]:
    """torch.cuda.OutOfMemoryError when torch is loaded; the pipeline never imports torch itself."""
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return (oom,) if isinstance(oom, type) else ()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, out_of_memory_types())


def is_too_large(error: BaseException) -> bool:
    return isinstance(error, MessageSizeTooLargeError | RecordListTooLargeError)


def is_transient(error: BaseException) -> bool:
    """Worth another try after a pause: retriable Kafka errors (timeouts included) and CUDA out of memory."""
    if is_out_of_memory(error):
        return True
    if isinstance(error, KafkaTimeoutError):
        return True
    return isinstance(error, KafkaError) and bool(getattr(error, "retriable", False))


def transient_retries(
    settings: Settings,
    *,
    sleep: Callable[[float], None],
    before_sleep: Callable[[tenacity.RetryCallState], None],
) -> tenacity.Retrying:
    """The one retry policy of transient failures (scoring and publishing): up to RERANK_MAX_ATTEMPTS tries, with
    exponential backoff and full jitter from RERANK_RETRY_INITIAL_MS up to RERANK_RETRY_MAX_MS; anything not
    transient, and the last failure, raise as they are."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(settings.max_attempts),
        wait=tenacity.wait_random_exponential(
            multiplier=settings.retry_initial_ms / 1000, max=settings.retry_max_ms / 1000
        ),
        retry=tenacity.retry_if_exception(is_transient),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


def retry_error(state: tenacity.RetryCallState) -> BaseException | None:
    """The failure a tenacity retry is about to repeat (None if the try raised nothing)."""
    return state.outcome.exception() if state.outcome else None


def reason_of(error: BaseException) -> str:
    """The dead-letter / metrics slug of an error."""
    if isinstance(error, PermanentError | InvalidJobError):
        return error.reason
    if is_out_of_memory(error):
        return "out_of_memory"
    if isinstance(error, KafkaTimeoutError):
        return "produce_timeout"
    if isinstance(error, KafkaError) and getattr(error, "retriable", False):
        return "broker_unavailable"
    if isinstance(error, KafkaError):
        return "publish_rejected"
    return "scoring_error"


def error_class(error: BaseException) -> str:
    """Fully qualified class name, as Spring's `kafka_dlt-exception-fqcn` and Connect's `exception.class.name`."""
    cls = type(error)
    return f"{cls.__module__}.{cls.__qualname__}"


def one_line(error: BaseException, limit: int = 1000) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
