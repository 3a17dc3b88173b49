"""Three kinds of failure, decided where the error is raised (never by matching messages later).

- permanent: the message itself is bad; retrying cannot help. Dead-letter it now (`PermanentError`, and the
  engine's `InvalidJobError`).
- transient: the world is briefly bad (broker unavailable, produce timeout, CUDA out of memory). Retry with
  exponential backoff and jitter; after RERANK_MAX_ATTEMPTS dead-letter it with the attempt count.
- fatal: the worker is misconfigured or broken (bad credentials, missing model or topic). Exit non-zero with one
  clear log line; what was not committed is redelivered to the next worker.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Literal

from kafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError, RecordListTooLargeError

from worker.engine import InvalidJobError

if TYPE_CHECKING:
    import tenacity

Category = Literal["permanent", "transient"]


class PermanentError(Exception):
    """A job that can never be answered as sent. `reason` is the dead-letter slug, `stage` where it was found."""

    def __init__(self, reason: str, message: str, *, stage: str = "validate") -> None:
        super().__init__(message)
        self.reason = reason
        self.stage = stage


class FatalError(Exception):
    """The worker cannot run as configured: the message is the one line logged before exiting non-zero."""


def out_of_memory_types() -> tuple[type[BaseException], ...]:
    """torch.cuda.OutOfMemoryError when torch is loaded; the loop never imports torch itself."""
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
