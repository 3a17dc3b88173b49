"""Every setting of the worker, read from the environment (prefix RERANK_), in one pydantic-settings class.

Each field documents itself as `name (type): meaning. Default: X`; the README's table is generated from the same
descriptions (tests/test_settings.py checks that the two agree). Unknown RERANK_* variables are rejected at start,
so a typo such as RERANK_MAX_DOC_TOKEN fails loudly instead of silently running with the default.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
import warnings
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "RERANK_"

PositiveInt = Annotated[int, Field(ge=1)]
# Kafka topic names: the broker's own rule (legal characters, at most 249 of them).
TopicName = Annotated[
    str,
    Field(
        pattern=r"^[a-zA-Z0-9._-]{1,249}$",
        json_schema_extra={"allowed": "a topic name: 1 to 249 letters, digits, '.', '_' or '-'"},
    ),
]
MIB = 1024 * 1024
# Old names still read, for one release, with a FutureWarning: old -> new.
DEPRECATED_NAMES = {"RERANK_MAX_BATCH_TOKENS": "RERANK_MAX_PACK_TOKENS"}


class Settings(BaseSettings):
    # populate_by_name: code and tests pass `bootstrap_servers=...`; the environment uses the KAFKA_* aliases.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True, populate_by_name=True)

    model: str = Field(
        "Qwen/Qwen3-Reranker-0.6B",
        description="Model to load with `from_pretrained`: a hub name or a local directory.",
    )
    model_revision: str | None = Field(
        None,
        description="Hub revision of RERANK_MODEL (a branch, tag or commit hash), passed to `from_pretrained` for "
        "the tokenizer and the weights: pin a commit so every replica and every restart runs the same model. "
        "Empty: the hub's default branch. Ignored for a local directory.",
    )
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = Field(
        "auto",
        description="`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.",
        json_schema_extra={"allowed": "auto, cpu, cuda or cuda:N"},
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Model weights and activations: `auto` is bfloat16 on CUDA and float32 on CPU. "
        "The final yes/no projection always runs in float32. `float16` is a few percent slower than bfloat16 on an "
        "H100 and agrees with the float32 scores several times more closely (docs/PERFORMANCE.md), but activations "
        "past 65,504 overflow: untried on the real weights, so not the default.",
    )
    quantization: Literal["none", "fp8"] = Field(
        "none",
        description="`fp8`: the linear layers' weights in float8 e4m3 with a scale per output channel, activations "
        "quantized per token on the fly, matmuls on FP8 tensor cores; norms, rotary, attention, the yes/no head and "
        "the last layer's output projection and MLP (they see only the documents' last tokens) stay in bfloat16. "
        "Needs RERANK_DTYPE=bfloat16 (`auto` on CUDA) and a GPU of compute capability 8.9 or newer (L4, L40S, H100, "
        "H200, B200); refused elsewhere. Experimental: tested on CPU only so far, not yet measured on a GPU "
        "(docs/PERFORMANCE.md); check agreement on your weights with `python -m bench.agreement --model DIR`.",
    )
    attention: Literal["auto", "triton", "flash_varlen", "flex_attention", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernel: `auto` is `triton` on CUDA in bfloat16/float16 (one Triton kernel per layer "
        "for the whole pack: each token over its own segment causally and its job's head; no host-side lengths, "
        "so the forward runs as CUDA graphs), `flex_attention` (block mask from segment ids) on CUDA in float32, "
        "SDPA with a dense mask on CPU. `flash_varlen`: FlashAttention per segment plus a Triton kernel merging in "
        "each document's view of its head (CUDA, bfloat16/float16; no graphs). `eager` runs the model's own "
        "decoder.",
    )
    forward: Literal["auto", "packed", "transformers"] = Field(
        "auto",
        description="`packed`: the worker's own Qwen3 forward over the loaded weights (fused projections, the last "
        "layer on document ends only); `transformers`: the model's own decoder. `auto`: packed for Qwen3 models.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile the packed forward's layer steps (dynamic pack length: compiled once at "
        "warm-up). `auto`: on for CUDA, off for CPU.",
    )
    cuda_graphs: bool = Field(
        True,
        description="With `triton` attention, capture the forward as one CUDA graph per pack-length bucket at "
        "warm-up (packs are padded to the next bucket; one launch per pack, so the host is free while the GPU "
        "works). `false` launches kernel by kernel. Other attention kernels always launch kernel by kernel.",
    )
    max_doc_tokens: PositiveInt = Field(512, description="Each document is cut to this many tokens.")
    max_query_tokens: PositiveInt = Field(
        512,
        description="The query is cut to this many tokens; a longer instruction rejects the job.",
    )
    max_pack_tokens: PositiveInt | None = Field(
        None,
        validation_alias=AliasChoices("RERANK_MAX_PACK_TOKENS", "RERANK_MAX_BATCH_TOKENS"),
        description="Token budget of one pack (one packed sequence, run by one forward pass); jobs share packs up "
        "to it and a bigger job spans several. Empty: 32768 on CUDA, 4096 on CPU. Its old name "
        "RERANK_MAX_BATCH_TOKENS is still read, with a warning, for one release.",
    )
    max_docs: PositiveInt = Field(1000, description="Most documents one job may carry; more rejects the job.")
    instruction: str | None = Field(
        None,
        description="Instruction for jobs that carry none. Empty: the official default, `Given a web search query, "
        "retrieve relevant passages that answer the query`.",
    )
    cache_dir: str | None = Field(
        None,
        description="Directory of the compile caches (TorchInductor, Triton, CUDA's JIT cache): a restarted worker "
        "finds its compiled kernels there instead of compiling them again. Empty: `rerank-worker/compile` under "
        "the model cache (HF_HOME, default ~/.cache/huggingface), so a persistent model volume keeps both.",
    )
    doc_cache_size: Annotated[int, Field(ge=0)] = Field(
        20000,
        description="Documents whose token ids are kept (least recently used first out); catalogues repeat "
        "documents across queries. 0 turns the cache off.",
    )

    # -- Kafka connection: the usual KAFKA_* names, shared with other clients, so no RERANK_ prefix ------------------
    bootstrap_servers: str = Field(
        "localhost:9092",
        validation_alias="KAFKA_BOOTSTRAP_SERVERS",
        description="Comma-separated `host:port` list of Kafka brokers to bootstrap from.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        validation_alias="KAFKA_SECURITY_PROTOCOL",
        description="`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`. The SASL ones need KAFKA_SASL_MECHANISM, "
        "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD.",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None,
        validation_alias="KAFKA_SASL_MECHANISM",
        description="SASL mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`. Empty: `PLAIN` when the protocol "
        "is a SASL one.",
    )
    sasl_username: str | None = Field(None, validation_alias="KAFKA_SASL_USERNAME", description="SASL user name.")
    sasl_password: SecretStr | None = Field(
        None, validation_alias="KAFKA_SASL_PASSWORD", description="SASL password; never logged or printed."
    )
    ssl_cafile: str | None = Field(
        None,
        validation_alias="KAFKA_SSL_CAFILE",
        description="PEM file of the CA that signed the brokers' certificates (`SSL`, `SASL_SSL`). Empty: the "
        "system's trusted CAs.",
    )
    ssl_certfile: str | None = Field(
        None,
        validation_alias="KAFKA_SSL_CERTFILE",
        description="PEM file of this client's certificate, for brokers that require one (mutual TLS; `SSL`, "
        "`SASL_SSL`). Needs KAFKA_SSL_KEYFILE.",
    )
    ssl_keyfile: str | None = Field(
        None,
        validation_alias="KAFKA_SSL_KEYFILE",
        description="PEM file of the private key of KAFKA_SSL_CERTFILE (unencrypted).",
    )

    # -- Kafka worker -------------------------------------------------------------------------------------------------
    group_id: str = Field("rerank-worker", min_length=1, description="Consumer group of the workers.")
    jobs_topic: TopicName = Field("rerank.jobs", description="Topic the worker consumes RerankJob messages from.")
    results_topic: TopicName = Field(
        "rerank.results", description="Topic of the RerankResult messages (key: job_id), unless a job's `reply_topic`."
    )
    dlq_topic: TopicName = Field(
        "rerank.jobs.dlq",
        description="Dead-letter topic: jobs that cannot be answered, with their original key and value bytes and "
        "`rerank.*` headers saying why.",
    )
    reply_topic_allowlist: str | None = Field(
        None,
        description="Regular expression (whole-name match) of the `reply_topic` values jobs may name; a job naming "
        "another topic is dead-lettered as `disallowed_reply_topic`, one naming an allowed topic that does not "
        "exist as `unknown_reply_topic` (the worker never creates reply topics; it asks the cluster with a 5 s bound "
        "and remembers the answer: found for 5 minutes, missing for 10 s). Empty: only RERANK_RESULTS_TOPIC.",
    )
    max_message_bytes: PositiveInt = Field(
        16 * MIB,
        description="Largest job or result, in bytes: sizes the producer's `max_request_size` and the consumer's "
        "fetch sizes. A bigger job is dead-lettered as `message_too_large`, a bigger result as `result_too_large`. "
        "The topics' `max.message.bytes` (broker `message.max.bytes`) must allow it too.",
    )
    compression_type: Literal["gzip", "none", "snappy", "lz4", "zstd"] = Field(
        "gzip",
        description="Compression of produced messages. `gzip` needs nothing else; `snappy`, `lz4` and `zstd` need "
        "the python-snappy, lz4 or zstandard package.",
    )
    delivery: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="`at_least_once`: a result is published, then its offset committed; a crash between the two "
        "gives a second result for the job. `exactly_once`: each commit is one Kafka transaction holding results, "
        "dead letters and offsets (transactional id `<RERANK_GROUP_ID>.<worker id>`: set RERANK_WORKER_ID to keep "
        "it across restarts); consumers of the results and dead-letter topics must read with "
        "`isolation.level=read_committed`. Replays stay at-least-once.",
    )
    max_attempts: PositiveInt = Field(
        5,
        description="Tries of a transient failure (broker unavailable, produce timeout, CUDA out of memory) before "
        "the job is dead-lettered with `rerank.attempts`.",
    )
    retry_initial_ms: PositiveInt = Field(
        200, description="First backoff between tries; it doubles each try, with random jitter."
    )
    retry_max_ms: PositiveInt = Field(10000, description="Longest backoff between tries.")
    batch_wait_ms: Annotated[int, Field(ge=0)] = Field(
        20,
        description="How long a batch waits for more jobs after its first one, unless its token budget fills first.",
    )
    batch_max_packs: PositiveInt = Field(
        4,
        description="Token budget of a batch (the jobs scored together), in packs of RERANK_MAX_PACK_TOKENS: jobs "
        "are gathered until their tokens would fill this many packs. A bigger job forms a batch of its own.",
    )
    max_queued_jobs: PositiveInt = Field(
        64,
        description="Parsed jobs waiting for the GPU thread. When the queue is full, the consumer pauses its "
        "partitions but keeps polling, so long GPU work never exceeds RERANK_MAX_POLL_INTERVAL_MS.",
    )
    max_poll_records: PositiveInt = Field(100, description="Most records one consumer poll returns.")
    session_timeout_ms: PositiveInt = Field(
        45000,
        description="The group drops a worker that sends no heartbeat for this long (the broker bounds it by "
        "`group.min.session.timeout.ms`, 6000 by default). A killed worker's partitions move after it.",
    )
    heartbeat_interval_ms: PositiveInt = Field(
        3000, description="Heartbeat period; must be below a third of RERANK_SESSION_TIMEOUT_MS."
    )
    max_poll_interval_ms: PositiveInt = Field(
        300000,
        description="Longest gap between two polls before the group drops the worker. The consumer thread polls "
        "every few hundred ms whatever the GPU does, so this only trips when the worker is stuck.",
    )
    produce_timeout_ms: PositiveInt = Field(
        60000,
        description="How long one publish (result or dead letter) may take until acknowledged, including the "
        "producer's own retries, before it counts as a failed (transient) try.",
    )
    revoke_timeout_s: Annotated[float, Field(ge=0)] = Field(
        10.0,
        description="On a rebalance, how long to wait for the revoked partitions' jobs being scored or published "
        "before committing what is done; jobs not started yet are given up at once. What is not done is "
        "redelivered to the new owner. Capped at half RERANK_SESSION_TIMEOUT_MS.",
    )
    shutdown_timeout_s: Annotated[float, Field(gt=0)] = Field(
        30.0,
        description="On SIGTERM or SIGINT: the worker stops fetching, finishes and publishes the batch in hand, "
        "commits, leaves the group and exits 0 within this many seconds. A second SIGINT exits at once.",
    )
    kafka_startup_timeout_s: Annotated[float, Field(ge=0)] = Field(
        300.0,
        description="At start, how long the worker waits for a Kafka cluster that does not answer, before the model "
        "loads and again when it opens its clients (tried again with backoff up to 15 s, one log line per try; "
        "`/healthz` alive, `/readyz` not ready). Then it exits 4. A refusal that waiting cannot change (wrong "
        "password, failed TLS handshake, a topic that does not exist) exits 4 at once.",
    )
    stall_timeout_s: Annotated[float, Field(gt=0)] = Field(
        300.0,
        description="`/healthz` fails (and a liveness probe restarts the worker) when the GPU thread has not "
        "finished its batch for this long: a hung driver or a deadlock. A batch takes well under a second on a GPU "
        "(a few seconds with out-of-memory retries); on a CPU a batch of large jobs with the full-size model can "
        "take minutes: raise it there.",
    )
    http_host: str = Field("0.0.0.0", description="Address of the health and metrics server.")
    http_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        8080, description="Port of `/healthz`, `/readyz` and `/metrics`; 0 picks a free port (logged at start)."
    )
    worker_id: str | None = Field(
        None,
        description="Name of this worker in logs, result and dead-letter headers and the Kafka client id. Empty: "
        "`<hostname>-<pid>`.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of the JSON log lines on stderr."
    )

    @model_validator(mode="after")
    def _kafka_orderings(self) -> Settings:
        if self.security_protocol.startswith("SASL_") and not (self.sasl_username and self.sasl_password):
            raise ValueError(
                f"KAFKA_SECURITY_PROTOCOL={self.security_protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE go together: set both or neither")
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                f"RERANK_HEARTBEAT_INTERVAL_MS={self.heartbeat_interval_ms} must be at most a third of "
                f"RERANK_SESSION_TIMEOUT_MS={self.session_timeout_ms}"
            )
        if self.reply_topic_allowlist is not None:
            try:
                re.compile(self.reply_topic_allowlist)
            except re.error as e:
                raise ValueError(f"RERANK_REPLY_TOPIC_ALLOWLIST is not a regular expression: {e}") from None
        return self

    def reply_topic_pattern(self) -> re.Pattern[str]:
        """Which `reply_topic` values a job may name (a whole-name match); by default only the results topic."""
        return re.compile(self.reply_topic_allowlist or re.escape(self.results_topic))

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> Settings:
        # Fields read from an alias (KAFKA_*) have no RERANK_ name: RERANK_BOOTSTRAP_SERVERS is a typo, not a setting.
        known = {env_name(name) for name in type(self).model_fields if env_name(name).startswith(ENV_PREFIX)}
        present = {k.upper() for k in os.environ}
        unknown = sorted(k for k in present if k.startswith(ENV_PREFIX) and k not in known | set(DEPRECATED_NAMES))
        if unknown:
            raise ValueError("; ".join(unknown_setting(name, known) for name in unknown))
        for old, new in DEPRECATED_NAMES.items():
            if old in present:
                used = "ignored, since it is set too" if new in present else "read for now"
                warnings.warn(
                    f"{old} is deprecated and will stop working in the next release: use {new} ({old} is {used})",
                    FutureWarning,
                    stacklevel=2,
                )
        return self


def env_name(field_name: str) -> str:
    """The environment variable of a setting: its alias (KAFKA_BOOTSTRAP_SERVERS), the first of its aliases (the
    others are deprecated names), or RERANK_<NAME>."""
    alias = Settings.model_fields[field_name].validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return first if isinstance(first, str) else ENV_PREFIX + field_name.upper()
    return alias if isinstance(alias, str) else ENV_PREFIX + field_name.upper()


def unknown_setting(name: str, known: set[str]) -> str:
    """`RERANK_MAX_DOC_TOKEN is not a setting (did you mean RERANK_MAX_DOC_TOKENS?)`."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
    hint = f"did you mean {close[0]}?" if close else "the README's settings table lists them"
    return f"{name} is not a setting ({hint})"


def allowed_values(field_name: str) -> str | None:
    """What a setting accepts, in words, from its type (None where pydantic's own message says it best)."""
    field = Settings.model_fields[field_name]
    annotation: Any = field.annotation
    types = [a for a in typing.get_args(annotation) if a is not type(None)] if typing.get_origin(annotation) else []
    types = [annotation, *types]
    metadata = list(field.metadata)
    for t in list(types):  # Annotated[int, Field(ge=1)] inside an Optional keeps its constraints in its own metadata
        if hasattr(t, "__metadata__"):
            types.append(typing.get_args(t)[0])
            for meta in t.__metadata__:
                metadata += getattr(meta, "metadata", [meta])
    for extra in [field.json_schema_extra, *(getattr(m, "json_schema_extra", None) for m in metadata)]:
        if isinstance(extra, dict) and isinstance(extra.get("allowed"), str):
            return str(extra["allowed"])
    literal = next((t for t in types if typing.get_origin(t) is Literal), None)
    if literal is not None:
        return "one of " + ", ".join(str(v) for v in typing.get_args(literal))
    kinds = {bool: "true or false", int: "an integer", float: "a number"}
    kind = next((kinds[t] for t in types if t in kinds), None)
    low = next((getattr(m, a) for m in metadata for a in ("ge", "gt") if getattr(m, a, None) is not None), None)
    strict = any(getattr(m, "gt", None) is not None for m in metadata)
    high = next((m.le for m in metadata if getattr(m, "le", None) is not None), None)
    if kind is None:
        return None
    if low is not None and high is not None:
        return f"{kind} from {low} to {high}"
    if low is not None:
        return f"{kind} {'>' if strict else '>='} {low}"
    return kind


def describe_settings_error(error: ValidationError) -> str:
    """One line per broken setting, naming the environment variable, the value given (secrets hidden) and what is
    allowed: `RERANK_DEVICE='gpu': expected auto, cpu, cuda or cuda:N`."""
    parts = []
    fields = Settings.model_fields
    by_alias = {env_name(n).lower(): n for n in fields} | {
        a.lower(): n
        for n, f in fields.items()
        if isinstance(f.validation_alias, AliasChoices)
        for a in f.validation_alias.choices
        if isinstance(a, str)
    }
    for e in error.errors(include_url=False):
        loc = str(e["loc"][0]).lower() if e["loc"] else ""
        name = loc if loc in fields else by_alias.get(loc)
        message = str(e["msg"]).removeprefix("Value error, ")
        if name is None:
            parts.append(message)
            continue
        secret = fields[name].annotation in (SecretStr, SecretStr | None)
        given = "'***'" if secret else repr(e.get("input"))
        allowed = allowed_values(name)
        parts.append(f"{env_name(name)}={given}: " + (f"expected {allowed}" if allowed else message))
    return "; ".join(parts)


def default_text(default: object) -> str:
    """A default as one writes it in the environment (`true`, not Python's `True`)."""
    return str(default).lower() if isinstance(default, bool) else str(default)


def settings_table() -> str:
    """A Markdown table of every setting: the README embeds it."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else f"`{default_text(field.default)}`"
        rows.append(f"| `{env_name(name)}` | {default} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
