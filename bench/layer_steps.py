"""Where one decoder layer's time goes at a pack's shape: each step of the packed forward timed alone, then
the whole layer as one CUDA graph, on the engine's own code (`Qwen3PackedScorer`'s compiled steps and kernels) over
a one-layer random model of Qwen3-Reranker-0.6B's width. No model on disk and no tokenizer: the pack is planned
from synthetic token counts shaped like workload a (one head, 400 documents of ~80 tokens with the suffix), so a
kernel change can be compared step by step between two commits at little GPU time.

Timing: the mean of `--loop` back-to-back calls between two CUDA events (the host's launch time hides behind the
device), median of `--reps`. Timing single calls between events would include Triton's host-side launch (tens of us).

GPU machine: python -m bench.layer_steps [--docs 400] [--head 75] [--doc-tokens 64] [--dtype bfloat16]
CPU smoke (tiny width, SDPA, wall clock): python -m bench.layer_steps --device cpu --size tiny --docs 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from worker.engine.api import PreparedJob
from worker.engine.plan import build_pack_arrays, plan_packs
from worker.engine.qwen3 import Qwen3PackedScorer, device_rows, mlp_block
from worker.testing.offline_model import ModelSize, _qwen3_config

SUFFIX_TOKENS = 9  # the prompt's suffix after each document, in Qwen3's tokenizer


def synthetic_pack(docs: int, head: int, doc_tokens: float, seed: int) -> Any:
    """One job's pack arrays: `head` tokens, then `docs` documents of lognormal length with median `doc_tokens`.
    The defaults and the log-std of 0.47 follow workload a as tokenized (head 75 tokens, document median 64)."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(doc_tokens), 0.47, docs)).clip(4, 4 * doc_tokens).astype(int)
    ids = np.int32(9)  # any ordinary token
    tokens = head + int(lengths.sum()) + SUFFIX_TOKENS * docs
    job = PreparedJob(
        np.full(head, ids), [np.full(n, ids) for n in lengths], np.arange(docs, dtype=np.int64), False, 0, tokens
    )
    suffix = np.full(SUFFIX_TOKENS, ids)
    (pack,) = plan_packs([job], SUFFIX_TOKENS, 1 << 30)
    return build_pack_arrays(pack, [job], suffix, 1, pad_id=0)


def timer(device: torch.device, loop: int, reps: int) -> Callable[[Callable[[], object]], float]:
    """us per call of fn: on CUDA the mean over `loop` back-to-back calls between two events, median of `reps`."""

    def time_us(fn: Callable[[], object]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                start.record()
                for _ in range(loop):
                    fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(float(start.elapsed_time(end)) * 1e3 / loop)
            else:
                began = time.perf_counter()
                for _ in range(loop):
                    fn()
                times.append((time.perf_counter() - began) * 1e6 / loop)
        return round(statistics.median(times), 1)

    return time_us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--size", choices=["tiny", "full"], default="full")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--head", type=int, default=75)
    ap.add_argument("--doc-tokens", type=float, default=64.0, help="median document length in tokens")
    ap.add_argument("--loop", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()

    from transformers import Qwen3ForCausalLM

    from worker.engine.load import resolve_attention

    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    size: ModelSize = a.size
    config = _qwen3_config(size)
    config.num_hidden_layers = 1
    layers_per_pack = _qwen3_config(size).num_hidden_layers
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(device=device, dtype=dtype).eval()
    attention = resolve_attention(a.attention, device, dtype)
    scorer = Qwen3PackedScorer(model, yes_id=9, no_id=10, attention=attention, compile=device.type == "cuda")
    arrays = synthetic_pack(a.docs, a.head, a.doc_tokens, seed=1)
    length = len(arrays.input_ids)
    rows = torch.from_numpy(np.stack(device_rows(arrays))).to(device)
    _, positions, head_start, head_end, segment_start = rows.unbind(0)
    mask = scorer._mask(arrays, head_start, head_end, segment_start)
    w, eps, heads, kv_heads = scorer.layers[0], scorer.eps, scorer.heads, scorer.kv_heads
    time_us = timer(device, a.loop, a.reps)
    steps: dict[str, float] = {}

    with torch.inference_mode():
        x = torch.randn(length, config.hidden_size, device=device, dtype=dtype)
        cos, sin = scorer.rotary(x.unsqueeze(0), positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [L, 1, D]
        scorer._dynamic(x, cos, sin)
        residual = torch.empty_like(x)

        def attention_inputs(stream: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return scorer.layer_qkv(stream, w, cos, sin)  # as `forward_body` makes them

        if scorer.triton_kernels:
            from worker.engine.kernels import qk_norm_rotary

            qkv = scorer._norm_qkv(x, w.input_norm, w.qkv, eps)
            cos2d, sin2d = cos[:, 0], sin[:, 0]
            steps["input RMSNorm + q/k/v matmul"] = time_us(lambda: scorer._norm_qkv(x, w.input_norm, w.qkv, eps))
            steps["q/k RMSNorm + rotary"] = time_us(
                lambda: qk_norm_rotary(qkv, cos2d, sin2d, w.qk_norms, heads, kv_heads, eps)
            )
        else:
            steps["input RMSNorm + q/k/v + q/k RMSNorm + rotary"] = time_us(lambda: attention_inputs(x))
        q, k, v = attention_inputs(x)
        steps[f"attention ({attention})"] = time_us(lambda: scorer._attend(q, k, v, mask))
        attended = scorer._attend(q, k, v, mask).reshape(length, -1)
        steps["o_proj + residual"] = time_us(lambda: torch.addmm(x, attended, w.o.t(), out=residual))
        gated = scorer._norm_gate_up(x, w.post_norm, w.gate_up, eps)
        steps["post RMSNorm + gate/up matmul + SiLU * up"] = time_us(
            lambda: scorer._norm_gate_up(x, w.post_norm, w.gate_up, eps)
        )
        matmul_alone = "  of which the gate/up matmul alone"
        if scorer.fused_gate_up_reason is None:  # the step above is kernels.gate_up_silu: no separate matmul in it
            matmul_alone = "  (cuBLAS gate/up matmul alone, which gate_up_silu replaces)"
        steps[matmul_alone] = time_us(lambda: F.linear(x, w.gate_up))
        steps["down_proj + residual"] = time_us(lambda: torch.addmm(x, gated, w.down.t(), out=residual))

        def layer() -> torch.Tensor:
            """The whole layer as `forward_body` runs it (the residual stream updated in place)."""
            qn, kn, vn = attention_inputs(residual)
            return mlp_block(residual, scorer._attend(qn, kn, vn, mask), w, eps, scorer._norm_gate_up)

        residual.copy_(x)
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                layer()  # compile and tune outside the capture
            torch.cuda.current_stream(device).wait_stream(side)
            with torch.cuda.graph(graph):
                layer()
            whole = time_us(graph.replay)
        else:
            whole = time_us(layer)

    summed = round(sum(us for name, us in steps.items() if not name.startswith(" ")), 1)
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "dtype": a.dtype,
                "attention": attention,
                "pack_tokens": length,
                "docs": a.docs,
                "us_per_layer": steps,
                "sum_of_steps_us": summed,
                "layer_as_one_graph_us" if device.type == "cuda" else "layer_us": whole,
                f"x{layers_per_pack}_layers_ms": round(whole * layers_per_pack / 1e3, 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
