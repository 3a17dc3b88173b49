"""Operator tools on top of the pipeline: `replay` (re-score a time range with a new model: the worker's pipeline
with a bounded source and a replay sink), `dlq` (list and requeue dead letters), `times` (their TIME arguments)."""
