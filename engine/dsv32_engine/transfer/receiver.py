"""Decode-worker side of KV transfer: ``KVReceiver`` (see the package docstring for the protocol)."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import torch

from .bootstrap import BootstrapQueue
from .errors import (ChecksumMismatch, GeometryMismatch, PeerFailed, TransferClosed, TransferError, TransferTimeout,
                     transfer_error)
from .landing import Landing
from .pages import CachePages, PageSet, StagingPool
from .pair import (SENDER_RANK, Announcement, PairGroup, backend_for, build_group, group_prefix, host_store,
                   seconds_left)
from .state import KVPoll, TransferResult, TransferState, TransferThreads

log = logging.getLogger(__name__)


MAX_PREBUILDS = 16
"""Pair groups joined at once on an announcement, at most this many at a time."""


class _Expected:
    """One transfer on the receiver side."""

    def __init__(self, transfer_id: str, peer_id: str, pages: PageSet, num_layers: int):
        self.transfer_id, self.peer_id, self.pages, self.num_layers = transfer_id, peer_id, pages, num_layers
        self.status = TransferState(transfer_id)
        # Guards writes to the pages against release(): after release() returns, no page is written. A receive
        # posted straight into the pages cannot be recalled, so release() waits for those in flight (``in_place``);
        # one is posted only once a message of its layer has landed (see ``landing``).
        self.lock = threading.Condition()
        self.released = False
        self.released_at = 0.0
        self.in_place = 0
        self.claim = None
        self.token = ""

    @contextmanager
    def writing(self):
        """Hold the lock; yields whether the pages may still be written."""
        with self.lock:
            yield not self.released


class _Peer:
    """The groups one prefill worker has built with us; only the newest generation is used."""

    def __init__(self):
        self.lock = threading.Lock()
        self.group: PairGroup | None = None
        self.max_gen = 0


class KVReceiver:
    """Decode-worker side: hosts the TCPStore; ``expect`` → ``poll``/``wait`` → ``release``.

    ``host``: the address prefill workers reach this worker at (the store listens on ``port``, 0 = any free
    one; gloo binds to ``host``). ``timeout_s`` bounds the wait for a transfer's announcement and, from
    there, the transfer. ``window_bytes``: receives kept posted. ``ordered``: as for ``KVSender``.
    Transfers are kept until ``release``.
    """

    def __init__(self, cache, host: str, port: int, worker_id: str, timeout_s: float = 30,
                 window_bytes: int = 32 << 20, ordered: bool | None = None, require_auth: bool = False,
                 announce_timeout_s: float | None = None):
        self.worker_id = worker_id
        self.announce_timeout_s = timeout_s if announce_timeout_s is None else announce_timeout_s
        """How long an expected transfer waits for its announcement (the sender's prompt may be queued);
        a released one waits ``timeout_s`` more at most (to drain a sender that still sends)."""
        self.require_auth = require_auth
        """Only expected, authenticated announcements make this receiver join a pair group (a decode worker:
        its store is reachable by more than its prefill workers); else any announcement does, at once."""
        self.timeout_s = timeout_s
        self._pages = CachePages(cache)
        self._backend = backend_for(self._pages.device)
        self._ordered = self._backend == "nccl" if ordered is None else ordered
        self._window_bytes = window_bytes
        self._store = host_store(host, port, timeout_s)
        self._store_lock = threading.Lock()
        self.host, self.port = host, self._store.port
        self._staging = StagingPool(2 * window_bytes + (8 << 20))
        self._peers: dict[str, _Peer] = {}
        self._transfers: dict[str, _Expected] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._threads = TransferThreads(self)
        self._prebuilds = threading.BoundedSemaphore(MAX_PREBUILDS)
        self._bootstrap = BootstrapQueue(self._store, timeout_s, self._on_announcement)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def expect(self, transfer_id: str, peer_id: str, dst_pages: list[int], num_layers: int | None = None,
               token: str = "") -> None:
        """Receive ``transfer_id`` from prefill worker ``peer_id`` into ``dst_pages`` of every layer (background)."""
        if self._closed:
            raise TransferClosed("KVReceiver is closed")
        num_layers = self._pages.num_layers if num_layers is None else num_layers
        if not 0 < num_layers <= self._pages.num_layers:
            raise ValueError(f"num_layers={num_layers} but the cache has {self._pages.num_layers}")
        t = _Expected(transfer_id, peer_id, self._pages.page_set(dst_pages), num_layers)
        t.token = token
        if self.require_auth and not token:
            raise ValueError(f"transfer {transfer_id}: this receiver requires a token")
        with self._lock:
            if transfer_id in self._transfers:
                raise ValueError(f"transfer {transfer_id} is already expected")
            self._transfers[transfer_id] = t
        t.claim = self._bootstrap.claim(transfer_id)
        self._threads.start(self._run, t, f"kv-recv-{transfer_id}")

    def poll(self, transfer_id: str) -> KVPoll:
        return self._get(transfer_id).status.state

    def progress_at(self, transfer_id: str) -> float | None:
        """``time.monotonic()`` of the transfer's last progress (None before its group was ready, or unknown)."""
        t = self._transfers.get(transfer_id)
        return t.status.t_progress if t is not None else None

    def wait(self, transfer_id: str, timeout_s: float) -> TransferResult:
        """Block until the pages have landed and the checksum matched; raise ``TransferError`` otherwise
        (``StillInFlight`` if ``timeout_s`` ran out first)."""
        return self._get(transfer_id).status.wait(timeout_s)

    def release(self, transfer_id: str) -> None:
        """Forget a transfer; from the return on, nothing writes to its pages. Data still in flight is drained.

        Returns at once, unless messages are being received straight into the pages: then when they have
        landed (each was posted after a message of its layer landed: the sender is sending it) or failed
        (at the transfer's deadline, at most ``timeout_s`` later, which closes the pair).
        """
        self._release(transfer_id, self.timeout_s + 1.0)

    def _release(self, transfer_id: str, wait_s: float) -> None:
        with self._lock:
            t = self._transfers.pop(transfer_id, None)
        if t is not None:
            with t.lock:
                t.released = True
                t.released_at = time.monotonic()
                if not t.lock.wait_for(lambda: t.in_place == 0, wait_s):
                    log.error("transfer %s: released while a receive into its pages is still posted", transfer_id)

    @property
    def healthy(self) -> bool:
        """The bootstrap thread is alive (without it no transfer would ever start)."""
        return self._closed or self._bootstrap.healthy

    def pair_generation(self, peer_id: str) -> int | None:
        """The generation of the live group with a prefill worker (observability and tests)."""
        peer = self._peers.get(peer_id)
        group = peer.group if peer else None
        return group.gen if group is not None and not group.broken else None

    def close(self, join_timeout_s: float = 5.0) -> None:
        """Stop: transfers still waiting for an announcement end at once, those receiving get ``join_timeout_s``."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            ids = list(self._transfers)
        end = time.monotonic() + join_timeout_s
        for tid in ids:  # closing: the pages go with the receiver
            self._release(tid, max(0.0, end - time.monotonic()))
        with self._store_lock:
            self._bootstrap.close(self._store)
        self._threads.join(join_timeout_s)
        for peer in list(self._peers.values()):
            if peer.group is not None:
                peer.group.mark_broken()
            peer.group = None
        with self._store_lock:
            self._store = None

    def _get(self, transfer_id: str) -> _Expected:
        try:
            return self._transfers[transfer_id]
        except KeyError:
            raise KeyError(f"transfer {transfer_id} is not expected (or was released)") from None

    # -- worker thread ---------------------------------------------------------
    def _run(self, t: _Expected) -> None:
        group = error = None
        try:
            if self._pages.device.type == "cuda":
                torch.cuda.set_device(self._pages.device)
            ann = self._await_announcement(t)
            deadline = time.monotonic() + self.timeout_s
            error = self._mismatch(t, ann)
            group = self._group_for(ann, deadline)
            t.status.advance(KVPoll.WAITING)
            mine, sender_sum = Landing(t, ann, group, self._pages, self._staging, error is None,
                                       self._window_bytes, self.timeout_s).run(deadline)
            if error is None and sender_sum != mine:
                error = ChecksumMismatch(f"checksum mismatch: sender {sender_sum}, receiver {mine} "
                                         "(latent or indexer pages corrupted or missing)")
        except Exception as e:
            if group is not None:  # a failed wait closes the gloo pair: this generation is finished
                group.mark_broken()
            error = transfer_error(e)
        group = None  # before signalling: see TransferThreads
        if error is not None or t.released:
            t.status.fail(error or TransferClosed("released while in flight"))
        else:
            nbytes = len(t.pages) * self._pages.page_bytes * t.num_layers
            t.status.succeed(TransferResult(t.transfer_id, nbytes, mine, time.perf_counter() - t.status.t_start))

    def _await_announcement(self, t: _Expected) -> Announcement:
        """The sender's announcement, handed over by the bootstrap thread.

        A released transfer keeps waiting: if its sender still sends, the data is drained rather than left
        pending until the sender's wait times out, which would close the pair for every transfer on it.
        """
        end = time.monotonic() + self.announce_timeout_s
        while not t.claim.event.wait(min(0.25, max(0.0, end - time.monotonic()))):
            if t.released:
                end = min(end, t.released_at + self.timeout_s)
            if self._closed or time.monotonic() >= end:
                break
        ann = self._bootstrap.wait(t.transfer_id, t.claim, 0)
        if ann is None:
            if self._closed:
                raise TransferClosed("receiver closed")
            raise TransferTimeout(f"no announcement from {t.peer_id} within {self.announce_timeout_s}s")
        return ann

    def _on_announcement(self, ann: Announcement) -> None:
        """Join a new generation's group at once: the sender is waiting for us in its rendezvous."""
        if self.require_auth:
            t = self._transfers.get(ann.transfer_id)
            if t is None or t.peer_id != ann.prefill_id or not ann.proves(t.token):
                return  # its transfer (if any) fails on its own; nobody else's group is touched
        peer = self._peers.get(ann.prefill_id)
        if (peer is None or ann.gen > peer.max_gen) and (ann.backend, ann.ordered) == (self._backend, self._ordered):
            # bounded: a flood of announcements (the store is reachable by anyone) costs no more threads
            if self._prebuilds.acquire(blocking=False):
                self._threads.start(self._prebuild, ann, f"kv-recv-join-{ann.prefill_id}")

    def _prebuild(self, ann: Announcement) -> None:
        try:
            self._group_for(ann, time.monotonic() + self.timeout_s)
        except Exception:
            pass  # the transfers that need this group report the failure
        finally:
            self._prebuilds.release()

    def _mismatch(self, t: _Expected, ann: Announcement) -> GeometryMismatch | None:
        """Why the announced data cannot go into the expected pages, or None. Raises if it cannot even be drained."""
        if not ann.proves(t.token):
            raise TransferError(f"announcement for {t.transfer_id} is not authenticated (wrong transfer token)")
        if ann.prefill_id != t.peer_id or ann.backend != self._backend or ann.ordered != self._ordered:
            raise TransferError(f"announcement from {ann.prefill_id} ({ann.backend}, ordered={ann.ordered}) does not "
                                f"match: expected {t.peer_id} ({self._backend}, ordered={self._ordered})")
        mine = (t.num_layers, len(t.pages), self._pages.latent_page_bytes, self._pages.index_page_bytes)
        theirs = (ann.num_layers, ann.num_pages, ann.latent_page_bytes, ann.index_page_bytes)
        if mine != theirs:
            return GeometryMismatch(f"geometry mismatch (layers, pages, latent page bytes, index page bytes): "
                                    f"sender {theirs}, receiver {mine}")
        return None

    def _group_for(self, ann: Announcement, deadline: float) -> PairGroup:
        with self._lock:
            peer = self._peers.setdefault(ann.prefill_id, _Peer())
        with peer.lock:
            group = peer.group
            if group is not None and group.gen == ann.gen and not group.broken:
                return group
            if ann.gen <= peer.max_gen:
                raise PeerFailed(f"{ann.prefill_id} announced generation {ann.gen}, but generation {peer.max_gen} "
                                 "was built already (stale announcement, or a broken group the sender must rebuild)")
            if group is not None:
                group.mark_broken()  # superseded: the sender restarted or saw a failure
            peer.group, peer.max_gen = None, ann.gen
            host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
            pg, store = build_group(ann.backend, host, self.port, group_prefix(ann.prefill_id, self.worker_id, ann.gen),
                                    1 - SENDER_RANK, seconds_left(deadline), host)
            peer.group = PairGroup(pg, store, ann.gen, ann.ordered)
            return peer.group
