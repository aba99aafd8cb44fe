"""In-process fake KV transfer: the two roles of the package, copying pages between caches in one process.

For unit tests of the workers and for warm-up. No threads, no sockets: each
``send_layer`` copies the layer's pages straight into the receiver's pages (or
parks them until ``expect`` is called), with the same page-byte handling,
checksum, states and errors as the real backend (``base`` has the protocols
both satisfy; ``tests/test_transfer_conformance.py`` holds them to it).
Receivers are found by endpoint in a ``FakeTransferHub`` (one default hub per
process). Faults: ``arm_fault`` or the ``fault`` spec, as on the real sender.
"""

from __future__ import annotations

import threading
import time

import torch

from .errors import ChecksumMismatch, GeometryMismatch, PeerUnreachable, StillInFlight, TransferError, TransferTimeout
from .faults import FaultPlan, corrupt_part
from .pages import CachePages, Checksum
from .state import KVPoll, TransferResult, TransferState


class FakeTransferHub:
    """Endpoint → fake receiver, for one process."""

    def __init__(self):
        self.lock = threading.RLock()
        self._receivers: dict[str, FakeKVReceiver] = {}
        self._next_port = 1

    def register(self, receiver: FakeKVReceiver, host: str, port: int) -> str:
        with self.lock:
            if not port:
                port, self._next_port = self._next_port, self._next_port + 1
            endpoint = f"{host}:{port}"
            if endpoint in self._receivers:
                raise ValueError(f"fake endpoint {endpoint} is taken")
            self._receivers[endpoint] = receiver
            return endpoint

    def unregister(self, endpoint: str) -> None:
        with self.lock:
            self._receivers.pop(endpoint, None)

    def lookup(self, endpoint: str) -> FakeKVReceiver:
        with self.lock:
            if endpoint not in self._receivers:
                raise PeerUnreachable(f"no fake receiver at {endpoint}")
            return self._receivers[endpoint]


DEFAULT_HUB = FakeTransferHub()


class _Incoming:
    def __init__(self, transfer_id: str, device: torch.device):
        self.status = TransferState(transfer_id)
        self.peer_id: str | None = None
        self.pages = None
        self.num_layers = 0
        self.deadline = 0.0
        self.parked: list[tuple[str, tuple, int, list]] = []  # (sender, geometry, layer, [bytes a pool]) before expect
        self.checksum, self.next_layer, self.sender_sum = Checksum(device), 0, None


class FakeKVReceiver:
    def __init__(self, cache, host: str = "fake", port: int = 0, worker_id: str = "decode", timeout_s: float = 30,
                 hub: FakeTransferHub | None = None):
        self.worker_id, self.timeout_s = worker_id, timeout_s
        self._pages = CachePages(cache)
        self._hub = hub or DEFAULT_HUB
        self.endpoint = self._hub.register(self, host, port)
        self._incoming: dict[str, _Incoming] = {}

    def expect(self, transfer_id: str, peer_id: str, dst_pages: list[int], num_layers: int | None = None,
               token: str = "") -> None:
        with self._hub.lock:
            t = self._incoming.setdefault(transfer_id, _Incoming(transfer_id, self._pages.device))
            if t.pages is not None:
                raise ValueError(f"transfer {transfer_id} is already expected")
            t.peer_id, t.pages = peer_id, self._pages.page_set(dst_pages)
            t.num_layers = num_layers or self._pages.num_layers
            t.deadline = time.monotonic() + self.timeout_s
            parked, t.parked = t.parked, []
            for sender_id, geometry, layer, blobs in parked:
                self._land(t, sender_id, geometry, layer, blobs)

    def poll(self, transfer_id: str) -> KVPoll:
        t = self._get(transfer_id)
        if t.status.state not in (KVPoll.SUCCESS, KVPoll.FAILED) and time.monotonic() > t.deadline:
            t.status.fail(TransferTimeout(f"timed out after {self.timeout_s}s"))
        return t.status.state

    def wait(self, transfer_id: str, timeout_s: float) -> TransferResult:
        t = self._get(transfer_id)
        try:
            return t.status.wait(min(timeout_s, max(0.0, t.deadline - time.monotonic())))
        except StillInFlight:
            if self.poll(transfer_id) != KVPoll.FAILED:  # past the transfer's own deadline: FAILED from now on
                raise
        return t.status.wait(0)  # raises the TransferTimeout

    def release(self, transfer_id: str) -> None:
        with self._hub.lock:
            self._incoming.pop(transfer_id, None)

    def progress_at(self, transfer_id: str) -> float | None:
        t = self._incoming.get(transfer_id)
        return t.status.t_progress if t is not None else None

    @property
    def healthy(self) -> bool:
        return True  # no threads of its own

    def close(self) -> None:
        self._hub.unregister(self.endpoint)
        with self._hub.lock:
            self._incoming.clear()

    def _get(self, transfer_id: str) -> _Incoming:
        t = self._incoming.get(transfer_id)
        if t is None or t.pages is None:
            raise KeyError(f"transfer {transfer_id} is not expected (or was released)")
        return t

    def deliver(self, transfer_id: str, sender_id: str, geometry: tuple, layer: int, blobs: list,
                sender_sum: str | None) -> None:
        """Called by ``FakeKVSender`` (under the hub lock) for each layer; the last one carries the checksum.
        ``geometry``: the sender's (layers, pages, latent page bytes, index page bytes), as announced."""
        t = self._incoming.setdefault(transfer_id, _Incoming(transfer_id, self._pages.device))
        if sender_sum is not None:
            t.sender_sum = sender_sum
        if t.pages is None:
            t.parked.append((sender_id, geometry, layer, blobs))
        else:
            self._land(t, sender_id, geometry, layer, blobs)

    def _land(self, t: _Incoming, sender_id: str, geometry: tuple, layer: int, blobs: list) -> None:
        if t.status.state == KVPoll.FAILED:
            return
        if sender_id != t.peer_id or layer != t.next_layer:
            t.status.fail(TransferError(f"unexpected data: layer {layer} of {blobs[0].shape[0]} pages "
                                        f"from {sender_id}"))
            return
        mine = (t.num_layers, len(t.pages), self._pages.latent_page_bytes, self._pages.index_page_bytes)
        if geometry != mine:  # the rest is dropped, as the real receiver drains it
            t.status.fail(GeometryMismatch(f"geometry mismatch (layers, pages, latent page bytes, index page bytes): "
                                           f"sender {geometry}, receiver {mine}"))
            return
        t.status.advance(KVPoll.TRANSFERRING)
        for pool, blob in zip(self._pages.parts(layer), blobs):
            t.checksum.update(blob)
            t.pages.scatter(pool, blob)
        t.next_layer += 1
        if t.next_layer == t.num_layers:
            mine = t.checksum.hexdigest()
            if t.sender_sum != mine:
                t.status.fail(ChecksumMismatch(f"checksum mismatch: sender {t.sender_sum}, receiver {mine}"))
            else:
                nbytes = len(t.pages) * self._pages.page_bytes * t.num_layers
                t.status.succeed(TransferResult(t.status.transfer_id, nbytes, mine,
                                                time.perf_counter() - t.status.t_start))


class FakeSendHandle:
    def __init__(self, transfer_id: str, receiver: FakeKVReceiver, pages, num_layers: int, device: torch.device):
        self.transfer_id, self.receiver, self.pages, self.num_layers = transfer_id, receiver, pages, num_layers
        self.status = TransferState(transfer_id)
        self.status.advance(KVPoll.WAITING)
        self.checksum, self.next_layer = Checksum(device), 0


class FakeKVSender:
    def __init__(self, cache, worker_id: str = "prefill", timeout_s: float = 30, hub: FakeTransferHub | None = None,
                 fault: str | None = None):
        self.worker_id, self.timeout_s = worker_id, timeout_s
        self._pages = CachePages(cache)
        self._hub = hub or DEFAULT_HUB
        self._faults = FaultPlan(fault or "")

    def begin(self, transfer_id: str, endpoint: str, decode_id: str, src_pages: list[int],
              num_layers: int | None = None, token: str = "") -> FakeSendHandle:
        receiver = self._hub.lookup(endpoint)
        if receiver.worker_id != decode_id:
            raise PeerUnreachable(f"{endpoint} is {receiver.worker_id}, not {decode_id}")
        return FakeSendHandle(transfer_id, receiver, self._pages.page_set(src_pages),
                              num_layers or self._pages.num_layers, self._pages.device)

    def send_layer(self, handle: FakeSendHandle, layer: int) -> None:
        if layer != handle.next_layer or layer >= handle.num_layers:
            raise ValueError(f"transfer {handle.transfer_id}: expected layer {handle.next_layer}, got {layer}")
        handle.status.advance(KVPoll.TRANSFERRING)
        blobs = [pool[handle.pages.ids_tensor].clone() for pool in self._pages.parts(layer)]
        for blob in blobs:
            handle.checksum.update(blob)
        last = layer == handle.num_layers - 1
        fault = self._faults.take() if last else None
        if fault:
            blobs[corrupt_part(fault, len(blobs))].view(-1)[0] ^= 0xFF
        handle.next_layer += 1
        geometry = (handle.num_layers, len(handle.pages), self._pages.latent_page_bytes, self._pages.index_page_bytes)
        with self._hub.lock:
            handle.receiver.deliver(handle.transfer_id, self.worker_id, geometry, layer, blobs,
                                    handle.checksum.hexdigest() if last else None)
        if last:
            nbytes = len(handle.pages) * self._pages.page_bytes * handle.num_layers
            handle.status.succeed(TransferResult(handle.transfer_id, nbytes, handle.checksum.hexdigest(),
                                                 time.perf_counter() - handle.status.t_start))

    def finish(self, handle: FakeSendHandle, timeout_s: float) -> TransferResult:
        if handle.next_layer < handle.num_layers:
            raise TransferError(f"transfer {handle.transfer_id}: finish() before layer {handle.next_layer} was sent")
        return handle.status.wait(timeout_s)

    def poll(self, handle: FakeSendHandle) -> KVPoll:
        return handle.status.state

    def arm_fault(self, kind: str, count: int = 1) -> None:
        """Test hook: hit the next ``count`` transfers with fault ``kind`` (``faults.FAULTS``; else ValueError)."""
        self._faults.arm(kind, count)

    def disarm_fault(self) -> None:
        self._faults.disarm()

    def close(self) -> None:
        pass
