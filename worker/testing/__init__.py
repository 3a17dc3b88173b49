"""Test and benchmark support, not used by the worker at run time: `offline_model` builds the real Qwen3 tokenizer
and random-weight Qwen3 rerankers offline (no model hub reaches these machines). The demo falls back to it too."""
