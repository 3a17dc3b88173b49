"""Structured logs: one JSON object per line on stderr, carrying job_id and `topic[partition]@offset` when known.

Pass context with `extra=`: `log.info("scored", extra=job_fields(record, job_id))`.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from worker.pipeline.records import SourceRecord

# Attributes every LogRecord has; anything else was passed through `extra=` and goes into the JSON object.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, worker_id: str | None = None) -> None:
        super().__init__()
        self.worker_id = worker_id

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker_id:
            out["worker_id"] = self.worker_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class KafkaChatter(logging.Filter):
    """kafka-python's own lines become debug lines: its reconnects and retries (a dozen lines a second while a broker
    is down, NotCoordinator warnings at every start on a fresh broker) are summed up by the worker's own lines
    (`Kafka ... is not reachable`, `publish failed, trying again`, `rejoining consumer group`)."""

    def __init__(self, show: bool) -> None:
        super().__init__()
        self.show = show

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "kafka" or record.name.startswith("kafka."):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.show
        return True


def configure_logging(level: str = "INFO", worker_id: str | None = None) -> None:
    debug = logging.getLevelName(level) <= logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker_id))
    handler.addFilter(KafkaChatter(show=debug))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(logging.DEBUG if debug else logging.WARNING)


def job_fields(record: SourceRecord, job_id: str | None = None, **more: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"where": record.where, "topic": record.topic, "partition": record.partition}
    fields["offset"] = record.offset
    if job_id is not None:
        fields["job_id"] = job_id
    return {**fields, **more}
