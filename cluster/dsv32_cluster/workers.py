"""The worker registry: one hash per worker and an index of their ids.

The keys and their contents are documented with the rest of the schema in
:mod:`dsv32_cluster.state`; this module holds the registration record
(:class:`WorkerInfo`) and builds the registry's Redis commands, which
:class:`~dsv32_cluster.state.ClusterState` and its async twin execute.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field, fields

ROLES = ("prefill", "decode", "colocated")
DEFAULT_PAGE_SIZE = 64
"""Tokens per cache page when a registration does not say (one built by hand, or
from a worker older than the field). Equal to the engine's
``dsv32_kernels.layout.PAGE_SIZE`` (a test checks it); a worker registers the page
size of its own cache layout."""


@dataclass
class WorkerInfo:
    """A worker's registration and latest load report (one Redis hash)."""

    worker_id: str
    role: str
    """``prefill``, ``decode`` or ``colocated`` (prefill and decode in one process)."""
    endpoint: str
    """gRPC host:port of the worker service."""
    transfer_endpoint: str = ""
    """Decode workers: host:port of the KV receiver (its TCPStore); empty for the others."""
    model: str = ""
    page_size: int = DEFAULT_PAGE_SIZE
    """Tokens per page of the worker's cache pool: the unit of every page count below."""
    ep_group: str = ""
    """Expert parallelism: the id of the EP group this rank belongs to (empty: no EP). Each rank of a
    group registers as its own target (its own requests, pages and KV endpoint)."""
    ep_rank: int = 0
    ep_size: int = 1
    """Ranks in the group. A group with a rank missing from the registry is broken as a whole: its
    collectives fail, so routers skip every rank of it (:func:`complete_groups`)."""
    weight_bytes: int = 0
    """Resident weight bytes of this worker (an EP rank: its share of the routed experts + the rest)."""
    cache_salt: str = ""
    """Root of this worker's prefix-cache keys (:mod:`dsv32_text.prefix_hash`; model, numerics, dtype, page
    size); empty: no prefix cache. The keys it holds are the set ``{prefix}worker:{id}:kv``."""
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)
    updated_at: float = 0.0
    free_pages: int = 0
    total_pages: int = 0
    reserved_pages: int = 0
    running: int = 0
    queued_requests: int = 0
    queued_tokens: int = 0
    auth: str = ""
    """HMAC of id, role and endpoints under the cluster's internal token (:mod:`.auth`); routers of a
    cluster with a token use only workers whose signature verifies."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.ep_size < 1 or not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank {self.ep_rank} is outside an EP group of size {self.ep_size}")

    def pages_for(self, num_tokens: int) -> int:
        """Pages of this worker's pool that ``num_tokens`` tokens occupy."""
        return -(-num_tokens // self.page_size)

    def to_redis(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_redis(cls, h: dict[str, str]) -> WorkerInfo:
        cast = {"int": lambda v: int(float(v)), "float": float}
        return cls(**{f.name: cast.get(f.type, str)(h[f.name]) for f in fields(cls) if f.name in h})


def complete_groups(workers: list[WorkerInfo]) -> list[WorkerInfo]:
    """The workers whose EP group has every rank registered (workers without EP always)."""
    seen: dict[str, set[int]] = {}
    for w in workers:
        if w.ep_group:
            seen.setdefault(w.ep_group, set()).add(w.ep_rank)
    return [w for w in workers if not w.ep_group or len(seen[w.ep_group]) == w.ep_size]


def heartbeat_pipe(client, keys, info: WorkerInfo, ttl_ms: int):
    """Register or refresh ``info``: rewrite its hash, renew its TTL, index its id."""
    info.updated_at = time.time()
    key = keys.worker(info.worker_id)
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, mapping=info.to_redis())
    pipe.pexpire(key, ttl_ms)
    pipe.zadd(keys.workers, {info.worker_id: info.started_at})
    return pipe


def deregister_pipe(client, keys, worker_id: str):
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.worker(worker_id))
    pipe.delete(keys.worker_kv(worker_id))
    pipe.zrem(keys.workers, worker_id)
    return pipe


def hashes_pipe(client, keys, ids: list[str]):
    pipe = client.pipeline(transaction=False)
    for wid in ids:
        pipe.hgetall(keys.worker(wid))
    return pipe


def parse_workers(ids: list[str], hashes: list[dict], role: str | None) -> tuple[list[WorkerInfo], list[str]]:
    """The live registrations (of ``role`` if given) and the ids whose hash has expired."""
    alive, dead = [], []
    for wid, h in zip(ids, hashes):
        if not h:
            dead.append(wid)
        else:
            info = WorkerInfo.from_redis(h)
            if role is None or info.role == role:
                alive.append(info)
    return alive, dead


def cache_keys_pipe(client, keys, worker_id: str, added, removed, ttl_ms: int, full: list[str] | None = None):
    """Update the set of prefix-cache keys a worker holds (``full``: rewrite it whole); ends with SCARD, so
    the caller can tell a set that drifted (lost to a Redis restart) and rewrite it."""
    key = keys.worker_kv(worker_id)
    pipe = client.pipeline(transaction=True)
    if full is not None:
        pipe.delete(key)
        added, removed = full, ()
    if added:
        pipe.sadd(key, *added)
    if removed:
        pipe.srem(key, *removed)
    pipe.pexpire(key, ttl_ms)
    pipe.scard(key)
    return pipe


def cached_prefix_pipe(client, keys, worker_ids: list[str], page_keys: dict[str, list[str]]):
    """For each worker, which of its prompt page keys it holds (SMISMEMBER; the longest leading run counts)."""
    pipe = client.pipeline(transaction=False)
    for wid in worker_ids:
        pipe.smismember(keys.worker_kv(wid), page_keys[wid])
    return pipe


def leading_hits(flags: list) -> int:
    n = 0
    for f in flags:
        if not int(f):
            break
        n += 1
    return n
