"""Triton kernels for the packed forward on CUDA: each does in one pass what the compiler or a library does in
several, so no intermediate tensor between those passes is written to memory and read back.

`qk_norm_rotary`: per-head RMSNorm of q and k and rotate-half rotary, read straight from the fused q/k/v matmul
output and written as the contiguous q and k FlashAttention takes (v is passed on as a strided view: no copy).
Roundings follow the eager Qwen3 code step by step (norm, weight product, each rotary product and their sum are
each rounded to the model dtype), so the result is what `transformers` computes, not a more precise cousin of it.

`head_attention_merge`: each document token's attention over its group's head (the shared query prefix), merged
into the attention over its own segment that FlashAttention already wrote, in place, by log-sum-exp. One pass, so
there is no second FlashAttention call over gathered head rows and no separate merge pass (which would write and
read three full-size tensors). The head is the contiguous pack range [head_start, head_end) of each token, so
nothing is gathered.

`pack_attention`: the whole pack's attention in one kernel (own segment, then the group's head, one online
softmax), from per-token ranges on the device alone, so a CUDA graph can hold it.

`gate_up_silu`: the MLP's fused gate/up matmul with SiLU(gate) * up applied to the accumulator before anything is
written (cuBLAS has no such epilogue: with it the [L, 2 x intermediate] output is written, then read back by a
separate SiLU * up kernel). A persistent kernel with TMA loads; each tile's B operand is one [2, 128, 64] box of the
fused weight seen as [2, intermediate, hidden]: 128 gate rows and the same 128 up rows, so one matmul gives both
halves.

All take any float dtype (`gate_up_silu` only bf16 or fp16 on CUDA); the tests run them under Triton's interpreter
on CPU and on the GPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

# Triton's interpreter (CPU tests) cannot time configurations: it gets one, and a single config is never timed.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(configs: list[triton.Config]) -> list[triton.Config]:
    return configs[:1] if _INTERPRETED else configs


@triton.autotune(
    configs=_configs([triton.Config({"BLOCK_R": r}, num_warps=w) for r in (128, 64, 256) for w in (4, 8)]),
    key=["H", "KV", "D"],  # not the length: a new pack length must not tune again
)
@triton.jit
def _qk_norm_rotary_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    norm_ptr,  # [2, D]: q_norm weight, then k_norm weight
    q_ptr,
    k_ptr,
    length,
    stride_qkv,
    stride_rot,
    eps,
    H: tl.constexpr,
    KV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # A program takes BLOCK_R consecutive (token, head) rows, head fastest: its loads and stores are whole runs of
    # each token's q/k and a token's cos/sin are read once, then hit in cache (one program per token block and head
    # would re-read every cos/sin row once per head).
    HEADS: tl.constexpr = H + KV
    HALF: tl.constexpr = D // 2
    pairs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    token = pairs // HEADS
    head = pairs % HEADS  # 0..H-1: q heads, H..H+KV-1: k heads
    live = token < length
    token64 = token.to(tl.int64)
    cols = tl.arange(0, HALF)
    src = qkv_ptr + token64[:, None] * stride_qkv + head[:, None] * D + cols[None, :]
    lo = tl.load(src, mask=live[:, None], other=0.0)
    hi = tl.load(src + HALF, mask=live[:, None], other=0.0)
    dtype = lo.dtype
    lo = lo.to(tl.float32)
    hi = hi.to(tl.float32)
    inv_rms = tl.rsqrt((tl.sum(lo * lo, 1) + tl.sum(hi * hi, 1)) / D + eps)
    weights = norm_ptr + (head >= H).to(tl.int32)[:, None] * D + cols[None, :]
    w_lo = tl.load(weights).to(tl.float32)
    w_hi = tl.load(weights + HALF).to(tl.float32)
    # eager: weight * (x * rsqrt(var + eps)).to(dtype), a dtype product
    n_lo = (w_lo * (lo * inv_rms[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    n_hi = (w_hi * (hi * inv_rms[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    rot = token64[:, None] * stride_rot + cols[None, :]
    c_lo = tl.load(cos_ptr + rot, mask=live[:, None], other=0.0).to(tl.float32)
    c_hi = tl.load(cos_ptr + rot + HALF, mask=live[:, None], other=0.0).to(tl.float32)
    s_lo = tl.load(sin_ptr + rot, mask=live[:, None], other=0.0).to(tl.float32)
    s_hi = tl.load(sin_ptr + rot + HALF, mask=live[:, None], other=0.0).to(tl.float32)
    # eager: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x_hi, x_lo); each product and the sum rounded
    out_lo = ((n_lo * c_lo).to(dtype).to(tl.float32) + (-n_hi * s_lo).to(dtype).to(tl.float32)).to(dtype)
    out_hi = ((n_hi * c_hi).to(dtype).to(tl.float32) + (n_lo * s_hi).to(dtype).to(tl.float32)).to(dtype)
    is_q = head < H
    q_at = q_ptr + token64[:, None] * (H * D) + head[:, None] * D + cols[None, :]
    k_at = k_ptr + token64[:, None] * (KV * D) + (head - H)[:, None] * D + cols[None, :]
    to_q = (live & is_q)[:, None]
    to_k = (live & ~is_q)[:, None]
    tl.store(q_at, out_lo, mask=to_q)
    tl.store(q_at + HALF, out_hi, mask=to_q)
    tl.store(k_at, out_lo, mask=to_k)
    tl.store(k_at + HALF, out_hi, mask=to_k)


QK_MAX_ROWS = 2**31 - 1024  # int32 row index, with room for the last program's block (BLOCK_R <= 256)


def qk_norm_rotary(
    qkv: Tensor,  # [L, (H + 2 KV) * D]
    cos: Tensor,  # [L, D]
    sin: Tensor,
    norms: Tensor,  # [2, D]
    heads: int,
    kv_heads: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """q [L, H, D] and k [L, KV, D] normed and rotated (contiguous), v [L, KV, D] a view of `qkv`."""
    length = qkv.shape[0]
    head_dim = norms.shape[1]
    if qkv.stride(1) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride() or not norms.is_contiguous():
        raise ValueError("qk_norm_rotary wants row-major qkv, cos and sin and a contiguous [2, D] norms")
    pairs = length * (heads + kv_heads)
    if pairs > QK_MAX_ROWS:  # the kernel indexes rows in int32, a last program's included
        raise ValueError(f"qk_norm_rotary takes at most {QK_MAX_ROWS} (token, head) rows, not {pairs}")
    q = torch.empty(length, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(length, kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (triton.cdiv(pairs, meta["BLOCK_R"]),)

    _qk_norm_rotary_kernel[grid](
        qkv, cos, sin, norms, q, k, length, qkv.stride(0), cos.stride(0), eps, H=heads, KV=kv_heads, D=head_dim
    )
    v = qkv[:, (heads + kv_heads) * head_dim :].view(length, kv_heads, head_dim)
    return q, k, v


# Rows of a query tile: BLOCK_M tokens x the GROUP query heads that share one key/value head, so every key block
# loaded feeds GROUP heads at once and the matmuls are 128 rows tall whatever the grouping.
PACK_TILE_ROWS = 128
LOG2_E = 1.4426950408889634  # the attention kernels' softmax runs in base 2: exp(x) = exp2(x * log2(e))


@triton.jit
def _attend_block(q, kt, vt, visible, m, denom, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One key block of an online softmax in base 2: the running max `m`, denominator and output sum, updated."""
    scores = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * qk_scale
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    alpha = tl.math.exp2(m - m_new)
    p = tl.math.exp2(scores - m_new[:, None])
    denom = denom * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
    return m_new, denom, acc


@triton.jit
def _attend_heads(
    q,
    k_ptr,
    v_ptr,
    stride_k,
    stride_v,
    kv,
    is_doc,
    head_start,
    head_end,
    length,
    m,
    denom,
    acc,
    qk_scale,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Document rows (`is_doc`) over their group's head [head_start, head_end), continuing an online softmax in
    base 2. One pass per group (job) among the rows: a block straddling two jobs must not walk the keys between
    their heads (the earlier job's documents, all masked out)."""
    dims = tl.arange(0, D)
    group_lo = tl.min(tl.where(is_doc, head_start, length), 0)
    while group_lo < length:
        in_group = is_doc & (head_start == group_lo)  # these rows' head is exactly [group_lo, group_hi)
        group_hi = tl.max(tl.where(in_group, head_end, 0), 0)
        for start in range(group_lo, group_hi, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            keys64 = keys.to(tl.int64)
            in_range = keys < group_hi
            k_at = k_ptr + keys64[:, None] * stride_k + kv * D + dims[None, :]
            kt = tl.load(k_at, mask=in_range[:, None], other=0.0)
            vt = tl.load(v_ptr + keys64[:, None] * stride_v + kv * D + dims[None, :], mask=in_range[:, None], other=0.0)
            # Only this group's rows, and only keys inside its head: the last key block can run on into the next
            # job's head (loaded as zeros), which that job's rows must not count here.
            visible = in_group[:, None] & in_range[None, :]
            m, denom, acc = _attend_block(q, kt, vt, visible, m, denom, acc, qk_scale, DOT_PRECISION)
        group_lo = tl.min(tl.where(is_doc & (head_start > group_lo), head_start, length), 0)
    return m, denom, acc


@triton.autotune(
    configs=_configs(
        [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m in (64, 128) for w in (4, 8) for s in (1, 2)]
    ),
    key=["H", "KV", "D", "DOT_PRECISION"],
    restore_value=["out_ptr"],  # the kernel updates its input in place: every timed trial must start from it
)
@triton.jit
def _head_attention_merge_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,  # in: attention over the own segment; out: merged with the head (document rows only)
    lse_ptr,  # [H, L] fp32: natural log-sum-exp of the own-segment attention
    head_start_ptr,
    head_end_ptr,
    length,
    stride_q,
    stride_k,
    stride_v,
    stride_o,
    stride_lse,
    qk_scale,  # softmax scale x log2(e): the head pass works in base 2
    H: tl.constexpr,
    KV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    block = tl.program_id(0)
    h = tl.program_id(1)
    kv = h // (H // KV)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows < length
    head_start = tl.load(head_start_ptr + rows, mask=live, other=0)
    head_end = tl.load(head_end_ptr + rows, mask=live, other=0)
    is_doc = live & (rows >= head_end)  # head tokens see only their own segment: already final
    if tl.max(is_doc.to(tl.int32), 0) == 0:
        return
    dims = tl.arange(0, D)
    rows64 = rows.to(tl.int64)
    q = tl.load(q_ptr + rows64[:, None] * stride_q + h * D + dims[None, :], mask=is_doc[:, None], other=0.0)
    # issued before the key loop so their latency hides behind it
    out_at = out_ptr + rows64[:, None] * stride_o + h * D + dims[None, :]
    own = tl.load(out_at, mask=is_doc[:, None], other=0.0)
    own_lse = tl.load(lse_ptr + h * stride_lse + rows, mask=is_doc, other=0.0)
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a row with no key yet keeps exp2(m - m_new) = 1
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    m, denom, acc = _attend_heads(
        q, k_ptr, v_ptr, stride_k, stride_v, kv, is_doc, head_start, head_end, length, m, denom, acc, qk_scale,
        D, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    own_lse2 = own_lse * 1.4426950408889634  # LOG2_E: natural log-sum-exp -> base 2, the head pass's units
    top = tl.maximum(m, own_lse2)
    own_w = tl.math.exp2(own_lse2 - top)
    head_w = tl.math.exp2(m - top)
    merged = (own.to(tl.float32) * own_w[:, None] + acc * head_w[:, None]) / (own_w + denom * head_w)[:, None]
    tl.store(out_at, merged.to(own.dtype), mask=is_doc[:, None])


def head_attention_merge(
    q: Tensor,  # [L, H, D]
    k: Tensor,  # [L, KV, D], any token stride
    v: Tensor,
    own: Tensor,  # [L, H, D]: attention of each token over its own segment; updated in place
    own_lse: Tensor,  # [H, L] fp32
    head_start: Tensor,  # [L] int
    head_end: Tensor,
    scale: float,
) -> Tensor:
    length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    for t in (q, k, v, own):
        if t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError("head_attention_merge wants [L, heads, D] tensors with contiguous heads")
    if head_start.stride(0) != 1 or head_end.stride(0) != 1:
        raise ValueError("head_attention_merge wants contiguous head_start and head_end")
    if own_lse.stride(1) != 1:
        own_lse = own_lse.contiguous()

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(length, meta["BLOCK_M"]), heads)

    # BLOCK_N fixed (not tuned): it sets where the online softmax is cut, so it must not vary between machines
    _head_attention_merge_kernel[grid](
        q, k, v, own, own_lse, head_start, head_end, length,
        q.stride(0), k.stride(0), v.stride(0), own.stride(0), own_lse.stride(0), scale * LOG2_E,
        H=heads, KV=kv_heads, D=head_dim, BLOCK_N=64,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (tf32 drops 13 bits)
    )  # fmt: skip
    return own


@triton.autotune(
    configs=_configs([triton.Config({}, num_warps=w, num_stages=s) for w in (8, 4) for s in (2, 3, 1)]),
    key=["H", "KV", "D", "BLOCK_N", "DOT_PRECISION"],  # not the length: a new pack length must not tune again
)
@triton.jit
def _pack_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    head_start_ptr,
    head_end_ptr,
    segment_start_ptr,
    length,
    stride_q,
    stride_k,
    stride_v,
    stride_o,
    qk_scale,  # softmax scale x log2(e): the kernel works in base 2
    H: tl.constexpr,
    KV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    GROUP: tl.constexpr = H // KV
    block = tl.program_id(0)
    kv = tl.program_id(1)
    tile = tl.arange(0, BLOCK_M * GROUP)  # tile row i: token i % BLOCK_M of the block, query head i // BLOCK_M
    rows = block * BLOCK_M + tile % BLOCK_M
    heads = kv * GROUP + tile // BLOCK_M
    live = rows < length
    segment_start = tl.load(segment_start_ptr + rows, mask=live, other=length)
    head_start = tl.load(head_start_ptr + rows, mask=live, other=length)
    head_end = tl.load(head_end_ptr + rows, mask=live, other=length)
    is_doc = live & (rows >= head_end)  # head tokens see only their own segment (the head itself)
    dims = tl.arange(0, D)
    rows64 = rows.to(tl.int64)
    q = tl.load(q_ptr + rows64[:, None] * stride_q + heads[:, None] * D + dims[None, :], mask=live[:, None], other=0.0)
    m = tl.full([BLOCK_M * GROUP], -1.0e30, tl.float32)  # finite: a row with no key yet keeps exp2(m - m_new) = 1
    denom = tl.zeros([BLOCK_M * GROUP], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP, D], tl.float32)
    # 1. the own segment, causally: keys from the earliest segment start among the block's rows to its last row
    own_lo = tl.min(segment_start, 0)
    own_hi = tl.minimum(block * BLOCK_M + BLOCK_M, length)
    for start in range(own_lo, own_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        keys64 = keys.to(tl.int64)
        in_range = keys < own_hi
        kt = tl.load(k_ptr + keys64[:, None] * stride_k + kv * D + dims[None, :], mask=in_range[:, None], other=0.0)
        vt = tl.load(v_ptr + keys64[:, None] * stride_v + kv * D + dims[None, :], mask=in_range[:, None], other=0.0)
        visible = (keys[None, :] >= segment_start[:, None]) & (keys[None, :] <= rows[:, None])
        m, denom, acc = _attend_block(q, kt, vt, visible, m, denom, acc, qk_scale, DOT_PRECISION)
    # 2. document rows over their group's head
    m, denom, acc = _attend_heads(
        q, k_ptr, v_ptr, stride_k, stride_v, kv, is_doc, head_start, head_end, length, m, denom, acc, qk_scale,
        D, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    out = acc / tl.maximum(denom, 1.0e-30)[:, None]  # every live row sees at least itself: denom >= 1
    out_at = out_ptr + rows64[:, None] * stride_o + heads[:, None] * D + dims[None, :]
    tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=live[:, None])


def pack_attention_unsupported(heads: int, kv_heads: int) -> str | None:
    """Why `pack_attention` cannot run this head layout (None if it can): a tile is 128 rows of whole query groups."""
    group = heads // kv_heads
    if heads % kv_heads or group & (group - 1) or group > PACK_TILE_ROWS // 16:
        return f"{heads} query heads over {kv_heads} key/value heads (it needs a power-of-two group of at most 8)"
    return None


def pack_attention(
    q: Tensor,  # [L, H, D]
    k: Tensor,  # [L, KV, D], any token stride
    v: Tensor,
    head_start: Tensor,  # [L] int
    head_end: Tensor,
    segment_start: Tensor,
    scale: float,
    *,
    block_n: int = 32,  # tuned on Hopper for bf16 32k-token packs (the fastest of 16, 32 and 64)
    out: Tensor | None = None,  # [L, H, D] contiguous, written in place of a new tensor
) -> Tensor:
    """Attention of a whole pack in one kernel: each token causally over its own segment and, for document tokens,
    over their group's head [head_start, head_end). Needs only these per-token ranges on the device (no host-side
    lengths or segment counts), so a pack of a given length is one fixed launch that a CUDA graph can hold.
    Padding tokens laid out as one-token segments with an empty head attend to themselves and are never read."""
    length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    reason = pack_attention_unsupported(heads, kv_heads)
    if reason is not None:
        raise ValueError(f"pack_attention cannot run this model: {reason}")
    group = heads // kv_heads
    for t in (q, k, v):
        if t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError("pack_attention wants [L, heads, D] tensors with contiguous heads")
    for t in (head_start, head_end, segment_start):
        if t.stride(0) != 1 or t.shape[0] != length:
            raise ValueError("pack_attention wants contiguous [L] ranges")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError("pack_attention's out must be a contiguous tensor shaped and typed like q")
    block_m = PACK_TILE_ROWS // group
    # BLOCK_N fixed per call (not tuned): it sets where the online softmax is cut, so it must not vary by machine
    _pack_attention_kernel[(triton.cdiv(length, block_m), kv_heads)](
        q, k, v, out, head_start, head_end, segment_start, length,
        q.stride(0), k.stride(0), v.stride(0), out.stride(0), scale * LOG2_E,
        H=heads, KV=kv_heads, D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (tf32 drops 13 bits)
    )  # fmt: skip
    return out


# gate_up_silu's tile: 128 rows x (128 gate + 128 up columns), 64-wide steps along the hidden size. Tuned on Hopper
# for 32k-row packs of Qwen3-Reranker-0.6B's shape (hidden 1,024, intermediate 3,072), where it beats cuBLAS's
# gate/up matmul plus the compiled SiLU * up, and beats a 128 x 128 tile with separate gate and up accumulators and a
# non-persistent kernel with plain pointer loads.
GATE_UP_BLOCK_M, GATE_UP_CHUNK, GATE_UP_BLOCK_K = 128, 128, 64
# 3 stages of an x box and a weight box (16 + 32 KiB) and the output tile (32 KiB), with room: H100/H200/B200 allow
# 227-228 KiB per block, consumer Blackwell (compute capability 12.x) about 99
GATE_UP_SHARED_BYTES = 180 * 1024


@triton.jit
def _tile_of(tile, per_group, num_m, GROUP_M: tl.constexpr):
    """Row block and column chunk of a tile, GROUP_M row blocks at a time (their x rows stay in L2 across chunks)."""
    first_m = (tile // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit(do_not_specialize=["length"])  # a pack's length, or a tail's row count, must not compile a new variant
def _gate_up_silu_kernel(
    x_desc,  # [L, hidden], block [BLOCK_M, BLOCK_K]
    w_desc,  # the fused weight as [2, intermediate, hidden], block [2, CHUNK, BLOCK_K]
    out_desc,  # [L, intermediate], block [BLOCK_M, CHUNK]
    length,
    intermediate,
    hidden,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PROGRAMS: tl.constexpr,  # one per SM, whatever the length (programs past the last tile do nothing)
):
    dtype = out_desc.dtype
    num_m = tl.cdiv(length, BLOCK_M)
    tiles = num_m * (intermediate // CHUNK)
    per_group = GROUP_M * (intermediate // CHUNK)
    first = tl.program_id(0)
    out_tile = first - PROGRAMS  # the epilogue's own counter, as in Triton's persistent matmul tutorial
    for tile in tl.range(first, tiles, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_of(tile, per_group, num_m, GROUP_M)
        acc = tl.zeros((BLOCK_M, 2 * CHUNK), dtype=tl.float32)
        for k in range(0, tl.cdiv(hidden, BLOCK_K)):
            x = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([0, pid_n * CHUNK, k * BLOCK_K]).reshape(2 * CHUNK, BLOCK_K)
            acc = tl.dot(x, w.T, acc)
        out_tile += PROGRAMS
        pid_m, pid_n = _tile_of(out_tile, per_group, num_m, GROUP_M)
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, CHUNK)), (0, 2, 1)))
        # As the unfused steps round: the matmul's outputs to the model dtype, then SiLU(gate) * up in fp32
        gate = gate.to(dtype).to(tl.float32)
        up = up.to(dtype).to(tl.float32)
        out_desc.store([pid_m * BLOCK_M, pid_n * CHUNK], (gate * tl.sigmoid(gate) * up).to(dtype))


def gate_up_silu_unsupported(device: torch.device, dtype: torch.dtype, intermediate: int, hidden: int) -> str | None:
    """Why `gate_up_silu` does not serve this model and device (None if it does)."""
    if device.type != "cuda":
        return "not a CUDA device"
    capability = torch.cuda.get_device_capability(device)
    if capability < (9, 0):
        return "TMA loads need compute capability 9.0 (Hopper) or newer"
    shared = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    enough = capability[0] in (9, 10) if shared is None else shared >= GATE_UP_SHARED_BYTES
    if not enough:
        return f"its tiles need {GATE_UP_SHARED_BYTES // 1024} KiB of shared memory per block (this GPU: {shared})"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{dtype} (its matmul would run in tf32)"
    if intermediate % GATE_UP_CHUNK:
        return f"intermediate size {intermediate} is not a multiple of {GATE_UP_CHUNK}"
    if hidden % 8:
        return f"hidden size {hidden} is not a multiple of 8 (TMA wants rows of whole 16-byte units)"
    return None


@functools.cache
def _programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter: any number of programs walks every tile
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def gate_up_silu(x: Tensor, gate_up: Tensor) -> Tensor:
    """SiLU(x @ gate.T) * (x @ up.T) for x [L, hidden] and the fused weight [2 x intermediate, hidden] (gate rows,
    then up rows): [L, intermediate]."""
    length, hidden = x.shape
    intermediate = gate_up.shape[0] // 2
    if gate_up.shape != (2 * intermediate, hidden) or intermediate % GATE_UP_CHUNK:
        raise ValueError("gate_up_silu wants a [2 x intermediate, hidden] weight, intermediate a multiple of 128")
    if not (x.is_contiguous() and gate_up.is_contiguous()) or x.dtype != gate_up.dtype:
        raise ValueError("gate_up_silu wants a contiguous x and weight of one dtype")
    if x.is_cuda and x.dtype == torch.float32:
        raise ValueError("gate_up_silu takes bf16 or fp16 on CUDA: its fp32 matmul would run in tf32")
    out = torch.empty(length, intermediate, dtype=x.dtype, device=x.device)
    if length == 0:
        return out
    x_desc = TensorDescriptor.from_tensor(x, [GATE_UP_BLOCK_M, GATE_UP_BLOCK_K])
    w_desc = TensorDescriptor.from_tensor(gate_up.view(2, intermediate, hidden), [2, GATE_UP_CHUNK, GATE_UP_BLOCK_K])
    out_desc = TensorDescriptor.from_tensor(out, [GATE_UP_BLOCK_M, GATE_UP_CHUNK])
    programs = _programs(x.device)  # not fewer for a short input: each count would be a variant compiled anew
    _gate_up_silu_kernel[(programs,)](
        x_desc, w_desc, out_desc, length, intermediate, hidden,
        BLOCK_M=GATE_UP_BLOCK_M, CHUNK=GATE_UP_CHUNK, BLOCK_K=GATE_UP_BLOCK_K, GROUP_M=4, PROGRAMS=programs,
        num_warps=8, num_stages=3,
    )  # fmt: skip
    return out
