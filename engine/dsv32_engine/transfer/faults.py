"""Fault injection for tests: what a sender can be armed with, and how many transfers it hits.

Both senders (real and fake) take faults the same ways: ``arm_fault(kind, count)``
at run time (what the prefill worker's ``InjectFault`` RPC does), or a spec
``kind[:count]`` given to the constructor or, for the real sender, read from the
environment variable ``FAULT_ENV`` when the constructor is given none.
"""

from __future__ import annotations

import threading

FAULT_ENV = "DSV32_TRANSFER_FAULT"

FAULTS = {
    "corrupt-index": "flip a byte of the last layer's indexer pages (latent pages where the model has no indexer) "
                     "after the sender's checksum: the receiver fails with ChecksumMismatch",
    "corrupt-latent": "flip a byte of the last layer's latent pages after the sender's checksum: the receiver "
                      "fails with ChecksumMismatch",
}
"""Fault name → what it does to each of the next ``count`` transfers. The cache itself is never touched."""


class FaultPlan:
    """The fault a sender is armed with and how many more transfers it hits; shared by the sender's threads."""

    def __init__(self, spec: str = ""):
        self._lock = threading.Lock()
        self._kind, self._left = "", 0
        kind, _, count = spec.partition(":")
        if kind:
            self.arm(kind, int(count or 1))

    def arm(self, kind: str, count: int = 1) -> None:
        """Hit the next ``count`` transfers with ``kind`` (one of ``FAULTS``), replacing what was armed."""
        if kind not in FAULTS:
            raise ValueError(f"unknown transfer fault {kind!r}; known: {', '.join(FAULTS)}")
        if count < 1:
            raise ValueError(f"fault count must be >= 1, got {count} (disarm_fault() clears a fault)")
        with self._lock:
            self._kind, self._left = kind, count

    def disarm(self) -> None:
        with self._lock:
            self._kind, self._left = "", 0

    def take(self) -> str | None:
        """The armed fault, for one transfer (counted off), or None."""
        with self._lock:
            if not self._left:
                return None
            self._left -= 1
            return self._kind


def corrupt_part(kind: str, num_parts: int) -> int:
    """Which pool of a layer a corrupting fault hits, as an index into the pools that travel
    (``CachePages.parts``: indexer then latent, or latent alone)."""
    return 0 if kind == "corrupt-index" else num_parts - 1
