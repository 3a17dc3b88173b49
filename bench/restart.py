"""Warm restarts: process start to first result, with an empty compile cache and with the one a run before left.

Each run is a fresh Python process (`--child`) that imports the engine, loads the model with RERANK_CACHE_DIR's
`cache_dir`, warms up (compile, CUDA graphs) and scores one 400-document job (workload a); the parent times it from
the moment it starts the process. The first run gets an empty cache directory; the later ones reuse it, as a
restarted pod does with the chart's model volume.

GPU machine: python -m bench.restart --model-dir /tmp/full [--runs 3] [--dtype bfloat16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def child(model_dir: Path, dtype: str, cache_dir: Path, spawned_at: float) -> None:
    started = time.time()
    import numpy as np
    import torch

    from bench.workloads import make_job
    from worker.engine.load import load_engine

    imported = time.time()
    engine = load_engine(str(model_dir), device="cuda", dtype=dtype, cache_dir=str(cache_dir))
    loaded = time.time()
    warm_s = engine.warm_up()
    warmed = time.time()
    engine.score([make_job(np.random.default_rng(1), 400, 55, 160)])
    torch.cuda.synchronize()
    done = time.time()
    row = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "interpreter_s": round(started - spawned_at, 2),
        "imports_s": round(imported - started, 2),
        "load_s": round(loaded - imported, 2),
        "warm_up_s": round(warm_s, 2),
        "warm_up_wall_s": round(warmed - loaded, 2),
        "first_job_s": round(done - warmed, 3),
        "start_to_first_result_s": round(done - spawned_at, 2),
    }
    print("RESULT " + json.dumps(row), flush=True)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def child_args(a: argparse.Namespace, cache_dir: Path) -> list[str]:
    return ["--model-dir", str(a.model_dir), "--dtype", a.dtype, "--cache-dir", str(cache_dir)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--runs", type=int, default=3, help="the first with an empty cache, the rest reusing it")
    ap.add_argument("--cache-dir", type=Path, help="default: a new temporary directory")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.model_dir, a.dtype, a.cache_dir, a.spawned_at)
        return
    cache_dir = a.cache_dir or Path(tempfile.mkdtemp(prefix="rerank-compile-cache-"))
    # The process-wide defaults (/tmp/torchinductor_<user>, ~/.triton) must not serve as a second, warm cache.
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    rows: list[dict[str, Any]] = []
    for run in range(a.runs):
        before = directory_bytes(cache_dir)
        spawned_at = time.time()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.restart",
                "--child",
                *child_args(a, cache_dir),
                "--spawned-at",
                repr(spawned_at),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            sys.stderr.write(out.stdout + out.stderr)
            raise SystemExit(f"run {run} failed (exit {out.returncode})")
        measured = json.loads(lines[-1].removeprefix("RESULT "))
        row = {"run": run, "cache": "empty" if before == 0 else "filled", **measured}
        row["cache_mib_after"] = round(directory_bytes(cache_dir) / 2**20, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
