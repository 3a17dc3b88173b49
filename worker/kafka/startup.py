"""Reaching the cluster at start: tried again with backoff while it is unreachable, fatal at once when no retry helps.

The worker runs `reach` in the main thread twice: before the model loads (a misconfiguration then costs no load, and
a broker that is down is waited for while `/healthz` answers alive and `/readyz` not ready), and when it opens its
clients after the load (the broker may have gone away meanwhile). Each waits up to RERANK_KAFKA_STARTUP_TIMEOUT_S, so
a rolling broker restart does not turn into a crash loop of workers that each pay their model load again.

Unreachable (tried again): no broker answers, a connection or request times out, a topic's metadata is not there
yet. Not unreachable (exit at once): authentication or authorization refused, a TLS handshake that fails, a broker
too old for a request, a topic that does not exist where the broker creates none; the FatalError says which.

kafka-python reports every failed bootstrap as the same timeout ("Unable to bootstrap from ..."), and says why only
in its log: `Refusals` reads those lines while a step runs and names the refusal in one line a user can act on
(wrong credentials, an untrusted broker certificate, a client certificate refused, a port that speaks another
protocol). The CLI's Kafka commands use it too.
"""

from __future__ import annotations

import logging
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


# What kafka-python's connection errors mean, as a user reads it: (pattern in its log line, meaning).
_REFUSALS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"SaslAuthenticationFailed|[Aa]uthentication failed"),
        "authentication failed: check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SASL_MECHANISM",
    ),
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"),
        "the broker's TLS certificate is not trusted: KAFKA_SSL_CAFILE must name the CA that signed it",
    ),
    (
        re.compile(r"BAD_CERTIFICATE|CERTIFICATE_REQUIRED|certificate required|bad certificate"),
        "the broker refused the client's TLS certificate (or its absence): check KAFKA_SSL_CERTFILE and "
        "KAFKA_SSL_KEYFILE",
    ),
    (
        re.compile(r"Invalid frame length|WRONG_VERSION_NUMBER|wrong version number|UNEXPECTED_MESSAGE"),
        "the broker's port speaks another protocol than KAFKA_SECURITY_PROTOCOL (TLS read as plaintext, or the "
        "reverse)",
    ),
    (
        re.compile(r"UnsupportedSaslMechanism|IllegalSaslState"),
        "the broker does not offer KAFKA_SASL_MECHANISM on this listener",
    ),
)


_SPEAKS_TLS = "the broker's port speaks TLS but KAFKA_SECURITY_PROTOCOL={protocol} does not (use SSL or SASL_SSL)"


def speaks_tls(bootstrap_servers: str, timeout_s: float = 3.0) -> bool:
    """Whether the first bootstrap server completes a TLS handshake (trusting any certificate: a question about the
    protocol, not about trust)."""
    first = next((s.strip() for s in bootstrap_servers.split(",") if s.strip()), "")
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        return False
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host.strip("[]")),
        ):
            return True
    except (OSError, ValueError):
        return False


class Refusals(logging.Handler):
    """Remembers the last refusal kafka-python logged (see the module doc); `refusal` is None when it logged none."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.refusal: str | None = None

    def explain(self, settings: Settings) -> str | None:
        """The refusal, or, when none was logged and the client speaks plaintext, whether the port speaks TLS (a TLS
        listener may just close a plaintext connection, and kafka-python then logs only a disconnect)."""
        plaintext = not settings.security_protocol.endswith("SSL")
        if self.refusal is None and plaintext and speaks_tls(settings.bootstrap_servers):
            self.refusal = _SPEAKS_TLS.format(protocol=settings.security_protocol)
        return self.refusal

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            return
        for pattern, meaning in _REFUSALS:
            if pattern.search(text):
                self.refusal = meaning
                return


@contextmanager
def watching_refusals() -> Iterator[Refusals]:
    """Refusals of kafka-python's connections while the block runs. Its log lines also stop reaching stderr through
    Python's last-resort handler where nothing else handles them (the CLI's Kafka commands)."""
    refusals = Refusals()
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(refusals)
    try:
        yield refusals
    finally:
        kafka_log.removeHandler(refusals)


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
            with watching_refusals() as refusals:
                return step()
        except Exception as e:
            if refusals.explain(settings) is not None:
                raise FatalError(f"{what}: {refusals.refusal} ({settings.bootstrap_servers})") from e
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
