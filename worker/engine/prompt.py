"""The official Qwen3-Reranker prompt, split where token ids stay exact.

Official per-pair input (QwenLM/Qwen3-Embedding, examples/qwen3_reranker_transformers.py):
    ids(PREFIX) + ids("<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}") + ids(SUFFIX)

The packed path shares everything up to and including "<Document>:" and tokenizes " " + doc on its own. Splitting
after the colon is exact: the pre-tokenizer always cuts between ">:" and the following space, so the two halves
give the same ids as the whole. Splitting after the space would not be: it yields [">:", " ", "The"] where the
official string yields [">:", " The"].
"""

from __future__ import annotations

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
YES_TOKEN = "yes"
NO_TOKEN = "no"


def query_head(instruction: str, query: str) -> str:
    """The body of the user turn up to the document: shared by every document of a job."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>:"


def document_tail(document: str) -> str:
    """The document as it follows the head: the space after "<Document>:" belongs to the document's first token."""
    return " " + document


def official_body(instruction: str, query: str, document: str) -> str:
    """The official single-string body of one pair (reference and documentation only)."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
