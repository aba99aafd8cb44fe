"""Worker counters around a run (``loadtest --worker-stats``): what the cluster computed and moved.

Before and after each run every registered worker is asked for its ``Stats``
(``dsv32.worker.v1``; decode and colocated workers serve it on ``DecodeWorker``,
prefill workers on ``PrefillWorker``), and the run gets the differences:

* ``prefill_tokens_computed`` — Σ ``prefill_forward_tokens`` (every role: a
  decode worker that prefills a short suffix itself counts too);
* ``kv_bytes_sent`` — Σ ``bytes_sent`` of the prefill workers: the KV moved
  (``kv_bytes_received``, Σ ``bytes_received`` of the decode workers, beside it);
* ``cached_tokens_prefill`` / ``cached_tokens_decode`` — Σ ``cached_tokens`` by
  role (prompt tokens a prefill worker found in its cache; prompt tokens a decode
  worker already held, so that they were not transferred);
* ``cached_pages`` — Σ ``cached_pages`` after the run (a gauge, not a difference).

The counters are the whole cluster's: other traffic during the run is counted
too. A worker present in one snapshot only, or whose counters went backwards (it
restarted), is named in ``notes``; a restarted worker's counters since its
restart are what is added.

The registry is read with ``redis`` directly in the key schema of
``dsv32_cluster.state`` (this package does not import the cluster runtime).
``Stats`` needs no credentials; when ``$DSV32_INTERNAL_TOKEN`` is set, it is sent
(``x-dsv32-internal``, as routers do) only to workers whose registration is
signed with it, so a registration written by someone without the secret never
receives it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc

from .client import env_secret

COUNTERS = ("prefill_forward_tokens", "bytes_sent", "bytes_received", "cached_tokens", "decode_steps",
            "requests_finished", "requests_aborted", "checksum_failures")
INTERNAL_ENV, INTERNAL_KEY = "DSV32_INTERNAL_TOKEN", "x-dsv32-internal"


def _internal_token() -> str:
    return env_secret(INTERNAL_ENV)


def signed_with(h: dict[str, str], token: str) -> bool:
    """Whether registration ``h`` carries the signature ``dsv32_cluster.auth.worker_signature`` makes."""
    msg = "\n".join(h.get(k, "") for k in ("worker_id", "role", "endpoint", "transfer_endpoint")).encode()
    want = hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()
    return hmac.compare_digest(h.get("auth", "").encode(), want.encode())


@dataclass
class WorkerStatsReader:
    redis_url: str
    prefix: str = "dsv32:"
    timeout_s: float = 5.0

    def workers(self) -> list[dict[str, str]]:
        """The live registrations (hashes of ``{prefix}worker:{id}``)."""
        import redis

        r = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=self.timeout_s)
        try:
            ids = r.zrange(f"{self.prefix}workers", 0, -1)
            pipe = r.pipeline(transaction=False)
            for wid in ids:
                pipe.hgetall(f"{self.prefix}worker:{wid}")
            return [h for h in pipe.execute() if h.get("role") and h.get("endpoint")]
        finally:
            r.close()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``{worker_id: {role, started_at, counters..., cached_pages}}``; a worker that does not answer:
        ``{role, error}``. Raises ``ValueError`` when Redis cannot be read."""
        from ._api import worker_pb2, worker_pb2_grpc

        try:
            regs = self.workers()
        except Exception as e:  # noqa: BLE001 - any Redis failure is one line for the user
            where = urlsplit(self.redis_url)  # not the URL itself: it may carry the password
            raise ValueError(f"--worker-stats: cannot read the worker registry at {where.hostname}:{where.port}: "
                             f"{type(e).__name__}: {e}") from None
        token = _internal_token()
        out: dict[str, dict[str, Any]] = {}
        for h in regs:
            wid, role = h.get("worker_id", ""), h["role"]
            meta = ((INTERNAL_KEY, token),) if token and signed_with(h, token) else None
            stub_class = worker_pb2_grpc.PrefillWorkerStub if role == "prefill" else worker_pb2_grpc.DecodeWorkerStub
            with grpc.insecure_channel(h["endpoint"]) as ch:
                try:
                    s = stub_class(ch).Stats(worker_pb2.StatsRequest(), timeout=self.timeout_s, metadata=meta)
                except grpc.RpcError as e:
                    out[wid] = {"role": role, "error": f"{e.code().name}: {e.details()}"}
                    continue
            out[wid] = {"role": role, "started_at": h.get("started_at", ""),
                        **{k: int(getattr(s, k)) for k in COUNTERS}, "cached_pages": int(s.cached_pages)}
        return out


def deltas(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's counters from two snapshots: ``{totals, workers: {id: {role, counters...}}, notes}``."""
    workers: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for wid in sorted(set(before) | set(after)):
        b, a = before.get(wid), after.get(wid)
        if a is None or "error" in a:
            notes.append(f"{wid}: no counters after the run ({a['error'] if a else 'gone from the registry'})")
            continue
        if b is None or "error" in b:
            notes.append(f"{wid}: no counters before the run (counted from its start)")
            b = {}
        elif b.get("started_at") != a.get("started_at") or any(a[k] < b[k] for k in COUNTERS):
            notes.append(f"{wid}: restarted during the run (counted from its restart)")
            b = {}
        workers[wid] = {"role": a["role"], **{k: a[k] - b.get(k, 0) for k in COUNTERS},
                        "cached_pages": a["cached_pages"]}

    def total(key: str, *roles: str) -> int:
        return sum(w[key] for w in workers.values() if not roles or w["role"] in roles)

    totals = {"workers": len(workers),
              "prefill_tokens_computed": total("prefill_forward_tokens"),
              "kv_bytes_sent": total("bytes_sent", "prefill"),
              "kv_bytes_received": total("bytes_received", "decode"),
              "cached_tokens_prefill": total("cached_tokens", "prefill"),
              "cached_tokens_decode": total("cached_tokens", "decode", "colocated"),
              "cached_pages": total("cached_pages"),
              "checksum_failures": total("checksum_failures")}
    return {"totals": totals, "workers": workers, "notes": notes}
