"""The scoring engine: text in, scores out. Knows nothing of Kafka.

    api       the types and protocols everything else imports (torch-free)
    prompt    the official Qwen3-Reranker prompt, split where token ids stay exact
    tokenize  text to exact token ids (fast_bpe: the same ids through tiktoken)
    plan      packs under a token budget, laid out as flat arrays
    engine    RerankEngine: prepare, plan, run the packs on a scorer, collect (torch-free)
    load      from_pretrained: model and tokenizer in, a RerankEngine out (torch)
    backend   what the scorers share, and TorchScorer (the model's own decoder)
    qwen3     Qwen3PackedScorer: the packed forward over the loaded weights
    masks     the attention rules of a pack; kernels: the Triton kernels

Importing this package imports nothing: import what you need from its modules.
"""
