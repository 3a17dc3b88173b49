"""Pack planning and vectorized pack tensors.

A prepared job is a head (shared prefix ids) and its unique documents (ids, suffix not included). Packs are filled
greedily in job order under a token budget: a job's group opens with its head; documents follow while they fit;
when one does not, the pack is closed and the job continues in the next pack behind a fresh copy of its head.
Small jobs share packs (cross-job packing); a job larger than the budget spans several.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from worker.engine.api import PackArrays, PreparedJob, TokenIds


@dataclass(frozen=True)
class PackGroup:
    job: int  # index into the batch's jobs
    docs: tuple[int, ...]  # indices into that job's unique_docs


@dataclass(frozen=True)
class Pack:
    groups: tuple[PackGroup, ...]
    num_tokens: int


@dataclass
class _PackBuilder:
    budget: int
    groups: list[PackGroup] = field(default_factory=list)
    num_tokens: int = 0


def plan_packs(jobs: Sequence[PreparedJob], suffix_len: int, max_pack_tokens: int) -> list[Pack]:
    """Greedy in-order packing of every job's unique documents under `max_pack_tokens` per pack.

    A pack that holds a single document may exceed the budget if head + document alone do (the engine rejects such
    settings at start; this keeps the planner total).
    """
    packs: list[Pack] = []
    current = _PackBuilder(max_pack_tokens)

    def close() -> None:
        nonlocal current
        if current.groups:
            packs.append(Pack(tuple(current.groups), current.num_tokens))
        current = _PackBuilder(max_pack_tokens)

    for job_index, job in enumerate(jobs):
        head_len = len(job.head_ids)
        group_docs: list[int] = []
        for doc_index, doc in enumerate(job.unique_docs):
            cost = len(doc) + suffix_len + (0 if group_docs else head_len)
            if current.num_tokens + cost > max_pack_tokens and (current.groups or group_docs):
                if group_docs:
                    current.groups.append(PackGroup(job_index, tuple(group_docs)))
                    group_docs = []
                close()
                cost = len(doc) + suffix_len + head_len
            group_docs.append(doc_index)
            current.num_tokens += cost
        if group_docs:
            current.groups.append(PackGroup(job_index, tuple(group_docs)))
    close()
    return packs


def build_pack_arrays(
    pack: Pack, jobs: Sequence[PreparedJob], suffix_ids: TokenIds, pad_to_multiple: int = 1, pad_id: int = 0
) -> PackArrays:
    """Lay out a pack as flat arrays, vectorized over tokens (Python touches segments only, never tokens)."""
    pieces: list[TokenIds] = []
    seg_len: list[int] = []
    seg_group: list[int] = []
    seg_doc: list[int] = []
    seg_pos0: list[int] = []
    seg_head: list[int] = []  # segment -> index of its group's head segment
    doc_number = 0
    for group_number, group in enumerate(pack.groups):
        head = jobs[group.job].head_ids
        pieces.append(head)
        seg_len.append(len(head))
        seg_group.append(group_number)
        seg_doc.append(0)
        seg_pos0.append(0)
        head_segment = len(seg_len) - 1
        seg_head.append(head_segment)
        for doc_index in group.docs:
            doc_number += 1
            doc = jobs[group.job].unique_docs[doc_index]
            pieces += (doc, suffix_ids)
            seg_len.append(len(doc) + len(suffix_ids))
            seg_group.append(group_number)
            seg_doc.append(doc_number)
            seg_pos0.append(len(head))  # positions restart right after the head
            seg_head.append(head_segment)
    lengths = np.asarray(seg_len, dtype=np.int64)
    num_tokens = int(lengths.sum())
    padded = -(-num_tokens // pad_to_multiple) * pad_to_multiple
    pad = padded - num_tokens
    starts = np.cumsum(lengths) - lengths
    input_ids = np.concatenate(pieces).astype(np.int64)
    position_ids = np.arange(num_tokens, dtype=np.int64) + np.repeat(np.asarray(seg_pos0) - starts, lengths)
    group_ids = np.repeat(np.asarray(seg_group, dtype=np.int64), lengths)
    doc_ids = np.repeat(np.asarray(seg_doc, dtype=np.int64), lengths)
    is_doc = np.asarray(seg_doc) > 0
    doc_ends = (starts + lengths - 1)[is_doc]
    heads = np.asarray(seg_head, dtype=np.int64)
    head_start = np.repeat(starts[heads], lengths)
    head_end = np.repeat(starts[heads] + lengths[heads], lengths)
    segment_start = np.repeat(starts, lengths)
    if pad:
        input_ids = np.pad(input_ids, (0, pad), constant_values=pad_id)
        position_ids = np.pad(position_ids, (0, pad))
        group_ids = np.pad(group_ids, (0, pad), constant_values=-1)
        doc_ids = np.pad(doc_ids, (0, pad), constant_values=-1)
        # padding: one segment starting at num_tokens, no head (an empty range)
        head_start, head_end, segment_start = (
            np.pad(a, (0, pad), constant_values=num_tokens) for a in (head_start, head_end, segment_start)
        )
    return PackArrays(
        input_ids, position_ids, group_ids, doc_ids, doc_ends, num_tokens, head_start, head_end, segment_start
    )
