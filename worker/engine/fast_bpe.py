"""Document tokenizing through tiktoken's BPE over the tokenizer's own vocabulary, when that gives the same ids.

Why: tokenizing documents is the CPU side's largest cost, and tiktoken's BPE does it faster than `tokenizers`.
Qwen's byte-level BPE is a tiktoken encoding at heart; its `tokenizer.json` is that encoding converted. `FastBPE.of`
rebuilds the tiktoken ranks from the vocabulary and accepts the tokenizer only if the steps that could make the two
disagree are ruled out or checked:

- normalizer NFC or none (applied with the tokenizer's own normalizer, so Unicode tables cannot differ);
- pre-tokenizer exactly [Split(regex, Isolated), ByteLevel without its own regex]: the same regex goes to tiktoken;
- model BPE without dropout, byte fallback, prefixes or suffixes, all 256 bytes in the vocabulary;
- merges are exactly the pairs (a, b) with a, b and a+b in the vocabulary, ordered by the rank of a+b: then "merge
  the earliest listed pair" (tokenizers) and "merge the pair whose concatenation ranks lowest" (tiktoken) pick the
  same pair at every step;
- with `ignore_merges` off, every token is what BPE makes of its own bytes, so tiktoken's shortcut (a piece that is
  a whole token is returned as it) changes nothing.

- the one place the two merge rules can part, a tie between two splits of one token at overlapping places
  (x+y = y+z: tokenizers merges the earlier-listed split, tiktoken the leftmost pair), is searched for in the whole
  vocabulary and every such case encoded both ways;
- a probe text (every code point below U+3000 and one of each other Unicode category, in several contexts) gives the
  same ids both ways: the two regex engines (Oniguruma in tokenizers, fancy-regex in tiktoken) split alike, and the
  regex matches every character (tiktoken encodes only the matches, Split keeps the gaps too).

Tests sweep every Unicode code point through both, with the versions installed; a version of either library with
other Unicode tables could still differ on a character the load-time probe does not hold.

The checks walk the whole vocabulary (seconds). Their verdict can be kept in a directory (the engine uses the compile
cache, RERANK_CACHE_DIR): a restarted worker with the same tokenizer.json and the same versions of tiktoken,
tokenizers and these checks rebuilds the encoding without walking the vocabulary again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-printable-character map, inverted: vocabulary characters back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shifted = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _split_regex(pre_tokenizer: Any) -> str | None:
    if not pre_tokenizer or pre_tokenizer.get("type") != "Sequence":
        return None
    steps = pre_tokenizer.get("pretokenizers") or []
    if len(steps) != 2:
        return None
    split, byte_level = steps
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in (split.get("pattern") or {})
    ):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space") or byte_level.get("use_regex"):
        return None
    regex: str = split["pattern"]["Regex"]
    return regex


def _merge_pairs(merges: Sequence[Any]) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]  # type: ignore[misc]


class FastBPE:
    """`encode_batch(texts)` gives the same ids as the plain tokenizer's `encode_batch(texts, add_special_tokens=
    False)` (no added tokens are matched: it is meant for the copy of the tokenizer that has none)."""

    def __init__(self, encoding: Any, normalizer: Any) -> None:
        self._encoding = encoding
        self._normalizer = normalizer
        self._allowed = frozenset([SEPARATOR])
        # as a special token (a vocabulary could also hold U+E000's bytes as an ordinary token)
        (self._separator_id,) = encoding.encode(SEPARATOR, allowed_special=self._allowed)
        # Large batches are split over the cores (each encode call releases the GIL); a pool made once, since
        # starting threads per call costs more than a job's documents take (tiktoken's own batch call does that).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._threads = max(1, min(8, cores))
        self._pool = ThreadPoolExecutor(self._threads, "fast-bpe") if self._threads > 1 else None

    @classmethod
    def of(cls, tokenizer: Tokenizer, verdicts: Path | None = None) -> tuple[FastBPE | None, str]:
        """The fast path for this tokenizer, or None and the reason it does not apply (checked once per
        distinct tokenizer in a process: the checks walk the whole vocabulary, which takes seconds). `verdicts`: a
        directory keeping the checks' verdicts across processes."""
        spec_text = tokenizer.to_str()
        key = _verdict_key(spec_text)
        if key not in _CHECKED:
            proven = _read_verdict(verdicts, key)
            _CHECKED[key] = cls._check(tokenizer, json.loads(spec_text), proven=proven)
            if not proven:
                fast, reason = _CHECKED[key]
                _write_verdict(verdicts, key, fast is not None, reason)
        return _CHECKED[key]

    @classmethod
    def _check(cls, tokenizer: Tokenizer, spec: dict[str, Any], *, proven: bool = False) -> tuple[FastBPE | None, str]:
        """`proven`: a kept verdict says the vocabulary-wide checks passed for exactly this tokenizer and these
        versions; the structure is still checked (cheap), the walks over the vocabulary are not repeated."""
        try:
            import tiktoken
        except ImportError:
            return None, "tiktoken is not installed"
        if spec.get("added_tokens"):
            return None, "the tokenizer has added tokens"
        normalizer = spec.get("normalizer")
        if normalizer is not None and normalizer.get("type") != "NFC":
            return None, f"normalizer {normalizer.get('type')!r}"
        regex = _split_regex(spec.get("pre_tokenizer"))
        if regex is None:
            return None, "pre-tokenizer is not Split(regex) + ByteLevel"
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            return None, f"model {model.get('type')!r}"
        if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
            return None, "BPE with dropout, byte fallback or a subword prefix"
        if model.get("end_of_word_suffix"):
            return None, "BPE with an end-of-word suffix"
        alphabet = _byte_level_alphabet()
        vocab: dict[str, int] = model["vocab"]
        if any(ch not in alphabet for token in vocab for ch in token):
            return None, "vocabulary is not byte-level"
        ranks = {bytes(alphabet[ch] for ch in token): rank for token, rank in vocab.items()}
        if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
            return None, "vocabulary does not hold every byte exactly once"
        reason = "" if proven else _merges_match_ranks(_merge_pairs(model.get("merges") or []), vocab)
        if reason:
            return None, reason
        if not proven and not model.get("ignore_merges", False):
            unreachable = [t for t, i in vocab.items() if [x.id for x in tokenizer.model.tokenize(t)] != [i]]
            if unreachable:
                return None, f"{len(unreachable)} tokens are not what BPE makes of their own bytes"
        special = {SEPARATOR: max(ranks.values()) + 1}
        encoding = tiktoken.Encoding("bpe", pat_str=regex, mergeable_ranks=ranks, special_tokens=special)
        fast = cls(encoding, tokenizer.normalizer if normalizer is not None else None)
        if proven:
            return fast, ""
        reason = _split_ties_agree(fast, tokenizer, vocab, alphabet) or _probe_agrees(fast, tokenizer)
        if reason:
            return None, reason
        return fast, ""

    def encode_batch(self, texts: Sequence[str]) -> list[TokenIds]:
        parts = min(self._threads, len(texts) // MIN_TEXTS_PER_THREAD)
        if parts <= 1 or self._pool is None:
            return self._encode_joined(texts)
        bounds = [len(texts) * i // parts for i in range(parts + 1)]
        pending = [self._pool.submit(self._encode_joined, texts[a:b]) for a, b in itertools.pairwise(bounds)]
        return [ids for part in pending for ids in part.result()]

    def _encode_joined(self, texts: Sequence[str]) -> list[TokenIds]:
        """One tiktoken call for all texts, joined on SEPARATOR (a special token here): per-text calls each take
        and give back the GIL, which serializes the threads (two would be slower than one). tiktoken runs its regex
        on the text between special tokens alone, so each text is split exactly as if it were encoded by itself.
        A text that holds SEPARATOR itself would be cut there: it is encoded alone."""
        norm = self._normalizer
        if norm is not None:
            texts = [t if t.isascii() else norm.normalize_str(t) for t in texts]  # ASCII is NFC already
        joined = SEPARATOR.join(texts) + SEPARATOR
        if joined.count(SEPARATOR) == len(texts):  # no text holds it
            return self._split(joined, len(texts))
        out: list[TokenIds] = [np.empty(0, dtype=np.int32)] * len(texts)
        clean = []
        for i, text in enumerate(texts):
            if SEPARATOR in text:
                out[i] = np.asarray(self._encoding.encode_ordinary(text), dtype=np.int32)
            else:
                clean.append(i)
        if clean:
            joined = SEPARATOR.join(texts[i] for i in clean) + SEPARATOR
            for i, ids in zip(clean, self._split(joined, len(clean)), strict=True):
                out[i] = ids
        return out

    def _split(self, joined: str, count: int) -> list[TokenIds]:
        """Ids of `count` texts joined on SEPARATOR (none holding it), each text's own."""
        ids = self._encoding.encode_to_numpy(joined, allowed_special=self._allowed, disallowed_special=())
        ends = np.flatnonzero(ids == self._separator_id)
        if len(ends) != count:
            raise RuntimeError(f"{len(ends)} separators in the ids of {count} joined texts. This is a bug.")
        ids = ids.astype(np.int32)
        starts = [0, *(ends[:-1] + 1).tolist()]
        return [ids[a:b] for a, b in zip(starts, ends.tolist(), strict=True)]


SEPARATOR = "\ue000"  # a private-use character; a text that holds it is encoded alone
TokenIds = npt.NDArray[np.int32]
_CHECKED: dict[str, tuple[FastBPE | None, str]] = {}  # `_verdict_key` -> outcome
MIN_TEXTS_PER_THREAD = 32
# Part of every kept verdict's key: change it whenever the checks change, so no verdict of older checks is trusted.
CHECKS_VERSION = 1


def _verdict_key(spec_text: str) -> str:
    """sha256 of tokenizer.json and of what the verdict depends on besides it: the two libraries and the checks."""
    libraries = []
    for name in ("tiktoken", "tokenizers"):
        try:
            libraries.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            libraries.append(f"{name} missing")
    return hashlib.sha256("\n".join([spec_text, *libraries, f"checks {CHECKS_VERSION}"]).encode()).hexdigest()


def _read_verdict(verdicts: Path | None, key: str) -> bool:
    """Whether a kept verdict proves the fast path for `key` (an unreadable or negative one proves nothing)."""
    if verdicts is None:
        return False
    try:
        verdict = json.loads((verdicts / f"fast-bpe-{key}.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(verdict, dict) and verdict.get("fast") is True and verdict.get("key") == key


def _write_verdict(verdicts: Path | None, key: str, fast: bool, reason: str) -> None:
    """Keep a verdict (written whole, then renamed: a reader never sees half of one); a failure only costs the next
    start the checks."""
    if verdicts is None:
        return
    with contextlib.suppress(OSError):
        verdicts.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=verdicts, suffix=".tmp", delete=False) as f:
            json.dump({"key": key, "fast": fast, "reason": reason}, f)
        os.replace(f.name, verdicts / f"fast-bpe-{key}.json")


def _merges_match_ranks(merges: list[tuple[str, str]], vocab: dict[str, int]) -> str:
    """ "" if the merges are exactly every split of every token into two tokens, ordered by the token's rank."""
    last_rank = -1
    for left, right in merges:
        rank = vocab.get(left + right)
        if rank is None or left not in vocab or right not in vocab:
            return f"merge {left!r} + {right!r} does not make a token"
        if rank < last_rank:
            return "merges are not ordered by the rank of their result"
        last_rank = rank
    splits = sum(1 for token in vocab for cut in range(1, len(token)) if token[:cut] in vocab and token[cut:] in vocab)
    if splits != len(set(merges)) or len(merges) != len(set(merges)):
        return f"merges ({len(merges)}) are not every two-token split of the vocabulary ({splits})"
    return ""


def split_tie_cases(vocab: dict[str, int]) -> list[str]:
    """Pieces (in the vocabulary's byte-level characters) where two splits of one token T meet: symbols x, y, z
    with x+y = y+z = T, alone and in two contexts."""
    cases = []
    for token in vocab:
        n = len(token)
        for m in range(1, n):
            x, y, z = token[: n - m], token[:m], token[m:]
            if token[:m] == token[n - m :] and x != z and x in vocab and y in vocab and z in vocab:
                cases += [x + y + z, x + y + z + y, y + x + y + z]
    return cases


def _split_ties_agree(fast: FastBPE, tokenizer: Tokenizer, vocab: dict[str, int], alphabet: dict[str, int]) -> str:
    """ "" if every split-tie case encodes alike both ways (see the module docstring)."""
    single_piece = fast._encoding._encode_single_piece
    for case in split_tie_cases(vocab):
        if single_piece(bytes(alphabet[ch] for ch in case)) != [t.id for t in tokenizer.model.tokenize(case)]:
            return f"merge order differs on {case!r} (ties between splits of one token)"
    return ""


def _probe_texts() -> list[str]:
    """Every code point below U+3000 and the first code point of each Unicode category above it, in contexts (not
    the separator: the probe is for the joined path, tests cover texts that hold it)."""
    import unicodedata

    first_of: dict[str, int] = {}
    for c in range(0x3000, sys.maxunicode + 1):
        if not 0xD800 <= c <= 0xDFFF:
            first_of.setdefault(unicodedata.category(chr(c)), c)
    first_of["Co"] = ord(SEPARATOR) + 1  # the private-use area's first character is the separator: take the next
    points = [c for c in range(1, 0x3000) if not 0xD800 <= c <= 0xDFFF] + sorted(first_of.values())
    return [
        "".join(f" {ch}a{ch}1{ch}{ch}\n{ch}  {ch}'s" for ch in map(chr, points[i : i + 256]))
        for i in range(0, len(points), 256)
    ]


def _probe_agrees(fast: FastBPE, tokenizer: Tokenizer) -> str:
    texts = _probe_texts()
    slow = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    for text, want, got in zip(texts, slow, fast.encode_batch(texts), strict=True):
        if want != got.tolist():
            return f"ids differ on the probe text starting {text[:12]!r} (regex engines or coverage)"
    return ""
