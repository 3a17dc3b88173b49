"""Pack planning and pack arrays: every document once, budget kept, positions restart after the head."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from worker.engine.api import PreparedJob
from worker.engine.plan import build_pack_arrays, plan_packs

SUFFIX = np.array([90, 91, 92], dtype=np.int32)


def job(head_len: int, doc_lens: list[int], seed: int) -> PreparedJob:
    rng = np.random.default_rng(seed)
    return PreparedJob(
        head_ids=rng.integers(1000, 2000, head_len).astype(np.int32),
        unique_docs=[rng.integers(3000, 4000, n).astype(np.int32) for n in doc_lens],
        doc_slot=np.arange(len(doc_lens)),
        query_truncated=False,
        truncated_docs=0,
        tokens=head_len + sum(n + len(SUFFIX) for n in doc_lens),
    )


jobs_strategy = st.lists(
    st.tuples(st.integers(1, 12), st.lists(st.integers(1, 20), min_size=0, max_size=12)), min_size=1, max_size=5
).map(lambda specs: [job(h, d, i) for i, (h, d) in enumerate(specs)])


@given(jobs=jobs_strategy, budget=st.integers(40, 200))
def test_every_document_is_planned_once_within_budget(jobs: list[PreparedJob], budget: int) -> None:
    packs = plan_packs(jobs, len(SUFFIX), budget)
    seen = [(g.job, d) for p in packs for g in p.groups for d in g.docs]
    assert sorted(seen) == [(j, d) for j, job in enumerate(jobs) for d in range(len(job.unique_docs))]
    for p in packs:
        expected = sum(
            len(jobs[g.job].head_ids) + sum(len(jobs[g.job].unique_docs[d]) + len(SUFFIX) for d in g.docs)
            for g in p.groups
        )
        assert p.num_tokens == expected
        single_doc = sum(len(g.docs) for g in p.groups) == 1
        assert p.num_tokens <= budget or single_doc


@given(jobs=jobs_strategy, budget=st.integers(40, 200), pad=st.sampled_from([1, 8, 128]))
def test_pack_arrays_lay_out_heads_documents_and_positions(jobs: list[PreparedJob], budget: int, pad: int) -> None:
    for pack in plan_packs(jobs, len(SUFFIX), budget):
        arrays = build_pack_arrays(pack, jobs, SUFFIX, pad_to_multiple=pad, pad_id=0)
        length = len(arrays.input_ids)
        assert length % pad == 0
        assert length - arrays.num_tokens < pad
        assert arrays.num_tokens == pack.num_tokens
        # rebuilt with plain Python, one token at a time
        ids, pos, group, doc, ends = [], [], [], [], []
        number = 0
        for g_index, g in enumerate(pack.groups):
            head = jobs[g.job].head_ids.tolist()
            ids += head
            pos += list(range(len(head)))
            group += [g_index] * len(head)
            doc += [0] * len(head)
            for d in g.docs:
                number += 1
                seq = jobs[g.job].unique_docs[d].tolist() + SUFFIX.tolist()
                ids += seq
                pos += list(range(len(head), len(head) + len(seq)))
                group += [g_index] * len(seq)
                doc += [number] * len(seq)
                ends.append(len(ids) - 1)
        pad_len = length - len(ids)
        assert arrays.input_ids.tolist() == ids + [0] * pad_len
        assert arrays.position_ids.tolist() == pos + [0] * pad_len
        assert arrays.group.tolist() == group + [-1] * pad_len
        assert arrays.doc.tolist() == doc + [-1] * pad_len
        assert arrays.doc_ends.tolist() == ends


def test_small_jobs_share_a_pack_and_a_big_job_spans_several() -> None:
    small = [job(5, [4, 4], 1), job(5, [4], 2)]
    packs = plan_packs(small, len(SUFFIX), 100)
    assert len(packs) == 1
    assert [g.job for g in packs[0].groups] == [0, 1]
    big = [job(10, [20] * 10, 3)]
    packs = plan_packs(big, len(SUFFIX), 100)
    # head 10 + 4 x (20 + 3) = 102 > 100: three documents per pack, each pack behind its own copy of the head
    assert [len(p.groups[0].docs) for p in packs] == [3, 3, 3, 1]
    assert all(len(p.groups) == 1 and p.groups[0].job == 0 for p in packs)
