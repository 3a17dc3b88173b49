"""Reaching the cluster at start: tried again with backoff while it is unreachable, fatal at once when no retry helps.

The worker runs `reach` in the main thread twice: before the model loads (a misconfiguration then costs no load, and
a broker that is down is waited for while `/healthz` answers alive and `/readyz` not ready), and when it opens its
clients after the load (the broker may have gone away meanwhile). Each waits up to RERANK_KAFKA_STARTUP_TIMEOUT_S, so
a rolling broker restart does not turn into a crash loop of workers that each pay their model load again.

Unreachable (tried again): no broker answers, a connection or request times out, a topic's metadata is not there
yet. Not unreachable (exit at once): authentication or authorization refused, a TLS handshake that fails, a broker
too old for a request, a topic that does not exist where the broker creates none; the FatalError says which.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from kafka import errors as kafka_errors

from worker.pipeline.errors import FatalError, one_line
from worker.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 15.0

_NEVER_RETRIED: tuple[type[BaseException], ...] = (
    ssl.SSLError,
    kafka_errors.AuthorizationError,
    kafka_errors.SaslAuthenticationFailedError,
    kafka_errors.UnsupportedVersionError,
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.IllegalSaslStateError,
)


class StopRequested(Exception):  # noqa: N818 (a request, not an error)
    """A stop was asked for while the cluster was being waited for."""


def causes(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from or during, outermost first."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def unreachable(error: BaseException) -> bool:
    """Whether waiting may help: the cluster did not answer, rather than answered no. A FatalError raised from
    nothing is a decision already made (a topic that does not exist), never waited on."""
    if isinstance(error, FatalError) and error.__cause__ is None:
        return False
    chain = causes(error)
    if any(isinstance(e, _NEVER_RETRIED) for e in chain):
        return False
    for e in chain:
        if isinstance(e, kafka_errors.KafkaError) and (
            getattr(e, "retriable", False)
            or isinstance(e, kafka_errors.KafkaConnectionError | kafka_errors.KafkaTimeoutError)
        ):
            return True
        if isinstance(e, ConnectionError | TimeoutError | OSError):
            return True
    return "bootstrap" in str(error).lower()  # kafka-python's "Unable to bootstrap from [...]" on older releases


def reach(
    settings: Settings,
    step: Callable[[], T],
    *,
    what: str,
    stopping: threading.Event,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`step()`'s value, calling it again while it fails because the cluster is unreachable, with backoff (1 s,
    doubling to 15 s, jittered), for up to RERANK_KAFKA_STARTUP_TIMEOUT_S. FatalError (one line, naming `what`)
    when it fails otherwise or time runs out; StopRequested when `stopping` is set meanwhile."""
    timeout_s = settings.kafka_startup_timeout_s
    deadline = clock() + timeout_s
    delay = FIRST_DELAY_S
    attempt = 0
    while True:
        attempt += 1
        try:
            return step()
        except Exception as e:
            if not unreachable(e):
                if isinstance(e, FatalError):
                    raise
                raise FatalError(f"{what}: {one_line(e)}") from e
            left = deadline - clock()
            if left <= 0:
                raise FatalError(
                    f"{what}: Kafka at {settings.bootstrap_servers} unreachable for {timeout_s:g} s "
                    f"(RERANK_KAFKA_STARTUP_TIMEOUT_S): {one_line(e)}"
                ) from e
            wait = min(left, delay * random.uniform(0.8, 1.2))
            log.warning(
                "Kafka at %s is not reachable (%s): trying again in %.0f s (attempt %d; giving up in %.0f s)",
                settings.bootstrap_servers,
                one_line(e),
                wait,
                attempt,
                left,
            )
            if stopping.wait(wait):
                raise StopRequested from e
            delay = min(delay * 2, MAX_DELAY_S)
