"""dsv32_cluster: the runtime that the router, both worker kinds and the Ray app join.

Redis state (:mod:`.state`), the worker directory (:mod:`.directory`),
heartbeats (:mod:`.heartbeat`), parent-death handling (:mod:`.parent`),
process supervision (:mod:`.procs`), a private ``redis-server``
(:mod:`.redis_server`), tracing and metrics (:mod:`.telemetry`), and the worker
runtime (:mod:`.runtime`: flags → engine config, registration, load report,
proto ↔ engine conversions). Importing the package imports nothing heavy: the
router uses it and never imports torch; the engine is imported only by a worker
that builds one.
"""
