"""Fault injection while a load test runs (issue 10): ``--chaos kill-decode|stop-decode|kill-prefill``.

Every ``every_s`` seconds one worker of the role is picked from the cluster's Redis registry (round
robin) and hit on this machine: SIGKILL (``kill-*``), or SIGSTOP for ``stop_s`` seconds then SIGCONT
(``stop-decode``: a hung worker). Each fault's *recovery time* is measured from the fault to the
moment the registry again holds a live registration of that worker id that is newer than the fault
(``up`` restarted it, or the stopped one re-registered) — what capacity the cluster lost and for how
long; the requests' outcomes are in the load test's own report.

Then the same load runs again without faults (greedy: ``--chaos`` sends ``temperature 0`` unless
``--temperature`` says otherwise) and :func:`compare_tokens` holds each request that completed under
faults to the same request (same index: the same prompt) of that run: identical, differing (must be
0), failed (by status; *unclear* = one that names no reason: ``UNKNOWN``, ``INTERNAL``, a harness
error or no message), or unverified (its fault-free twin did not complete).

Only for a cluster on this machine (it signals pids). Reads the registry with ``redis`` directly, in
the key schema of ``dsv32_cluster.state`` (this package does not import the cluster runtime).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field

KINDS = ("kill-decode", "stop-decode", "kill-prefill")


@dataclass
class Fault:
    kind: str
    worker_id: str
    pid: int
    at_s: float
    """Seconds since the chaos started."""
    recovered_s: float | None = None
    """Seconds from the fault until the worker was registered and beating again (None: not within the run)."""


@dataclass
class Chaos:
    kind: str
    redis_url: str
    prefix: str = "dsv32:"
    every_s: float = 10.0
    stop_s: float = 8.0
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--chaos must be one of {KINDS}, got {self.kind!r}")
        import redis

        self._r = redis.Redis.from_url(self.redis_url, decode_responses=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._t0 = 0.0
        self._next = 0

    def start(self) -> Chaos:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self, settle_s: float = 30.0) -> list[Fault]:
        """Stop injecting; wait up to ``settle_s`` for the last faults to recover; resume any stopped worker."""
        self._stop.set()
        self._thread.join(timeout=self.stop_s + 5)
        deadline = time.monotonic() + settle_s
        while any(f.recovered_s is None for f in self.faults) and time.monotonic() < deadline:
            self._check_recovery()
            time.sleep(0.2)
        return self.faults

    def summary(self) -> dict:
        rec = [f.recovered_s for f in self.faults if f.recovered_s is not None]
        return {"kind": self.kind, "every_s": self.every_s, "faults": len(self.faults),
                "recovered": len(rec), "max_recovery_s": round(max(rec), 2) if rec else None,
                "mean_recovery_s": round(sum(rec) / len(rec), 2) if rec else None,
                "events": [asdict(f) for f in self.faults]}

    # -- the thread ------------------------------------------------------------------------------
    def _workers(self, role: str) -> list[dict]:
        ids = self._r.zrange(f"{self.prefix}workers", 0, -1)
        pipe = self._r.pipeline(transaction=False)
        for wid in ids:
            pipe.hgetall(f"{self.prefix}worker:{wid}")
        return [h for h in pipe.execute() if h and h.get("role") == role]

    def _run(self) -> None:
        role = self.kind.split("-", 1)[1]
        due = time.monotonic() + self.every_s
        while not self._stop.wait(0.1):
            try:
                self._check_recovery()  # every 0.1 s: the recovery times' resolution
            except Exception:
                pass
            if time.monotonic() < due:
                continue
            due = time.monotonic() + self.every_s
            try:
                workers = sorted(self._workers(role), key=lambda h: h["worker_id"])
            except Exception:  # Redis away for a moment
                continue
            if len(workers) < 2:  # never take the last one of a role: that is an outage, not a fault
                continue
            w = workers[self._next % len(workers)]
            self._next += 1
            pid = int(w["pid"])
            fault = Fault(self.kind, w["worker_id"], pid, round(time.monotonic() - self._t0, 3))
            self.faults.append(fault)
            try:
                if self.kind == "stop-decode":
                    os.kill(pid, signal.SIGSTOP)
                    self._stop.wait(self.stop_s)
                    os.kill(pid, signal.SIGCONT)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _check_recovery(self) -> None:
        pending = [f for f in self.faults if f.recovered_s is None]
        if not pending:
            return
        now_wall, now = time.time(), time.monotonic()
        for f in pending:
            h = self._r.hgetall(f"{self.prefix}worker:{f.worker_id}")
            fault_wall = now_wall - (now - self._t0 - f.at_s)
            # a registration beating after the fault: a restarted process (new pid), or the resumed one
            started_after = float(h.get("started_at", 0)) > fault_wall
            resumed = self.kind == "stop-decode" and float(h.get("updated_at", 0)) > fault_wall + self.stop_s
            if h and (started_after or resumed):
                f.recovered_s = round(now - self._t0 - f.at_s, 2)


# a failure whose status says nothing about why: what "fails with a clear status" rules out
UNCLEAR = ("UNKNOWN", "INTERNAL", "CLIENT_ERROR", "PENDING", "EMPTY_STREAM")


def compare_tokens(faulty, fault_free) -> dict:
    """Each request of the runs of ``faulty`` (a ``LoadReport``) against the same request of ``fault_free``'s
    run at the same position; token ids from ``RequestResult.reply_ids``."""
    out = {"completed": 0, "identical": 0, "differ": 0, "unverified": 0, "failed": 0, "unclear_failures": 0,
           "failed_by_status": {}, "differ_requests": []}
    for run, ref in zip(faulty.runs, fault_free.runs):
        twins = {r.index: r for r in ref.results}
        for r in run.results:
            if not r.ok:
                out["failed"] += 1
                out["failed_by_status"][r.status] = out["failed_by_status"].get(r.status, 0) + 1
                out["unclear_failures"] += r.status in UNCLEAR or not r.error
                continue
            out["completed"] += 1
            twin = twins.get(r.index)
            if twin is None or not twin.ok:
                out["unverified"] += 1
            elif r.reply_ids == twin.reply_ids:
                out["identical"] += 1
            else:
                out["differ"] += 1
                if len(out["differ_requests"]) < 20:
                    out["differ_requests"].append(r.request_id)
    out["failed_by_status"] = dict(sorted(out["failed_by_status"].items()))
    return out


def format_tokens(t: dict) -> str:
    failed = ", ".join(f"{k} {v}" for k, v in t["failed_by_status"].items()) or "none"
    return (f"chaos tokens vs a fault-free run: {t['identical']} of {t['completed']} completed identical, "
            f"{t['differ']} differ, {t['unverified']} unverified; failed {t['failed']} ({failed}; "
            f"{t['unclear_failures']} without a clear status)")
