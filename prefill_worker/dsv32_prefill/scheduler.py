"""The prefill worker's waiting queue and batch loop (life cycle: :mod:`dsv32_prefill`)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


@dataclass
class PrefillJob:
    request_id: str
    prompt_ids: list[int]
    params: object  # dsv32_engine.SamplingParams
    transfer_id: str
    endpoint: str
    decode_id: str
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    # results
    first: object = None  # StepOutput
    transfer: object = None  # TransferResult
    error: str | None = None
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_size: int = 0

    def fail(self, error: str) -> None:
        self.error = error
        self.done.set()


class PrefillScheduler:
    """``WaitingQueue`` + the batch loop that owns the engine."""

    def __init__(self, engine, sender, *, budget_tokens: int, max_queued_tokens: int, transfer_timeout_s: float):
        self.engine, self.sender = engine, sender
        self.budget_tokens = budget_tokens
        self.max_queued_tokens = max_queued_tokens
        self.transfer_timeout_s = transfer_timeout_s
        self._waiting: deque[PrefillJob] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self.queued_tokens = 0
        self.running_tokens = 0
        self.counters = {"bytes_sent": 0, "batches": 0, "requests": 0, "failed": 0}
        self.on_change = lambda: None  # load changed (the heartbeat reports it at once)
        self._thread = threading.Thread(target=self._run, name="prefill-loop", daemon=True)

    def start(self) -> PrefillScheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        for job in self._waiting:
            job.fail("prefill worker shutting down")

    def submit(self, job: PrefillJob) -> None:
        n = len(job.prompt_ids)
        with self._cv:
            if self._stop:
                raise QueueFull("prefill worker shutting down")
            if self._waiting and self.queued_tokens + n > self.max_queued_tokens:
                raise QueueFull(f"{self.queued_tokens} prompt tokens queued (limit {self.max_queued_tokens})")
            self._waiting.append(job)
            self.queued_tokens += n
            self._cv.notify()
        self.on_change()

    def cancel(self, job: PrefillJob) -> None:
        with self._cv:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self.queued_tokens -= len(job.prompt_ids)
                job.fail("cancelled")

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _next_batch(self) -> list[PrefillJob]:
        """Arrival order, within the token budget and the free pages (always at least one job)."""
        with self._cv:
            while not self._waiting and not self._stop:
                self._cv.wait()
            if self._stop:
                return []
            batch, tokens, pages = [], 0, 0
            layout, free = self.engine.layout, self.engine.allocator.num_free
            while self._waiting:
                job = self._waiting[0]
                n, p = len(job.prompt_ids), layout.pages_for(len(job.prompt_ids))
                if batch and (tokens + n > self.budget_tokens or pages + p > free):
                    break
                self._waiting.popleft()
                self.queued_tokens -= n
                batch.append(job)
                tokens, pages = tokens + n, pages + p
            self.running_tokens = tokens
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            try:
                self._prefill(batch)
            except Exception as e:  # never leave an RPC hanging
                log.exception("prefill batch failed")
                for job in batch:
                    if not job.done.is_set():
                        job.fail(f"prefill failed: {e}")
            finally:
                self.running_tokens = 0
                self.on_change()

    def _prefill(self, batch: list[PrefillJob]) -> None:
        from dsv32_engine.engine import PrefillInput

        eng, alloc = self.engine, self.engine.allocator
        live, pages, handles = [], {}, {}
        for job in batch:
            need = eng.layout.pages_for(len(job.prompt_ids))
            if not alloc.can_allocate(need):
                job.fail(f"prompt needs {need} pages; this prefill worker's pool has {alloc.num_total}")
                continue
            pages[job.request_id] = alloc.allocate(need)
            try:
                handles[job.request_id] = self.sender.begin(job.transfer_id, job.endpoint, job.decode_id,
                                                            pages[job.request_id])
            except Exception as e:
                alloc.free(pages.pop(job.request_id))
                job.fail(f"KV transfer to {job.decode_id} could not start: {e}")
                continue
            live.append(job)
        try:
            if not live:
                return
            now = time.monotonic()
            for job in live:
                job.queue_s, job.batch_size = now - job.enqueued_at, len(live)
            failed: dict[str, str] = {}

            def on_layer_done(layer: int) -> None:
                for job in live:
                    if job.request_id not in failed:
                        try:
                            self.sender.send_layer(handles[job.request_id], layer)
                        except Exception as e:
                            failed[job.request_id] = f"KV transfer to {job.decode_id} failed at layer {layer}: {e}"

            inputs = [PrefillInput(j.request_id, j.prompt_ids, j.params, pages[j.request_id]) for j in live]
            t0 = time.monotonic()
            firsts = eng.prefill(inputs, on_layer_done=on_layer_done)
            compute = time.monotonic() - t0
            self.counters["batches"] += 1
            for job, first in zip(live, firsts):
                job.first, job.compute_s = first, compute
                if job.request_id in failed:
                    job.fail(failed[job.request_id])
                    continue
                try:
                    job.transfer = self.sender.finish(handles[job.request_id], self.transfer_timeout_s)
                    self.counters["bytes_sent"] += job.transfer.num_bytes
                    self.counters["requests"] += 1
                    job.done.set()
                except Exception as e:
                    job.fail(f"KV transfer to {job.decode_id} failed: {e}")
        finally:
            for job in batch:
                if job.request_id in pages:
                    alloc.free(pages[job.request_id])
                if job.error:
                    self.counters["failed"] += 1
