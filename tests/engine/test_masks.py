"""The composed mask rule against a plain loop construction of the same intent."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from worker.engine.masks import block_structure, dense_mask, interval_mask, packed_rerank_mask


def loop_mask(group: list[int], doc: list[int]) -> np.ndarray:
    """Written from the intent, one pair at a time: causal, same job, and the key is the job's head or own doc."""
    n = len(group)
    out = np.zeros((n, n), dtype=bool)
    for q in range(n):
        for k in range(q + 1):
            if group[k] != group[q]:
                continue
            out[q, k] = doc[k] == 0 or doc[k] == doc[q]
    return out


@st.composite
def pack_layouts(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    group: list[int] = []
    doc: list[int] = []
    next_doc = 1
    for g in range(draw(st.integers(1, 3))):
        head = draw(st.integers(1, 4))
        group += [g] * head
        doc += [0] * head
        for _ in range(draw(st.integers(0, 3))):
            n = draw(st.integers(1, 4))
            group += [g] * n
            doc += [next_doc] * n
            next_doc += 1
    pad = draw(st.integers(0, 3))
    return group + [-1] * pad, doc + [-1] * pad


@given(pack_layouts())
def test_dense_mask_equals_loop_construction(layout: tuple[list[int], list[int]]) -> None:
    group, doc = layout
    mask = dense_mask(packed_rerank_mask(torch.tensor(group), torch.tensor(doc)), len(group), torch.device("cpu"))
    assert mask.shape == (1, 1, len(group), len(group))
    np.testing.assert_array_equal(mask[0, 0].numpy(), loop_mask(group, doc))


def test_every_row_sees_at_least_itself() -> None:
    group = [0, 0, 0, 0, 1, 1, 1, -1, -1]
    doc = [0, 1, 1, 2, 0, 3, 3, -1, -1]
    mask = dense_mask(packed_rerank_mask(torch.tensor(group), torch.tensor(doc)), len(group), torch.device("cpu"))
    assert bool(mask[0, 0].diagonal().all())
    # document 2 sees the head of job 0 and itself, not document 1 nor job 1
    assert mask[0, 0, 3].tolist() == [True, False, False, True, False, False, False, False, False]


def intervals_from_layout(group: list[int], doc: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Per token, from the intent: its group's head range and the start of its own run (padding: empty head)."""
    n = len(group)
    head_start, head_end, segment_start = [0] * n, [0] * n, [0] * n
    for t in range(n):
        if group[t] < 0:
            first_pad = group.index(-1)
            head_start[t] = head_end[t] = segment_start[t] = first_pad
            continue
        head = [i for i in range(n) if group[i] == group[t] and doc[i] == 0]
        head_start[t], head_end[t] = head[0], head[-1] + 1
        s = t
        while s > 0 and (group[s - 1], doc[s - 1]) == (group[t], doc[t]):
            s -= 1
        segment_start[t] = s
    return head_start, head_end, segment_start


@given(pack_layouts())
def test_interval_mask_is_the_composed_rule(layout: tuple[list[int], list[int]]) -> None:
    group, doc = layout
    ranges = [torch.tensor(r) for r in intervals_from_layout(group, doc)]
    mask = dense_mask(interval_mask(*ranges), len(group), torch.device("cpu"))
    np.testing.assert_array_equal(mask[0, 0].numpy(), loop_mask(group, doc))


@given(pack_layouts(), st.sampled_from([1, 2, 4]))
def test_block_structure_summarizes_the_dense_mask(layout: tuple[list[int], list[int]], block: int) -> None:
    group, doc = layout
    pad = -len(group) % block
    group, doc = group + [-1] * pad, doc + [-1] * pad
    ranges = [torch.tensor(r) for r in intervals_from_layout(group, doc)]
    nb = len(group) // block
    dense = torch.from_numpy(loop_mask(group, doc)).view(nb, block, nb, block)
    used, every = dense.any(3).any(1), dense.all(3).all(1)

    s = block_structure(*ranges, block)

    def blocks(num: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(nb, nb, dtype=torch.bool)
        for q in range(nb):
            out[q, indices[0, 0, q, : num[0, 0, q]].long()] = True
        return out

    partial, full = blocks(s.partial_num, s.partial_indices), blocks(s.full_num, s.full_indices)
    assert torch.equal(partial | full, used)  # no needed block is skipped, no unneeded one visited
    assert not (partial & full).any()
    assert not (full & ~every).any()  # a block marked full really is: its mask_mod is never evaluated
    if block == 1:
        assert torch.equal(full, every)  # single tokens: exact
