"""The router's limits, and how long a request may still wait given its client's deadline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RouterLimits:
    max_inflight: int = 256
    """Requests between admission and finish."""
    max_waiting: int = 256
    """Requests waiting for a slot or for capacity; more → RESOURCE_EXHAUSTED at once."""
    admission_timeout_s: float = 10.0
    """How long a request may wait for a slot or for decode capacity."""
    max_attempts: int = 3
    """Pairs tried per request (worker failure, checksum mismatch)."""
    reserve_lease_s: float = 30.0
    """A reservation not followed by its Decode stream within this is freed by D."""
    worker_timeout_s: float = 600.0
    """Bound on a worker call when the client set no deadline."""
    stall_timeout_s: float = 30.0
    """A decode stream with no message for this long is failed over (a hung worker, detected by progress);
    a worker missing from the registry (heartbeat TTL) is failed over sooner, from any phase."""

    def __post_init__(self) -> None:
        for name in ("max_inflight", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_waiting",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def admission_budget(self, context) -> float:
        """Seconds a request may wait for a slot or for capacity: the admission timeout,
        cut to what is left of the client's deadline."""
        left = time_remaining(context)
        return self.admission_timeout_s if left is None else max(0.0, min(left, self.admission_timeout_s))

    def worker_timeout(self, context) -> float:
        """Bound on one worker call: what is left of the client's deadline, else ``worker_timeout_s``."""
        left = time_remaining(context)
        return self.worker_timeout_s if left is None else max(0.01, left)


def time_remaining(context) -> float | None:
    """Seconds left of the client's deadline; None without a deadline (or a context)."""
    return context.time_remaining() if context is not None else None


def deadline_passed(context) -> bool:
    left = time_remaining(context)
    return left is not None and left <= 0.05
