"""Dead letters: the original key and value bytes, unchanged, with headers that say why and where from.

Header names follow Kafka Connect (`__connect.errors.*`) and Spring Kafka (`kafka_dlt-*`) in spirit, under a
`rerank.` prefix; every value is UTF-8 text (numbers in decimal), so `kcat -f '%h'` shows them as they are:

| header | value |
|---|---|
| `rerank.error.reason` | slug, see below |
| `rerank.error.category` | `permanent` (the message is bad) or `transient` (retried RERANK_MAX_ATTEMPTS times) |
| `rerank.error.class` | fully qualified exception class |
| `rerank.error.message` | one line, at most 1000 characters |
| `rerank.error.stage` | `validate`, `prepare`, `score` or `publish` |
| `rerank.original.topic` / `.partition` / `.offset` / `.timestamp` / `.timestamp.type` | where the job was read |
| `rerank.consumer.group` | the worker's consumer group |
| `rerank.attempts` | tries made (1 for permanent errors) |
| `rerank.worker.id` | RERANK_WORKER_ID |
| `rerank.model` | the model name |
| `rerank.original.value.dropped` | only when the value was too large even for the dead-letter topic: its size |
| `rerank.original.headers.dropped` | only when still too large without its value: the original headers dropped |

Reasons. Permanent: `not_utf8`, `not_json`, `schema_violation`, `blank_query`, `too_many_documents`,
`metadata_too_deep`, `unknown_schema_version` (worker.messages.parse_job), `message_too_large`,
`disallowed_reply_topic`, `result_too_large`, `result_not_serializable` (writing the result failed),
`publish_rejected` (the broker refused the result, e.g. not authorized for its reply topic),
`scoring_error` (the job failed alone in the engine), and the engine's own InvalidJobError reasons.
Transient, after RERANK_MAX_ATTEMPTS tries: `out_of_memory`, `broker_unavailable`, `produce_timeout`.

The original record's own headers come first, unchanged (a dead letter replayed and failing again has its old
`rerank.error.*` / `rerank.original.*` headers replaced, not duplicated).
"""

from __future__ import annotations

from dataclasses import replace

from worker.pipeline.records import Failure, Headers, Outgoing, SourceRecord

PREFIX = "rerank."
VALUE_DROPPED = "rerank.original.value.dropped"
HEADERS_DROPPED = "rerank.original.headers.dropped"
# Headers the worker writes on a dead letter: replaced when a job is dead-lettered again, removed when requeued.
REPLACED = (
    "rerank.error.",
    "rerank.original.",
    "rerank.consumer.",
    "rerank.attempts",
    "rerank.worker.",
    "rerank.model",
)


def dead_letter_headers(
    record: SourceRecord, failure: Failure, *, group_id: str, worker_id: str, model: str
) -> Headers:
    kept = [(k, v) for k, v in record.headers if not k.startswith(REPLACED)]
    ours = {
        "rerank.error.reason": failure.reason,
        "rerank.error.category": failure.category,
        "rerank.error.class": failure.error_class,
        "rerank.error.message": failure.message,
        "rerank.error.stage": failure.stage,
        "rerank.original.topic": record.topic,
        "rerank.original.partition": str(record.partition),
        "rerank.original.offset": str(record.offset),
        "rerank.original.timestamp": str(record.timestamp),
        "rerank.original.timestamp.type": str(record.timestamp_type),
        "rerank.consumer.group": group_id,
        "rerank.attempts": str(failure.attempts),
        "rerank.worker.id": worker_id,
        "rerank.model": model,
    }
    return kept + [(k, v.encode("utf-8")) for k, v in ours.items()]


def dead_letter(
    record: SourceRecord, failure: Failure, *, topic: str, group_id: str, worker_id: str, model: str, job_id: str | None
) -> Outgoing:
    """The dead letter of `record`: same key, same value bytes (a tombstone without key gets an empty value, since
    Kafka needs a key or a value)."""
    value = record.value if record.value is not None or record.key is not None else b""
    headers = dead_letter_headers(record, failure, group_id=group_id, worker_id=worker_id, model=model)
    return Outgoing(
        kind="dead_letter",
        record=record,
        topic=topic,
        key=record.key,
        value=value,
        headers=headers,
        job_id=job_id,
        failure=failure,
    )


def smaller_dead_letter(letter: Outgoing) -> Outgoing | None:
    """The next fallback for a dead letter too large for the dead-letter topic itself: first without its value (its
    size kept), then also without the original record's own headers (their count kept; they can be most of it);
    None once both were tried. The header added last says which."""
    names = {k for k, _ in letter.headers}
    if VALUE_DROPPED not in names:
        size = str(len(letter.value or b"")).encode()
        return replace(letter, value=b"", headers=[*letter.headers, (VALUE_DROPPED, size)])
    if HEADERS_DROPPED not in names:
        ours = [(k, v) for k, v in letter.headers if k.startswith(REPLACED)]
        dropped = str(len(letter.headers) - len(ours)).encode()
        return replace(letter, headers=[*ours, (HEADERS_DROPPED, dropped)])
    return None


def header_map(headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...]) -> dict[str, str]:
    """Headers as text (the last value of a repeated name wins): for tests, tools and the client."""
    return {k: v.decode("utf-8", "replace") for k, v in headers}
