"""Wire models: what producers send (RerankJob) and what the worker publishes (RerankResult).

One flat pydantic class per message, constraints in the types, a description on each field, unknown fields
rejected (a typo such as `top_k` fails the job loudly instead of being ignored). JSON Schemas are generated from
these classes into `schemas/` (`python -m worker.messages schemas/`); a test fails when the files drift.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from worker.engine.api import EngineInfo, InvalidJobError, JobScores, ScoreRequest

SchemaVersion = Literal[1]
SCHEMA_VERSION: SchemaVersion = 1
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


# orjson reads JSON nested up to 1,024 levels but pydantic and orjson write only ~255: a job whose metadata were
# deeper would parse, then fail as its result is written. Refused up front, far below either limit.
MAX_METADATA_DEPTH = 64


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON: 0 for a scalar, 1 for a flat object or array (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in children)
    return deepest


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Document(_Wire):
    """A document with an identifier of the caller's, echoed back in the result."""

    id: str | int | None = Field(None, description="Caller's identifier, returned as `id` in the result.")
    text: str | None = Field(description="The document text. Null or blank: not scored (`relevance_score: null`).")


class RerankJob(_Wire):
    """One query and the documents to rank against it."""

    model_config = ConfigDict(title="RerankJob")

    schema_version: SchemaVersion = Field(SCHEMA_VERSION, description="Version of this message format.")
    job_id: str = Field(min_length=1, max_length=512, description="Caller's identifier; the result's key.")
    query: str = Field(description="The search query. Must not be blank.")
    documents: list[str | Document | None] = Field(
        description="Texts or `{id, text}` objects, at most RERANK_MAX_DOCS. Null or blank entries are kept in "
        "place and get `relevance_score: null`. An empty list gets a result with no `results`, not a dead letter.",
    )
    instruction: str | None = Field(
        None, description="Task instruction; default RERANK_INSTRUCTION, else the official Qwen3-Reranker one."
    )
    top_n: Annotated[int, Field(ge=1)] | None = Field(None, description="Return only the best `top_n` results.")
    return_documents: bool = Field(False, description="Include each document's text in the results.")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Caller's data, copied unchanged into the result; nested at most {MAX_METADATA_DEPTH} levels.",
    )
    reply_topic: Annotated[str, Field(pattern=r"^[a-zA-Z0-9._-]{1,249}$")] | None = Field(
        None,
        description="Topic for this job's result instead of RERANK_RESULTS_TOPIC; honoured only when it matches "
        "RERANK_REPLY_TOPIC_ALLOWLIST, else the job is dead-lettered as `disallowed_reply_topic`; a topic that does "
        "not exist is dead-lettered as `unknown_reply_topic`.",
    )

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("query must not be blank")
        return query

    @field_validator("metadata")
    @classmethod
    def _metadata_not_too_deep(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        depth = json_depth(metadata)
        if depth > MAX_METADATA_DEPTH:
            raise ValueError(f"metadata is nested {depth} levels deep, more than {MAX_METADATA_DEPTH}")
        return metadata

    @field_validator("documents")
    @classmethod
    def _at_most_max_docs(cls, documents: list[Any], info: ValidationInfo) -> list[Any]:
        max_docs = (info.context or {}).get("max_docs")
        if max_docs is not None and len(documents) > max_docs:
            raise ValueError(f"{len(documents)} documents, more than RERANK_MAX_DOCS={max_docs}")
        return documents

    def document_texts(self) -> list[str | None]:
        return [d.text if isinstance(d, Document) else d for d in self.documents]

    def to_score_request(self) -> ScoreRequest:
        return ScoreRequest(query=self.query, documents=self.document_texts(), instruction=self.instruction)


class RankedDocument(_Wire):
    index: int = Field(ge=0, description="Position of the document in the job's `documents`.")
    id: str | int | None = Field(None, description="The document's `id`, when the job gave one.")
    relevance_score: float | None = Field(description="P(yes) from the reranker, in (0, 1); null for a blank document.")
    document: str | None = Field(None, description="The document text, when the job asked `return_documents`.")

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for optional in ("id", "document"):
            if data.get(optional) is None:
                data.pop(optional, None)
        return data


class RerankMeta(_Wire):
    """How the job was scored: its documents, the packs it rode in, the model and timings."""

    input_docs: int = Field(description="Documents in the job.")
    usable_docs: int = Field(description="Documents that were not null or blank.")
    unique_docs: int = Field(description="Distinct documents scored (identical token ids are scored once).")
    dedup_ratio: float = Field(description="1 - unique_docs / usable_docs.")
    truncated_docs: int = Field(description="Documents cut to RERANK_MAX_DOC_TOKENS.")
    query_truncated: bool = Field(description="Whether the query was cut to RERANK_MAX_QUERY_TOKENS.")
    tokens: int = Field(description="Tokens this job put through the model (head copies, documents, suffixes).")
    packs: int = Field(
        description="Packs (one packed sequence, one forward pass each) that carried this job's documents."
    )
    longest_pack_tokens: int = Field(description="Length of the longest of those packs, in tokens (all jobs in it).")
    mean_pack_tokens: float = Field(description="Mean length of those packs, in tokens.")
    max_pack_tokens: int = Field(description="Token budget of one pack (RERANK_MAX_PACK_TOKENS).")
    max_doc_tokens: int = Field(description="RERANK_MAX_DOC_TOKENS in force.")
    tokenize_ms: float = Field(description="Time spent tokenizing this job.")
    inference_ms: float = Field(description="Time of the forward passes of the batch this job was scored in.")
    elapsed_ms: float = Field(description="Wall time of the whole batch this job was scored in.")
    model: str = Field(description="Model name or path.")
    device: str = Field(description="Device the model ran on, for example `cuda:0` or `cpu`.")
    dtype: str = Field(description="Model dtype, for example `bfloat16`.")
    attention: str = Field(
        description="Attention backend: `triton`, `flash_varlen`, `flex_attention`, `sdpa` or `eager`."
    )
    # Deprecated names of the four fields above ("batch" means the jobs scored together, not a pack): written as
    # well, for one release.
    packed_batches: int = Field(
        description="Deprecated: the same as `packs`; removed in the next release.", deprecated=True
    )
    packed_max_seq_len: int = Field(
        description="Deprecated: the same as `longest_pack_tokens`; removed in the next release.", deprecated=True
    )
    packed_avg_seq_len: float = Field(
        description="Deprecated: the same as `mean_pack_tokens`; removed in the next release.", deprecated=True
    )
    max_batch_tokens: int = Field(
        description="Deprecated: the same as `max_pack_tokens`; removed in the next release.", deprecated=True
    )


class ReplayInfo(_Wire):
    """Where the job of a replayed result was read (`rerank-worker replay`); absent on the workers' results."""

    replay_id: str = Field(description="Identifier of the replay run; also the `rerank.replay.id` header.")
    source_topic: str = Field(description="Topic the job was read from.")
    source_partition: int = Field(ge=0, description="Partition the job was read from.")
    source_offset: int = Field(ge=0, description="Offset of the job in that partition.")
    source_timestamp: int = Field(description="Kafka timestamp of the job record, epoch milliseconds.")


class RerankResult(_Wire):
    """The ranked documents of one job."""

    model_config = ConfigDict(title="RerankResult")

    schema_version: SchemaVersion = Field(SCHEMA_VERSION, description="Version of this message format.")
    job_id: str = Field(description="The job's `job_id`.")
    model: str = Field(description="Model that produced the scores.")
    results: list[RankedDocument] = Field(
        description="Documents by `relevance_score`, highest first, nulls last, ties by index; `top_n` applied."
    )
    metadata: dict[str, Any] = Field(description="The job's `metadata`, unchanged.")
    meta: RerankMeta
    scored_at: datetime = Field(description="When the scores were computed (UTC).")
    replay: ReplayInfo | None = Field(
        None,
        description="Only on results of `rerank-worker replay`: the job's source record and the replay run. "
        "Absent on the workers' results.",
    )

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("replay") is None:
            data.pop("replay", None)
        return data

    @classmethod
    def from_scores(
        cls,
        job: RerankJob,
        scored: JobScores,
        engine: EngineInfo,
        *,
        scored_at: datetime | None = None,
        replay: ReplayInfo | None = None,
    ) -> RerankResult:
        ranked = sorted(
            range(len(scored.scores)),
            key=lambda i: (scored.scores[i] is None, -(scored.scores[i] or 0.0), i),
        )
        if job.top_n is not None:
            ranked = ranked[: job.top_n]
        texts = job.document_texts()
        results = [
            RankedDocument(
                index=i,
                id=doc.id if isinstance(doc := job.documents[i], Document) else None,
                relevance_score=scored.scores[i],
                document=texts[i] if job.return_documents else None,
            )
            for i in ranked
        ]
        stats = scored.stats
        meta = RerankMeta(
            input_docs=stats.input_docs,
            usable_docs=stats.usable_docs,
            unique_docs=stats.unique_docs,
            dedup_ratio=stats.dedup_ratio,
            truncated_docs=stats.truncated_docs,
            query_truncated=stats.query_truncated,
            tokens=stats.tokens,
            packs=stats.packs,
            longest_pack_tokens=stats.longest_pack_tokens,
            mean_pack_tokens=stats.mean_pack_tokens,
            max_pack_tokens=engine.max_pack_tokens,
            max_doc_tokens=engine.max_doc_tokens,
            tokenize_ms=stats.tokenize_ms,
            inference_ms=stats.inference_ms,
            elapsed_ms=stats.elapsed_ms,
            model=engine.model,
            device=engine.device,
            dtype=engine.dtype,
            attention=engine.attention,
            packed_batches=stats.packs,
            packed_max_seq_len=stats.longest_pack_tokens,
            packed_avg_seq_len=stats.mean_pack_tokens,
            max_batch_tokens=engine.max_pack_tokens,
        )
        return cls(
            job_id=job.job_id,
            model=engine.model,
            results=results,
            metadata=job.metadata,
            meta=meta,
            scored_at=scored_at or datetime.now(UTC),
            replay=replay,
        )


# Which field's failure gives which dead-letter reason; anything else is a plain schema violation.
_REASON_BY_FIELD = {
    "query": "blank_query",
    "documents": "too_many_documents",
    "metadata": "metadata_too_deep",
    "schema_version": "unknown_schema_version",
}


def describe_validation_error(error: ValidationError) -> str:
    """One line naming every broken rule: `documents.3: Input should be a valid string; query: ...`."""
    parts = []
    for e in error.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "job"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def parse_job(raw: bytes, *, max_docs: int | None = None) -> RerankJob:
    """Bytes off the wire to a RerankJob, or InvalidJobError with a reason slug and a one-line message."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidJobError("not_utf8", f"job is not UTF-8: {e}") from None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InvalidJobError("not_json", f"job is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidJobError("schema_violation", f"job must be a JSON object, not {type(data).__name__}")
    try:
        return RerankJob.model_validate(data, context={"max_docs": max_docs})
    except ValidationError as e:
        reason = "schema_violation"
        for err in e.errors(include_url=False):
            field = err["loc"][0] if err["loc"] else None
            if err["type"] in ("value_error", "literal_error") and field in _REASON_BY_FIELD:
                reason = _REASON_BY_FIELD[str(field)]
                break
        raise InvalidJobError(reason, describe_validation_error(e)) from None


WIRE_MODELS: dict[str, type[BaseModel]] = {
    "rerank-job.schema.json": RerankJob,
    "rerank-result.schema.json": RerankResult,
}


def json_schemas() -> dict[str, str]:
    """File name -> JSON Schema text, exactly as committed under schemas/."""
    out = {}
    for filename, model in WIRE_MODELS.items():
        schema = {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema(mode="validation")}
        out[filename] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in json_schemas().items():
        path = directory / filename
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas")):
        print(path)
