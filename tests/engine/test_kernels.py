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


Groups = list[tuple[int, list[int]]]  # per job: head tokens, then its documents' tokens


def pack_layout(groups: Groups, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """head_start, head_end, segment_start of a pack of these groups (cut at `length`); the rows after them are
    padded the way a CUDA-graph bucket pads: each its own one-token segment with an empty head."""
    head_start, head_end, segment_start = (np.empty(length, dtype=np.int64) for _ in range(3))
    pos = 0
    for head_tokens, docs in groups:
        group, end = pos, min(length, pos + head_tokens)
        head_start[pos:end], head_end[pos:end], segment_start[pos:end] = group, end, group
        head, pos = end, end
        for doc_tokens in docs:
            end = min(length, pos + doc_tokens)
            head_start[pos:end], head_end[pos:end], segment_start[pos:end] = group, head, pos
            pos = end
    head_start[pos:], head_end[pos:], segment_start[pos:] = pos, pos, np.arange(pos, length)
    return tuple(torch.from_numpy(a) for a in (head_start, head_end, segment_start))  # type: ignore[return-value]


def random_groups(length: int, seed: int) -> Groups:
    """Jobs of a head of 3..150 tokens (several key blocks) and 1..4 documents of 1..89 tokens, up to `length`."""
    rng = np.random.default_rng(seed)
    groups: Groups = []
    while sum(h + sum(d) for h, d in groups) < length:
        groups.append((int(rng.integers(3, 150)), [int(n) for n in rng.integers(1, 90, int(rng.integers(1, 5)))]))
    return groups


# Packs the kernels must get right: random ones, with a padding tail, and jobs so short that one block of rows
# holds document rows of two jobs while a key block of the first job's head runs on into the second job's head
# (the second job's rows must not count those keys in the first job's pass).
PACKS: dict[str, tuple[Groups, int]] = {
    **{f"random {seed}": (random_groups(663, seed), 700) for seed in (1, 5, 9)},
    "two short jobs in one block": ([(10, [5]), (15, [30]), (40, [7, 3]), (12, [60, 9])] * 3, 700),
}


def check_kernels(device: str, dtype_name: str, heads: int = 4, kv_heads: int = 2) -> None:
    from worker.engine.kernels import head_attention_merge, pack_attention, qk_norm_rotary

    dtype = getattr(torch, dtype_name)
    tol = TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(0)
    length, dim, eps = 700, 128, 1e-6

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
    scale = dim**-0.5
    group = heads // kv_heads
    scores = torch.einsum(
        "qhd,khd->hqk", q.double().cpu(), k.double().cpu().repeat_interleave(group, 1)
    ) * scale  # fmt: skip
    values = v.double().cpu().repeat_interleave(group, 1)
    rows, keys = torch.arange(length)[:, None], torch.arange(length)[None, :]
    for name, (groups, pack_length) in PACKS.items():
        head_start, head_end, segment_start = pack_layout(groups, pack_length)
        own_mask = (keys >= segment_start[:, None]) & (keys <= rows)
        full_mask = own_mask | ((keys >= head_start[:, None]) & (keys < head_end[:, None]) & (keys <= rows))

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
        assert is_doc.sum() > length // 2, name  # both kinds of rows are exercised
        assert (~is_doc).sum() > 10, name
        assert torch.equal(merged[~is_doc.to(device)], own_before[~is_doc.to(device)])  # head rows: their own view
        torch.testing.assert_close(merged.double().cpu(), expected, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")  # noqa: B023

        ranges = [t.to(device) for t in (head_start, head_end, segment_start)]
        for block_n in (32, 64):
            whole = pack_attention(q, k, v, *ranges, scale, block_n=block_n)
            torch.testing.assert_close(
                whole.double().cpu(),
                expected,
                rtol=tol,
                atol=tol,
                msg=lambda m: f"{name}, key block {block_n}: {m}",  # noqa: B023
            )


def check_gate_up_silu(device: str, dtype_name: str) -> None:
    """The fused gate/up matmul + SiLU * up against the unfused steps in float64 (rounded where they round): row
    counts that leave a partial tile, a hidden size of several key steps, an intermediate size of two chunks."""
    from worker.engine.kernels import gate_up_silu

    dtype = getattr(torch, dtype_name)
    tol = TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(1)
    hidden, intermediate = 192, 256
    weight = ((torch.rand(2 * intermediate, hidden, generator=gen) - 0.5) * 0.3).to(device=device, dtype=dtype)
    for length in (1, 130, 300):
        x = (torch.rand(length, hidden, generator=gen) * 2 - 1).to(device=device, dtype=dtype)
        product = (x.double() @ weight.double().T).to(dtype).float()  # the matmul's output, rounded
        gate, up = product.chunk(2, dim=-1)
        expected = (torch.nn.functional.silu(gate) * up).to(dtype)
        got = gate_up_silu(x, weight)
        assert got.shape == (length, intermediate)
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=lambda m: f"{length} rows: {m}")  # noqa: B023
    with pytest.raises(ValueError, match="multiple of 128"):
        gate_up_silu(x, weight[:200])


# numpy (under the interpreter) has no bfloat16
DTYPES = ["bfloat16", "float16", "float32"] if torch.cuda.is_available() else ["float32", "float16"]


def run_check(check: str, *args: object) -> None:
    """`check` (a function of this module, by name) on the GPU, or on CPU under Triton's interpreter in a child."""
    if torch.cuda.is_available():
        globals()[check]("cuda", *args)
        return
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    code = f"from tests.engine.test_kernels import {check}; {check}('cpu', *{args!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels(dtype: str) -> None:
    run_check("check_kernels", dtype)


@pytest.mark.parametrize(("heads", "kv_heads"), [(2, 2), (8, 2), (8, 1)])
def test_kernels_for_other_query_groupings(heads: int, kv_heads: int) -> None:
    """Query heads per key/value head 1, 4 and 8 (Qwen3-Reranker-4B/8B have 4): other tile shapes of pack_attention."""
    run_check("check_kernels", "bfloat16" if torch.cuda.is_available() else "float32", heads, kv_heads)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "float32" or not torch.cuda.is_available()])
def test_gate_up_silu(dtype: str) -> None:
    run_check("check_gate_up_silu", dtype)


def test_gate_up_silu_serves_half_precision_on_hopper_only() -> None:
    from worker.engine.kernels import gate_up_silu, gate_up_silu_unsupported

    assert gate_up_silu_unsupported(torch.device("cpu"), torch.bfloat16, 3072, 1024) == "not a CUDA device"
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        hopper = torch.cuda.get_device_capability() >= (9, 0)
        assert (gate_up_silu_unsupported(cuda, torch.bfloat16, 3072, 1024) is None) == hopper
        if hopper:
            assert "tf32" in (gate_up_silu_unsupported(cuda, torch.float32, 3072, 1024) or "")
            assert "multiple of 128" in (gate_up_silu_unsupported(cuda, torch.bfloat16, 3000, 1024) or "")
            assert "multiple of 8" in (gate_up_silu_unsupported(cuda, torch.bfloat16, 3072, 1020) or "")
            x = torch.zeros(4, 1024, device=cuda)
            with pytest.raises(ValueError, match="tf32"):
                gate_up_silu(x, torch.zeros(6144, 1024, device=cuda))


@pytest.mark.parametrize(
    ("capability", "shared", "served"),
    [
        ((9, 0), 232448, True),
        ((10, 0), 232448, True),
        ((12, 0), 101376, False),
        ((9, 0), None, True),
        ((12, 0), None, False),
    ],
)
def test_gate_up_silu_needs_its_shared_memory(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], shared: int | None, served: bool
) -> None:
    """Its tiles need ~180 KiB of shared memory per block: H100/H200/B200 have 227-228, consumer Blackwell (12.x)
    about 99. Without the property (older torch), datacenter Hopper and Blackwell by compute capability."""
    from types import SimpleNamespace

    from worker.engine.kernels import gate_up_silu_unsupported

    props = SimpleNamespace() if shared is None else SimpleNamespace(shared_memory_per_block_optin=shared)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    reason = gate_up_silu_unsupported(torch.device("cuda"), torch.bfloat16, 3072, 1024)
    assert (reason is None) == served, reason
    if not served:
        assert "shared memory" in (reason or "")


def test_qk_norm_rotary_refuses_inputs_past_its_int32_row_index() -> None:
    """Rows are (token, head) pairs indexed in int32: a longer input is refused before anything is allocated."""
    from worker.engine.kernels import QK_MAX_ROWS, qk_norm_rotary

    heads, kv_heads, dim = 16, 8, 128
    length = QK_MAX_ROWS // (heads + kv_heads) + 1
    qkv = torch.zeros(1, (heads + 2 * kv_heads) * dim, dtype=torch.bfloat16).expand(length, -1)  # no storage
    rotary = torch.zeros(1, dim, dtype=torch.bfloat16).expand(length, -1)
    with pytest.raises(ValueError, match="at most"):
        qk_norm_rotary(qkv, rotary, rotary, torch.ones(2, dim, dtype=torch.bfloat16), heads, kv_heads, 1e-6)
