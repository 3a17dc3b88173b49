"""A Qwen3 decoder forward written for packs, on the weights of a model loaded by `from_pretrained`.

Why not call the Hugging Face decoder: a pack needs none of its generality, and its per-layer Python, unfused
norms and rotary, and one mask build per call cost more than the matmuls at 32k tokens. Here, per layer:
    attention_inputs   RMSNorm, one fused q/k/v matmul, per-head q/k RMSNorm, rotary
                       (CUDA: compiled norm + matmul, then the `kernels.qk_norm_rotary` Triton kernel)
    attend             CUDA bf16/fp16: `kernels.pack_attention`, one kernel over the per-token ranges (or, as
                       `flash_varlen`, FlashAttention varlen per segment plus `kernels.head_attention_merge`);
                       CUDA fp32: FlexAttention over the pack's block structure; CPU: SDPA with a dense mask
    mlp_block          o_proj and down_proj with the residual added in the matmul (`addmm_`); between them
                       RMSNorm, one fused gate/up matmul, SiLU * up (compiled on CUDA; bf16/fp16 on Hopper: the
                       matmul and SiLU * up are one Triton kernel, `kernels.gate_up_silu`)
The last layer runs its o_proj and MLP on the document-end rows only (nothing else is read), and the final norm
and the fp32 yes-minus-no product see only those rows. The math is Qwen3's, operation for operation (RMSNorm in
fp32 cast back before the weight, rotate-half rotary from the model's own rotary module), except that each residual
sum is rounded once, from the matmul's fp32 accumulator; tests compare it with an independent per-pair forward of
the Hugging Face model.

With `quantization="fp8"` (`worker.engine.fp8`) the four projections run on FP8 tensor cores (all but the last
layer's o_proj and MLP, which see the document-end rows only and stay in the model dtype): weights quantized once
here, per output channel; activations per token, inside the compiled step before each matmul, so the quantization
fuses into the RMSNorm, the attention output's reshape or SiLU * up that precedes it. The MLP's
residual add is left to the next layer's q/k/v step (`norm_qkv_fp8`), where it fuses with that norm and
quantization: `_scaled_mm` cannot add into its output as `addmm_` does. Norms, rotary, attention and the head stay
as above.

The compiled steps are layer-generic (weights are arguments, so 28 layers share one graph) and the pack length is
a dynamic dimension, so a stream of packs of any length compiles a bounded set of graphs at warm-up, then none.
With `pack_attention` no step needs a host-side length, so warm-up also captures everything up to the last layer's
attention as one CUDA graph per pack-length bucket (`PackGraphs`); the last layer's tail runs after the replay.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from worker.engine.api import BackendInfo, PackArrays
from worker.engine.backend import FLEX_BLOCK, PendingScores, device_mark, yes_minus_no_vector
from worker.engine.fp8 import Fp8Weight, fp8_linear
from worker.engine.masks import block_structure, dense_mask, interval_mask

PackedAttention = Literal["triton", "flash_varlen", "flex_attention", "sdpa"]
Quantization = Literal["none", "fp8"]
# Triton specializes an integer argument on its divisibility by 16, so pack lengths of both kinds would compile a
# second variant of qk_norm_rotary and pack_attention while serving (bench.warmup counts them). Packs that run kernel
# by kernel are padded to a multiple of 16 to keep one variant (graphs pad to their buckets anyway).
TRITON_LENGTH_MULTIPLE = 16
# Document-end rows are padded to a multiple of this (repeating the last end) so their count never hits the
# compiler's 0/1 specializations or changes a graph's shape class.
ROWS_MULTIPLE = 16


def unsupported_reason(config: Any) -> str | None:
    """Why this forward cannot run a model with this config (None if it can)."""
    if getattr(config, "model_type", None) != "qwen3":
        return f"model_type {getattr(config, 'model_type', None)!r} is not qwen3"
    if getattr(config, "attention_bias", False):
        return "attention projections with bias"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    return None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Qwen3RMSNorm: normalize in fp32, cast back, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_inputs(
    x: Tensor,  # [L, hidden]
    cos: Tensor,  # [L, 1, head_dim]
    sin: Tensor,
    input_norm: Tensor,
    qkv_weight: Tensor,  # [(heads + 2 kv_heads) * head_dim, hidden]
    q_norm: Tensor,
    k_norm: Tensor,
    heads: int,
    kv_heads: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as [L, heads or kv_heads, head_dim], contiguous (the varlen layout)."""
    qkv = F.linear(rms_norm(x, input_norm, eps), qkv_weight)
    return qk_heads(qkv, cos, sin, q_norm, k_norm, heads, kv_heads, eps)


def qk_heads(
    qkv: Tensor,  # [L, (heads + 2 kv_heads) * head_dim]
    cos: Tensor,  # [L, 1, head_dim]
    sin: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    heads: int,
    kv_heads: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused projection's output split into q, k, v ([L, heads or kv_heads, head_dim], contiguous), q and k
    normed per head and rotated: what `kernels.qk_norm_rotary` does on CUDA."""
    length = qkv.shape[0]
    head_dim = q_norm.shape[0]
    q, k, v = torch.split(qkv, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = rms_norm(q.view(length, heads, head_dim), q_norm, eps)
    k = rms_norm(k.view(length, kv_heads, head_dim), k_norm, eps)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    return q, k, v.reshape(length, kv_heads, head_dim).contiguous()


def norm_gate_up(x: Tensor, post_norm: Tensor, gate_up_weight: Tensor, eps: float) -> Tensor:
    """The MLP's input to down_proj: SiLU(gate) * up of the normed residual stream, [R, intermediate]."""
    gate, up = F.linear(rms_norm(x, post_norm, eps), gate_up_weight).chunk(2, dim=-1)
    return F.silu(gate) * up


def mlp_block(x: Tensor, attended: Tensor, w: LayerWeights, eps: float, norm_gate_up: Any = norm_gate_up) -> Tensor:
    """o_proj and the MLP, each added to the residual stream inside its matmul: `addmm_` in place on `x` has cuBLAS
    read x as the accumulator's starting value (beta = 1), so no separate add kernel reads and writes the stream
    again. The sum is rounded to x's dtype once, from the fp32 accumulator; Qwen3's own forward rounds the
    projection first, then the sum. `x` is overwritten: callers pass a stream nothing else reads (the embedding's
    output, a gather, the previous layer's result)."""
    x = x.addmm_(attended.reshape(x.shape[0], -1), w.o.t())
    return x.addmm_(norm_gate_up(x, w.post_norm, w.gate_up, eps), w.down.t())


def norm_qkv(x: Tensor, input_norm: Tensor, qkv_weight: Tensor, eps: float) -> Tensor:
    """The fused q/k/v projection of the normed residual stream: [L, (heads + 2 kv_heads) * head_dim]."""
    return F.linear(rms_norm(x, input_norm, eps), qkv_weight)


def norm_qkv_fp8(
    x: Tensor, residual: Tensor | None, input_norm: Tensor, qkv: Tensor, qkv_scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """`norm_qkv` with FP8 weights (`Fp8Weight`'s data and scale), after adding the previous layer's MLP output
    `residual` (None in the first layer) to the residual stream: the stream [L, hidden] and q/k/v."""
    if residual is not None:
        x = x + residual
    return x, fp8_linear(rms_norm(x, input_norm, eps), qkv, qkv_scale)


def mlp_block_fp8(
    x: Tensor,
    attended: Tensor,  # [R, heads, head_dim]
    o: Tensor,
    o_scale: Tensor,
    post_norm: Tensor,
    gate_up: Tensor,
    gate_up_scale: Tensor,
    down: Tensor,
    down_scale: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """`mlp_block` with FP8 weights: the residual stream after o_proj, and the MLP's output, which the caller adds
    (the next layer's `norm_qkv_fp8`, or the tail). `x` is not modified."""
    x = x + fp8_linear(attended.reshape(x.shape[0], -1), o, o_scale)
    gate, up = fp8_linear(rms_norm(x, post_norm, eps), gate_up, gate_up_scale).chunk(2, dim=-1)
    return x, fp8_linear(F.silu(gate) * up, down, down_scale)


@dataclass(frozen=True)
class VarlenLayout:
    """A pack for FlashAttention varlen: every segment (a head, a document) attends causally to itself; then each
    document token's view of its group's head [head_start, head_end) is merged in by `head_attention_merge`."""

    segment_offsets: Tensor  # [segments + 1] int32
    longest_segment: int
    head_start: Tensor  # [L]
    head_end: Tensor  # [L]

    @classmethod
    def of(cls, arrays: PackArrays, head_start: Tensor, head_end: Tensor) -> VarlenLayout:
        length = len(arrays.input_ids)
        if length != arrays.num_tokens:
            raise ValueError("varlen packs carry no padding")
        segs = np.append(np.flatnonzero(np.diff(arrays.segment_start, prepend=-1)), length)
        offsets = torch.from_numpy(segs.astype(np.int32)).to(head_start.device, non_blocking=True)
        return cls(offsets, int(np.diff(segs).max()), head_start, head_end)


@dataclass(frozen=True)
class PackRanges:
    """A pack for `kernels.pack_attention`: per-token ranges on the device, nothing on the host."""

    head_start: Tensor  # [L]
    head_end: Tensor
    segment_start: Tensor


def flash_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_offsets: Tensor,
    k_offsets: Tensor,
    max_q: int,
    max_k: int,
    *,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """FlashAttention-2 varlen forward (PyTorch's built-in kernel; GQA native): output [Tq, H, D] and the
    log-sum-exp [H, Tq] in fp32. Called through the aten op because `torch.nn.attention.varlen.varlen_attn`
    changed its arguments between torch 2.10 and 2.12 and may route to cuDNN."""
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, q_offsets, k_offsets, max_q, max_k, 0.0, causal, False, scale=scale
    )
    if lse.dim() == 3:  # older kernels: padded [sequences, H, max_q]; bring it to [H, Tq]
        rows = torch.arange(q.shape[0], device=q.device)
        seq = torch.searchsorted(q_offsets[1:].long(), rows, right=True)
        lse = lse[seq, :, rows - q_offsets[seq].long()].transpose(0, 1)
    return out, lse


@dataclass(frozen=True)
class LayerWeights:
    input_norm: Tensor
    qkv: Tensor
    qk_norms: Tensor  # [2, head_dim]: q_norm's weight, then k_norm's (the Triton kernel's layout)
    o: Tensor
    post_norm: Tensor
    gate_up: Tensor
    down: Tensor


@dataclass(frozen=True)
class Fp8LayerWeights:
    """`LayerWeights` with the four projections in FP8."""

    input_norm: Tensor
    qkv: Fp8Weight
    qk_norms: Tensor
    o: Fp8Weight
    post_norm: Tensor
    gate_up: Fp8Weight
    down: Fp8Weight

    @classmethod
    def quantize(cls, w: LayerWeights, *, projections_only: bool = False) -> Fp8LayerWeights:
        """`projections_only`: q/k/v alone (the last layer's o_proj and MLP run in the model dtype), the others
        left as empty placeholders."""

        def fp8(weight: Tensor) -> Fp8Weight:
            empty = weight.new_empty(0)
            return Fp8Weight(empty, empty) if projections_only else Fp8Weight.quantize(weight)

        return cls(
            input_norm=w.input_norm,
            qkv=Fp8Weight.quantize(w.qkv),
            qk_norms=w.qk_norms,
            o=fp8(w.o),
            post_norm=w.post_norm,
            gate_up=fp8(w.gate_up),
            down=fp8(w.down),
        )


def _quantize_layers(model: Any, layers: list[LayerWeights]) -> tuple[list[Fp8LayerWeights], LayerWeights]:
    """FP8 copies of every layer's projections but the last layer's o_proj and MLP, and that layer's weights in the
    model dtype for the tail: it runs on the document-end rows only (a few hundred of a pack's thousands), so FP8
    would buy nothing there, and its output feeds the head directly. The model's own projection weights are
    released as each layer is done (the packed forward never reads them): the two copies coexist for one layer at
    most. Empties `layers`."""
    quantized = []
    decoder_layers = model.get_decoder().layers
    tail = layers[-1]
    for i, (decoder_layer, w) in enumerate(zip(decoder_layers, layers, strict=True)):
        last = i == len(layers) - 1
        quantized.append(Fp8LayerWeights.quantize(w, projections_only=last))
        attn, mlp = decoder_layer.self_attn, decoder_layer.mlp
        released: tuple[Any, ...] = (attn.q_proj, attn.k_proj, attn.v_proj)
        if not last:
            released += (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        for lin in released:
            lin.weight.data = lin.weight.data.new_empty(0)
    layers.clear()
    return quantized, replace(tail, qkv=tail.qkv.new_empty(0))


def _fuse_rows(*linears: Any) -> Tensor:
    """Concatenate linear weights along the output dim and point the modules at views of the result (no copy
    of the model stays behind: the fused tensor is the only storage)."""
    fused = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = fused[start : start + rows]
        start += rows
    return fused


def _extract_layers(model: Any) -> list[LayerWeights]:
    layers = []
    for layer in model.get_decoder().layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(
            LayerWeights(
                input_norm=layer.input_layernorm.weight.detach(),
                qkv=_fuse_rows(attn.q_proj, attn.k_proj, attn.v_proj),
                qk_norms=torch.stack([attn.q_norm.weight.detach(), attn.k_norm.weight.detach()]),
                o=attn.o_proj.weight.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=_fuse_rows(mlp.gate_proj, mlp.up_proj),
                down=mlp.down_proj.weight.detach(),
            )
        )
    return layers


def _from_kv_blocks_kwargs() -> dict[str, Any]:
    from torch.nn.attention.flex_attention import BlockMask

    # inference never runs the backward pass: skip building its transposed (q-block) index where torch allows
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        return {"compute_q_blocks": False}
    return {}


class Qwen3PackedScorer:
    """Scores packs with the forward above. Same interface as `backend.TorchScorer`."""

    def __init__(
        self,
        model: Any,
        *,
        yes_id: int,
        no_id: int,
        attention: PackedAttention,
        compile: bool,
        cuda_graphs: bool = True,
        quantization: Quantization = "none",
    ) -> None:
        """`quantization="fp8"` runs wherever `torch._scaled_mm` does (CPU included, for tests);
        `worker.engine.load.load_scorer` refuses it where it would not pay or not run (`fp8.fp8_unsupported`)."""
        reason = unsupported_reason(model.config)
        if reason is not None:
            raise ValueError(f"the packed Qwen3 forward cannot run this model: {reason}")
        config = model.config
        self.model = model
        decoder = model.get_decoder()
        self.embed = decoder.embed_tokens.weight.detach()
        self.rotary = decoder.rotary_emb
        self.final_norm = decoder.norm.weight.detach()
        self.layers = _extract_layers(model)
        self.yes_minus_no = yes_minus_no_vector(model, yes_id, no_id)
        self.quantization = quantization
        if quantization not in ("none", "fp8"):
            raise ValueError(f"unknown quantization {quantization!r}")
        self.fp8_layers: list[Fp8LayerWeights] | None = None
        tail = self.layers[-1] if self.layers else None
        if quantization == "fp8" and self.layers:
            self.fp8_layers, tail = _quantize_layers(model, self.layers)  # empties self.layers
        self.tail_layer = tail  # the last layer's o_proj and MLP, on document ends: in the model dtype
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        self.attention = attention
        self.compiled = compile
        self.use_cuda_graphs = cuda_graphs
        self.graphs: PackGraphs | None = None  # captured by capture_graphs (the engine's warm-up)
        self.pad_to_multiple = {"flex_attention": FLEX_BLOCK, "triton": TRITON_LENGTH_MULTIPLE}.get(attention, 1)
        # Triton kernels wherever CUDA is (they need no compiler step of torch's, only Triton)
        self.triton_kernels = self.device.type == "cuda"
        self._attention_inputs: Any = attention_inputs
        self._norm_qkv: Any = norm_qkv
        self._norm_gate_up: Any = norm_gate_up
        self._rms_norm: Any = rms_norm
        self._norm_qkv_fp8: Any = norm_qkv_fp8
        self._mlp_block_fp8: Any = mlp_block_fp8
        self._qk_heads: Any = qk_heads
        self._flex: Any = None
        if attention == "flex_attention":
            from torch.nn.attention.flex_attention import flex_attention

            self._flex = flex_attention
            self._block_mask_kwargs = _from_kv_blocks_kwargs()
        if compile:
            self._attention_inputs = torch.compile(attention_inputs, fullgraph=True)
            self._norm_qkv = torch.compile(norm_qkv, fullgraph=True)
            self._norm_gate_up = torch.compile(norm_gate_up, fullgraph=True)
            self._rms_norm = torch.compile(rms_norm, fullgraph=True)
            self._norm_qkv_fp8 = torch.compile(norm_qkv_fp8, fullgraph=True)
            self._mlp_block_fp8 = torch.compile(mlp_block_fp8, fullgraph=True)
            self._qk_heads = torch.compile(qk_heads, fullgraph=True)
            if self._flex is not None:
                self._flex = torch.compile(self._flex, fullgraph=True)
        # bf16/fp16 on Hopper or newer: the MLP's gate/up matmul with SiLU * up in its epilogue (Triton, TMA)
        self.fused_gate_up_reason: str | None = "not a CUDA device"
        if self.triton_kernels:
            from worker.engine.kernels import gate_up_silu_unsupported

            intermediate, hidden = self.tail_layer.gate_up.shape if self.tail_layer is not None else (0, 0)
            self.fused_gate_up_reason = gate_up_silu_unsupported(self.device, self.dtype, intermediate // 2, hidden)
        if self.fused_gate_up_reason is None:
            self._norm_gate_up = self._norm_gate_up_fused

    def _norm_gate_up_fused(self, x: Tensor, post_norm: Tensor, gate_up_weight: Tensor, eps: float) -> Tensor:
        """`norm_gate_up` with the matmul and SiLU * up in one Triton kernel (`kernels.gate_up_silu`): the
        [L, 2 x intermediate] matmul output is never written nor read back."""
        from worker.engine.kernels import gate_up_silu

        return gate_up_silu(self._rms_norm(x, post_norm, eps), gate_up_weight)

    @property
    def info(self) -> BackendInfo:
        dtype = str(self.dtype).removeprefix("torch.")
        graphs = len(self.graphs.buckets) if self.graphs is not None else 0
        return BackendInfo(
            str(self.device), dtype, self.attention, "packed-qwen3", self.compiled, graphs, self.quantization
        )

    def weight_bytes(self) -> int:
        """Bytes of the weights this scorer holds on its device (the FP8 copies included, the released bf16
        projections not)."""
        held = int(sum(p.numel() * p.element_size() for p in self.model.parameters()))
        for w in self.fp8_layers or []:
            held += w.qkv.nbytes + w.o.nbytes + w.gate_up.nbytes + w.down.nbytes
        return held

    # -- one pack ----------------------------------------------------------------------------------------------

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Any, out: Tensor | None = None) -> Tensor:
        """Attention of a pack: q [L, heads, D], k and v [L, kv_heads, D] -> [L, heads, D] (into `out` if given)."""
        scale = self.head_dim**-0.5
        if self.attention == "triton":
            from worker.engine.kernels import pack_attention

            r: PackRanges = mask
            return pack_attention(q, k, v, r.head_start, r.head_end, r.segment_start, scale, out=out)
        if self.attention == "flash_varlen":
            from worker.engine.kernels import head_attention_merge

            lay: VarlenLayout = mask
            own, own_lse = flash_varlen(
                q,
                k,
                v,
                lay.segment_offsets,
                lay.segment_offsets,
                lay.longest_segment,
                lay.longest_segment,
                causal=True,
                scale=scale,
            )
            attended = head_attention_merge(q, k, v, own, own_lse, lay.head_start, lay.head_end, scale)
        else:
            qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, L, D]
            if self.attention == "flex_attention":
                heads_first: Tensor = self._flex(qh, kh, vh, block_mask=mask, scale=scale, enable_gqa=True)
            else:
                heads_first = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
            attended = heads_first.squeeze(0).transpose(0, 1)
        return attended if out is None else out.copy_(attended)  # these kernels allocate their own output

    def _mask(self, arrays: PackArrays, head_start: Tensor, head_end: Tensor, segment_start: Tensor) -> Any:
        if self.attention == "triton":
            return PackRanges(head_start, head_end, segment_start)
        if self.attention == "flash_varlen":
            return VarlenLayout.of(arrays, head_start, head_end)
        mask_mod = interval_mask(head_start, head_end, segment_start)
        length = head_start.shape[0]
        if self.attention == "flex_attention":
            from torch.nn.attention.flex_attention import BlockMask

            s = block_structure(head_start, head_end, segment_start, FLEX_BLOCK)
            return BlockMask.from_kv_blocks(
                s.partial_num,
                s.partial_indices,
                s.full_num,
                s.full_indices,
                BLOCK_SIZE=FLEX_BLOCK,
                mask_mod=mask_mod,
                seq_lengths=(length, length),
                **self._block_mask_kwargs,
            )
        return dense_mask(mask_mod, length, self.device)

    def _dynamic(self, *tensors: Tensor) -> None:
        """Declare dim 0 (rows) dynamic for the compiler: one graph serves every pack length."""
        if self.compiled:
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)

    @torch.inference_mode()
    def forward_pack(self, input_ids: Tensor, position_ids: Tensor, ends: Tensor, mask: Any) -> Tensor:
        """fp32 yes-minus-no logit at each `ends` row: [len(ends)]; `mask` comes from `_mask`."""
        x, attended = self.forward_body(input_ids, position_ids, mask)
        return self.forward_tail(x, attended, ends)

    def forward_body(
        self, input_ids: Tensor, position_ids: Tensor, mask: Any, out: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Every layer up to and including the last layer's attention, over all rows: the residual stream entering
        the last layer and that layer's attention output, written into `out` ([L, hidden], [L, heads, head_dim])
        when given. The part a CUDA graph captures (fixed length)."""
        if self.fp8_layers is not None:
            return self._forward_body_fp8(self.fp8_layers, input_ids, position_ids, mask, out)
        x = F.embedding(input_ids, self.embed)  # [L, hidden]
        cos, sin = self.rotary(x.unsqueeze(0), position_ids.unsqueeze(0))  # [1, L, head_dim] each
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [L, 1, head_dim]
        self._dynamic(x, cos, sin)
        last = len(self.layers) - 1
        for i, w in enumerate(self.layers):
            q, k, v = self.layer_qkv(x, w, cos, sin)
            if i == last and out is not None:
                x_out, attended_out = out
                return x_out.copy_(x), self._attend(q, k, v, mask, out=attended_out)
            attended = self._attend(q, k, v, mask)
            self._dynamic(attended)
            if i == last:
                return x, attended
            x = mlp_block(x, attended, w, self.eps, self._norm_gate_up)
        raise ValueError("a model with no layers")

    def _forward_body_fp8(
        self,
        layers: list[Fp8LayerWeights],
        input_ids: Tensor,
        position_ids: Tensor,
        mask: Any,
        out: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor]:
        """`forward_body` with FP8 projections. Each layer's MLP output is added to the stream by the next layer's
        q/k/v step, so the stream returned for the last layer already holds every earlier layer's MLP."""
        x = F.embedding(input_ids, self.embed)  # [L, hidden]
        cos, sin = self.rotary(x.unsqueeze(0), position_ids.unsqueeze(0))  # [1, L, head_dim] each
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [L, 1, head_dim]
        self._dynamic(x, cos, sin)
        residual: Tensor | None = None
        last = len(layers) - 1
        for i, w in enumerate(layers):
            x, qkv = self._norm_qkv_fp8(x, residual, w.input_norm, w.qkv.data, w.qkv.scale, self.eps)
            q, k, v = self._heads(qkv, w.qk_norms, cos, sin)
            if i == last and out is not None:
                x_out, attended_out = out
                return x_out.copy_(x), self._attend(q, k, v, mask, out=attended_out)
            attended = self._attend(q, k, v, mask)
            self._dynamic(x, attended)
            if i == last:
                return x, attended
            x, residual = self._mlp_fp8(x, attended, w)
            self._dynamic(x, residual)
        raise ValueError("a model with no layers")

    def _heads(self, qkv: Tensor, qk_norms: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v from the fused projection's output: per-head norm and rotary (Triton on CUDA)."""
        if self.triton_kernels:
            from worker.engine.kernels import qk_norm_rotary

            return qk_norm_rotary(qkv, cos[:, 0], sin[:, 0], qk_norms, self.heads, self.kv_heads, self.eps)
        q, k, v = self._qk_heads(qkv, cos, sin, *qk_norms, self.heads, self.kv_heads, self.eps)
        return q, k, v

    def _mlp_fp8(self, x: Tensor, attended: Tensor, w: Fp8LayerWeights) -> tuple[Tensor, Tensor]:
        result: tuple[Tensor, Tensor] = self._mlp_block_fp8(
            x,
            attended,
            w.o.data,
            w.o.scale,
            w.post_norm,
            w.gate_up.data,
            w.gate_up.scale,
            w.down.data,
            w.down.scale,
            self.eps,
        )
        return result

    def layer_qkv(self, x: Tensor, w: LayerWeights, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One layer's q, k, v ([L, heads or kv_heads, head_dim]) from the residual stream; cos, sin: [L, 1, D]."""
        if self.triton_kernels:
            from worker.engine.kernels import qk_norm_rotary

            qkv = self._norm_qkv(x, w.input_norm, w.qkv, self.eps)
            return qk_norm_rotary(qkv, cos[:, 0], sin[:, 0], w.qk_norms, self.heads, self.kv_heads, self.eps)
        q, k, v = self._attention_inputs(
            x, cos, sin, w.input_norm, w.qkv, *w.qk_norms, self.heads, self.kv_heads, self.eps
        )
        return q, k, v

    def forward_tail(self, x: Tensor, attended: Tensor, ends: Tensor) -> Tensor:
        """The last layer's o_proj and MLP, final norm and yes-minus-no, on the document-end rows only."""
        x, attended = x[ends], attended[ends]
        self._dynamic(x, attended)
        w = self.layers[-1] if self.fp8_layers is None else self.tail_layer
        if w is None:
            raise ValueError("a model with no layers")
        x = mlp_block(x, attended, w, self.eps, self._norm_gate_up)
        hidden = rms_norm(x, self.final_norm, self.eps)
        logits: Tensor = hidden.float() @ self.yes_minus_no
        return logits

    def _padded_ends(self, arrays: PackArrays) -> npt.NDArray[np.int64]:
        num_docs = len(arrays.doc_ends)
        if not self.compiled:
            return arrays.doc_ends
        padded = -(-num_docs // ROWS_MULTIPLE) * ROWS_MULTIPLE
        return np.pad(arrays.doc_ends, (0, padded - num_docs), mode="edge")

    def launch_pack(self, arrays: PackArrays) -> PendingScores:
        """Queue the pack's forward; nothing on the graph path waits for the device (the FlashAttention path
        reads no device values either, but its host-side lengths are built from the arrays)."""
        num_docs = len(arrays.doc_ends)
        # Triton launches on the calling thread's current device, and the GPU thread never set one: cuda:N needs it
        with self._on_device(), torch.inference_mode():
            started = device_mark(self.device)
            if self.graphs is not None and self.graphs.fits(arrays.num_tokens):
                logits = self.graphs.run(arrays, self._padded_ends(arrays))
            else:
                logits = self._forward_eager(arrays)
            return PendingScores(torch.sigmoid(logits[:num_docs]), started)

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _forward_eager(self, arrays: PackArrays) -> Tensor:
        host = torch.from_numpy(np.stack(device_rows(arrays)))
        ends = torch.from_numpy(self._padded_ends(arrays))
        if self.device.type == "cuda":  # a copy from pageable memory first waits for the device to drain
            host, ends = host.pin_memory(), ends.pin_memory()
        input_ids, position_ids, head_start, head_end, segment_start = host.to(self.device, non_blocking=True).unbind(0)
        mask = self._mask(arrays, head_start, head_end, segment_start)
        return self.forward_pack(input_ids, position_ids, ends.to(self.device, non_blocking=True), mask)

    def capture_graphs(self, max_tokens: int) -> int:
        """Capture one CUDA graph of `forward_body` per pack-length bucket up to `max_tokens` (after a warm-up
        that compiled and tuned the kernels). Only the Triton attention runs without host-side lengths, so only it
        is captured; returns the number of graphs (0 where they do not apply)."""
        if not (self.use_cuda_graphs and self.attention == "triton" and self.device.type == "cuda"):
            return 0
        with self._on_device():
            self.graphs = PackGraphs(self, graph_buckets(max_tokens))
        # Packs that fit a bucket now replay inside the graphs' own pool: hand back what the eager warm-up passes
        # left cached in the default pool.
        torch.cuda.empty_cache()
        return len(self.graphs.buckets)


def device_rows(arrays: PackArrays) -> tuple[npt.NDArray[np.int64], ...]:
    """The per-token rows a pack sends to the device, in the order the forward unbinds them: input ids, position
    ids, head start, head end, segment start."""
    return (arrays.input_ids, arrays.position_ids, arrays.head_start, arrays.head_end, arrays.segment_start)


def graph_buckets(max_tokens: int) -> list[int]:
    """Pack lengths a graph is captured for: 256, 512, 1,024, 2,048, then steps of 1/8 rounded up to 256 tokens
    (a pack above 2,048 tokens is padded by less than 1/8 of its length plus 256), the budget itself last."""
    buckets = [b for b in (256, 512, 1024, 2048) if b < max_tokens]
    bucket = 2048
    while (bucket := -(-bucket * 9 // 8 // 256) * 256) < max_tokens:
        buckets.append(bucket)
    return [*buckets, max_tokens]


class PackGraphs:
    """CUDA graphs of `forward_body`, one per length bucket, sharing one memory pool and one pair of output tensors
    (all on one stream: replays never overlap, and each replay's outputs are read before the next replay, in
    stream order, so packs can be queued back to back). A pack is padded to its bucket: each padding token is its
    own one-token segment with an empty head, so real rows never see it and it costs the attention one key.
    Replaying costs one launch instead of a few hundred, so the host is free while the GPU works."""

    def __init__(self, scorer: Qwen3PackedScorer, buckets: list[int]) -> None:
        self.scorer = scorer
        self.buckets = buckets
        self.pool = torch.cuda.graph_pool_handle()
        # bucket -> [6, L] int64 on the device: ids, positions, the 3 ranges (what the graph reads), then the
        # document-end rows (what the tail after the replay reads)
        self.inputs: dict[int, Tensor] = {}
        self.padding_segments = np.arange(buckets[-1], dtype=np.int64)
        # outside the graphs' pool: every graph writes the first `bucket` rows, nothing is kept per bucket
        longest, device, dtype = buckets[-1], scorer.device, scorer.dtype
        self.x_out = torch.empty((longest, scorer.embed.shape[1]), device=device, dtype=dtype)
        self.attended_out = torch.empty((longest, scorer.heads, scorer.head_dim), device=device, dtype=dtype)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Longest first: the graphs share one pool, and a block one capture freed can be split for a smaller
        # request of a later capture but never serve a bigger one, so shortest first would leave every bucket's
        # blocks cached side by side (replays never overlap and keep nothing in the pool, so sharing is safe).
        for bucket in sorted(buckets, reverse=True):
            self._capture(bucket)

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.buckets[-1]

    def _body(self, bucket: int) -> None:
        ids, positions, head_start, head_end, segment_start, _ = self.inputs[bucket].unbind(0)
        ranges = PackRanges(head_start, head_end, segment_start)
        self.scorer.forward_body(ids, positions, ranges, out=(self.x_out[:bucket], self.attended_out[:bucket]))

    @torch.inference_mode()
    def _capture(self, bucket: int) -> None:
        device = self.scorer.device
        rows = torch.arange(bucket, device=device)
        # a cheap valid pack to record with: every token its own one-token segment, no head
        self.inputs[bucket] = torch.stack([torch.zeros_like(rows), torch.zeros_like(rows), rows, rows, rows, rows])
        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._body(bucket)  # compiled graphs and allocator settle outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._body(bucket)
        self.graphs[bucket] = graph

    def run(self, arrays: PackArrays, ends: npt.NDArray[np.int64]) -> Tensor:
        """Queue the pack's copy in, the replay and the tail on the current stream; returns the logits at `ends`
        without waiting for any of it."""
        n = arrays.num_tokens
        bucket = next(b for b in self.buckets if b >= n)
        if len(ends) > bucket:
            raise ValueError(f"{len(ends)} document ends in a {bucket}-token bucket. This is a bug.")
        # Pinned staging from torch's caching host allocator: a block goes back to the cache only once the copy
        # queued from it has run, so packs queue without the host ever waiting for the device.
        pinned = torch.empty((6, bucket), dtype=torch.int64, pin_memory=True)
        staging = pinned.numpy()
        for row, values in enumerate(device_rows(arrays)):
            staging[row, :n] = values[:n]
        staging[:2, n:] = 0
        staging[2:4, n:] = n  # padding: an empty head ...
        staging[4, n:] = self.padding_segments[n:bucket]  # ... and each token its own segment (one key)
        staging[5, : len(ends)] = ends
        inputs = self.inputs[bucket]
        inputs.copy_(pinned, non_blocking=True)
        # Inputs, outputs and the tail's reads are all ordered on this one stream: a pack queued behind this one
        # overwrites them only after this pack's tail has read them.
        self.graphs[bucket].replay()
        x, attended = self.x_out[:bucket], self.attended_out[:bucket]
        return self.scorer.forward_tail(x, attended, inputs[5, : len(ends)])
