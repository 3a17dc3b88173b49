"""Where one 400-document job's time goes: host steps, the graph replay and the tail timed alone, then the
profiler's device timeline of single calls and of the overlapped stream (kernel time, busy span, idle gaps).

GPU machine: python -m bench.pack_timeline --model-dir /tmp/full [--out DIR] (DIR gets the Chrome traces)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.cpu_side import median_ms as host_ms  # median host time of fn, after one warm-up call
from bench.throughput import stream as throughput_stream
from bench.workloads import make_job
from worker.engine.load import load_engine
from worker.engine.plan import build_pack_arrays
from worker.testing.offline_model import build_random_reranker


def device_ms(fn: Callable[[], object], reps: int = 10) -> float:
    """Median device time between two events around `fn` (launched with the GPU idle)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(float(start.elapsed_time(end)))
    return round(statistics.median(times), 3)


def timeline(trace_path: Path, gap_us: float = 30.0) -> dict[str, Any]:
    """Device activity of a Chrome trace: kernel/copy time, the busy union, and the idle gaps between activities
    with the host call that preceded each (by time)."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    device = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
        key=lambda e: e["ts"],
    )
    host = sorted(
        (e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "user_annotation")), key=lambda e: e["ts"]
    )
    busy = 0.0
    gaps: list[tuple[float, float]] = []
    end = None
    for e in device:
        start, stop = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if end is None or start > end:
            if end is not None and start - end > gap_us:
                gaps.append((end, start - end))
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    by_name: dict[str, float] = {}
    for e in device:
        name = str(e["name"])[:70]
        by_name[name] = by_name.get(name, 0.0) + float(e["dur"])
    described = []
    for at, length in sorted(gaps, key=lambda g: -g[1])[:12]:
        during = [h["name"] for h in host if h["ts"] <= at + length and h["ts"] + h.get("dur", 0) >= at]
        described.append({"at_us": round(at - device[0]["ts"], 1), "gap_us": round(length, 1), "host": during[-6:]})
    span = float(device[-1]["ts"] + device[-1]["dur"] - device[0]["ts"]) if device else 0.0
    return {
        "device_events": len(device),
        "span_ms": round(span / 1e3, 3),
        "busy_ms": round(busy / 1e3, 3),
        "idle_ms": round((span - busy) / 1e3, 3),
        "gaps_over_us": gap_us,
        "gaps": len(gaps),
        "gap_ms_total": round(sum(g[1] for g in gaps) / 1e3, 3),
        "largest_gaps": described,
        "device_ms_by_name": {k: round(v / 1e3, 3) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:14]},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen3-reranker-full-random"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--cuda-graphs", choices=["on", "off"], default="on")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if not (a.model_dir / "config.json").exists():
        build_random_reranker(a.model_dir, size="full", seed=0)
    engine = load_engine(
        str(a.model_dir), device="cuda", dtype=a.dtype, attention=a.attention, cuda_graphs=a.cuda_graphs == "on"
    )
    engine.warm_up()
    rng = np.random.default_rng(1)
    requests = [make_job(rng, 400, 55, 160) for _ in range(6)]
    prepared = engine.prepare(requests[0])
    packs = engine.plan_packs([prepared])
    suffix = engine.tokenizer.suffix_ids
    scorer: Any = engine.scorer
    arrays = build_pack_arrays(packs[0], [prepared], suffix, scorer.pad_to_multiple, pad_id=0)
    row: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "info": engine.info.__dict__,
        "pack_tokens": arrays.num_tokens,
        "packs": len(packs),
        "host_prepare_ms": host_ms(lambda: engine.prepare(requests[0]), 10),
        "host_plan_ms": host_ms(lambda: engine.plan_packs([prepared]), 20),
        "host_pack_arrays_ms": host_ms(lambda: build_pack_arrays(packs[0], [prepared], suffix, 1, pad_id=0), 20),
        "score_pack_ms": device_ms(lambda: scorer.launch_pack(arrays).result()),
        "launch_pack_host_ms": host_ms(lambda: scorer.launch_pack(arrays), 5),
        "score_prepared_ms": device_ms(lambda: engine.score_prepared([prepared])),
    }
    graphs = getattr(scorer, "graphs", None)
    if graphs is not None:
        bucket = next(b for b in graphs.buckets if b >= arrays.num_tokens)
        ends = scorer._padded_ends(arrays)
        with torch.inference_mode():
            graphs.run(arrays, ends)
            row["bucket"] = bucket
            row["replay_ms"] = device_ms(lambda: graphs.graphs[bucket].replay())
            x, att = graphs.x_out[:bucket], graphs.attended_out[:bucket]
            ends_t = torch.from_numpy(ends).cuda()
            row["tail_ms"] = device_ms(lambda: scorer.forward_tail(x, att, ends_t))
            row["graph_run_host_ms"] = host_ms(lambda: graphs.run(arrays, ends), 20)  # launches only, no sync
            torch.cuda.synchronize()
    print(json.dumps(row), flush=True)

    from torch.profiler import ProfilerActivity, profile

    def latency() -> None:
        for _ in range(3):
            engine.score([requests[0]])
        torch.cuda.synchronize()

    streamed: list[list[float | None]] = []

    def stream() -> None:
        """As the worker runs: the next job tokenized on a thread and queued before waiting for the one ahead."""
        batches = throughput_stream(engine, [[r] for r in requests], torch.device("cuda")).results
        streamed[:] = [scored.scores for batch in batches for scored in batch]
        torch.cuda.synchronize()

    for name, fn in (("latency", latency), ("stream", stream)):
        fn()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
        wall = time.perf_counter() - t0
        path = a.out / f"trace-{name}.json"
        prof.export_chrome_trace(str(path))
        summary = {"mode": name, "wall_ms_under_profiler": round(wall * 1e3, 2), **timeline(path)}
        print(json.dumps(summary), flush=True)
    # queued back to back, each job's scores must be what it gets alone (shared graph buffers, reused staging)
    alone = [engine.score([r])[0].scores for r in requests]
    pairs = zip(streamed, alone, strict=True)
    gap = max(float(np.abs(np.asarray(s, dtype=float) - np.asarray(t, dtype=float)).max()) for s, t in pairs)
    print(json.dumps({"stream_vs_alone_max_score_diff": gap}), flush=True)


if __name__ == "__main__":
    main()
