"""The scoring engine: text in, scores out. Tokenize, de-duplicate, plan packs, build tensors, forward, score."""

from worker.engine.engine import EngineInfo, JobScores, JobStats, RerankEngine, ScoreRequest, ScoringBatch
from worker.engine.errors import InvalidJobError

__all__ = ["EngineInfo", "InvalidJobError", "JobScores", "JobStats", "RerankEngine", "ScoreRequest", "ScoringBatch"]
