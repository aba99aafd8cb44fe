"""The worker's liveness: is the engine loop still stepping?

The loop thread notes each step (:meth:`dsv32_cluster.metrics.ProcessMetrics.step_beat`). A
watchdog thread sets the gRPC health status of :data:`SERVICE` to ``NOT_SERVING`` while the
worker has had work (running or queued requests) for longer than ``timeout_s`` without a step,
and back to ``SERVING`` when it steps again. An idle worker is alive. Kubernetes' liveness
probe asks for this service (``grpc: {port, service: dsv32.worker.v1.EngineLoop}``), so a hung
engine gets its pod restarted while the process's gRPC server still answers.
"""

from __future__ import annotations

import logging
import threading
import time

from grpc_health.v1 import health_pb2

log = logging.getLogger(__name__)
SERVICE = "dsv32.worker.v1.EngineLoop"


def stalled(busy_since: float | None, last_step: float, now: float, timeout_s: float) -> bool:
    """Work waited ``timeout_s`` with no step (counted from the later of the last step and the
    moment work arrived)."""
    return busy_since is not None and now - max(busy_since, last_step) > timeout_s


class EngineWatchdog:
    def __init__(self, health_servicer, load, last_step, timeout_s: float, interval_s: float = 1.0):
        """``load()``: a ``WorkerLoad``; ``last_step()``: monotonic time of the loop's last step."""
        self.hs, self.load, self.last_step = health_servicer, load, last_step
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-watchdog", daemon=True)

    def start(self) -> EngineWatchdog:
        self.hs.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        busy_since, ok = None, True
        while not self._stop.wait(self.interval_s):
            try:
                w = self.load()
                busy = w.running > 0 or w.queued_requests > 0
            except Exception as e:
                log.debug("watchdog: load: %s", e)
                continue
            now = time.monotonic()
            busy_since = (busy_since or now) if busy else None
            alive = not stalled(busy_since, self.last_step(), now, self.timeout_s)
            if alive != ok:
                ok = alive
                if not alive:
                    log.error("engine loop: no step for %.0f s with work waiting; liveness fails", self.timeout_s)
                self.hs.set(SERVICE, health_pb2.HealthCheckResponse.SERVING if alive
                            else health_pb2.HealthCheckResponse.NOT_SERVING)
