"""The model side: load a Qwen3 reranker, run one pack, return P(yes) at each document's last token.

Only the yes/no direction of the head is ever computed: score = sigmoid(h . (w_yes - w_no)), which equals the
softmax over ("no", "yes") logits that the official code takes (the head has no bias), without the 151,669-way
projection. That one dot product runs in fp32 whatever the model's dtype (bf16 moves scores near rank boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from worker.engine.masks import dense_mask, packed_rerank_mask
from worker.engine.plan import PackArrays

AttentionBackend = Literal["triton", "flash_varlen", "flex_attention", "sdpa", "eager"]
# FlexAttention works on 128x128 blocks: padding to a multiple of the block keeps every block whole.
FLEX_BLOCK = 128


@dataclass(frozen=True)
class BackendInfo:
    device: str
    dtype: str
    attention: AttentionBackend
    forward: str = "transformers"  # "packed-qwen3": worker.engine.qwen3; "transformers": the model's own decoder
    compiled: bool = False
    cuda_graphs: int = 0  # pack-length buckets captured as CUDA graphs


def device_mark(device: torch.device) -> torch.cuda.Event | None:
    """A timing event recorded now on the device's current stream (None off CUDA): where a pack's work begins."""
    if device.type != "cuda":
        return None
    mark = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    mark.record(torch.cuda.current_stream(device))
    return mark


class PendingScores:
    """One pack's P(yes) per document on its way to the host. On CUDA the copy into pinned memory is queued behind
    the pack's forward and nothing waits for it until `result()`, so the caller can queue the next pack first and
    the device never idles between packs. On CPU the scores are already there."""

    def __init__(self, probs: Tensor, started: torch.cuda.Event | None = None) -> None:
        self.started = started  # `device_mark` before the pack's work, for `device_ms`
        self._done: torch.cuda.Event | None = None
        if probs.device.type == "cuda":
            host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
            host.copy_(probs, non_blocking=True)
            self._done = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            self._done.record(torch.cuda.current_stream(probs.device))  # the stream the copy was queued on
            probs = host
        self._host = probs

    def result(self) -> npt.NDArray[np.float32]:
        """float32 [num_docs] in pack order; waits (GIL released) for the device where it must."""
        if self._done is not None:
            self._done.synchronize()
        return self._host.numpy()

    def device_ms(self, first: PendingScores) -> float | None:
        """Device time from the start of `first`'s work to the end of this pack's (after `result()`): the forward
        passes alone, not the wait behind work queued before them. None off CUDA."""
        if first.started is None or self._done is None:
            return None
        return float(first.started.elapsed_time(self._done))


class PackScorer(Protocol):
    """What the engine needs of a backend: score one pack's document ends."""

    device: torch.device
    pad_to_multiple: int
    model: Any  # the model `from_pretrained` loaded (weights, config)

    @property
    def info(self) -> BackendInfo: ...

    def launch_pack(self, arrays: PackArrays) -> PendingScores:
        """Queue the pack's forward on the device; the scores arrive through the returned handle."""
        ...

    def capture_graphs(self, max_tokens: int) -> int:
        """Capture CUDA graphs for packs up to `max_tokens` where the backend can; returns how many (0: none)."""
        ...


def load_scorer(
    model_name_or_path: str,
    *,
    device: str,
    dtype: str,
    attention: str,
    forward: str = "auto",
    compile: str = "auto",
    cuda_graphs: bool = True,
    yes_id: int,
    no_id: int,
) -> PackScorer:
    """Load the model with `from_pretrained` and pick the forward: the packed Qwen3 one where it applies (Qwen3
    configs; FlashAttention varlen, FlexAttention or SDPA), else the model's own decoder (`forward="transformers"`,
    eager attention, other architectures)."""
    from transformers import AutoModelForCausalLM

    from worker.engine.qwen3 import Qwen3PackedScorer, unsupported_reason

    if forward not in ("auto", "packed", "transformers"):
        raise ValueError(f"unknown forward {forward!r}")
    if compile not in ("auto", "on", "off"):
        raise ValueError(f"unknown compile setting {compile!r}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    attn = resolve_attention(attention, torch_device, torch_dtype)
    # the model's own attention serves only the transformers path, which has no varlen layout: Flex there
    hf_attn: AttentionBackend = "flex_attention" if attn in ("flash_varlen", "triton") else attn
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_name_or_path, dtype=torch_dtype, attn_implementation=hf_attn
    )
    model.to(torch_device).eval().requires_grad_(False)
    reason = unsupported_reason(model.config)
    if attn == "eager":
        reason = "eager attention"
    if forward == "packed" and reason is not None:
        raise ValueError(f"RERANK_FORWARD=packed cannot run this model: {reason}")
    if forward == "transformers" or reason is not None:
        return TorchScorer(model, yes_id=yes_id, no_id=no_id, attention=hf_attn)
    if attn == "triton":
        from worker.engine.kernels import pack_attention_unsupported

        config = model.config
        kernel_reason = pack_attention_unsupported(config.num_attention_heads, config.num_key_value_heads)
        if kernel_reason is not None and attention != "auto":
            raise ValueError(f"RERANK_ATTENTION=triton cannot run this model: {kernel_reason}")
        if kernel_reason is not None:
            attn = "flash_varlen"  # `auto` falls back to the kernel that takes any head grouping
    # torch.compile on CUDA only: on CPU the forward is for tests and small loads, where compiling costs more
    compiled = compile == "on" or (compile == "auto" and torch_device.type == "cuda")
    return Qwen3PackedScorer(
        model,
        yes_id=yes_id,
        no_id=no_id,
        attention=attn,  # type: ignore[arg-type]
        compile=compiled,
        cuda_graphs=cuda_graphs,
    )


def yes_minus_no_vector(model: Any, yes_id: int, no_id: int) -> Tensor:
    """w_yes - w_no of the LM head in fp32 ([hidden]): the one direction scores need (module docstring)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("the LM head has a bias; the yes-minus-no shortcut assumes none")
    weight: Tensor = head.weight.detach()
    return weight[yes_id].float() - weight[no_id].float()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"RERANK_DEVICE={device} but CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    return table[dtype]


def resolve_attention(attention: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """`auto`: on CUDA in bf16/fp16 the worker's Triton pack attention (one kernel per layer, no host-side lengths:
    the forward is captured as CUDA graphs), on CUDA in fp32 FlexAttention, on CPU SDPA with a dense mask.
    `flash_varlen` (FlashAttention per segment plus the head-merge kernel) stays selectable on CUDA in bf16/fp16."""
    if attention == "auto":
        if device.type != "cuda":
            return "sdpa"
        return "triton" if dtype in (torch.bfloat16, torch.float16) else "flex_attention"
    if attention not in ("triton", "flash_varlen", "flex_attention", "sdpa", "eager"):
        raise ValueError(f"unknown attention backend {attention!r}")
    if attention in ("triton", "flash_varlen") and (device.type != "cuda" or dtype == torch.float32):
        raise ValueError(f"{attention} attention needs CUDA and bfloat16 or float16")
    return attention  # type: ignore[return-value]


class TorchScorer:
    """Runs packs through a causal LM's decoder and scores document ends with the fp32 yes-minus-no vector."""

    def __init__(self, model: torch.nn.Module, *, yes_id: int, no_id: int, attention: AttentionBackend) -> None:
        self.model = model
        self.decoder = model.get_decoder()  # type: ignore[operator]
        self.yes_minus_no = yes_minus_no_vector(model, yes_id, no_id)
        self.device: torch.device = self.yes_minus_no.device
        self.dtype: torch.dtype = model.get_output_embeddings().weight.dtype  # type: ignore[operator]
        self.attention = attention
        self.pad_to_multiple = FLEX_BLOCK if attention == "flex_attention" else 1

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(str(self.device), str(self.dtype).removeprefix("torch."), self.attention)

    def _attention_mask(self, group: Tensor, doc: Tensor, length: int) -> object:
        mask_mod = packed_rerank_mask(group, doc)
        if self.attention == "flex_attention":
            from torch.nn.attention.flex_attention import create_block_mask

            # compiled: the eager build materializes int64 [L, L] intermediates (gigabytes at 32k tokens)
            return create_block_mask(mask_mod, 1, None, length, length, device=self.device, _compile=True)
        allowed = dense_mask(mask_mod, length, self.device)  # [1, 1, L, L] bool
        if self.attention == "sdpa":
            return allowed
        # eager attention adds the mask to the scores: it needs 0 / -inf-like floats, not booleans
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(
            ~allowed, torch.finfo(self.dtype).min
        )

    def capture_graphs(self, max_tokens: int) -> int:
        return 0  # the Hugging Face decoder builds its mask on the host per call: nothing fixed to capture

    @torch.inference_mode()
    def launch_pack(self, arrays: PackArrays) -> PendingScores:
        started = device_mark(self.device)
        to: dict[str, Any] = {"device": self.device, "non_blocking": True}
        input_ids = torch.from_numpy(arrays.input_ids).to(**to).view(1, -1)  # [1, L]
        position_ids = torch.from_numpy(arrays.position_ids).to(**to).view(1, -1)  # [1, L]
        group = torch.from_numpy(arrays.group).to(**to)  # [L]
        doc = torch.from_numpy(arrays.doc).to(**to)  # [L]
        ends = torch.from_numpy(arrays.doc_ends).to(**to)  # [num_docs]
        mask = self._attention_mask(group, doc, input_ids.shape[1])
        hidden = self.decoder(
            input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False
        ).last_hidden_state[0, ends]  # [num_docs, hidden]
        return PendingScores(torch.sigmoid(hidden.float() @ self.yes_minus_no), started)  # [num_docs], fp32
