"""When requests are sent: open-loop arrival schedules and the closed loop.

Open loop (the schedule does not wait for the server):

* ``poisson`` — exponential gaps at ``rate`` requests/s;
* ``gamma`` — gamma gaps with shape ``burstiness`` and mean ``1/rate``, as
  vLLM's ``--burstiness``: 1 is Poisson, < 1 burstier, > 1 more regular; the
  gaps' coefficient of variation is ``1/sqrt(burstiness)``;
* ``burst`` — everything at t = 0 (vLLM's ``--request-rate inf``).

Closed loop: ``closed`` — ``concurrency`` users, each sending its next request
as soon as its previous one finishes. Any arrival process may also be capped
with ``concurrency`` (at most that many requests in flight; arrivals wait).
``trace`` — the send times a trace workload brings (its timestamps); any
other process given to a trace workload replays its lengths on that schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PROCESSES = ("poisson", "gamma", "burst", "closed", "trace")


@dataclass(frozen=True)
class Arrival:
    """How requests arrive."""

    process: str = "poisson"
    """One of ``PROCESSES``."""
    rate: float = 1.0
    """Requests (or session starts) per second, for ``poisson`` and ``gamma``."""
    burstiness: float = 1.0
    """Gamma shape for ``gamma``; 1 = Poisson."""
    concurrency: int | None = None
    """Cap on requests in flight; the number of users for ``closed``."""
    seed: int = 0
    """Seeds the gaps, so that two runs see the same schedule."""

    def __post_init__(self) -> None:
        if self.process not in PROCESSES:
            raise ValueError(f"arrival process must be one of {', '.join(PROCESSES)}, got {self.process!r}")
        if self.process in ("poisson", "gamma") and not self.rate > 0:
            raise ValueError(f"request rate must be > 0 requests/s, got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.process == "poisson" and self.burstiness != 1.0:
            raise ValueError("poisson has burstiness 1; use --arrival gamma for another burstiness")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.process == "closed" and self.concurrency is None:
            raise ValueError("closed-loop arrivals need a concurrency (the number of users)")

    @property
    def open_loop(self) -> bool:
        return self.process != "closed"

    def label(self) -> str:
        if self.process == "closed":
            return f"closed c={self.concurrency}"
        if self.process in ("burst", "trace"):
            return self.process + (f" c<={self.concurrency}" if self.concurrency else "")
        cap = f" c<={self.concurrency}" if self.concurrency else ""
        shape = f" b={self.burstiness:g}" if self.process == "gamma" else ""
        return f"{self.process} {self.rate:g}/s{shape}{cap}"

    def schedule(self, n: int) -> np.ndarray:
        """Send times in seconds from the run start, one per arrival (first at 0)."""
        if self.process == "trace":
            raise ValueError("trace arrivals take their times from a trace workload")
        if self.process in ("burst", "closed") or math.isinf(self.rate):
            return np.zeros(n)
        rng = np.random.default_rng(self.seed)
        shape = self.burstiness
        gaps = rng.gamma(shape=shape, scale=1.0 / (self.rate * shape), size=max(n - 1, 0))
        return np.concatenate([[0.0], np.cumsum(gaps)])[:n]

