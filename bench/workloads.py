"""Seeded synthetic rerank jobs: real words, lognormal document lengths (in words), for benchmarks."""

from __future__ import annotations

import math

import numpy as np

from worker.engine.api import ScoreRequest

WORDS = (
    "the of and to in is for on with as by at from that this it be are was an or which you not have has but "
    "product price quality shipping size color black white red blue green steel cotton leather wireless battery "
    "screen phone laptop camera lens kitchen knife table chair lamp garden shoe jacket dress watch ring bag "
    "durable lightweight waterproof compact portable premium classic modern vintage ergonomic adjustable "
    "model version review rating customer return warranty delivery order stock available new used certified "
    "river mountain city history science music film book author chapter energy water light system data network "
    "2024 2025 10 20 50 100 4k 5g usb-c 1.5 3.7 % $ ( ) , . ; : - ! ?"
).split()


def make_job(rng: np.random.Generator, num_docs: int, mean_words: float, max_words: int) -> ScoreRequest:
    lengths = np.exp(rng.normal(math.log(mean_words), 0.5, num_docs)).clip(4, max_words).astype(int)
    words = np.asarray(WORDS)
    docs = [" ".join(words[rng.integers(0, len(words), n)]) for n in lengths]
    query = " ".join(words[rng.integers(0, len(words), 8)])
    return ScoreRequest(query=query, documents=docs)
