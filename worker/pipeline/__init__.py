"""The worker's pipeline: one stage a file, each run by one thread, handing typed entries (`records`) on.

    consume   consumer thread   source of records: a consumer group (worker) or offset ranges (replay)
    parse     consumer thread   bytes to a RerankJob, or the reason it can never be one
    tokenize  consumer thread   Engine.prepare into the bounded work queue; the source pauses while it is full
    batch     GPU thread        jobs gathered under one token budget
    score     GPU thread        the engine, one batch ahead on the device; out-of-memory and poison-job policy
    publish   publisher thread  results and dead letters until acknowledged; retry and redirect policy
    commit    consumer thread   the contiguous watermark of finished records

`sink` is where the worker and a replay differ (results and dead letters, or replay results and skips); `runner`
wires the stages and runs the consumer thread's loop; `worker` is `rerank-worker run` (health server, signals).
`errors`, `deadletter`, `metrics`, `http` and `logs` serve them all. Nothing here imports torch: the engine is
reached through worker.engine.api. ARCHITECTURE.md draws the whole house.
"""
