"""A worker's registration in Redis, refreshed by a daemon thread.

Lives in the torch-free control-plane package so that every role registers
the same way. The load report is the :class:`WorkerLoad` that ``load()``
returns at each beat (the same object answers the workers' ``Stats`` RPC); a
worker also ``poke()``s
the heartbeat when its load changes, so reports are fresh to within ~50 ms
rather than one interval (a router choosing on stale load herds a burst onto
one worker). A Redis outage is survived: the beat keeps trying and
re-registers the worker when Redis is back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

from .state import ClusterState, WorkerInfo

log = logging.getLogger(__name__)
MIN_GAP_S = 0.05


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load report: the load fields of its Redis hash (each heartbeat) and of its ``Stats`` RPC.

    Page counts are in pages of the worker's own pool.
    """

    free_pages: int
    """Pages a new request can still be given: a decode or colocated worker counts what its requests
    are committed to grow into as taken (and never more than the pool has free)."""
    total_pages: int
    reserved_pages: int = 0
    """Decode: pages held by reservations whose KV has not been admitted to the running batch yet."""
    running: int = 0
    """Requests in the running batch (prefill: 1 while a batch is in the forward)."""
    queued_requests: int = 0
    """Prefill: prompts waiting for a batch; decode: reservations not yet decoding."""
    queued_tokens: int = 0
    """Prefill: prompt tokens waiting or in the forward (what the router balances on)."""

    def stats_fields(self) -> dict[str, int]:
        """As the fields of ``worker_pb2.WorkerStats`` (where ``running`` is ``running_requests``)."""
        d = asdict(self)
        d["running_requests"] = d.pop("running")
        return d


class Heartbeat:
    def __init__(self, state: ClusterState, info: WorkerInfo, load: Callable[[], WorkerLoad], interval_s: float = 0.5,
                 watch_parent: bool = False, cache=None):
        """``cache``: the worker's page allocator when it has a prefix cache: each beat also applies its
        publish/evict events to the worker's key set in Redis (what cache-aware routers read)."""
        self.state, self.info, self.load, self.interval_s = state, info, load, interval_s
        self.cache = cache
        self._cache_resync = True
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{info.worker_id}", daemon=True)
        self._parent = os.getppid() if watch_parent else None
        self.on_orphaned: Callable[[], None] | None = None

    def beat(self) -> None:
        for k, v in asdict(self.load()).items():
            setattr(self.info, k, v)
        self.state.heartbeat(self.info)
        if self.cache is not None:
            self._publish_cache()

    def _publish_cache(self) -> None:
        added, removed = self.cache.drain_events()
        try:
            if self._cache_resync:
                full = self.cache.cached_keys()
                n, want = self.state.publish_cache_keys(self.info.worker_id, (), (), full=full), len(full)
            else:
                n, want = self.state.publish_cache_keys(self.info.worker_id, added, removed), self.cache.num_cached
        except BaseException:
            self._cache_resync = True  # events lost with the failed write: rewrite the set next time
            raise
        self._cache_resync = n != want  # drifted (a Redis restart, a race with an eviction): rewrite next beat

    def start(self) -> Heartbeat:
        self.beat()  # registered before start() returns: callers can announce readiness
        self._thread.start()
        return self

    def poke(self) -> None:
        """The load changed (a request queued or left): report it now rather than at the next beat."""
        self._wake.set()

    def _run(self) -> None:
        failing = False
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._parent is not None and os.getppid() != self._parent and self.on_orphaned:
                log.error("parent process %d is gone; shutting down", self._parent)
                self.on_orphaned()
                return
            try:
                self.beat()
                if failing:
                    log.info("heartbeat to Redis restored")
                failing = False
            except Exception as e:
                if not failing:
                    log.warning("heartbeat to Redis failed (will keep trying): %s", e)
                failing = True
            time.sleep(MIN_GAP_S)  # pokes come in bursts: at most one report per gap

    def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if deregister:
            try:
                self.state.deregister(self.info.worker_id)
            except Exception as e:
                log.warning("could not deregister %s: %s", self.info.worker_id, e)
