"""The router's view of the workers: a registry snapshot refreshed from Redis,
plus one gRPC channel per worker endpoint.

Requests waiting for capacity wait on :attr:`WorkerDirectory.changed`, an
``asyncio.Condition`` notified after every refresh and by whoever learns that
capacity was given back (the router, when a request leaves a worker).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from dsv32_proto import worker_pb2_grpc
from . import auth
from .state import ROLES, AsyncClusterState, WorkerInfo
from .workers import complete_groups

log = logging.getLogger(__name__)
CHANNEL_IDLE_CLOSE_S = 30.0

# Worker channels carry token streams; keep them alive across idle periods.
_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class WorkerDirectory:
    def __init__(self, state: AsyncClusterState, refresh_s: float = 0.25, interceptors=None):
        self.state = state
        self.refresh_s = refresh_s
        self.snapshot: list[WorkerInfo] = []
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._last_seen: dict[str, float] = {}
        self._interceptors = [*auth.router_client_interceptors(), *(interceptors or [])]
        self._token = auth.internal_token()
        self._warned_unsigned = False
        self._task: asyncio.Task | None = None
        self.changed = asyncio.Condition()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="worker-directory")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as e:  # Redis away: keep the last snapshot, say so once a second at most
                log.warning("worker registry refresh failed: %s", e)

    async def refresh(self) -> list[WorkerInfo]:
        # an EP group with a rank gone is broken as a whole (its collectives fail): skip all of it
        workers = await self.state.workers()
        signed = [w for w in workers if auth.signed_by_us(w, self._token)]
        if len(signed) < len(workers) and not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning("ignoring registered workers without a valid signature: %s",
                        sorted(w.worker_id for w in workers if w not in signed))
        self.snapshot = complete_groups(signed)
        now = time.monotonic()
        for w in self.snapshot:
            self._last_seen[w.endpoint] = now
        # A worker that misses a heartbeat or two keeps its channel (calls in flight
        # on it go on); only endpoints gone for a while are closed.
        for endpoint in [e for e in self._channels if now - self._last_seen.get(e, 0) > CHANNEL_IDLE_CLOSE_S]:
            self._last_seen.pop(endpoint, None)
            await self._channels.pop(endpoint).close(grace=None)
        await self.notify_changed()
        return self.snapshot

    async def notify_changed(self) -> None:
        """Wake every :meth:`wait_changed`: the snapshot, or what fits in it, may differ now."""
        async with self.changed:
            self.changed.notify_all()

    async def wait_changed(self, timeout: float) -> bool:
        """Until the next :meth:`notify_changed` (True) or ``timeout`` seconds (False)."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout)
                return True
            except asyncio.TimeoutError:
                return False

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(ROLES, 0)
        for w in self.snapshot:
            out[w.role] += 1
        return out

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS, interceptors=self._interceptors)
            self._channels[endpoint] = ch
        return ch

    def decode_stub(self, w: WorkerInfo) -> worker_pb2_grpc.DecodeWorkerStub:
        """Decode and colocated workers (both serve the ``DecodeWorker`` service)."""
        return worker_pb2_grpc.DecodeWorkerStub(self._channel(w.endpoint))

    def prefill_stub(self, w: WorkerInfo) -> worker_pb2_grpc.PrefillWorkerStub:
        return worker_pb2_grpc.PrefillWorkerStub(self._channel(w.endpoint))

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for ch in self._channels.values():
            await ch.close(grace=None)
        self._channels.clear()
