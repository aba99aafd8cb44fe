"""The receiver's end of the announcement queue (``xfer/announce`` on its TCPStore).

Senders ``queue_push`` an ``Announcement`` per transfer. One thread here blocks
in ``queue_pop`` on its own store connection (no polling: a transfer is picked
up the moment it is announced), hands each announcement to the transfer that
``claim``-ed its id, or keeps it until that transfer is expected, and tells the
receiver about every announcement so that a new generation's group is joined
at once, without waiting for ``expect``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from .pair import ANNOUNCE_QUEUE, Announcement

log = logging.getLogger(__name__)
MAX_EARLY = 1024
"""Announcements kept for transfers not expected yet (a flood of them costs memory, nothing more)."""


class Claim:
    """A transfer id waiting for its announcement."""

    def __init__(self):
        self.event = threading.Event()
        self.announcement: Announcement | None = None


class BootstrapQueue:
    def __init__(self, store, timeout_s: float, on_announcement: Callable[[Announcement], None]):
        self._store = store.clone()  # blocks in queue_pop: the shared connection must stay free
        self._store.set_timeout(timedelta(hours=1))  # woken by announcements or by close(), not by timeouts
        self._timeout_s = timeout_s
        self._on_announcement = on_announcement
        self._claims: dict[str, Claim] = {}
        self._early: dict[str, tuple[Announcement, float]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.rejected = 0
        self._thread = threading.Thread(target=self._watch, name="kv-recv-bootstrap", daemon=True)
        self._thread.start()

    def claim(self, transfer_id: str) -> Claim:
        """Register interest in an id; already filled if its announcement came first."""
        claim = Claim()
        with self._lock:
            early = self._early.pop(transfer_id, None)
            if early is None:
                self._claims[transfer_id] = claim
        if early is not None:
            claim.announcement = early[0]
            claim.event.set()
        return claim

    def wait(self, transfer_id: str, claim: Claim, timeout_s: float) -> Announcement | None:
        """The announcement, or None after ``timeout_s`` or on close."""
        if not claim.event.wait(timeout_s):
            with self._lock:
                if self._claims.get(transfer_id) is claim:
                    del self._claims[transfer_id]
        return claim.announcement

    def close(self, push_store) -> None:
        """Stop the watcher: an empty entry pushed through ``push_store`` wakes it."""
        self._closed = True
        push_store.queue_push(ANNOUNCE_QUEUE, "")
        self._thread.join(5)
        with self._lock:
            claims, self._claims = list(self._claims.values()), {}
        for claim in claims:
            claim.event.set()

    @property
    def healthy(self) -> bool:
        """False once the watcher has died (then no transfer could ever start)."""
        return self._closed or self._thread.is_alive()

    def _watch(self) -> None:
        while not self._closed:
            try:
                raw = self._store.queue_pop(ANNOUNCE_QUEUE)
            except Exception:  # an hour without announcements, or the store going away
                if self._closed:
                    return
                time.sleep(0.01)  # a store that fails at once must not turn this into a busy loop
                continue
            if not raw:
                continue
            try:  # anyone who can reach the store can push here: one bad entry costs that entry only
                self._deliver(Announcement.decode(raw))
            except Exception as e:
                self.rejected += 1
                log.warning("announcement rejected (%s): %.200r", e, raw)

    def _deliver(self, ann: Announcement) -> None:
        with self._lock:
            claim = self._claims.pop(ann.transfer_id, None)
            if claim is None:
                now = time.monotonic()  # unclaimed announcements are kept for one timeout, MAX_EARLY at most
                self._early = {k: v for k, v in self._early.items() if now - v[1] < self._timeout_s}
                while len(self._early) >= MAX_EARLY:
                    self._early.pop(next(iter(self._early)))
                self._early[ann.transfer_id] = (ann, now)
        if claim is not None:
            claim.announcement = ann
            claim.event.set()
        self._on_announcement(ann)
