"""An independent per-pair reference: the official Qwen3-Reranker scoring, one pair at a time.

Written from the model card (QwenLM/Qwen3-Embedding, examples/qwen3_reranker_transformers.py), sharing no code with
the engine: its own copy of the prompt strings, Hugging Face's tokenizer call, a plain causal forward with the
default mask and position ids, the full logits at the last position, softmax over ("no", "yes").
One deliberate difference from the model card: the body (user text) is tokenized as plain text, since the worker's
contract is that text inside a query or document never becomes a control token. `split_special_tokens=True` is not
enough for that (Qwen3's "<think>" is an added token that is not "special"), so the body goes through the
tokenizer's own tokenizer.json with its added tokens removed.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from tokenizers import Tokenizer

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
YES_ID, NO_ID = 9693, 2152


_plain_text_tokenizers: dict[int, Tokenizer] = {}


def _plain_text_tokenizer(tokenizer: Any) -> Tokenizer:
    key = id(tokenizer)
    if key not in _plain_text_tokenizers:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec["added_tokens"] = []
        _plain_text_tokenizers[key] = Tokenizer.from_str(json.dumps(spec))
    return _plain_text_tokenizers[key]


def official_ids(tokenizer: Any, query: str, document: str, instruction: str | None = None) -> list[int]:
    instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
    body = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    return (
        tokenizer.encode(PREFIX, add_special_tokens=False)
        + _plain_text_tokenizer(tokenizer).encode(body, add_special_tokens=False).ids
        + tokenizer.encode(SUFFIX, add_special_tokens=False)
    )


@torch.inference_mode()
def official_score_ids(model: Any, ids: list[int]) -> float:
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]  # [vocab]
    pair = torch.stack([logits[NO_ID], logits[YES_ID]]).double()
    return float(torch.softmax(pair, dim=0)[1])


def official_score(model: Any, tokenizer: Any, query: str, document: str, instruction: str | None = None) -> float:
    return official_score_ids(model, official_ids(tokenizer, query, document, instruction))
