"""Pack attention kernels side by side on one GPU (not the benchmark of record: that is `bench.throughput`).

Synthetic packs shaped like the throughput workloads (a head of query-prefix tokens, then documents of lognormal
length, each a segment), Qwen3-0.6B's attention geometry (16 query heads, 8 key/value heads, head_dim 128):
  flash+merge   FlashAttention varlen per segment, then `head_attention_merge` (the engine's `flash_varlen`)
  pack/BN       `pack_attention`, one kernel, key blocks of BN
Prints microseconds per call (Triton's do_bench, median) and the largest difference from an fp32 reference.
Usage on the GPU machine: python -m bench.attention_kernels [--out FILE]
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from triton.testing import do_bench

from worker.engine.kernels import head_attention_merge, pack_attention
from worker.engine.qwen3 import flash_varlen

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
SUFFIX_TOKENS = 13  # the assistant turn after each document


def synthetic_pack(
    rng: np.random.Generator, length: int, docs_per_job: int, mean_doc_tokens: float, head_tokens: int
) -> dict[str, Any]:
    """Per-token ranges of a pack of jobs (head, then documents) filled up to `length` tokens."""
    head_start, head_end, segment_start = (np.empty(length, dtype=np.int64) for _ in range(3))
    segments, pos = [0], 0
    while pos < length:
        group, end = pos, min(length, pos + head_tokens)
        head_start[pos:end], head_end[pos:end], segment_start[pos:end] = group, end, group
        head, pos = end, end
        segments.append(pos)
        sizes = np.exp(rng.normal(math.log(mean_doc_tokens), 0.5, docs_per_job)).clip(4, 512).astype(int)
        for size in sizes + SUFFIX_TOKENS:
            if pos >= length:
                break
            end = min(length, pos + int(size))
            head_start[pos:end], head_end[pos:end], segment_start[pos:end] = group, head, pos
            pos = end
            segments.append(pos)
    return {
        "ranges": [torch.from_numpy(a).cuda() for a in (head_start, head_end, segment_start)],
        "offsets": torch.tensor(sorted(set(segments)), dtype=torch.int32).cuda(),
        "longest": int(np.diff(sorted(set(segments))).max()),
        "segments": len(set(segments)) - 1,
    }


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: dict[str, Any], scale: float) -> torch.Tensor:
    """fp32 attention through the engine's own fp32 path on small chunks of rows (exact masks, no kernel)."""
    head_start, head_end, segment_start = pack["ranges"]
    length = q.shape[0]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    group = HEADS // KV_HEADS
    kf = k.float().repeat_interleave(group, 1)
    vf = v.float().repeat_interleave(group, 1)
    keys = torch.arange(length, device=q.device)
    for lo in range(0, length, 512):
        rows = torch.arange(lo, min(lo + 512, length), device=q.device)
        own = (keys[None] >= segment_start[rows, None]) & (keys[None] <= rows[:, None])
        head = (
            (keys[None] >= head_start[rows, None]) & (keys[None] < head_end[rows, None]) & (keys[None] <= rows[:, None])
        )
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), kf) * scale
        scores = scores.masked_fill(~(own | head)[None], float("-inf"))
        out[rows] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vf)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rng = np.random.default_rng(0)
    scale = HEAD_DIM**-0.5
    shapes = {  # name: (pack tokens, docs per job, mean document tokens, head tokens)
        "a: 1 job x 400 docs ~70 tok": (32000, 400, 66, 90),
        "b: docs ~250 tok": (32768, 1000, 240, 90),
        "c: 18 jobs x 20 docs": (32768, 20, 66, 60),
        "a at 8k tokens": (8192, 400, 66, 90),
    }
    results = []
    for name, (length, docs, mean, head) in shapes.items():
        pack = synthetic_pack(rng, length, docs, mean, head)
        qkv = torch.randn(length, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=dtype)
        q = qkv[:, : HEADS * HEAD_DIM].reshape(length, HEADS, HEAD_DIM).contiguous()
        k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].reshape(length, KV_HEADS, HEAD_DIM).contiguous()
        v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(length, KV_HEADS, HEAD_DIM)  # strided, as in the engine
        truth = reference(q, k, v, pack, scale)
        head_start, head_end, segment_start = pack["ranges"]

        def flash_merge() -> torch.Tensor:
            own, lse = flash_varlen(
                q, k, v, pack["offsets"], pack["offsets"], pack["longest"], pack["longest"], causal=True, scale=scale
            )
            return head_attention_merge(q, k, v, own, lse, head_start, head_end, scale)

        candidates = {"flash+merge": flash_merge}
        for block_n in (64, 32, 16):
            candidates[f"pack/BN{block_n}"] = lambda bn=block_n: pack_attention(
                q, k, v, head_start, head_end, segment_start, scale, block_n=bn
            )
        row: dict[str, Any] = {"shape": name, "tokens": length, "segments": pack["segments"]}
        for label, fn in candidates.items():
            out = fn()  # autotunes on first call
            torch.cuda.synchronize()
            row[label] = {
                "us": round(do_bench(fn, warmup=50, rep=300) * 1000, 1),
                "max_abs_diff_vs_fp32": float((out.float() - truth).abs().max()),
            }
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
