"""The sender's second thread per transfer: it issues the sends and retires them.

gloo writes a message to the socket in the thread that calls ``send`` (as far
as the socket buffer takes it), so with one thread the socket copy of a chunk
and the gather and checksum of the next one would take turns. With this one,
they overlap: the transfer thread prepares chunks and ``put``s them, this
thread sends them in order and waits for them, at most ``window`` at a time.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable

import torch

from .errors import TransferError, TransferTimeout, transfer_error
from .pair import peer_error, seconds_left, wait_work


class SendIssuer:
    def __init__(self, pg, dst_rank: int, window: int, deadline: float, give_back: Callable,
                 after_last_issue: Callable[[], None] | None = None):
        self._pg, self._dst, self._window, self._deadline = pg, dst_rank, max(1, window), deadline
        self._give_back = give_back  # returns a staging buffer to its pool
        self._after_last_issue = after_last_issue
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._slots = threading.Semaphore(2 * self._window)  # queued + in flight: bounds staging memory
        self._error: TransferError | None = None
        self._thread = threading.Thread(target=self._loop, name="kv-send-issue", daemon=True)
        self._thread.start()

    def put(self, buf, tag: int, staging) -> None:
        """Queue one message (``staging``: its buffer to give back once sent, or None). Blocks on a full window."""
        if not self._slots.acquire(timeout=seconds_left(self._deadline)):
            raise TransferTimeout("sends did not complete in time (send window full)")
        if self._error:
            raise transfer_error(self._error)  # a copy: a raised one would hold its frames (and the group)
        self._queue.put((buf, tag, staging))

    def extend(self, deadline: float) -> None:
        """Progress was made: every later wait is bounded by ``deadline`` (never earlier than before)."""
        self._deadline = max(self._deadline, deadline)

    def finish(self) -> None:
        """Every message is queued: wait until all are sent. Raises ``TransferError``."""
        self._queue.put(None)
        self._thread.join(seconds_left(self._deadline) + 1.0)
        if self._thread.is_alive():
            raise TransferTimeout("sends did not complete in time")
        if self._error:
            raise transfer_error(self._error)

    def abort(self) -> None:
        """The transfer failed while preparing: stop without waiting for the sends (the group is broken)."""
        self._queue.put(False)

    def _loop(self) -> None:
        inflight: deque = deque()
        try:
            while item := self._queue.get(timeout=seconds_left(self._deadline)):
                if item[0].is_cuda:
                    torch.cuda.set_device(item[0].device)
                buf, tag, staging = item
                inflight.append((self._pg.send([buf], self._dst, tag), staging))
                while len(inflight) >= self._window:
                    self._retire(inflight.popleft())
            if item is False:
                return
            if self._after_last_issue is not None:
                self._after_last_issue()
            while inflight:
                self._retire(inflight.popleft())
        except Exception as e:  # queue.Empty (the preparing thread vanished) or a failed send
            self._error = (TransferTimeout("no message was handed over before the deadline")
                           if isinstance(e, queue.Empty) else transfer_error(peer_error(e, self._deadline)))
            for _ in range(2 * self._window + 1):
                self._slots.release()  # wake a put() waiting for a slot
        finally:
            self._pg = None  # see TransferThreads: no group reference may outlive the transfer

    def _retire(self, item) -> None:
        work, staging = item
        wait_work(work, self._deadline)
        if staging is not None:
            self._give_back(staging)
        self._slots.release()
