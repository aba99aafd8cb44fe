"""The worker's liveness watchdog: NOT_SERVING only when work waits and the engine loop takes no step."""

from __future__ import annotations

import time

from grpc_health.v1 import health_pb2

from dsv32_cluster.heartbeat import WorkerLoad
from dsv32_cluster.liveness import SERVICE, EngineWatchdog, stalled


def test_stalled_counts_from_the_later_of_last_step_and_work_arriving():
    assert not stalled(None, 0.0, 1000.0, 10)  # idle: alive however old the last step
    assert not stalled(995.0, 0.0, 1000.0, 10)  # work arrived 5 s ago after a long idle
    assert stalled(980.0, 0.0, 1000.0, 10)  # 20 s of work, no step
    assert not stalled(980.0, 995.0, 1000.0, 10)  # it stepped 5 s ago


class FakeHealth:
    def __init__(self):
        self.status = {}

    def set(self, service, status):
        self.status[service] = status


def test_watchdog_fails_a_hung_loop_and_recovers_when_it_steps():
    hs, load = FakeHealth(), {"w": WorkerLoad(free_pages=1, total_pages=2, running=0)}
    last = {"t": time.monotonic()}
    dog = EngineWatchdog(hs, lambda: load["w"], lambda: last["t"], timeout_s=0.3, interval_s=0.05).start()
    try:
        assert hs.status[SERVICE] == health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.5)  # idle longer than the timeout: still alive
        assert hs.status[SERVICE] == health_pb2.HealthCheckResponse.SERVING
        load["w"] = WorkerLoad(free_pages=1, total_pages=2, running=1)  # work, and the loop never steps
        deadline = time.monotonic() + 3
        while hs.status[SERVICE] == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hs.status[SERVICE] == health_pb2.HealthCheckResponse.NOT_SERVING
        last["t"] = time.monotonic() + 10  # it steps again
        deadline = time.monotonic() + 3
        while hs.status[SERVICE] != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hs.status[SERVICE] == health_pb2.HealthCheckResponse.SERVING
    finally:
        dog.stop()
