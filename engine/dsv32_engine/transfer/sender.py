"""Prefill-worker side of KV transfer: ``KVSender`` (see the package docstring for the protocol)."""

from __future__ import annotations

import os
import queue
import threading
import time

import torch

from .errors import PeerUnreachable, TransferClosed, TransferError, TransferTimeout, transfer_error
from .faults import FAULT_ENV, FaultPlan, corrupt_part
from .issuer import SendIssuer
from .pages import CachePages, Checksum, PageSet, StagingPool
from .pair import (ANNOUNCE_QUEUE, RECEIVER_RANK, SENDER_RANK, Announcement, PairGroup, backend_for, build_group,
                   checksum_key, chunk_ranges, connect_store, gen_key, group_prefix, local_address_towards,
                   pages_per_chunk, parse_endpoint, seconds_left, tag)
from .state import KVPoll, TransferResult, TransferState, TransferThreads


class _Pair:
    """This sender's link to one decode worker: a store connection and the current group generation."""

    def __init__(self, endpoint: str, decode_id: str):
        self.host, self.port = parse_endpoint(endpoint)
        self.decode_id = decode_id
        self.lock = threading.Lock()  # serialises announcing and (re)building
        self.store = None
        self.group: PairGroup | None = None


class SendHandle:
    """One transfer on the sender side, as returned by ``KVSender.begin``."""

    def __init__(self, transfer_id: str, pair: _Pair, pages: PageSet, num_layers: int, chunk_pages: int,
                 timeout_s: float):
        self.transfer_id = transfer_id
        self.decode_id = pair.decode_id
        self.pages = pages
        self.num_layers = num_layers
        self.chunk_pages = chunk_pages
        self.status = TransferState(transfer_id)
        self.deadline = time.monotonic() + timeout_s
        self.t_last_layer = 0.0
        self._pair = pair
        self._layers: queue.SimpleQueue = queue.SimpleQueue()
        self._next_layer = 0


class KVSender:
    """Prefill-worker side: ``begin`` → ``send_layer`` × layers → ``finish``; ``poll`` any time.

    ``cache``: anything with ``layout``, ``latent`` and ``index`` (per-layer page pools). ``timeout_s``
    bounds each transfer from ``begin``. ``window_bytes``: messages in flight (and as many queued);
    ``chunk_bytes``: size of one message. ``ordered``: issue a pair's transfers one after another (what
    NCCL needs; default: on CUDA only; must match the receiver). ``fault``: a fault spec ``kind[:count]``
    (``faults.FAULTS``; tests only), by default read from ``FAULT_ENV``. The source pages must stay unchanged
    until ``finish`` returns or ``poll`` says SUCCESS or FAILED.
    """

    def __init__(self, cache, worker_id: str, timeout_s: float = 30, window_bytes: int = 32 << 20,
                 ordered: bool | None = None, fault: str | None = None, chunk_bytes: int = 2 << 20):
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self._pages = CachePages(cache)
        self._backend = backend_for(self._pages.device)
        self._ordered = self._backend == "nccl" if ordered is None else ordered
        self._window_bytes = window_bytes
        self._chunk_bytes = chunk_bytes
        self._staging = StagingPool(2 * window_bytes + (8 << 20))
        self._pairs: dict[tuple[str, str], _Pair] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._threads = TransferThreads(self)
        self._faults = FaultPlan(fault if fault is not None else os.environ.get(FAULT_ENV, ""))

    def begin(self, transfer_id: str, endpoint: str, decode_id: str, src_pages: list[int],
              num_layers: int | None = None, token: str = "") -> SendHandle:
        """Start a transfer of ``src_pages`` (all layers) to the decode worker at ``endpoint``. Non-blocking."""
        if self._closed:
            raise TransferClosed("KVSender is closed")
        num_layers = self._pages.num_layers if num_layers is None else num_layers
        if not 0 < num_layers <= self._pages.num_layers:
            raise ValueError(f"num_layers={num_layers} but the cache has {self._pages.num_layers}")
        with self._lock:
            pair = self._pairs.setdefault((endpoint, decode_id), _Pair(endpoint, decode_id))
        pages = self._pages.page_set(src_pages)
        chunk_pages = pages_per_chunk(len(pages), self._pages.latent_page_bytes, self._chunk_bytes)
        h = SendHandle(transfer_id, pair, pages, num_layers, chunk_pages, self.timeout_s)
        h.token = token
        self._threads.start(self._run, h, f"kv-send-{transfer_id}")
        return h

    def send_layer(self, handle: SendHandle, layer: int) -> None:
        """Layer ``layer`` of the source pages is final: queue its sends. Non-blocking; layers go in order."""
        if layer != handle._next_layer or layer >= handle.num_layers:
            raise ValueError(f"transfer {handle.transfer_id}: expected layer {handle._next_layer}, got {layer}")
        handle._next_layer += 1
        event = None
        if self._pages.device.type == "cuda":  # the forward wrote the layer on the caller's stream
            event = torch.cuda.Event()
            event.record()
        handle.t_last_layer = time.perf_counter()
        # progress renews the bound: a long prompt's layers may take longer than timeout_s all together
        handle.deadline = max(handle.deadline, time.monotonic() + self.timeout_s)
        handle._layers.put((layer, event))

    def finish(self, handle: SendHandle, timeout_s: float) -> TransferResult:
        """Block until every layer is sent (at most ``timeout_s``); raise ``TransferError`` on failure."""
        if handle._next_layer < handle.num_layers:
            raise TransferError(f"transfer {handle.transfer_id}: finish() before layer {handle._next_layer} was sent")
        return handle.status.wait(timeout_s)

    def poll(self, handle: SendHandle) -> KVPoll:
        return handle.status.state

    def arm_fault(self, kind: str, count: int = 1) -> None:
        """Test hook: hit the next ``count`` transfers with fault ``kind`` (``faults.FAULTS``; else ValueError)."""
        self._faults.arm(kind, count)

    def disarm_fault(self) -> None:
        self._faults.disarm()

    def close(self, join_timeout_s: float = 5.0) -> None:
        """Forget every pair group, after giving transfers in flight ``join_timeout_s`` to end."""
        self._closed = True
        self._threads.join(join_timeout_s)
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            with pair.lock:
                if pair.group is not None:
                    pair.group.mark_broken()
                pair.group = pair.store = None

    # -- worker thread ---------------------------------------------------------
    def _run(self, h: SendHandle) -> None:
        group = result = error = None
        try:
            if self._pages.device.type == "cuda":
                torch.cuda.set_device(self._pages.device)
            group, seq = self._announce(h)
            h.status.advance(KVPoll.WAITING)
            result = self._stream(h, group, seq)
        except Exception as e:  # every failure after the announcement leaves the group in an unknown state
            error = transfer_error(e)
            if group is not None:
                group.mark_broken()
                if h._pair.group is group:
                    h._pair.group = None  # the next begin takes a fresh generation
        group = None  # before signalling: see TransferThreads
        if result is not None:
            h.status.succeed(result)
        else:
            h.status.fail(error)

    def _announce(self, h: SendHandle) -> tuple[PairGroup, int]:
        """Tell the receiver about the transfer (and the generation), building the group first if needed."""
        pair = h._pair
        # Another transfer may be building the group; that build is bounded by its own deadline, ours by ours.
        if not pair.lock.acquire(timeout=seconds_left(h.deadline)):
            raise TransferTimeout(f"the pair group to {pair.decode_id} was not ready within {self.timeout_s}s")
        try:
            if self._closed:
                raise TransferClosed("KVSender is closed")
            try:
                if pair.store is None:
                    pair.store = connect_store(pair.host, pair.port, seconds_left(h.deadline))
                fresh = pair.group is None
                gen = pair.store.add(gen_key(self.worker_id, pair.decode_id), 1) if fresh else pair.group.gen
                seq = 0 if fresh else pair.group.next_seq
                ann = Announcement(h.transfer_id, self.worker_id, gen, seq, h.num_layers, len(h.pages),
                                   self._pages.latent_page_bytes, self._pages.index_page_bytes, self._backend,
                                   self._ordered, h.chunk_pages).signed(h.token)
                # Announce before building: the receiver joins the group only once it has read this.
                pair.store.queue_push(ANNOUNCE_QUEUE, ann.encode())
                if fresh:
                    pg, store = build_group(self._backend, pair.host, pair.port,
                                            group_prefix(self.worker_id, pair.decode_id, gen), SENDER_RANK,
                                            seconds_left(h.deadline), local_address_towards(pair.host, pair.port))
                    pair.group = PairGroup(pg, store, gen, self._ordered)
            except Exception as e:
                pair.store = pair.group = None
                if isinstance(e, TransferError):
                    raise
                raise PeerUnreachable(f"transfer store of {pair.decode_id}: {type(e).__name__}: {e}") from e
            pair.group.next_seq = seq + 1
            return pair.group, seq
        finally:
            pair.lock.release()

    def _stream(self, h: SendHandle, group: PairGroup, seq: int) -> TransferResult:
        """Gather and checksum each layer as it is handed over, a chunk of pages a message; the issuer sends.

        Chunks of ~``chunk_bytes`` keep the gathered pages in cache for the checksum and the socket copy;
        about ``window_bytes`` of messages are in flight (as many again queued) at most.
        """
        chunks = h.pages.chunks(chunk_ranges(len(h.pages), h.chunk_pages))
        parts = self._pages.parts(0)
        window = max(2, self._window_bytes // (h.chunk_pages * self._pages.page_bytes // len(parts)))
        issuer = SendIssuer(group.pg, RECEIVER_RANK, window, h.deadline, self._staging.give,
                            (lambda: group.pass_turn(seq)) if group.ordered else None)
        checksum, last, checksum_s = Checksum(), h.num_layers - 1, 0.0
        try:
            for _ in range(h.num_layers):
                try:
                    layer, event = h._layers.get(timeout=seconds_left(h.deadline))
                except queue.Empty:
                    raise TransferTimeout(
                        f"layer {h._next_layer} was not handed over within {self.timeout_s}s") from None
                issuer.extend(h.deadline)
                if layer == 0 and group.ordered:
                    group.take_turn(seq, h.deadline)
                h.status.advance(KVPoll.TRANSFERRING)
                if event is not None:
                    torch.cuda.current_stream().wait_event(event)
                pools = self._pages.parts(layer)
                fault = self._faults.take() if layer == last else None
                for part, pool in enumerate(pools):
                    for c, sub in enumerate(chunks):
                        staging = None if sub.run_start is not None else self._staging.take(
                            len(sub) * pool.shape[1], pool.device)
                        buf = sub.gather(pool, staging)
                        t0 = time.perf_counter()
                        checksum.update(buf)
                        checksum_s += time.perf_counter() - t0
                        if fault and c == 0 and part == corrupt_part(fault, len(pools)):
                            buf = _flip_first_byte(buf)
                        issuer.put(buf, tag(seq, layer, part, c), staging)
            with group.store_lock:  # before the sends complete is fine: the receiver's get waits for the key
                group.store.set(checksum_key(h.transfer_id), checksum.hexdigest())
        except BaseException:
            issuer.abort()
            raise
        issuer.finish()
        t_done = time.perf_counter()
        return TransferResult(h.transfer_id, len(h.pages) * self._pages.page_bytes * h.num_layers,
                              checksum.hexdigest(), t_done - h.status.t_start, t_done - h.t_last_layer, checksum_s)


def _flip_first_byte(buf: torch.Tensor) -> torch.Tensor:
    """Fault injection, after the checksum: in a copy, never in the cache."""
    buf = buf.clone()
    buf.view(-1)[0] ^= 0xFF
    return buf
