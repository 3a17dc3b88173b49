"""Attention rules of a packed rerank sequence, as small composable `mask_mod`s (attention-gym style).

A pack holds one or more groups, one per job: the job's shared head, then its documents, each followed by the
suffix. Per token the pack carries `group` (which job's group) and `doc` (0 for head tokens, else a number unique
within the pack). A query token may see a key token when all three rules hold:
    causal                 k <= q
    same_group             group[k] == group[q]            (jobs never see each other)
    head_or_same_document  doc[k] == 0 or doc[k] == doc[q]  (a document sees its job's head and itself)
Padding tokens get group -1 and doc -1: they see only earlier padding, and nothing real sees them.

The same rules feed FlexAttention's BlockMask on CUDA and a dense boolean mask for SDPA/eager elsewhere, so both
paths are one definition; tests check the composed rule against a plain loop construction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def causal(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
    return k <= q


def generate_same_group(group: Tensor) -> MaskMod:
    def same_group(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return group[k] == group[q]

    return same_group


def generate_head_or_same_document(doc: Tensor) -> MaskMod:
    def head_or_same_document(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return (doc[k] == 0) | (doc[k] == doc[q])

    return head_or_same_document


def and_masks(*mods: MaskMod) -> MaskMod:
    def combined(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        allowed = mods[0](b, h, q, k)
        for mod in mods[1:]:
            allowed = allowed & mod(b, h, q, k)
        return allowed

    return combined


def packed_rerank_mask(group: Tensor, doc: Tensor) -> MaskMod:
    """The full rule of a pack: causal, within the job, head or own document."""
    return and_masks(causal, generate_same_group(group), generate_head_or_same_document(doc))


def dense_mask(mask_mod: MaskMod, length: int, device: torch.device) -> Tensor:
    """Evaluate a mask_mod on every (q, k) pair by broadcasting: bool [1, 1, length, length], True = may attend."""
    idx = torch.arange(length, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    allowed = mask_mod(zero, zero, idx.view(length, 1), idx.view(1, length))  # [L, L]
    return allowed.view(1, 1, length, length)
