"""The Kafka side of the worker: consume jobs, score them through the engine, publish results, dead-letter the rest.

Modules: `config` (kafka-python kwargs from settings), `offsets` (the contiguous-watermark commit rule), `errors`
(permanent / transient / fatal, decided where raised), `deadletter` (DLQ headers), `records` (the values that
flow between the threads), `scoring` (the GPU thread), `publish` (the publisher thread), `loop` (the consumer
thread and the run loop), `metrics` + `http` (Prometheus text and health probes), `logs` (JSON lines), `client`
(submit jobs, wait for results), `topics` (create topics with matching size limits).
"""
