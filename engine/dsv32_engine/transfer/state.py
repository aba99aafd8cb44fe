"""The pollable state of one KV transfer, shared by both roles and the fake backend."""

from __future__ import annotations

import atexit
import enum
import threading
import time
import weakref
from dataclasses import dataclass

from .errors import StillInFlight, TransferError, transfer_error


class KVPoll(enum.IntEnum):
    """Where a transfer stands (SGLang's ``KVPoll``): it only ever moves to the right, or to FAILED."""

    FAILED = 0
    BOOTSTRAPPING = 1
    """The pair group is being found or built; the receiver has not yet seen the sender's announcement."""
    WAITING = 2
    """The pair group is ready; no layer has been handed over (sender) or has arrived (receiver)."""
    TRANSFERRING = 3
    SUCCESS = 4


@dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    num_bytes: int
    """Latent + indexer bytes of every transferred page, all layers."""
    checksum: str
    """Over those bytes in wire order (layer 0 indexer, layer 0 latent, layer 1 indexer...): ``kv2:<32 hex>``
    on CPU, ``kv1:<16 hex>`` on CUDA (``pages.Checksum``). Equal on both sides, and equal to
    ``cache_checksum`` of the pages."""
    elapsed_s: float
    """Sender: ``begin`` to the last send completing. Receiver: ``expect`` to the last page landing."""
    wait_after_last_layer_s: float = 0.0
    """Sender only: from the last ``send_layer`` call to every send completing."""
    checksum_s: float = 0.0
    """Sender only: time spent computing the checksum."""


class TransferState:
    """A transfer's state, error and result, written by one worker thread and read by anyone."""

    def __init__(self, transfer_id: str):
        self.transfer_id = transfer_id
        self.t_start = time.perf_counter()
        self._state = KVPoll.BOOTSTRAPPING
        self.t_progress: float | None = None
        """``time.monotonic()`` of the last sign of life (the group ready, a message landed); None before."""
        self._error: TransferError | None = None
        self._result: TransferResult | None = None
        self._done = threading.Event()

    @property
    def state(self) -> KVPoll:
        return self._state

    @property
    def error(self) -> TransferError | None:
        return self._error

    def advance(self, state: KVPoll) -> None:
        """Move on to ``state`` (or stay); either way, progress was made now (see ``t_progress``)."""
        if not self._done.is_set():
            self.t_progress = time.monotonic()
            if state > self._state:
                self._state = state

    def succeed(self, result: TransferResult) -> None:
        if not self._done.is_set():
            self._result, self._state = result, KVPoll.SUCCESS
            self._done.set()

    def fail(self, error: BaseException) -> None:
        """Record why the transfer failed (kept as ``transfer_error(error)``: no traceback)."""
        if not self._done.is_set():
            self._error, self._state = transfer_error(error), KVPoll.FAILED
            self._done.set()

    def wait(self, timeout_s: float) -> TransferResult:
        """The result; raises the recorded error's class if the transfer failed, ``StillInFlight`` if it
        has not ended within ``timeout_s``."""
        if not self._done.wait(max(0.0, timeout_s)):
            raise StillInFlight(f"transfer {self.transfer_id}: still {self._state.name} after {timeout_s:.3g}s")
        if self._result is None:
            raise type(self._error)(f"transfer {self.transfer_id} failed: {self._error}")
        return self._result


class TransferThreads:
    """The per-transfer threads of one sender or receiver.

    A thread holding the last reference to a process group when the
    interpreter exits aborts the process (gloo's threads are destroyed while
    joinable), so threads drop their group before signalling and ``close``
    joins them; ``close`` also runs at exit for endpoints left open.
    """

    def __init__(self, owner):
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        _OPEN.add(owner)

    def start(self, target, arg, name: str) -> None:
        th = threading.Thread(target=target, args=(arg,), name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [th]
        th.start()

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            threads = list(self._threads)
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))


_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_endpoints() -> None:
    for owner in list(_OPEN):
        owner.close()
