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
from dataclasses import dataclass

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


def interval_mask(head_start: Tensor, head_end: Tensor, segment_start: Tensor) -> MaskMod:
    """`packed_rerank_mask` restated per query token as two key ranges: its group's head (causal) and its own
    segment up to itself. Only q-indexed loads, and the same data that builds the block structure below; tests
    check it equals the composed rule on every (q, k) of random packs.
    """

    def head_or_own_segment(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        in_head = (k >= head_start[q]) & (k < head_end[q])
        return (k <= q) & (in_head | (k >= segment_start[q]))

    return head_or_own_segment


@dataclass(frozen=True)
class BlockStructure:
    """Which key blocks each query block needs, FlexAttention's layout: partial blocks evaluate the mask_mod per
    element, full blocks skip it. Indices are sorted with the used ones first; int32 [1, 1, nq(, nk)]."""

    partial_num: Tensor
    partial_indices: Tensor
    full_num: Tensor
    full_indices: Tensor


def block_structure(head_start: Tensor, head_end: Tensor, segment_start: Tensor, block: int) -> BlockStructure:
    """Block-level summary of `interval_mask`, from the per-token ranges alone (no [L, L] evaluation).

    A key block is *used* by a query block if some query token's range overlaps it, and *full* if every query
    token's head range or own range covers all of it (a block covered only by the union of both is counted
    partial: correct, merely not skipped). The work is [nq, block, nk] comparisons, done in chunks of query blocks.
    """
    length = head_start.shape[0]
    if length % block:
        raise ValueError(f"pack length {length} is not a multiple of the block size {block}")
    nb = length // block
    device = head_start.device
    kv_lo = (torch.arange(nb, device=device) * block).view(1, 1, nb)
    kv_hi = kv_lo + block
    q_all = torch.arange(length, device=device).view(nb, block, 1)
    used_rows, full_rows = [], []
    chunk = max(1, (1 << 24) // (block * nb))  # bound the [chunk, block, nb] intermediates to ~16M elements
    for first in range(0, nb, chunk):
        rows = slice(first * block, min(nb, first + chunk) * block)
        q = q_all[first : first + chunk]
        hs, ss = (t[rows].view(-1, block, 1) for t in (head_start, segment_start))
        he = torch.minimum(head_end[rows].view(-1, block, 1), q + 1)  # head range, causal
        own_hi = q + 1
        used = ((hs < he) & (hs < kv_hi) & (he > kv_lo)) | ((ss < kv_hi) & (own_hi > kv_lo))
        full = ((hs <= kv_lo) & (he >= kv_hi)) | ((ss <= kv_lo) & (own_hi >= kv_hi))
        used_rows.append(used.any(1))
        full_rows.append(full.all(1))
    full_blocks = torch.cat(full_rows)  # [nb, nb]
    partial_blocks = torch.cat(used_rows) & ~full_blocks

    def layout(blocks: Tensor) -> tuple[Tensor, Tensor]:
        num = blocks.sum(-1, dtype=torch.int32)
        # stable sort of "not used" puts the used blocks first, in ascending order
        indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num.view(1, 1, nb), indices.view(1, 1, nb, nb)

    partial_num, partial_indices = layout(partial_blocks)
    full_num, full_indices = layout(full_blocks)
    return BlockStructure(partial_num, partial_indices, full_num, full_indices)
