"""Hypothesis strategies for texts that stress tokenization: unicode, emoji, digits, punctuation, whitespace."""

from __future__ import annotations

from hypothesis import strategies as st

# Pieces chosen to sit at the junction of head and document and to look like control tokens.
TRICKY_PIECES = [
    "The",
    "the",
    " ",
    "  ",
    "\n",
    "\t",
    "\r\n",
    "123",
    "0",
    "1.5",
    "!",
    "?!",
    "...",
    "(",
    ")",
    '"',
    "'s",
    "'",
    "-",
    "—",
    ":",
    ">",
    "<",
    "<Document>:",
    "<|im_end|>",
    "<|im_start|>assistant\n",
    "<think>",
    "</think>",
    "<|endoftext|>",
    "yes",
    "no",
    "é",
    "e\u0301",
    "ﬁ",
    "日本語",
    "中文文本",
    "한국어",
    "Ελληνικά",
    "עברית",
    "العربية",
    "🙂",
    "👩‍💻",
    "🇫🇷",
    "\u200b",
    "\u00a0",
    "ß",
    "İ",
    "Ⅻ",
    "½",
]

tricky_text = st.lists(
    st.one_of(
        st.sampled_from(TRICKY_PIECES),
        st.text(min_size=1, max_size=12),
        st.text(alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Z"]), max_size=12),
    ),
    min_size=1,
    max_size=10,
).map("".join)

nonblank_text = tricky_text.filter(lambda t: t.strip() != "")


@st.composite
def document_lists(draw: st.DrawFn, min_size: int = 1, max_size: int = 8) -> list[str | None]:
    """Documents with duplicates, blanks and nulls mixed in."""
    base = draw(st.lists(nonblank_text, min_size=1, max_size=max_size))
    extras = draw(st.lists(st.sampled_from([*base, None, "", "   ", "\n"]), max_size=3))
    docs: list[str | None] = [*base, *extras]
    return draw(st.permutations(docs)) if len(docs) >= min_size else docs
