"""`rerank-worker`: a thin command line over the engine, the pipeline and the tools.

Only the commands that load a model (`score`, `run`, `replay`) import torch and transformers, inside the command.

Exit codes: 0 done; 1 the job was invalid (or dead-lettered); 2 bad usage or settings; 3 the model could not be
loaded; 4 Kafka unreachable or misconfigured (or another fatal worker error); 5 `enqueue --wait` timed out.
Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import orjson
from pydantic import ValidationError

from worker.engine.errors import InvalidJobError
from worker.settings import Settings, describe_settings_error

if TYPE_CHECKING:
    from worker.engine.engine import RerankEngine

EXIT_INVALID_JOB = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_KAFKA = 4
EXIT_TIMEOUT = 5


def fail(code: int, message: str) -> NoReturn:
    print(f"rerank-worker: {message}", file=sys.stderr)
    raise SystemExit(code)


def read_file(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        fail(EXIT_USAGE, f"{flag} {path}: {e.strerror or e}")


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        fail(EXIT_USAGE, f"invalid settings: {describe_settings_error(e)}")


@contextmanager
def kafka_failures(what: str, settings: Settings) -> Iterator[None]:
    """Kafka errors in the block exit 4 with one line, naming the refusal kafka-python only logs (wrong password,
    untrusted certificate, another protocol on the port) where there was one."""
    from kafka.errors import KafkaError

    from worker.kafka.startup import watching_refusals
    from worker.pipeline.errors import FatalError, one_line

    with watching_refusals() as refusals:
        try:
            yield
        except (FatalError, KafkaError) as e:
            refusal = refusals.explain(settings)
            detail = f"{refusal} ({settings.bootstrap_servers})" if refusal else one_line(e)
            fail(EXIT_KAFKA, f"{what}: {detail}")


def require_topics(settings: Settings, *topics: str) -> None:
    """Check the cluster and `topics` before doing anything else (before a model loads, before a job is sent)."""
    from worker.kafka.topics import require_topics as require

    with kafka_failures("cannot use Kafka", settings):
        require(settings, topics, client_id=f"rerank-cli-{uuid.uuid4().hex[:8]}")


def build_engine(settings: Settings) -> RerankEngine:
    """The one place where settings become an engine."""
    from worker.engine.load import load_engine

    try:
        return load_engine(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            attention=settings.attention,
            forward=settings.forward,
            compile=settings.compile,
            cuda_graphs=settings.cuda_graphs,
            max_pack_tokens=settings.max_pack_tokens,
            max_doc_tokens=settings.max_doc_tokens,
            max_query_tokens=settings.max_query_tokens,
            default_instruction=settings.instruction,
            doc_cache_size=settings.doc_cache_size,
            revision=settings.model_revision,
            quantization=settings.quantization,
            cache_dir=settings.cache_dir,
        )
    except ValueError as e:  # settings the engine cannot honour (budget too small, unknown dtype)
        fail(EXIT_USAGE, f"invalid settings: {e}")
    except (OSError, RuntimeError) as e:  # model missing, unreachable hub, no CUDA
        fail(EXIT_MODEL, f"cannot load model {settings.model!r}: {str(e).splitlines()[0] if str(e) else e!r}")


def cmd_score(args: argparse.Namespace) -> None:
    import time

    from worker.messages import RerankResult, parse_job

    settings = load_settings(model=args.model, device=args.device)
    raw = read_file(args.input, "--input") if args.input and args.input != "-" else sys.stdin.buffer.read()
    try:
        job = parse_job(raw, max_docs=settings.max_docs)
    except InvalidJobError as e:
        fail(EXIT_INVALID_JOB, f"invalid job ({e.reason}): {e}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # stderr: errors and the one cost line
    started = time.perf_counter()
    engine = build_engine(settings)  # no warm-up: one job compiles and allocates only what it uses
    load_s = time.perf_counter() - started
    try:
        (scored,) = engine.score([job.to_score_request()])
    except InvalidJobError as e:
        fail(EXIT_INVALID_JOB, f"invalid job ({e.reason}): {e}")
    result = RerankResult.from_scores(job, scored, engine.info)
    option = orjson.OPT_INDENT_2 if args.pretty else 0
    sys.stdout.buffer.write(orjson.dumps(result.model_dump(mode="json"), option=option) + b"\n")
    stats = scored.stats
    weights = " (RANDOM WEIGHTS: the scores are meaningless)" if random_weights(settings.model) else ""
    print(
        f"rerank-worker: model loaded in {load_s:.1f} s on {engine.info.device}{weights}; {stats.input_docs} "
        f"documents scored in {stats.elapsed_ms:.1f} ms (tokenizing {stats.tokenize_ms:.1f} ms, model "
        f"{stats.inference_ms:.1f} ms)",
        file=sys.stderr,
    )


def cmd_schemas(args: argparse.Namespace) -> None:
    from worker.messages import write_schemas

    try:
        written = write_schemas(Path(args.out))
    except OSError as e:
        fail(EXIT_USAGE, f"--out {args.out}: {e.strerror or e}")
    for path in written:
        print(path)


def cmd_run(args: argparse.Namespace) -> None:
    from worker.pipeline.logs import configure_logging
    from worker.pipeline.worker import Worker, default_worker_id

    settings = load_settings(model=args.model, device=args.device)
    configure_logging(settings.log_level, settings.worker_id or default_worker_id())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # stderr carries JSON lines only
    # The model loads once the cluster has answered: a misconfigured or unreachable Kafka costs no load.
    worker = Worker(settings, load=lambda: warm(build_engine(settings)))
    raise SystemExit(worker.run(install_signals=True))


def warm(engine: RerankEngine) -> RerankEngine:
    """Compile and allocate before the first job (bounded: three synthetic packs), and say how long it took."""
    import logging

    seconds = engine.warm_up()
    logging.getLogger("worker.cli").info(
        "engine warm",
        extra={
            "warm_up_s": round(seconds, 2),
            "engine": dataclasses.asdict(engine.info),
            "document_encoder": engine.tokenizer.document_encoder,
        },
    )
    return engine


def _job_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.file:
        raw = sys.stdin.buffer.read() if args.file == "-" else read_file(args.file, "--file")
        try:
            job: dict[str, Any] = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            fail(EXIT_INVALID_JOB, f"invalid job (not_json): {e}")
        if not isinstance(job, dict):
            fail(EXIT_INVALID_JOB, "invalid job (schema_violation): a job is a JSON object")
    elif args.query is not None and args.doc:
        job = {"query": args.query, "documents": list(args.doc)}
    else:
        fail(EXIT_USAGE, "give a job with --file, or --query and at least one --doc")
    options = {
        "job_id": args.job_id,
        "instruction": args.instruction,
        "top_n": args.top_n,
        "reply_topic": args.reply_topic,
        "return_documents": args.return_documents or None,
    }
    job.update({k: v for k, v in options.items() if v is not None})
    job.setdefault("job_id", uuid.uuid4().hex)
    return job


def random_weights(model: str) -> bool:
    """Whether `model` is a local directory written by worker.testing.offline_model (random weights)."""
    return Path(model, "rerank-worker-offline.json").is_file()


def ranked_table(result: Any, job: Any, width: int = 60) -> str:
    """The ranked documents of a RerankResult as a fixed-width table, under two lines that say what it shows."""
    meta = result.meta
    texts = job.document_texts()
    cut = f" (top_n={job.top_n})" if job.top_n is not None and job.top_n < meta.input_docs else ""
    blank = meta.input_docs - meta.usable_docs
    duplicates = meta.usable_docs - meta.unique_docs
    where = "CPU" if meta.device == "cpu" else "GPU" if meta.device.startswith("cuda") else meta.device
    model = f"model {result.model}"
    if random_weights(result.model):
        model += " (RANDOM WEIGHTS: the scores are meaningless)"
    lines = [
        f"job {result.job_id}: {len(result.results)} of {meta.input_docs} documents{cut}; {blank} blank, "
        f"{duplicates} duplicate{'' if duplicates == 1 else 's'} scored once; scored in {meta.elapsed_ms:.1f} ms on "
        f"the {where}",
        model,
        f"{'rank':>4}  {'score':>8}  {'index':>5}  {'id':<12}  document",
    ]
    for rank, doc in enumerate(result.results, 1):
        score = "-" if doc.relevance_score is None else f"{doc.relevance_score:.6f}"
        text = (texts[doc.index] if doc.index < len(texts) else None) or ""
        text = " ".join(text.split())
        text = text if len(text) <= width else text[: width - 3] + "..."
        ident = "" if doc.id is None else str(doc.id)
        lines.append(f"{rank:>4}  {score:>8}  {doc.index:>5}  {ident:<12}  {text}")
    return "\n".join(lines)


def cmd_enqueue(args: argparse.Namespace) -> None:
    from worker.client import DeadLettered, RerankClient
    from worker.messages import RerankJob, describe_validation_error

    settings = load_settings()
    data = _job_from_args(args)
    try:
        job = RerankJob.model_validate(data, context={"max_docs": settings.max_docs})
    except ValidationError as e:
        fail(EXIT_INVALID_JOB, f"invalid job: {describe_validation_error(e)}")
    require_topics(settings, settings.jobs_topic)
    try:
        with kafka_failures(f"Kafka at {settings.bootstrap_servers}", settings), RerankClient(settings) as client:
            job_id = client.submit(job, timeout_s=args.timeout)
            if not args.wait:
                print(job_id)
                return
            outcome = client.wait([job_id], timeout_s=args.timeout)[job_id]
    except TimeoutError as e:
        fail(EXIT_TIMEOUT, str(e))
    if isinstance(outcome, DeadLettered):
        fail(EXIT_INVALID_JOB, f"job {job_id} was dead-lettered ({outcome.reason}): {outcome.message}")
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(outcome.model_dump(mode="json"), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(ranked_table(outcome, job))


def _time_or_fail(text: str | None, flag: str) -> int | None:
    from worker.tools.times import parse_time

    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as e:
        fail(EXIT_USAGE, f"{flag}: {e}")


def cmd_replay(args: argparse.Namespace) -> None:
    from worker.pipeline.logs import configure_logging
    from worker.pipeline.worker import default_worker_id
    from worker.tools.replay import check_range, replay, replay_group_id

    settings = load_settings(model=args.model, device=args.device)
    from_ms = _time_or_fail(args.from_time, "--from")
    to_ms = _time_or_fail(args.to_time, "--to")
    assert from_ms is not None
    try:  # bad options fail before the model loads
        check_range(from_ms, to_ms)
        replay_group_id(settings, "check", args.group_id)
    except ValueError as e:
        fail(EXIT_USAGE, str(e))
    require_topics(settings, settings.jobs_topic, args.reply_topic or settings.results_topic)  # before the model
    configure_logging(settings.log_level, settings.worker_id or default_worker_id())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    engine = warm(build_engine(settings))
    try:
        with kafka_failures("replay failed", settings):
            summary = replay(
                settings,
                engine,
                from_ms=from_ms,
                to_ms=to_ms,
                reply_topic=args.reply_topic,
                group_id=args.group_id,
                progress=not args.no_progress,
            )
    except ValueError as e:
        fail(EXIT_USAGE, str(e))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(summary.as_json()) + b"\n")
    else:
        print(summary.describe())


def cmd_dlq_list(args: argparse.Namespace) -> None:
    from worker.tools.dlq import list_dead_letters

    settings = load_settings()
    since_ms = _time_or_fail(args.since, "--since")
    require_topics(settings, settings.dlq_topic)
    with kafka_failures("dlq list failed", settings):
        summary = list_dead_letters(settings, reasons=args.reason, since_ms=since_ms, limit=args.limit)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(summary.as_json(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(summary.describe())


def cmd_dlq_requeue(args: argparse.Namespace) -> None:
    from worker.tools.dlq import requeue

    if not (args.reason or args.since or args.all):
        fail(EXIT_USAGE, "choose dead letters with --reason and/or --since, or requeue every one with --all")
    settings = load_settings()
    since_ms = _time_or_fail(args.since, "--since")
    require_topics(settings, settings.dlq_topic)
    with kafka_failures("dlq requeue failed", settings):
        report = requeue(settings, reasons=args.reason, since_ms=since_ms, dry_run=args.dry_run, to_topic=args.to_topic)
    print(report.describe())


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        fail(EXIT_USAGE, f"{message} (see {self.prog} --help)")


KAFKA = "KAFKA_BOOTSTRAP_SERVERS, KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_*"
ENGINE = (
    "RERANK_MODEL, RERANK_DEVICE, RERANK_DTYPE, RERANK_ATTENTION, RERANK_FORWARD, RERANK_COMPILE, "
    "RERANK_CUDA_GRAPHS, RERANK_MAX_PACK_TOKENS, RERANK_MAX_DOC_TOKENS, RERANK_MAX_QUERY_TOKENS, "
    "RERANK_INSTRUCTION, RERANK_DOC_CACHE_SIZE, RERANK_MAX_DOCS"
)
EXITS = {
    0: "done",
    1: "the job is invalid or was dead-lettered",
    2: "bad usage or settings",
    3: "the model could not be loaded",
    4: "Kafka unreachable or refused the connection, a topic missing (or another fatal error)",
    5: "no answer within --timeout",
}


def _command(sub: Any, name: str, *, summary: str, description: str, exits: tuple[int, ...], reads: str) -> Any:
    """A subcommand whose --help says what it does, its exit codes and the settings it reads."""
    codes = "\n".join(f"  {code}  {EXITS[code]}" for code in (0, *exits))
    settings = textwrap.fill(f"settings (environment variables): {reads}", width=100, subsequent_indent="  ")
    epilog = (
        f"exit codes:\n{codes}\n\n{settings}\n"
        "Every setting, its default and meaning: the README's settings table (python -m worker.settings)."
    )
    return sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rerank-worker",
        description="Qwen3-Reranker worker: score rerank jobs from Kafka, or one job from a file; replay a time "
        "range; inspect dead letters. Errors are one line on stderr; `rerank-worker COMMAND --help` says more.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    score = _command(
        sub,
        "score",
        summary="score one RerankJob (JSON on stdin or --input) and print the result",
        description="Score one RerankJob without Kafka and print its RerankResult as JSON on stdout; on stderr, one "
        "line with the model's load time and the scoring time (nothing is warmed up for one job).",
        exits=(1, 2, 3),
        reads=ENGINE,
    )
    score.add_argument("--model", help="model name or local directory (overrides RERANK_MODEL)")
    score.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides RERANK_DEVICE)")
    score.add_argument("--input", help="file holding the job; default stdin")
    score.add_argument("--pretty", action="store_true", help="indent the JSON output")
    score.set_defaults(func=cmd_score)

    run = _command(
        sub,
        "run",
        summary="consume RERANK_JOBS_TOPIC, score, publish results (until SIGTERM/SIGINT)",
        description="The worker: serves /healthz, /readyz and /metrics on RERANK_HTTP_PORT, checks the cluster and "
        "its topics (waiting up to RERANK_KAFKA_STARTUP_TIMEOUT_S for a broker that does not answer), loads the "
        "model, then consumes RERANK_JOBS_TOPIC in RERANK_GROUP_ID and publishes results and dead letters until "
        "SIGTERM or SIGINT (a second Ctrl+C exits at once). Logs are JSON lines on stderr.",
        exits=(2, 3, 4),
        reads="every setting (" + KAFKA + ", RERANK_*)",
    )
    run.add_argument("--model", help="model name or local directory (overrides RERANK_MODEL)")
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides RERANK_DEVICE)")
    run.set_defaults(func=cmd_run)

    enqueue = _command(
        sub,
        "enqueue",
        summary="send a job to RERANK_JOBS_TOPIC; with --wait print its ranked result",
        description="Validate a job (--file, or --query and --doc), send it to RERANK_JOBS_TOPIC and print its "
        "job_id; with --wait, wait for its result (or dead letter) and print a ranked table (--json: the result).",
        exits=(1, 2, 4, 5),
        reads=KAFKA + ", RERANK_JOBS_TOPIC, RERANK_RESULTS_TOPIC, RERANK_DLQ_TOPIC, RERANK_MAX_DOCS, "
        "RERANK_MAX_MESSAGE_BYTES",
    )
    enqueue.add_argument("--file", help="JSON file holding a RerankJob ('-': stdin)")
    enqueue.add_argument("--query", help="the query (with --doc)")
    enqueue.add_argument("--doc", action="append", help="a document; repeat for more")
    enqueue.add_argument("--job-id", help="job identifier; default a random one")
    enqueue.add_argument("--instruction", help="task instruction")
    enqueue.add_argument("--top-n", type=int, help="return only the best N documents")
    enqueue.add_argument("--return-documents", action="store_true", help="include document texts in the result")
    enqueue.add_argument("--reply-topic", help="publish the result there (must match RERANK_REPLY_TOPIC_ALLOWLIST)")
    enqueue.add_argument("--wait", action="store_true", help="wait for the result and print a ranked table")
    enqueue.add_argument("--json", action="store_true", help="with --wait: print the result JSON instead")
    enqueue.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    enqueue.set_defaults(func=cmd_enqueue)

    time_help = "ISO-8601 (2026-11-27T10:00:00Z), epoch milliseconds, or relative (-2h, -30m)"
    replay = _command(
        sub,
        "replay",
        summary="re-score the jobs of a time range of RERANK_JOBS_TOPIC with this model; results marked as replays",
        description="Re-score the jobs of [--from, --to) of RERANK_JOBS_TOPIC with this model, in a consumer group "
        "of its own, and publish the results marked as replays (`replay` in the result, rerank.replay.* headers). "
        "Bad records are skipped and counted (the workers dead-lettered them already). The cluster and the topics "
        "are checked before the model loads.",
        exits=(2, 3, 4),
        reads=ENGINE + ", " + KAFKA + ", RERANK_JOBS_TOPIC, RERANK_RESULTS_TOPIC, RERANK_GROUP_ID",
    )
    replay.add_argument("--from", dest="from_time", required=True, metavar="TIME", help=f"range start: {time_help}")
    replay.add_argument("--to", dest="to_time", metavar="TIME", help="range end, exclusive; default: the end now")
    replay.add_argument("--reply-topic", help="topic of the replayed results (default RERANK_RESULTS_TOPIC)")
    replay.add_argument("--group-id", help="consumer group (default <RERANK_GROUP_ID>.replay.<replay id>)")
    replay.add_argument("--model", help="model name or local directory (overrides RERANK_MODEL)")
    replay.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides RERANK_DEVICE)")
    replay.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    replay.add_argument("--json", action="store_true", help="print the summary as JSON")
    replay.set_defaults(func=cmd_replay)

    dlq = sub.add_parser(
        "dlq",
        help="inspect and requeue the dead letters of RERANK_DLQ_TOPIC",
        description="Inspect (`list`) and requeue (`requeue`) the dead letters of RERANK_DLQ_TOPIC.",
    )
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, parser_class=Parser)
    dlq_list = _command(
        dlq_sub,
        "list",
        summary="dead letters: counts by reason and the newest entries",
        description="Count the dead letters of RERANK_DLQ_TOPIC by reason, then show the newest (time, reason, "
        "original topic[partition]@offset, job_id, message).",
        exits=(2, 4),
        reads=KAFKA + ", RERANK_DLQ_TOPIC",
    )
    dlq_list.add_argument("--since", metavar="TIME", help=f"dead-lettered at or after: {time_help}")
    dlq_list.add_argument("--reason", action="append", help="only this reason; repeat for more")
    dlq_list.add_argument("--limit", type=int, default=50, help="entries shown, newest (default 50; 0: all)")
    dlq_list.add_argument("--json", action="store_true", help="print JSON: total, by_reason, entries")
    dlq_list.set_defaults(func=cmd_dlq_list)
    dlq_requeue = _command(
        dlq_sub,
        "requeue",
        summary="re-publish chosen dead letters' original bytes as jobs",
        description="Re-publish the original key, value and headers of the chosen dead letters to "
        "RERANK_JOBS_TOPIC (or --to-topic), each marked with where it was requeued from.",
        exits=(2, 4),
        reads=KAFKA + ", RERANK_DLQ_TOPIC, RERANK_JOBS_TOPIC",
    )
    dlq_requeue.add_argument("--reason", action="append", help="only this reason; repeat for more")
    dlq_requeue.add_argument("--since", metavar="TIME", help=f"dead-lettered at or after: {time_help}")
    dlq_requeue.add_argument("--all", action="store_true", help="every dead letter (without --reason or --since)")
    dlq_requeue.add_argument("--dry-run", action="store_true", help="print what would be requeued, send nothing")
    dlq_requeue.add_argument("--to-topic", help="send them there instead of RERANK_JOBS_TOPIC")
    dlq_requeue.set_defaults(func=cmd_dlq_requeue)

    schemas = _command(
        sub,
        "schemas",
        summary="write the wire JSON Schemas into a folder",
        description="Write the JSON Schemas of RerankJob and RerankResult into --out (default schemas/).",
        exits=(2,),
        reads="none",
    )
    schemas.add_argument("--out", default="schemas", help="folder to write into (default schemas)")
    schemas.set_defaults(func=cmd_schemas)
    return parser


_TIME_FLAGS = ("--from", "--to", "--since")


def _relative_times_attached(argv: list[str]) -> list[str]:
    """`--from -2h` as `--from=-2h`: argparse would read `-2h` as an option and fail."""
    if not any(arg in _TIME_FLAGS for arg in argv):
        return argv
    from worker.tools.times import is_relative_time

    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _TIME_FLAGS and is_relative_time(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(_relative_times_attached(sys.argv[1:] if argv is None else argv))
    args.func(args)


if __name__ == "__main__":
    main()
