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
from .pair import (ANNOUNCE_QUEUE, RECEIVER_RANK, SENDER_RANK, Announcement, Message, PairGroup, backend_for,
                   build_group, connect_store, encode_digest, gen_key, group_prefix, local_address_towards,
                   message_plan, pages_per_chunk, parse_endpoint, seconds_left, tag)
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
    ``chunk_bytes``: the largest message (``pair.message_plan``). ``ordered``: issue a pair's transfers
    one after another (what NCCL needs; default: on CUDA only; must match the receiver). ``fault``: a fault
    spec ``kind[:count]`` (``faults.FAULTS``; tests only), by default read from ``FAULT_ENV``. The source
    pages must stay unchanged until ``finish`` returns or ``poll`` says SUCCESS or FAILED (a run of pages
    is sent from the pool in place).
    """

    def __init__(self, cache, worker_id: str, timeout_s: float = 30, window_bytes: int = 32 << 20,
                 ordered: bool | None = None, fault: str | None = None, chunk_bytes: int = 8 << 20):
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
        chunk_pages = pages_per_chunk(self._pages.latent_page_bytes, self._chunk_bytes)
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
        """Pack and checksum each message once its last layer is handed over; the issuer sends them, then
        the checksum.

        A message that is one run of consecutive pages of one pool is sent from the pool in place (and
        hashed there); others are gathered into a staging buffer block by block, each block hashed right
        after its copy. About ``window_bytes`` of messages are in flight (as many again queued) at most.
        """
        plan = message_plan(h.num_layers, len(h.pages), self._pages.part_bytes, h.chunk_pages)
        window = max(2, self._window_bytes // max(m.nbytes for m in plan))
        issuer = SendIssuer(group.pg, RECEIVER_RANK, window, h.deadline, self._staging.give,
                            (lambda: group.pass_turn(seq)) if group.ordered else None)
        checksum, ready, fault = Checksum(self._pages.device), -1, None
        try:
            for i, message in enumerate(plan):
                while ready < message.last_layer:
                    ready = self._next_layer(h, group, seq, issuer)
                    if ready == h.num_layers - 1:
                        fault = self._faults.take()
                buf, staging, hit = self._pack(h, message, checksum, fault)
                fault = None if hit else fault  # one byte a transfer
                issuer.put(buf, tag(seq, i), staging)
            issuer.put(encode_digest(checksum.hexdigest(), self._pages.device), tag(seq, len(plan)), None)
        except BaseException:
            issuer.abort()
            raise
        issuer.finish()
        t_done = time.perf_counter()
        return TransferResult(h.transfer_id, len(h.pages) * self._pages.page_bytes * h.num_layers,
                              checksum.hexdigest(), t_done - h.status.t_start, t_done - h.t_last_layer,
                              checksum.seconds)

    def _next_layer(self, h: SendHandle, group: PairGroup, seq: int, issuer: SendIssuer) -> int:
        """Wait for the next ``send_layer``; the layer it handed over."""
        try:
            layer, event = h._layers.get(timeout=seconds_left(h.deadline))
        except queue.Empty:
            raise TransferTimeout(f"layer {h._next_layer} was not handed over within {self.timeout_s}s") from None
        issuer.extend(h.deadline)
        if layer == 0 and group.ordered:
            group.take_turn(seq, h.deadline)
        h.status.advance(KVPoll.TRANSFERRING)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
        return layer

    def _pack(self, h: SendHandle, message: Message, checksum: Checksum, fault: str | None):
        """One message's bytes, its staging buffer (None if sent in place), and whether ``fault`` hit it.
        The bytes are hashed on the way; a fault flips the first byte of the last layer's pool it names,
        after the checksum and never in the cache."""
        def hit(seg) -> bool:
            return bool(fault) and seg.layer == h.num_layers - 1 and \
                seg.part == corrupt_part(fault, len(self._pages.part_bytes))

        segments = message.segments
        if len(segments) == 1:
            seg = segments[0]
            buf = h.pages.window(seg.a, seg.b).run(self._pages.parts(seg.layer)[seg.part])
            if buf is not None:  # a run of pages: sent in place
                checksum.update(buf)
                if hit(seg):
                    buf = buf.clone()
                    buf.view(-1)[0] ^= 0xFF
                return buf, None, hit(seg)
        staging = self._staging.take(message.nbytes, self._pages.device)
        offset, flipped = 0, False
        for seg in segments:
            out = staging[offset : offset + seg.nbytes].view(seg.b - seg.a, seg.page_bytes)
            h.pages.window(seg.a, seg.b).gather(self._pages.parts(seg.layer)[seg.part], out, checksum)
            if hit(seg) and not flipped:
                out.view(-1)[0] ^= 0xFF
                flipped = True
            offset += seg.nbytes
        return staging[: message.nbytes], staging, flipped
