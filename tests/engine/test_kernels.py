"""The Triton kernels of the packed forward against plain torch.

On a GPU they run as compiled kernels (fp32, fp16, bf16). Without one they run under Triton's interpreter in a
child process (the interpreter is chosen when the kernels are defined, so it needs a fresh interpreter); numpy has
no bfloat16, so there fp32 and fp16 only.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from worker.engine.qwen3 import rms_norm, rotate_half

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_pack(length: int, seed: int, padding: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """head_start, head_end, segment_start of a pack of groups: a head (3..150 tokens: several key blocks), then
    1..4 documents; the last `padding` rows laid out as a CUDA-graph bucket pads them (one segment, empty head)."""
    rng = np.random.default_rng(seed)
    head_start, head_end, segment_start = (np.empty(length, dtype=np.int64) for _ in range(3))
    real = length - padding
    head_start[real:], head_end[real:], segment_start[real:] = real, real, real
    pos = 0
    while pos < real:
        group, end = pos, min(real, pos + int(rng.integers(3, 150)))
        head_start[pos:end], head_end[pos:end], segment_start[pos:end] = group, end, group
        head, pos = end, end
        for _ in range(int(rng.integers(1, 5))):
            end = min(real, pos + int(rng.integers(1, 90)))
            head_start[pos:end], head_end[pos:end], segment_start[pos:end] = group, head, pos
            pos = end
    return tuple(torch.from_numpy(a) for a in (head_start, head_end, segment_start))  # type: ignore[return-value]


def check_kernels(device: str, dtype_name: str) -> None:
    from worker.engine.kernels import head_attention_merge, pack_attention, qk_norm_rotary

    dtype = getattr(torch, dtype_name)
    tol = TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(0)
    length, heads, kv_heads, dim, eps = 700, 4, 2, 128, 1e-6

    def rand(*shape: int, low: float = -1.0) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * (1 - low) + low).to(device=device, dtype=dtype)

    qkv = rand(length, (heads + 2 * kv_heads) * dim) * 3
    angles = torch.rand(length, dim // 2, generator=gen) * 6.3
    cos = torch.cat([angles.cos()] * 2, -1).to(device=device, dtype=dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(device=device, dtype=dtype)
    norms = rand(2, dim, low=0.5)

    q, k, v = qk_norm_rotary(qkv, cos, sin, norms, heads, kv_heads, eps)
    q_ref, k_ref, v_ref = torch.split(qkv, [heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q_ref = rms_norm(q_ref.reshape(length, heads, dim), norms[0], eps)
    k_ref = rms_norm(k_ref.reshape(length, kv_heads, dim), norms[1], eps)
    q_ref = q_ref * cos[:, None] + rotate_half(q_ref) * sin[:, None]
    k_ref = k_ref * cos[:, None] + rotate_half(k_ref) * sin[:, None]
    torch.testing.assert_close(q, q_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(k, k_ref, rtol=tol, atol=tol)
    assert torch.equal(v, v_ref.reshape(length, kv_heads, dim))
    assert v.data_ptr() == v_ref.data_ptr()  # a view, not a copy

    if device == "cuda" and dtype == torch.float32:
        # The attention kernels serve bf16/fp16 only on CUDA (fp32 there is FlexAttention), and autotuning them for
        # fp32 compiles minutes of full-precision matmul code (one merge config alone: 52 s offline with Triton 3.6;
        # the GPU test did not finish in 200 s). The interpreter checks their fp32 arithmetic on CPU.
        return
    head_start, head_end, segment_start = random_pack(length, seed=1, padding=37)
    rows, keys = torch.arange(length)[:, None], torch.arange(length)[None, :]
    own_mask = (keys >= segment_start[:, None]) & (keys <= rows)
    full_mask = own_mask | ((keys >= head_start[:, None]) & (keys < head_end[:, None]) & (keys <= rows))
    scale = dim**-0.5
    group = heads // kv_heads
    scores = torch.einsum(
        "qhd,khd->hqk", q.double().cpu(), k.double().cpu().repeat_interleave(group, 1)
    ) * scale  # fmt: skip
    values = v.double().cpu().repeat_interleave(group, 1)

    def attend(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masked = scores.masked_fill(~mask, float("-inf"))
        return torch.einsum("hqk,khd->qhd", masked.softmax(-1), values), masked.logsumexp(-1)

    own, own_lse = attend(own_mask)
    expected, _ = attend(full_mask)
    out = own.to(device=device, dtype=dtype).contiguous()
    own_before = out.clone()
    merged = head_attention_merge(
        q, k, v, out, own_lse.float().to(device), head_start.to(device), head_end.to(device), scale
    )
    assert merged.data_ptr() == out.data_ptr()  # in place
    is_doc = torch.arange(length) >= head_end
    assert is_doc.sum() > length // 2  # both kinds of rows are exercised
    assert (~is_doc).sum() > 10
    assert torch.equal(merged[~is_doc.to(device)], own_before[~is_doc.to(device)])  # head rows keep their own view
    torch.testing.assert_close(merged.double().cpu(), expected, rtol=tol, atol=tol)

    ranges = [t.to(device) for t in (head_start, head_end, segment_start)]
    for block_n in (32, 64):
        whole = pack_attention(q, k, v, *ranges, scale, block_n=block_n)
        torch.testing.assert_close(whole.double().cpu(), expected, rtol=tol, atol=tol)


# numpy (under the interpreter) has no bfloat16
DTYPES = ["bfloat16", "float16", "float32"] if torch.cuda.is_available() else ["float32", "float16"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels(dtype: str) -> None:
    if torch.cuda.is_available():
        check_kernels("cuda", dtype)
        return
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    code = f"from tests.engine.test_kernels import check_kernels; check_kernels('cpu', {dtype!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
