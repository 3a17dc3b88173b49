"""The composed mask rule against a plain loop construction of the same intent."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from worker.engine.masks import dense_mask, packed_rerank_mask


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
