"""worker.kafka.startup: which failures are waited for, how long, and what ends the wait."""

from __future__ import annotations

import ssl
import threading

import pytest
from kafka import errors as kafka_errors

from worker.kafka.startup import StopRequested, reach, unreachable
from worker.pipeline.errors import FatalError
from worker.settings import Settings


def raised_from(cause: BaseException) -> FatalError:
    try:
        raise FatalError("cannot start the Kafka producer") from cause
    except FatalError as e:
        return e


@pytest.mark.parametrize(
    ("error", "waited"),
    [
        (kafka_errors.KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9)]"), True),
        (kafka_errors.KafkaTimeoutError("Failed to update metadata after 5.0 secs."), True),
        (ConnectionRefusedError(111, "Connection refused"), True),
        (raised_from(kafka_errors.KafkaConnectionError("Unable to bootstrap")), True),
        (kafka_errors.SaslAuthenticationFailedError("Authentication failed"), False),
        (kafka_errors.TopicAuthorizationFailedError(), False),
        (raised_from(ssl.SSLCertVerificationError("certificate verify failed")), False),
        (FatalError("topic 'jobs' does not exist"), False),
        (ValueError("not a Kafka problem"), False),
    ],
)
def test_only_a_cluster_that_does_not_answer_is_waited_for(error: BaseException, waited: bool) -> None:
    assert unreachable(error) is waited


class Steps:
    """A step that fails with `errors` in turn, then returns 'open'; and a clock that the waits move on."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.now = 0.0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "open"

    def clock(self) -> float:
        return self.now


class Waits(threading.Event):
    """`stopping` whose wait moves the clock instead of sleeping."""

    def __init__(self, steps: Steps, *, stop_after: int | None = None) -> None:
        super().__init__()
        self.steps = steps
        self.seconds: list[float] = []
        self.stop_after = stop_after

    def wait(self, timeout: float | None = None) -> bool:
        self.seconds.append(timeout or 0.0)
        self.steps.now += timeout or 0.0
        return self.stop_after is not None and len(self.seconds) >= self.stop_after


def down() -> kafka_errors.KafkaConnectionError:
    return kafka_errors.KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9)]")


def test_an_unreachable_cluster_is_tried_again_with_growing_waits(caplog: pytest.LogCaptureFixture) -> None:
    steps = Steps(*[down() for _ in range(6)])
    waits = Waits(steps)
    settings = Settings(kafka_startup_timeout_s=300)
    assert reach(settings, steps, what="checking", stopping=waits, clock=steps.clock) == "open"
    assert steps.calls == 7
    assert len(waits.seconds) == 6
    for n, seconds in enumerate(waits.seconds):  # 1, 2, 4, 8, 15, 15 s, each jittered by up to 20%
        assert 0.8 * min(2**n, 15) <= seconds <= 1.2 * min(2**n, 15)
    lines = [r for r in caplog.records if "is not reachable" in r.getMessage()]
    assert len(lines) == 6  # one line per attempt


def test_the_wait_ends_with_one_fatal_error_at_the_timeout() -> None:
    steps = Steps(*[down() for _ in range(100)])
    waits = Waits(steps)
    with pytest.raises(FatalError, match=r"unreachable for 30 s \(RERANK_KAFKA_STARTUP_TIMEOUT_S\)"):
        reach(Settings(kafka_startup_timeout_s=30), steps, what="checking", stopping=waits, clock=steps.clock)
    assert steps.now == pytest.approx(30)
    assert steps.calls < 10


def test_a_refusal_ends_it_at_once_and_a_stop_ends_the_wait() -> None:
    steps = Steps(kafka_errors.SaslAuthenticationFailedError("Authentication failed for user rerank"))
    with pytest.raises(FatalError, match=r"checking: .*Authentication failed"):
        reach(Settings(), steps, what="checking", stopping=Waits(steps), clock=steps.clock)
    assert steps.calls == 1

    steps = Steps(down(), down(), down())
    with pytest.raises(StopRequested):
        reach(Settings(), steps, what="checking", stopping=Waits(steps, stop_after=2), clock=steps.clock)
    assert steps.calls == 2


@pytest.mark.parametrize(
    ("line", "meaning"),
    [  # lines kafka-python 3.0 logged against the test broker's secured listeners
        (
            "Bootstrap connection to bootstrap-0 failed: [Error 58] SaslAuthenticationFailedError: "
            "Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
            "authentication failed",
        ),
        (
            "Connection failed: KafkaConnectionError: Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate "
            "verify failed: unable to get local issuer certificate (_ssl.c:1006)",
            "certificate is not trusted",
        ),
        (
            "Bootstrap connection to bootstrap-0 failed: KafkaConnectionError: [SSL: SSLV3_ALERT_BAD_CERTIFICATE] "
            "sslv3 alert bad certificate (_ssl.c:2580) (backoff 0.32 secs)",
            "refused the client's TLS certificate",
        ),
        (
            "<KafkaConnection node_id=bootstrap-0 broker_version=unknown (disconnected)>: Connection lost: "
            "InvalidReceiveError: Invalid frame length: 352518912",
            "speaks another protocol",
        ),
    ],
)
def test_kafka_pythons_log_lines_name_the_refusal(line: str, meaning: str) -> None:
    import logging

    from worker.kafka.startup import watching_refusals

    with watching_refusals() as refusals:
        logging.getLogger("kafka.net.manager").error(line)
    assert refusals.refusal is not None
    assert meaning in refusals.refusal
    with watching_refusals() as quiet:
        logging.getLogger("kafka.net.manager").warning("Bootstrap connection to bootstrap-0 failed: 111 ECONNREFUSED")
    assert quiet.refusal is None  # a broker that is down is not a refusal: it is waited for
