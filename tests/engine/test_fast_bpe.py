"""tiktoken's BPE over the Qwen3 vocabulary gives the ids `tokenizers` gives, for any text."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer

from bench.workloads import make_job
from tests.strategies import tricky_text
from worker.engine import fast_bpe
from worker.engine.engine import RerankEngine
from worker.engine.fast_bpe import FastBPE, _byte_level_alphabet, split_tie_cases
from worker.engine.prompt import document_tail
from worker.engine.tokenize import _without_added_tokens


@pytest.fixture(scope="module")
def plain(engine: RerankEngine) -> Tokenizer:
    return engine.tokenizer._plain


@pytest.fixture(scope="module")
def fast(plain: Tokenizer) -> FastBPE:
    bpe, reason = FastBPE.of(plain)
    assert bpe is not None, reason
    return bpe


def slow_ids(plain: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]


def test_engine_tokenizes_documents_with_tiktoken(engine: RerankEngine) -> None:
    assert engine.tokenizer.document_encoder == "tiktoken"


def test_every_code_point_splits_and_merges_alike(plain: Tokenizer, fast: FastBPE) -> None:
    """The regex engines differ (Oniguruma vs fancy-regex): every code point, next to letters, digits, spaces,
    newlines, apostrophes and itself, must give the same ids. Non-NFC text goes through the same normalizer."""
    points = [c for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = []
    for start in range(0, len(points), 64):
        texts.append("".join(f" {ch}a{ch}1{ch}{ch}\n{ch}  {ch}'s" for ch in map(chr, points[start : start + 64])))
    assert [ids.tolist() for ids in fast.encode_batch(texts)] == slow_ids(plain, texts)


def test_workload_documents(plain: Tokenizer, fast: FastBPE) -> None:
    texts = [document_tail(d) for d in make_job(np.random.default_rng(0), 400, 55, 160).documents]
    assert [ids.tolist() for ids in fast.encode_batch(texts)] == slow_ids(plain, texts)


def test_texts_are_encoded_alone_though_joined(plain: Tokenizer, fast: FastBPE) -> None:
    """Texts go to tiktoken joined on a separator: what ends one text (trailing spaces, a letter) must not merge with
    what starts the next, and a text that holds the separator character itself is still encoded as text."""
    texts = ["  ", " a", "b  ", "\n", f" x{fast_bpe.SEPARATOR}y ", "", " 1 ", f"{fast_bpe.SEPARATOR}"] * 40
    got = fast.encode_batch(texts)
    assert [ids.tolist() for ids in got] == slow_ids(plain, texts)
    assert all(ids.dtype == np.int32 for ids in got)
    clean = [t for t in texts if fast_bpe.SEPARATOR not in t]
    assert [ids.tolist() for ids in fast.encode_batch(clean)] == slow_ids(plain, clean)


def test_a_text_holding_the_separator_leaves_the_others_joined(
    plain: Tokenizer, fast: FastBPE, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [" a", f" b{fast_bpe.SEPARATOR}c", " d e", ""]
    alone: list[str] = []
    encode_ordinary = fast._encoding.encode_ordinary
    monkeypatch.setattr(fast._encoding, "encode_ordinary", lambda t: alone.append(t) or encode_ordinary(t))
    assert [ids.tolist() for ids in fast.encode_batch(texts)] == slow_ids(plain, texts)
    assert alone == [texts[1]]


def test_probe_texts_go_through_the_joined_path() -> None:
    assert not any(fast_bpe.SEPARATOR in t for t in fast_bpe._probe_texts())


def test_separator_id_is_the_special_token_even_if_the_vocabulary_has_its_bytes() -> None:
    import tiktoken

    ranks = {bytes([b]): b for b in range(256)} | {fast_bpe.SEPARATOR.encode(): 256}
    special = {fast_bpe.SEPARATOR: 257}
    fast = FastBPE(tiktoken.Encoding("t", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens=special), None)
    assert fast._separator_id == 257
    assert [ids.tolist() for ids in fast.encode_batch(["ab", "c"])] == [[97, 98], [99]]


@given(st.lists(st.one_of(st.text(), tricky_text), min_size=1, max_size=8))
def test_random_text(plain: Tokenizer, fast: FastBPE, texts: list[str]) -> None:
    assert [ids.tolist() for ids in fast.encode_batch(texts)] == slow_ids(plain, texts)


def test_overlapping_splits_of_one_token(plain: Tokenizer, fast: FastBPE) -> None:
    """The one place the two merge orders could part: symbols x, y, z with x+y and y+z the same token T (tokenizers
    merges the earlier-listed split first, tiktoken the leftmost). Search every such T in the vocabulary."""
    vocab: dict[str, int] = json.loads(plain.to_str())["model"]["vocab"]
    alphabet = _byte_level_alphabet()
    cases = split_tie_cases(vocab)
    assert len(cases) > 100  # the search found the shapes it looks for
    for case in cases:
        piece = bytes(alphabet[ch] for ch in case)
        assert fast._encoding._encode_single_piece(piece) == [t.id for t in plain.model.tokenize(case)], case


def _variant(plain: Tokenizer, edit: Any) -> Tokenizer:
    spec = json.loads(plain.to_str())
    edit(spec)
    return Tokenizer.from_str(json.dumps(spec))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer 'NFKC'"),
        (lambda s: s["pre_tokenizer"]["pretokenizers"].pop(0), "pre-tokenizer"),
        (lambda s: s["model"].update(dropout=0.1), "dropout"),
        (lambda s: s["model"]["merges"].reverse(), "not ordered by the rank"),
        (lambda s: s["model"]["merges"].pop(), "not every two-token split"),
    ],
)
def test_other_tokenizers_fall_back_with_a_reason(plain: Tokenizer, edit: Any, reason: str) -> None:
    bpe, why = FastBPE.of(_variant(plain, edit))
    assert bpe is None
    assert reason in why


def test_a_regex_that_skips_characters_falls_back(plain: Tokenizer) -> None:
    """tiktoken encodes only what the regex matches; Split keeps the gaps as pieces: the load-time probe tells."""

    def drop_digits(spec: dict[str, Any]) -> None:
        split = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]
        split["Regex"] = split["Regex"].replace("|\\p{N}|", "|")

    variant = _variant(plain, drop_digits)
    assert "\\p{N}|" not in json.loads(variant.to_str())["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    bpe, why = FastBPE.of(variant)
    assert bpe is None
    assert why.startswith("ids differ on the probe text")


def test_unreachable_token_falls_back(plain: Tokenizer) -> None:
    """A token BPE cannot build from its own bytes would be returned whole by tiktoken's shortcut: add "abcd" with
    only the merge ab+cd where bc merges first (so a, bc, d is stuck) and no abc or bcd exists."""
    vocab: dict[str, int] = json.loads(plain.to_str())["model"]["vocab"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    quad = next(
        a + b + c + d
        for a in letters
        for b in letters
        for c in letters
        for d in letters
        if all(p in vocab for p in (a + b, c + d, b + c))
        and vocab[b + c] < min(vocab[a + b], vocab[c + d])
        and not any(p in vocab for p in (a + b + c, b + c + d, a + b + c + d))
    )

    def add_token(spec: dict[str, Any]) -> None:
        spec["model"]["vocab"][quad] = max(spec["model"]["vocab"].values()) + 1
        spec["model"]["merges"].append([quad[:2], quad[2:]])

    bpe, why = FastBPE.of(_variant(plain, add_token))
    assert bpe is None
    assert why == "1 tokens are not what BPE makes of their own bytes"


def test_missing_tiktoken_falls_back(plain: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    monkeypatch.setattr(fast_bpe, "_CHECKED", {})
    assert FastBPE.of(plain) == (None, "tiktoken is not installed")


def test_added_tokens_are_refused(engine: RerankEngine) -> None:
    """The full tokenizer matches "<|im_end|>" in text; the fast path is only for the copy without added tokens."""
    full = engine.tokenizer._template
    assert FastBPE.of(full) == (None, "the tokenizer has added tokens")
    assert FastBPE.of(_without_added_tokens(full.to_str()))[0] is not None


def test_a_kept_verdict_spares_the_checks_and_gives_the_same_ids(
    plain: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted worker finds the verdict of the checks in its cache directory and rebuilds the encoding without
    walking the vocabulary; a verdict it cannot read, or one of another key, proves nothing."""
    monkeypatch.setattr(fast_bpe, "_CHECKED", {})
    first, reason = FastBPE.of(plain, tmp_path)
    assert first is not None, reason
    (kept,) = tmp_path.glob("fast-bpe-*.json")
    assert json.loads(kept.read_text())["fast"] is True

    def walked(*args: Any) -> str:
        raise AssertionError("the checks ran although a verdict was kept")

    monkeypatch.setattr(fast_bpe, "_CHECKED", {})  # a new process
    monkeypatch.setattr(fast_bpe, "_probe_agrees", walked)
    monkeypatch.setattr(fast_bpe, "_merges_match_ranks", walked)
    again, reason = FastBPE.of(plain, tmp_path)
    assert again is not None, reason
    texts = [document_tail(d) for d in make_job(np.random.default_rng(2), 200, 40, 120).documents]
    assert [ids.tolist() for ids in again.encode_batch(texts)] == slow_ids(plain, texts)

    for broken in ("{not json", json.dumps({"key": "another", "fast": True})):
        kept.write_text(broken)
        monkeypatch.setattr(fast_bpe, "_CHECKED", {})
        with pytest.raises(AssertionError, match="the checks ran"):
            FastBPE.of(plain, tmp_path)
