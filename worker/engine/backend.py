"""The model side: load a Qwen3 reranker, run one pack, return P(yes) at each document's last token.

Only the yes/no direction of the head is ever computed: score = sigmoid(h . (w_yes - w_no)), which equals the
softmax over ("no", "yes") logits that the official code takes (the head has no bias), without the 151,669-way
projection. That one dot product runs in fp32 whatever the model's dtype (bf16 moves scores near rank boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from worker.engine.masks import dense_mask, packed_rerank_mask
from worker.engine.plan import PackArrays

AttentionBackend = Literal["flex_attention", "sdpa", "eager"]
# FlexAttention works on 128x128 blocks: padding to a multiple of the block keeps every block whole.
FLEX_BLOCK = 128


@dataclass(frozen=True)
class BackendInfo:
    device: str
    dtype: str
    attention: AttentionBackend


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


def resolve_attention(attention: str, device: torch.device) -> AttentionBackend:
    if attention == "auto":
        return "flex_attention" if device.type == "cuda" else "sdpa"
    if attention not in ("flex_attention", "sdpa", "eager"):
        raise ValueError(f"unknown attention backend {attention!r}")
    return attention  # type: ignore[return-value]


class TorchScorer:
    """Runs packs through a causal LM's decoder and scores document ends with the fp32 yes-minus-no vector."""

    def __init__(self, model: torch.nn.Module, *, yes_id: int, no_id: int, attention: AttentionBackend) -> None:
        self.model = model
        self.decoder = model.get_decoder()  # type: ignore[operator]
        head = model.get_output_embeddings()  # type: ignore[operator]
        if getattr(head, "bias", None) is not None:
            raise ValueError("the LM head has a bias; the yes-minus-no shortcut assumes none")
        weight = head.weight.detach()
        self.yes_minus_no = weight[yes_id].float() - weight[no_id].float()  # [hidden], fp32
        self.device = weight.device
        self.dtype = weight.dtype
        self.attention = attention
        self.pad_to_multiple = FLEX_BLOCK if attention == "flex_attention" else 1

    @classmethod
    def load(
        cls, model_name_or_path: str, *, device: str, dtype: str, attention: str, yes_id: int, no_id: int
    ) -> TorchScorer:
        from transformers import AutoModelForCausalLM

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        attn = resolve_attention(attention, torch_device)
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_name_or_path, dtype=torch_dtype, attn_implementation=attn
        )
        model.to(torch_device).eval().requires_grad_(False)
        return cls(model, yes_id=yes_id, no_id=no_id, attention=attn)

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

    @torch.inference_mode()
    def score_pack(self, arrays: PackArrays) -> npt.NDArray[np.float32]:
        """P(yes) for each document of the pack, in pack order: float32 [num_docs]."""
        to = {"device": self.device, "non_blocking": True}
        input_ids = torch.from_numpy(arrays.input_ids).to(**to).view(1, -1)  # [1, L]
        position_ids = torch.from_numpy(arrays.position_ids).to(**to).view(1, -1)  # [1, L]
        group = torch.from_numpy(arrays.group).to(**to)  # [L]
        doc = torch.from_numpy(arrays.doc).to(**to)  # [L]
        ends = torch.from_numpy(arrays.doc_ends).to(**to)  # [num_docs]
        mask = self._attention_mask(group, doc, input_ids.shape[1])
        hidden = self.decoder(
            input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False
        ).last_hidden_state[0, ends]  # [num_docs, hidden]
        scores = torch.sigmoid(hidden.float() @ self.yes_minus_no)  # [num_docs], fp32
        return scores.cpu().numpy()
