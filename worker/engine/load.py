"""Loading: a model name or directory in, a `RerankEngine` out, through the same `from_pretrained` path for a hub
name (Qwen/Qwen3-Reranker-0.6B) and a local directory.

Decides what runs where: the device (`auto`: CUDA when available), the dtype (`auto`: bfloat16 on CUDA, float32 on
CPU), the attention kernel, and the forward: the packed Qwen3 one (`worker.engine.qwen3`) for Qwen3 configs, else
the model's own decoder (`worker.engine.backend.TorchScorer`). This module and the two scorers are the engine's only
users of torch and transformers, besides the kernels they call.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.engine.backend import AttentionBackend, TorchScorer
from worker.engine.engine import RerankEngine, check_budget
from worker.engine.fp8 import fp8_unsupported
from worker.engine.prompt import DEFAULT_INSTRUCTION
from worker.engine.qwen3 import Qwen3PackedScorer, unsupported_reason
from worker.engine.tokenize import PromptTokenizer


def load_engine(
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attention: str = "auto",
    forward: str = "auto",
    compile: str = "auto",
    cuda_graphs: bool = True,
    max_pack_tokens: int | None = None,
    max_doc_tokens: int = 512,
    max_query_tokens: int = 512,
    default_instruction: str | None = None,
    doc_cache_size: int = 0,
    revision: str | None = None,
    quantization: str = "none",
    cache_dir: str | None = None,
) -> RerankEngine:
    """Load tokenizer and model from a hub name (at `revision`: None is the default branch) or a local directory and
    put an engine over them. `max_pack_tokens` None: 32768 on CUDA, 4096 on CPU. Compile caches go to `cache_dir`
    (`use_cache_dir`). ValueError for settings that cannot work together, OSError for a model that cannot be found;
    both before the weights load."""
    if problem := missing_model_directory(model) or hub_unreachable(model, revision=revision):
        raise OSError(problem)
    caches = use_cache_dir(cache_dir)
    hf_tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    tokenizer = PromptTokenizer(
        hf_tokenizer.backend_tokenizer,
        max_query_tokens=max_query_tokens,
        max_doc_tokens=max_doc_tokens,
        doc_cache_size=doc_cache_size,
        fast_bpe_verdicts=caches / "tokenizer",
    )
    if max_pack_tokens is None:
        # A whole 400-document job in one pass on a GPU; on CPU the dense [L, L] mask grows with L squared.
        max_pack_tokens = 32768 if resolve_device(device).type == "cuda" else 4096
    check_budget(tokenizer, max_pack_tokens)
    scorer = load_scorer(
        model,
        device=device,
        dtype=dtype,
        attention=attention,
        forward=forward,
        compile=compile,
        cuda_graphs=cuda_graphs,
        yes_id=tokenizer.yes_id,
        no_id=tokenizer.no_id,
        revision=revision,
        quantization=quantization,
    )
    return RerankEngine(
        tokenizer,
        scorer,
        model_name=model,
        max_pack_tokens=max_pack_tokens,
        default_instruction=default_instruction or DEFAULT_INSTRUCTION,
    )


def missing_model_directory(model: str) -> str | None:
    """Why `model`, written as a local path, is no model directory (None for a hub name or a model directory).
    A hub name is `name` or `org/name`; anything starting with `.`, `/` or `~`, or with more slashes, is a path."""
    path = Path(model).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"{model} is a directory without config.json"
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model:
        return f"model directory {model} does not exist"
    return None


def use_cache_dir(cache_dir: str | None) -> Path:
    """Point TorchInductor's, Triton's and CUDA's JIT caches at `cache_dir` (None: `rerank-worker/compile` under
    HF_HOME), overriding TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR and CUDA_CACHE_PATH: a restarted worker on the
    same volume reuses what the last one compiled (and, in `tokenizer/`, the fast tokenizer's verdicts). Each
    library reads its variable when it first writes or looks up a cache entry, and CUDA when its context starts: so
    before anything compiles or touches the GPU."""
    from huggingface_hub import constants

    root = Path(cache_dir).expanduser() if cache_dir else Path(constants.HF_HOME) / "rerank-worker" / "compile"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    os.environ["CUDA_CACHE_PATH"] = str(root / "cuda")
    return root


def hub_unreachable(model: str, timeout_s: float = 3.0, *, revision: str | None = None) -> str | None:
    """Why hub name `model` cannot be had now: the hub does not answer and the model is not in the local cache (None
    otherwise, and for a local directory or HF_HUB_OFFLINE). Asked before anything loads: huggingface_hub would
    retry for about 50 s, a log line per try, before saying the same."""
    if Path(model).expanduser().exists() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return None
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
    if isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str):
        return None  # cached: huggingface_hub falls back to the cache
    return (
        f"the model hub ({constants.ENDPOINT}) does not answer ({why}) and {model} is not in the local cache: "
        "set RERANK_MODEL to a local model directory"
    )


def load_scorer(
    model_name_or_path: str,
    *,
    device: str,
    dtype: str,
    attention: str,
    forward: str = "auto",
    compile: str = "auto",
    cuda_graphs: bool = True,
    yes_id: int,
    no_id: int,
    revision: str | None = None,
    quantization: str = "none",
) -> TorchScorer | Qwen3PackedScorer:
    """Load the model with `from_pretrained` and pick the forward: the packed Qwen3 one where it applies (Qwen3
    configs; Triton pack attention, FlashAttention varlen, FlexAttention or SDPA), else the model's own decoder
    (`forward="transformers"`, eager attention, other architectures). `quantization="fp8"`: the packed forward's
    linear layers in FP8 (`worker.engine.fp8`), refused before the weights load on a CPU, a GPU older than compute
    capability 8.9, a dtype other than bfloat16, or a forward other than the packed one."""
    if forward not in ("auto", "packed", "transformers"):
        raise ValueError(f"unknown forward {forward!r}")
    if compile not in ("auto", "on", "off"):
        raise ValueError(f"unknown compile setting {compile!r}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    attn = resolve_attention(attention, torch_device, torch_dtype)
    # the model's own attention serves only the transformers path, which has no varlen layout: Flex there
    hf_attn: AttentionBackend = "flex_attention" if attn in ("flash_varlen", "triton") else attn
    if quantization not in ("none", "fp8"):
        raise ValueError(f"unknown quantization {quantization!r}")
    if quantization == "fp8":
        if (fp8_reason := fp8_unsupported(torch_device, torch_dtype)) is not None:
            raise ValueError(f"RERANK_QUANTIZATION=fp8 cannot run here: {fp8_reason}")
        if forward == "transformers" or attn == "eager":
            raise ValueError("RERANK_QUANTIZATION=fp8 runs only in the packed Qwen3 forward (RERANK_FORWARD=auto)")
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_name_or_path, revision=revision, dtype=torch_dtype, attn_implementation=hf_attn
    )
    model.to(torch_device).eval().requires_grad_(False)
    reason = unsupported_reason(model.config)
    if attn == "eager":
        reason = "eager attention"
    if forward == "packed" and reason is not None:
        raise ValueError(f"RERANK_FORWARD=packed cannot run this model: {reason}")
    if quantization == "fp8" and reason is not None:
        raise ValueError(
            f"RERANK_QUANTIZATION=fp8 runs only in the packed Qwen3 forward, which cannot run this model: {reason}"
        )
    if forward == "transformers" or reason is not None:
        return TorchScorer(model, yes_id=yes_id, no_id=no_id, attention=hf_attn)
    if attn == "triton":
        from worker.engine.kernels import pack_attention_unsupported

        config = model.config
        kernel_reason = pack_attention_unsupported(config.num_attention_heads, config.num_key_value_heads)
        if kernel_reason is not None and attention != "auto":
            raise ValueError(f"RERANK_ATTENTION=triton cannot run this model: {kernel_reason}")
        if kernel_reason is not None:
            attn = "flash_varlen"  # `auto` falls back to the kernel that takes any head grouping
    # torch.compile on CUDA only: on CPU the forward is for tests and small loads, where compiling costs more
    compiled = compile == "on" or (compile == "auto" and torch_device.type == "cuda")
    return Qwen3PackedScorer(
        model,
        yes_id=yes_id,
        no_id=no_id,
        attention=attn,  # type: ignore[arg-type]
        compile=compiled,
        cuda_graphs=cuda_graphs,
        quantization="fp8" if quantization == "fp8" else "none",
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"RERANK_DEVICE={device} but CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    return table[dtype]


def resolve_attention(attention: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """`auto`: on CUDA in bf16/fp16 the worker's Triton pack attention (one kernel per layer, no host-side lengths:
    the forward is captured as CUDA graphs), on CUDA in fp32 FlexAttention, on CPU SDPA with a dense mask.
    `flash_varlen` (FlashAttention per segment plus the head-merge kernel) stays selectable on CUDA in bf16/fp16."""
    if attention == "auto":
        if device.type != "cuda":
            return "sdpa"
        return "triton" if dtype in (torch.bfloat16, torch.float16) else "flex_attention"
    if attention not in ("triton", "flash_varlen", "flex_attention", "sdpa", "eager"):
        raise ValueError(f"unknown attention backend {attention!r}")
    if attention in ("triton", "flash_varlen") and (device.type != "cuda" or dtype == torch.float32):
        raise ValueError(f"{attention} attention needs CUDA and bfloat16 or float16")
    return attention  # type: ignore[return-value]
