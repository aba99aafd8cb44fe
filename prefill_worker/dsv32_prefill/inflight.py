"""The prefill worker's inflight queue (life cycle: :mod:`dsv32_prefill`).

A request whose forward is done but whose KV is still on its way to the decode
worker waits here, holding its pages, while the batch loop runs the next batch.
One thread polls the sender; a transfer that ends (or runs out of time) answers
its ``Prefill`` RPC and gives its pages back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from dsv32_cluster import metrics

log = logging.getLogger(__name__)


@dataclass
class Inflight:
    job: object  # scheduler.PrefillJob
    handle: object  # the sender's handle of the job's transfer
    page_ids: list[int]
    deadline: float


class PrefillInflightQueue:
    """Transfers still sending, polled every ``poll_interval_s``; each ends within ``timeout_s`` of joining.

    ``free_pages(page_ids)`` gives a finished transfer's pages back (the scheduler serialises it with
    allocation); ``count(name, n)`` updates the worker's counters; ``on_change()`` says the load changed.
    """

    def __init__(self, sender, timeout_s: float, free_pages: Callable[[list[int]], None],
                 count: Callable[[str, int], None], poll_interval_s: float = 0.002, idle_wait_s: float = 0.5):
        self.sender, self.timeout_s = sender, timeout_s
        self.free_pages, self.count = free_pages, count
        self.poll_interval_s, self.idle_wait_s = poll_interval_s, idle_wait_s
        self.on_change: Callable[[], None] = lambda: None
        self._entries: list[Inflight] = []
        self._mu = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="prefill-inflight", daemon=True)

    def start(self) -> PrefillInflightQueue:
        self._thread.start()
        return self

    def add(self, job, handle, page_ids: list[int]) -> None:
        """The job's forward is done and its last layer handed to the sender: wait here for the sends."""
        with self._mu:
            self._entries.append(Inflight(job, handle, page_ids, time.monotonic() + self.timeout_s))
        self._wake.set()

    def __len__(self) -> int:
        return len(self._entries)

    def stop(self, drain_s: float) -> None:
        """Let the transfers in flight end (at most ``drain_s``), then fail what is left."""
        deadline = time.monotonic() + drain_s
        while self._entries and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        with self._mu:
            left, self._entries = self._entries, []
        for e in left:
            self._end(e, error="prefill worker shutting down")

    def _run(self) -> None:
        from dsv32_engine.transfer import KVPoll

        while not self._stop:
            try:
                self._poll_once(KVPoll)
            except Exception:  # the poller outlives anything one transfer can throw at it
                log.exception("inflight poll")
                time.sleep(self.poll_interval_s)

    def _poll_once(self, KVPoll) -> None:
        with self._mu:
            entries = list(self._entries)
        if not entries:
            self._wake.wait(self.idle_wait_s)
            self._wake.clear()
            return
        now = time.monotonic()
        done = [e for e in entries if self.sender.poll(e.handle) in (KVPoll.SUCCESS, KVPoll.FAILED)
                or now >= e.deadline]
        if done:
            with self._mu:
                self._entries = [e for e in self._entries if e not in done]
            for e in done:
                self._finish(e)
            self.on_change()
        self._wake.wait(self.poll_interval_s)
        self._wake.clear()

    def _finish(self, e: Inflight) -> None:
        job = e.job
        try:
            job.transfer = self.sender.finish(e.handle, 0.0)
        except Exception as exc:  # failed, or still sending at the deadline
            self._end(e, error=f"KV transfer to {job.decode_id} failed: {exc}")
            return
        self.count("bytes_sent", job.transfer.num_bytes)
        metrics.process().transfer_seconds.observe(job.transfer.elapsed_s)
        self.count("requests", 1)
        self._end(e)

    def _end(self, e: Inflight, error: str | None = None) -> None:
        """Pages back to the pool first, then the RPC's answer (so a test that sees the answer sees the pages)."""
        try:
            self.free_pages(e.page_ids)
        except Exception:
            log.exception("freeing the pages of %s", e.job.request_id)
        if error is None:
            e.job.done.set()
        else:
            self.count("failed", 1)
            e.job.fail(error)
