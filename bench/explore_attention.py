"""Exploration, not a benchmark of record: one 400-document job (one pack) through the engine, then through the
Hugging Face decoder with FlexAttention, eager or under torch.compile, with 128- or 64-wide blocks.
Usage on the GPU machine: python -m bench.explore_attention --model-dir /tmp/full
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.workloads import make_job
from worker.engine.load import load_engine
from worker.engine.masks import packed_rerank_mask
from worker.engine.plan import build_pack_arrays
from worker.testing.offline_model import build_random_reranker


def bench(fn: Any, reps: int = 10) -> tuple[float, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main() -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/full"))
    ap.add_argument("--mean-words", type=float, default=55.0)
    ap.add_argument("--variants", default="engine,eager_blk128,eager_blk64,compiled_blk128,compiled_blk64")
    a = ap.parse_args()
    if not (a.model_dir / "config.json").exists():
        build_random_reranker(a.model_dir, size="full", seed=0)
    engine = load_engine(str(a.model_dir), device="cuda", dtype="bfloat16", max_pack_tokens=65536)
    request = make_job(np.random.default_rng(1), 400, a.mean_words, 160)
    jobs = [engine.prepare(request)]
    (pack,) = engine.plan_packs(jobs)
    scorer = engine.scorer
    hf_decoder = scorer.model.get_decoder()  # the model's own decoder (loaded with FlexAttention), whatever forward
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": pack.num_tokens}))
    compiled: dict[str, Any] = {}
    for variant in a.variants.split(","):
        if variant == "engine":
            first, med = bench(lambda: engine.score([request]))
            print(json.dumps({"variant": variant, "first_s": round(first, 2), "median_ms": round(med * 1e3, 2)}))
            continue
        mode, blk = variant.split("_blk")
        block = int(blk)
        arrays = build_pack_arrays(pack, jobs, engine.tokenizer.suffix_ids, pad_to_multiple=1024)
        dev = scorer.device
        ids = torch.from_numpy(arrays.input_ids).to(dev).view(1, -1)
        pos = torch.from_numpy(arrays.position_ids).to(dev).view(1, -1)
        group = torch.from_numpy(arrays.group).to(dev)
        doc = torch.from_numpy(arrays.doc).to(dev)
        ends = torch.from_numpy(arrays.doc_ends).to(dev)
        length = ids.shape[1]
        decoder = hf_decoder
        if mode == "compiled":
            decoder = compiled.setdefault("decoder", torch.compile(hf_decoder, dynamic=False))
        kernel_options = {"BLOCK_M": block, "BLOCK_N": block} if block != 128 else None

        def once() -> torch.Tensor:
            mask = create_block_mask(
                packed_rerank_mask(group, doc), 1, None, length, length, device=dev, BLOCK_SIZE=block, _compile=True
            )
            kw = {"kernel_options": kernel_options} if kernel_options else {}
            with torch.inference_mode():
                h = decoder(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False, **kw)
                h = h.last_hidden_state[0, ends]
                return torch.sigmoid(h.float() @ scorer.yes_minus_no)

        try:
            first, med = bench(once)
            _, mask_med = bench(
                lambda: create_block_mask(
                    packed_rerank_mask(group, doc),
                    1,
                    None,
                    length,
                    length,
                    device=dev,
                    BLOCK_SIZE=block,
                    _compile=True,
                )
            )
            row = {
                "variant": variant,
                "padded_len": length,
                "first_s": round(first, 2),
                "median_ms": round(med * 1e3, 2),
                "mask_ms": round(mask_med * 1e3, 2),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            }
        except Exception as e:  # keep going: one variant failing must not hide the others
            row = {"variant": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(row), flush=True)
    if "profile" in a.variants:
        pass


if __name__ == "__main__":
    main()
