"""`rerank-worker`: a thin command line over the engine (and, later, the Kafka loop).

Exit codes: 0 done; 1 the job was invalid; 2 bad usage or settings; 3 the model could not be loaded.
Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

import orjson
from pydantic import ValidationError

from worker.engine import InvalidJobError, RerankEngine
from worker.settings import Settings

EXIT_INVALID_JOB = 1
EXIT_USAGE = 2
EXIT_MODEL = 3


def fail(code: int, message: str) -> NoReturn:
    print(f"rerank-worker: {message}", file=sys.stderr)
    raise SystemExit(code)


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        from worker.messages import describe_validation_error

        fail(EXIT_USAGE, f"invalid settings: {describe_validation_error(e)}")


def build_engine(settings: Settings) -> RerankEngine:
    """The one place where settings become an engine."""
    try:
        return RerankEngine.load(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            attention=settings.attention,
            max_batch_tokens=settings.max_batch_tokens,
            max_doc_tokens=settings.max_doc_tokens,
            max_query_tokens=settings.max_query_tokens,
            default_instruction=settings.instruction,
            doc_cache_size=settings.doc_cache_size,
        )
    except ValueError as e:  # settings the engine cannot honour (budget too small, unknown dtype)
        fail(EXIT_USAGE, f"invalid settings: {e}")
    except (OSError, RuntimeError) as e:  # model missing, unreachable hub, no CUDA
        fail(EXIT_MODEL, f"cannot load model {settings.model!r}: {str(e).splitlines()[0] if str(e) else e!r}")


def cmd_score(args: argparse.Namespace) -> None:
    from worker.messages import RerankResult, parse_job

    settings = load_settings(model=args.model, device=args.device)
    raw = Path(args.input).read_bytes() if args.input and args.input != "-" else sys.stdin.buffer.read()
    try:
        job = parse_job(raw, max_docs=settings.max_docs)
        engine = build_engine(settings)
        (scored,) = engine.score([job.to_score_request()])
    except InvalidJobError as e:
        fail(EXIT_INVALID_JOB, f"invalid job ({e.reason}): {e}")
    result = RerankResult.from_scores(job, scored, engine.info)
    option = orjson.OPT_INDENT_2 if args.pretty else 0
    sys.stdout.buffer.write(orjson.dumps(result.model_dump(mode="json"), option=option) + b"\n")


def cmd_schemas(args: argparse.Namespace) -> None:
    from worker.messages import write_schemas

    for path in write_schemas(Path(args.out)):
        print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rerank-worker", description="Qwen3-Reranker worker.")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score one RerankJob (JSON on stdin or --input) and print the result")
    score.add_argument("--model", help="model name or local directory (overrides RERANK_MODEL)")
    score.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides RERANK_DEVICE)")
    score.add_argument("--input", help="file holding the job; default stdin")
    score.add_argument("--pretty", action="store_true", help="indent the JSON output")
    score.set_defaults(func=cmd_score)

    schemas = sub.add_parser("schemas", help="write the wire JSON Schemas into a folder")
    schemas.add_argument("--out", default="schemas")
    schemas.set_defaults(func=cmd_schemas)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
