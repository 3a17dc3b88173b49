"""Text to token ids for the packed prompt: exact ids, user text kept plain, truncation per document and query."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from worker.engine.api import InvalidJobError, TokenIds
from worker.engine.fast_bpe import FastBPE
from worker.engine.prompt import NO_TOKEN, PREFIX, SUFFIX, YES_TOKEN, document_tail, query_head


@dataclass(frozen=True)
class EncodedDocument:
    ids: TokenIds  # " " + document, truncated to max_doc_tokens
    truncated: bool


def _without_added_tokens(spec_text: str) -> Tokenizer:
    spec = json.loads(spec_text)
    spec["added_tokens"] = []
    spec["post_processor"] = None  # it may name added tokens; ids are asked for without special tokens anyway
    return Tokenizer.from_str(json.dumps(spec))


class PromptTokenizer:
    """Tokenizes the three parts of the prompt.

    Template text (PREFIX, SUFFIX) is parsed with its control tokens; user text (instruction, query, documents)
    never is: "<|im_end|>" inside a document stays the characters "<", "|", ... so no document can close its turn
    and forge the assistant's answer. Hugging Face tokenizers match added tokens in any text by default, and
    `split_special_tokens` covers only those marked special: Qwen3's "<think>" and "<tool_call>" are added but not
    special. So user text goes through a copy of the tokenizer with no added tokens at all, only the BPE vocabulary.
    """

    def __init__(
        self,
        backend: Tokenizer,
        *,
        max_query_tokens: int,
        max_doc_tokens: int,
        doc_cache_size: int = 0,
        fast_bpe: bool = True,
        fast_bpe_verdicts: Path | None = None,
    ) -> None:
        """`fast_bpe_verdicts`: where `FastBPE.of` keeps its verdicts across processes (None: checked each start)."""
        spec_text = backend.to_str()
        self._template = Tokenizer.from_str(spec_text)
        self._template.encode_special_tokens = False
        self._plain = _without_added_tokens(spec_text)
        for tok in (self._template, self._plain):
            tok.no_truncation()
            tok.no_padding()
        self.max_query_tokens = max_query_tokens
        self.max_doc_tokens = max_doc_tokens
        self.prefix_ids = self._ids(self._template.encode(PREFIX, add_special_tokens=False).ids)
        self.suffix_ids = self._ids(self._template.encode(SUFFIX, add_special_tokens=False).ids)
        self.yes_id = self._single_token_id(YES_TOKEN)
        self.no_id = self._single_token_id(NO_TOKEN)
        self._doc_cache: OrderedDict[str, EncodedDocument] = OrderedDict()
        self._doc_cache_size = doc_cache_size
        self._fast: FastBPE | None = None
        self.fast_bpe_reason = "off"
        if fast_bpe:
            self._fast, self.fast_bpe_reason = FastBPE.of(self._plain, fast_bpe_verdicts)

    @property
    def document_encoder(self) -> str:
        """Which implementation tokenizes documents, and why not the fast one if not."""
        return "tiktoken" if self._fast else f"tokenizers ({self.fast_bpe_reason})"

    def with_limits(
        self, *, max_query_tokens: int, max_doc_tokens: int, doc_cache_size: int | None = None
    ) -> PromptTokenizer:
        """A tokenizer with other limits sharing this one's tokenizers (building them again parses the whole
        tokenizer, twice)."""
        clone = copy.copy(self)
        clone.max_query_tokens = max_query_tokens
        clone.max_doc_tokens = max_doc_tokens
        clone._doc_cache = OrderedDict()  # this tokenizer's cached ids are cut to its own limit
        if doc_cache_size is not None:
            clone._doc_cache_size = doc_cache_size
        return clone

    @staticmethod
    def _ids(ids: Sequence[int] | TokenIds) -> TokenIds:
        return np.asarray(ids, dtype=np.int32)

    def _single_token_id(self, word: str) -> int:
        ids = self._plain.encode(word, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"tokenizer splits {word!r} into {len(ids)} tokens; this is not a Qwen3 tokenizer")
        return int(ids[0])

    def count_plain_tokens(self, text: str) -> int:
        return len(self._plain.encode(text, add_special_tokens=False).ids)

    def encode_head(self, instruction: str, query: str) -> tuple[TokenIds, bool]:
        """Ids of PREFIX + "<Instruct>: ...<Query>: ...<Document>:" and whether the query was truncated.

        The query is cut in text, at the start of its first token past max_query_tokens, and the head is then
        tokenized as one string, so its ids are exactly those of the official string for the shortened query.
        """
        if self.count_plain_tokens(instruction) > self.max_query_tokens:
            raise InvalidJobError(
                "instruction_too_long",
                f"instruction is longer than RERANK_MAX_QUERY_TOKENS={self.max_query_tokens} tokens",
            )
        truncated = False
        encoded_query = self._plain.encode(query, add_special_tokens=False)
        # A cut inside a word can re-tokenize into more pieces than it had: cut again until it fits.
        while len(encoded_query.ids) > self.max_query_tokens:
            truncated = True
            query = query[: encoded_query.offsets[self.max_query_tokens][0]]
            encoded_query = self._plain.encode(query, add_special_tokens=False)
        head = self._plain.encode(query_head(instruction, query), add_special_tokens=False).ids
        return np.concatenate([self.prefix_ids, self._ids(head)]), truncated

    def encode_documents(self, texts: Sequence[str]) -> list[EncodedDocument]:
        """Ids of " " + text for each text, truncated to max_doc_tokens (batched, cached by text)."""
        out: list[EncodedDocument | None] = [self._cache_get(t) for t in texts]
        missing = [i for i, e in enumerate(out) if e is None]
        if missing:
            tails = [document_tail(texts[i]) for i in missing]
            encodings: Sequence[Sequence[int] | TokenIds]
            if self._fast is not None:
                encodings = self._fast.encode_batch(tails)
            else:
                # encode_batch_fast (tokenizers >= 0.21) skips computing the offsets, which documents never need
                encode = getattr(self._plain, "encode_batch_fast", self._plain.encode_batch)
                encodings = [e.ids for e in encode(tails, add_special_tokens=False)]
            for i, ids in zip(missing, encodings, strict=True):
                kept = self._ids(ids[: self.max_doc_tokens])
                if self._doc_cache_size and kept.base is not None:
                    kept = kept.copy()  # a view into the whole batch's ids would keep all of them cached
                doc = EncodedDocument(kept, len(ids) > self.max_doc_tokens)
                out[i] = doc
                self._cache_put(texts[i], doc)
        return [doc for doc in out if doc is not None]

    def _cache_get(self, text: str) -> EncodedDocument | None:
        if not self._doc_cache_size:
            return None
        doc = self._doc_cache.get(text)
        if doc is not None:
            self._doc_cache.move_to_end(text)
        return doc

    def _cache_put(self, text: str, doc: EncodedDocument) -> None:
        if not self._doc_cache_size:
            return
        self._doc_cache[text] = doc
        if len(self._doc_cache) > self._doc_cache_size:
            self._doc_cache.popitem(last=False)
