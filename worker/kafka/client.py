"""Deprecated import path of `RerankClient`: it lives in `worker.client`. This module keeps the old import working,
with a FutureWarning, for one release."""

from __future__ import annotations

import warnings

from worker.client import DeadLettered, Outcome, RerankClient

__all__ = ["DeadLettered", "Outcome", "RerankClient"]

warnings.warn(
    "worker.kafka.client is deprecated and goes away in the next release: import RerankClient from worker.client",
    FutureWarning,
    stacklevel=2,
)
