"""The decode worker's transfer queue (life cycle: :mod:`dsv32_decode`).

A request whose ``Decode`` stream is open but whose KV is still arriving waits
here. One thread polls the KV receiver for every such request; a transfer that
ends is verified against what the prefill worker says it sent and the request
goes straight into the running batch, or its stream is told why not. The
stream's own thread only forwards what its request's output queue receives.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from dsv32_cluster import metrics

from .queues import Admission, RunningBatch

log = logging.getLogger(__name__)


class KVRejected(Exception):
    """The KV arrived but is not what was sent (checksum, byte count or geometry): ``DATA_LOSS``."""


class KVFailed(Exception):
    """The transfer failed or did not end in time: ``UNAVAILABLE`` (the router retries elsewhere)."""


@dataclass(frozen=True)
class Verified:
    """First item on a request's output queue once its KV is in and checked."""

    received: object  # dsv32_engine.transfer.TransferResult


@dataclass
class Incoming:
    adm: Admission
    transfer_id: str
    checksum: str
    """What the prefill worker reports having sent."""
    sent_bytes: int
    deadline: float


class DecodeTransferQueue:
    """Requests waiting for their KV, by request id; polled every ``poll_interval_s``.

    Whoever takes a request out of the queue owns its reservation: the poller,
    which admits it to ``batch`` or drops the reservation (``drop(request_id)``
    frees its pages) and puts the reason on the request's output queue; or the
    stream, through :meth:`discard`, when it ends first.
    """

    def __init__(self, receiver, batch: RunningBatch, drop: Callable[[str], None], poll_interval_s: float = 0.002,
                 idle_wait_s: float = 0.5):
        self.receiver, self.batch, self.drop = receiver, batch, drop
        self.poll_interval_s, self.idle_wait_s = poll_interval_s, idle_wait_s
        self.counters = {"bytes_received": 0, "checksum_failures": 0}
        self._pending: dict[str, Incoming] = {}
        self._mu = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decode-transfers", daemon=True)

    def add(self, inc: Incoming) -> None:
        """Wait for ``inc``'s KV (the first one starts the polling thread)."""
        with self._mu:
            self._pending[inc.adm.request_id] = inc
            if not self._thread.is_alive() and not self._stop.is_set():
                self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def discard(self, request_id: str) -> Incoming | None:
        """Take a request out before its transfer ended (its stream is gone, or it was cancelled); what was
        still here, or None. The caller owns its reservation from then on."""
        with self._mu:
            return self._pending.pop(request_id, None)

    def progress(self) -> dict[str, str]:
        """Transfer id by request id of the requests waiting here (their leases are renewed while the
        receiver sees their KV arriving)."""
        with self._mu:
            return {rid: inc.transfer_id for rid, inc in self._pending.items()}

    @property
    def healthy(self) -> bool:
        """False once the polling thread has died (it should never: then no transfer would ever end)."""
        return self._stop.is_set() or not self._thread.ident or self._thread.is_alive()

    def __len__(self) -> int:
        return len(self._pending)

    def _run(self) -> None:
        from dsv32_engine.transfer import KVPoll

        while not self._stop.is_set():
            try:
                self._poll_once(KVPoll)
            except Exception:  # the loop outlives anything one transfer can throw at it
                log.exception("transfer queue poll")
                time.sleep(self.poll_interval_s)

    def _poll_once(self, KVPoll) -> None:
        with self._mu:
            pending = list(self._pending.values())
        if not pending:
            self._wake.wait(self.idle_wait_s)
            self._wake.clear()
            return
        now = time.monotonic()
        for inc in pending:
            try:
                state = self.receiver.poll(inc.transfer_id)
            except KeyError:  # released: the stream discarded it meanwhile
                continue
            if state not in (KVPoll.SUCCESS, KVPoll.FAILED) and now < inc.deadline:
                continue
            with self._mu:
                if self._pending.pop(inc.adm.request_id, None) is None:
                    continue
            try:
                self._resolve(inc)
            except Exception as e:  # never leave a stream waiting
                log.exception("transfer of %s", inc.adm.request_id)
                self._fail(inc, KVFailed(f"KV transfer {inc.transfer_id}: {e}"))
        self._wake.wait(self.poll_interval_s)
        self._wake.clear()

    def _resolve(self, inc: Incoming) -> None:
        from dsv32_engine.transfer import ChecksumMismatch, GeometryMismatch, StillInFlight, TransferError

        tid = inc.transfer_id
        try:
            received = self.receiver.wait(tid, 0.0)
        except StillInFlight as e:
            self._fail(inc, KVFailed(f"KV transfer {tid}: {e}"))
            return
        except (ChecksumMismatch, GeometryMismatch) as e:
            self._reject(inc, str(e))
            return
        except TransferError as e:
            self._fail(inc, KVFailed(f"KV transfer {tid} failed: {e}"))
            return
        self._release(tid)
        self.counters["bytes_received"] += received.num_bytes
        m = metrics.process()
        m.transfer_bytes("received").inc(received.num_bytes)
        m.transfer_seconds.observe(received.elapsed_s)
        # The receiver already compared checksums with the sender over the pair group;
        # this second look ties the verified data to the request the router sent.
        if received.checksum != inc.checksum or received.num_bytes != inc.sent_bytes:
            self._reject(inc, f"sent {inc.checksum} ({inc.sent_bytes} B), received {received.checksum} "
                              f"({received.num_bytes} B)")
            return
        inc.adm.out.put(Verified(received))
        self.batch.admit(inc.adm)

    def _reject(self, inc: Incoming, why: str) -> None:
        self.counters["checksum_failures"] += 1
        metrics.process().checksum_failures.inc()
        log.error("request %s: KV verification failed: %s", inc.adm.request_id, why)
        self._fail(inc, KVRejected(why))

    def _fail(self, inc: Incoming, error: Exception) -> None:
        self.drop(inc.adm.request_id)  # frees the pages and releases the transfer
        inc.adm.out.put(error)

    def _release(self, transfer_id: str) -> None:
        try:
            self.receiver.release(transfer_id)
        except Exception as e:
            log.debug("release of %s: %s", transfer_id, e)
