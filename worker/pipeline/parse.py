"""Stage parse (consumer thread): a record's bytes become a `RerankJob`, or the reason it can never be one.

Checks, in order: the size (`message_too_large`), the wire format (`worker.messages.parse_job`: `not_utf8`,
`not_json`, `schema_violation`, `blank_query`, `too_many_documents`, `metadata_too_deep`, `unknown_schema_version`),
then, where the pipeline answers on the job's own `reply_topic`, the allowlist (`disallowed_reply_topic`) and that
the topic exists (`unknown_reply_topic`, asked of the cluster with a short bound and cached: worker.kafka.topics).
Hands a parsed job on to tokenize; a rejection goes to the sink (dead letter or skip) at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from worker.messages import RerankJob, parse_job
from worker.pipeline.errors import PermanentError
from worker.pipeline.records import SourceRecord


class Parser:
    """`reply_topics`: the pattern (whole-name match) a job's `reply_topic` must match, or None where the job's
    `reply_topic` is not used (a replay answers on a topic of its own); `topic_exists`: whether a topic exists
    (None: the cluster could not say, and the job goes on), or None not to ask."""

    def __init__(
        self,
        *,
        max_message_bytes: int,
        max_docs: int,
        reply_topics: re.Pattern[str] | None,
        topic_exists: Callable[[str], bool | None] | None = None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_docs = max_docs
        self.reply_topics = reply_topics
        self.topic_exists = topic_exists

    def parse(self, record: SourceRecord) -> RerankJob:
        """The job `record` carries; PermanentError or InvalidJobError saying why it can never be one."""
        size = len(record.value or b"")
        if size > self.max_message_bytes:
            raise PermanentError(
                "message_too_large", f"job of {size} bytes exceeds RERANK_MAX_MESSAGE_BYTES={self.max_message_bytes}"
            )
        return parse_job(record.value or b"", max_docs=self.max_docs)

    def check(self, job: RerankJob) -> None:
        """PermanentError when a parsed job asks for what this pipeline refuses (a reply topic off the allowlist)."""
        if self.reply_topics is None or job.reply_topic is None:
            return
        if not self.reply_topics.fullmatch(job.reply_topic):
            raise PermanentError(
                "disallowed_reply_topic",
                f"reply_topic {job.reply_topic!r} does not match RERANK_REPLY_TOPIC_ALLOWLIST "
                f"{self.reply_topics.pattern!r}",
            )
        if self.topic_exists is not None and self.topic_exists(job.reply_topic) is False:
            raise PermanentError(
                "unknown_reply_topic",
                f"reply_topic {job.reply_topic!r} does not exist (the worker does not create reply topics): create "
                "it, then requeue the job",
            )
