"""Cluster state in Redis: worker registry, request records, sessions.

This module holds the key schema (below, the one description of it) and the
clients that execute the commands; the commands of each noun are built in
:mod:`.workers` (registry), :mod:`.records` (request records and router
liveness) and :mod:`.sessions`, whose names are re-exported here.

Redis is the one shared state of a cluster; routers are stateless and workers
find nothing but Redis and each other's advertised endpoints. All keys start
with a configurable prefix (default ``dsv32:``), so several clusters can share
one Redis.

Key schema
----------

=================================  ======  ==================================================
key                                type    contents
=================================  ======  ==================================================
``{prefix}workers``                ZSET    member: worker id; score: registration time.
                                           An index only: a worker is alive while its hash
                                           below exists (readers drop dead members).
``{prefix}worker:{worker_id}``     HASH    ``role`` (prefill | decode | colocated),
                                           ``endpoint`` (gRPC
                                           host:port), ``transfer_endpoint`` (decode: KV
                                           receiver host:port), ``model``, ``host``, ``pid``,
                                           ``started_at``, ``updated_at``, ``page_size``
                                           (tokens per page of its cache pool), ``ep_group``,
                                           ``ep_rank``, ``ep_size``, ``weight_bytes`` (expert parallelism: every
                                           rank of a group registers itself; a group missing
                                           a rank is skipped by routers) and the
                                           load report (page counts in those pages):
                                           ``free_pages``, ``total_pages``, ``reserved_pages``,
                                           ``running``, ``queued_requests``, ``queued_tokens``.
                                           Rewritten by every heartbeat; EXPIRE = heartbeat
                                           TTL (default 5 s), so a dead worker vanishes.
``{prefix}worker:{worker_id}:kv`` SET    the prefix-cache keys (:mod:`dsv32_text.prefix_hash`)
                                           of the pages the worker holds, updated each heartbeat
                                           from its cache's publish/evict events (rewritten
                                           whole if it drifted); same TTL as the hash. The
                                           router asks it how much of a prompt each worker has.
``{prefix}request:{request_id}``   HASH    ``state`` (see below), ``created_at``, one
                                           ``{state}_at`` timestamp per state reached,
                                           ``updated_at``, ``router``, ``prefill_worker``,
                                           ``decode_worker``, ``attempts``, ``session_id``,
                                           ``prompt_tokens``, ``completion_tokens``,
                                           ``finish_reason``, ``error``. EXPIRE = record TTL
                                           (default 1 day).
``{prefix}requests``               ZSET    member: request id; score: creation time. Index
                                           of recent records (trimmed to the newest 100 000).
``{prefix}requests:active``        SET     request ids whose record is not terminal yet.
``{prefix}router:{router_id}``     STRING  a router's liveness (Unix time of its last beat);
                                           PX = router TTL (default 10 s).
``{prefix}session:{session_id}``   HASH    ``decode_worker`` (affinity), ``turns``,
                                           ``prompt_tokens``, ``completion_tokens`` (totals),
                                           ``last_request_id``, ``created_at``,
                                           ``updated_at``. EXPIRE = session TTL (default 1 h),
                                           renewed by each turn.
``{prefix}session:{session_id}:turns`` LIST  request ids of the turns, oldest first; same TTL.
=================================  ======  ==================================================

Times are Unix seconds as decimal strings; counters are integers as strings.

Request state machine
---------------------

``queued → prefilling → transferring → decoding → finished | failed | cancelled``

* ``queued``: the router accepted the request and is choosing a pair;
* ``prefilling``: the decode worker reserved pages and the prefill worker runs
  the prompt, pushing each layer's KV as it is done;
* ``transferring``: the prefill worker has sent everything; the decode worker
  verifies the checksum;
* ``decoding``: admitted to the decode worker's running batch, tokens stream;
* ``finished`` / ``failed`` / ``cancelled`` are terminal (cancelled covers
  client cancellation and deadline expiry).

A colocated worker (``dsv32-serve up --colocated``) runs the prompt and the
decode in one process, so its requests skip ``transferring``:
``queued → prefilling`` (the worker committed capacity and runs the prompt,
chunked into its decode batches; ``prefill_worker`` = ``decode_worker``)
``→ decoding`` (its first token has arrived) ``→ finished``.

Records outlive their router only as ``failed``: every router beats its
liveness key and every 10 s reaps the active records (``requests:active``)
whose router's key has expired (``error`` = "router <id> gone") or that have
not been updated for ``stale_after_s`` (default 2 × the router's 600 s worker
timeout; ``error`` = "stale for N s"), so neither a router crash nor a record
its live router lost track of leaves a request open. The check and the write
are one script (a record that finished meanwhile is left alone; routers that
reap at once fail a record once).

A worker failure or a checksum mismatch sends the record from any in-progress
state back to ``queued`` with ``attempts`` incremented (the router retries on
another pair). Transitions are checked atomically in Redis (a Lua script), so
a late writer can never move a terminal record.
"""

from __future__ import annotations

import time
from typing import Any

import redis
import redis.asyncio

from .records import (CREATE_LUA, DEFAULT_RECORD_TTL_S, DEFAULT_ROUTER_TTL_S, DEFAULT_STALE_AFTER_S,
                      MAX_RECORDS_INDEXED, REAP_LUA, STATES, TERMINAL_STATES, TRANSITION_LUA, TRANSITIONS,
                      InvalidTransition, create_args, orphans_pipe, reap_args, reap_candidates, router_alive_args,
                      transition_args)
from .sessions import DEFAULT_SESSION_TTL_S, turn_pipe
from .workers import (DEFAULT_PAGE_SIZE, ROLES, WorkerInfo, cache_keys_pipe, cached_prefix_pipe, deregister_pipe,
                      hashes_pipe, heartbeat_pipe, leading_hits, parse_workers)

__all__ = ["DEFAULT_PREFIX", "DEFAULT_HEARTBEAT_TTL_S", "DEFAULT_RECORD_TTL_S", "DEFAULT_SESSION_TTL_S",
           "DEFAULT_ROUTER_TTL_S", "DEFAULT_STALE_AFTER_S", "DEFAULT_PAGE_SIZE", "MAX_RECORDS_INDEXED", "ROLES",
           "STATES", "TERMINAL_STATES", "TRANSITIONS", "InvalidTransition", "WorkerInfo", "Keys", "ClusterState",
           "AsyncClusterState"]

DEFAULT_PREFIX = "dsv32:"
DEFAULT_HEARTBEAT_TTL_S = 5.0


class Keys:
    """The key schema of the module docstring, in one place."""

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        self.prefix = prefix
        self.workers = f"{prefix}workers"
        self.requests = f"{prefix}requests"
        self.active = f"{prefix}requests:active"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def worker_kv(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}:kv"

    def router(self, router_id: str) -> str:
        return f"{self.prefix}router:{router_id}"

    def request(self, request_id: str) -> str:
        return f"{self.prefix}request:{request_id}"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def session_turns(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}:turns"


class _StateBase:
    """Keys, TTLs and scripts; the sync and async subclasses execute the commands
    that :mod:`.workers`, :mod:`.records` and :mod:`.sessions` build."""

    def __init__(self, client, prefix: str = DEFAULT_PREFIX, *, heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S,
                 record_ttl_s: int = DEFAULT_RECORD_TTL_S, session_ttl_s: int = DEFAULT_SESSION_TTL_S):
        self.client = client
        self.keys = Keys(prefix)
        self.heartbeat_ttl_ms = max(1, int(heartbeat_ttl_s * 1000))
        self.record_ttl_s = int(record_ttl_s)
        self.session_ttl_s = int(session_ttl_s)
        self._transition = client.register_script(TRANSITION_LUA)
        self._create = client.register_script(CREATE_LUA)
        self._reap = client.register_script(REAP_LUA)

    def _turn(self, session_id: str, request_id: str, decode_worker: str, prompt_tokens: int,
              completion_tokens: int):
        return turn_pipe(self.client, self.keys, session_id, request_id, decode_worker, prompt_tokens,
                         completion_tokens, self.session_ttl_s)


class ClusterState(_StateBase):
    """Synchronous access (workers' heartbeat threads, tools, tests)."""

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX, **kw) -> ClusterState:
        return cls(redis.Redis.from_url(url, decode_responses=True), prefix, **kw)

    def ping(self) -> bool:
        return bool(self.client.ping())

    # -- workers --------------------------------------------------------------
    def heartbeat(self, info: WorkerInfo) -> None:
        """Register or refresh a worker (idempotent: survives a Redis restart)."""
        heartbeat_pipe(self.client, self.keys, info, self.heartbeat_ttl_ms).execute()

    register = heartbeat

    def deregister(self, worker_id: str) -> None:
        deregister_pipe(self.client, self.keys, worker_id).execute()

    def publish_cache_keys(self, worker_id: str, added, removed, full: list[str] | None = None) -> int:
        """Apply a worker's prefix-cache events to its key set; returns the set's size after."""
        return int(cache_keys_pipe(self.client, self.keys, worker_id, added, removed, self.heartbeat_ttl_ms,
                                   full).execute()[-1])

    def workers(self, role: str | None = None) -> list[WorkerInfo]:
        ids = self.client.zrange(self.keys.workers, 0, -1)
        alive, dead = parse_workers(ids, hashes_pipe(self.client, self.keys, ids).execute(), role)
        if dead:
            self.client.zrem(self.keys.workers, *dead)
        return alive

    # -- request records ------------------------------------------------------
    def create_request(self, request_id: str, **extra: Any) -> bool:
        """Open a ``queued`` record; False if one with this id exists already."""
        return bool(self._create(**create_args(self.keys, request_id, self.record_ttl_s, extra)))

    def transition(self, request_id: str, new_state: str, **extra: Any) -> str:
        """Move a record to ``new_state``; returns the previous state."""
        ok, old = self._transition(**transition_args(self.keys, request_id, new_state, self.record_ttl_s, extra))
        if not ok:
            raise InvalidTransition(request_id, old, new_state)
        return old

    def request(self, request_id: str) -> dict[str, str]:
        return self.client.hgetall(self.keys.request(request_id))

    def active_requests(self) -> set[str]:
        return self.client.smembers(self.keys.active)

    def recent_requests(self, n: int = 100) -> list[str]:
        return self.client.zrange(self.keys.requests, -n, -1)

    def router_alive(self, router_id: str, ttl_s: float = DEFAULT_ROUTER_TTL_S) -> None:
        key, now, ttl_ms = router_alive_args(self.keys, router_id, ttl_s)
        self.client.set(key, now, px=ttl_ms)

    def reap_orphans(self, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[str]:
        """Fail the open records whose router is gone or that are stale (see the module docstring)."""
        ids = sorted(self.client.smembers(self.keys.active))
        rows = orphans_pipe(self.client, self.keys, ids).execute()
        alive = {r for r in {r for r, _, _ in rows if r} if self.client.exists(self.keys.router(r))}
        drop, candidates = reap_candidates(ids, rows, alive, time.time(), stale_after_s)
        if drop:
            self.client.srem(self.keys.active, *drop)
        return [rid for rid, router in candidates
                if self._reap(**reap_args(self.keys, rid, router, stale_after_s, self.record_ttl_s))]

    # -- sessions -------------------------------------------------------------
    def session(self, session_id: str) -> dict[str, str]:
        return self.client.hgetall(self.keys.session(session_id))

    def session_turns(self, session_id: str) -> list[str]:
        return self.client.lrange(self.keys.session_turns(session_id), 0, -1)

    def record_turn(self, session_id: str, request_id: str, decode_worker: str, prompt_tokens: int,
                    completion_tokens: int) -> None:
        self._turn(session_id, request_id, decode_worker, prompt_tokens, completion_tokens).execute()


class AsyncClusterState(_StateBase):
    """The same operations for the router's event loop."""

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX, *, max_connections: int | None = None,
                 pool_timeout_s: float = 20.0, **kw) -> AsyncClusterState:
        """``max_connections``: a blocking pool of that size (a burst waits up to ``pool_timeout_s`` for a
        connection instead of failing with "Too many connections"); size it to the requests in flight."""
        if max_connections is None:
            return cls(redis.asyncio.Redis.from_url(url, decode_responses=True), prefix, **kw)
        pool = redis.asyncio.BlockingConnectionPool.from_url(url, decode_responses=True,
                                                             max_connections=max_connections, timeout=pool_timeout_s)
        return cls(redis.asyncio.Redis.from_pool(pool), prefix, **kw)  # from_pool: aclose() closes the pool

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    # -- workers --------------------------------------------------------------
    async def heartbeat(self, info: WorkerInfo) -> None:
        await heartbeat_pipe(self.client, self.keys, info, self.heartbeat_ttl_ms).execute()

    register = heartbeat

    async def deregister(self, worker_id: str) -> None:
        await deregister_pipe(self.client, self.keys, worker_id).execute()

    async def cached_prefix_tokens(self, workers: list[WorkerInfo], prompt_ids: list[int]) -> dict[str, int]:
        """Per worker (with a prefix cache): how many leading prompt tokens it holds, in whole pages."""
        from dsv32_text.prefix_hash import page_hashes

        ws = [w for w in workers if w.cache_salt]
        if not ws:
            return {}
        memo: dict[tuple[str, int], list[str]] = {}
        page_keys = {}
        for w in ws:  # workers of one model share salt and page size: the keys are computed once
            k = (w.cache_salt, w.page_size)
            if k not in memo:
                memo[k] = page_hashes(prompt_ids[:len(prompt_ids) - 1], w.page_size, w.cache_salt)
            page_keys[w.worker_id] = memo[k]
        ids = [w.worker_id for w in ws if page_keys[w.worker_id]]
        if not ids:
            return {w.worker_id: 0 for w in ws}
        flags = await cached_prefix_pipe(self.client, self.keys, ids, page_keys).execute()
        out = {w.worker_id: 0 for w in ws}
        for w, f in zip((w for w in ws if page_keys[w.worker_id]), flags):
            out[w.worker_id] = leading_hits(f) * w.page_size
        return out

    async def workers(self, role: str | None = None) -> list[WorkerInfo]:
        ids = await self.client.zrange(self.keys.workers, 0, -1)
        alive, dead = parse_workers(ids, await hashes_pipe(self.client, self.keys, ids).execute(), role)
        if dead:
            await self.client.zrem(self.keys.workers, *dead)
        return alive

    # -- request records ------------------------------------------------------
    async def create_request(self, request_id: str, **extra: Any) -> bool:
        return bool(await self._create(**create_args(self.keys, request_id, self.record_ttl_s, extra)))

    async def transition(self, request_id: str, new_state: str, **extra: Any) -> str:
        ok, old = await self._transition(**transition_args(self.keys, request_id, new_state, self.record_ttl_s,
                                                           extra))
        if not ok:
            raise InvalidTransition(request_id, old, new_state)
        return old

    async def request(self, request_id: str) -> dict[str, str]:
        return await self.client.hgetall(self.keys.request(request_id))

    async def router_alive(self, router_id: str, ttl_s: float = DEFAULT_ROUTER_TTL_S) -> None:
        key, now, ttl_ms = router_alive_args(self.keys, router_id, ttl_s)
        await self.client.set(key, now, px=ttl_ms)

    async def reap_orphans(self, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[str]:
        ids = sorted(await self.client.smembers(self.keys.active))
        rows = await orphans_pipe(self.client, self.keys, ids).execute()
        routers = sorted({r for r, _, _ in rows if r})
        pipe = self.client.pipeline(transaction=False)
        for r in routers:
            pipe.exists(self.keys.router(r))
        alive = {r for r, n in zip(routers, await pipe.execute()) if n}
        drop, candidates = reap_candidates(ids, rows, alive, time.time(), stale_after_s)
        if drop:
            await self.client.srem(self.keys.active, *drop)
        return [rid for rid, router in candidates
                if await self._reap(**reap_args(self.keys, rid, router, stale_after_s, self.record_ttl_s))]

    # -- sessions -------------------------------------------------------------
    async def session(self, session_id: str) -> dict[str, str]:
        return await self.client.hgetall(self.keys.session(session_id))

    async def end_session(self, session_id: str) -> bool:
        """Delete a session's record and turn list; whether it existed."""
        return bool(await self.client.delete(self.keys.session(session_id), self.keys.session_turns(session_id)))

    async def record_turn(self, session_id: str, request_id: str, decode_worker: str, prompt_tokens: int,
                          completion_tokens: int) -> None:
        await self._turn(session_id, request_id, decode_worker, prompt_tokens, completion_tokens).execute()

    async def aclose(self) -> None:
        await self.client.aclose()
