"""The torch side of a pack scorer: what both backends share, and `TorchScorer`, which runs a pack through the
model's own (Hugging Face) decoder. The packed Qwen3 forward is `worker.engine.qwen3`; `worker.engine.load` picks one.

Only the yes/no direction of the head is ever computed: score = sigmoid(h . (w_yes - w_no)), which equals the
softmax over ("no", "yes") logits that the official code takes (the head has no bias), without the 151,669-way
projection. That one dot product runs in fp32 whatever the model's dtype (bf16 moves scores near rank boundaries).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from worker.engine.api import BackendInfo, PackArrays, PendingPack
from worker.engine.masks import dense_mask, packed_rerank_mask

AttentionBackend = Literal["triton", "flash_varlen", "flex_attention", "sdpa", "eager"]
# FlexAttention works on 128x128 blocks: padding to a multiple of the block keeps every block whole.
FLEX_BLOCK = 128


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

    def device_ms(self, first: PendingPack) -> float | None:
        """Device time from the start of `first`'s work to the end of this pack's (after `result()`): the forward
        passes alone, not the wait behind work queued before them. None off CUDA."""
        if not isinstance(first, PendingScores) or first.started is None or self._done is None:
            return None
        return float(first.started.elapsed_time(self._done))


def yes_minus_no_vector(model: Any, yes_id: int, no_id: int) -> Tensor:
    """w_yes - w_no of the LM head in fp32 ([hidden]): the one direction scores need (module docstring)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("the LM head has a bias; the yes-minus-no shortcut assumes none")
    weight: Tensor = head.weight.detach()
    return weight[yes_id].float() - weight[no_id].float()


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
