"""Cluster state in Redis: worker registry, request records, sessions.

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
                                           ``started_at``, ``updated_at`` and the load report:
                                           ``free_pages``, ``total_pages``, ``reserved_pages``,
                                           ``running``, ``queued_requests``, ``queued_tokens``.
                                           Rewritten by every heartbeat; EXPIRE = heartbeat
                                           TTL (default 5 s), so a dead worker vanishes.
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
liveness key and periodically reaps the active records of routers whose key
has expired (``error`` = "router ... went away"), so a router crash never
leaves a request open silently.

A worker failure or a checksum mismatch sends the record from any in-progress
state back to ``queued`` with ``attempts`` incremented (the router retries on
another pair). Transitions are checked atomically in Redis (a Lua script), so
a late writer can never move a terminal record.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import redis
import redis.asyncio

DEFAULT_PREFIX = "dsv32:"
DEFAULT_HEARTBEAT_TTL_S = 5.0
DEFAULT_RECORD_TTL_S = 24 * 3600
DEFAULT_SESSION_TTL_S = 3600
DEFAULT_ROUTER_TTL_S = 10.0
MAX_RECORDS_INDEXED = 100_000

ROLES = ("prefill", "decode", "colocated")
TERMINAL_STATES = ("finished", "failed", "cancelled")
STATES = ("queued", "prefilling", "transferring", "decoding", *TERMINAL_STATES)
_IN_PROGRESS = ("queued", "prefilling", "transferring", "decoding")
# new state -> states it may be entered from
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("prefilling", "transferring", "decoding"),  # a retry
    "prefilling": ("queued",),
    "transferring": ("prefilling",),
    "decoding": ("transferring", "prefilling"),  # from prefilling: a colocated worker
    "finished": ("decoding",),
    "failed": _IN_PROGRESS,
    "cancelled": _IN_PROGRESS,
}

# KEYS[1] = record, KEYS[2] = active set; ARGV = new state, allowed-from (space
# separated), now, ttl, request id, terminal (1/0), then field/value pairs.
# Returns {1, old} on success, {0, old or ""} otherwise.
_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
if not string.find(' ' .. ARGV[2] .. ' ', ' ' .. cur .. ' ', 1, true) then return {0, cur} end
redis.call('HSET', KEYS[1], 'state', ARGV[1], ARGV[1] .. '_at', ARGV[3], 'updated_at', ARGV[3])
if ARGV[1] == 'queued' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[6] == '1' then redis.call('SREM', KEYS[2], ARGV[5]) end
return {1, cur}
"""


# KEYS[1] = record, KEYS[2] = index, KEYS[3] = active set; ARGV = now, ttl, request id, max indexed, then
# field/value pairs. Returns 0 if the record exists already (ids are unique), else 1.
_CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'created_at', ARGV[1], 'queued_at', ARGV[1],
           'updated_at', ARGV[1], 'attempts', 1)
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[4]) - 1)
return 1
"""


class InvalidTransition(RuntimeError):
    """A record was not in a state from which the requested one can be entered."""

    def __init__(self, request_id: str, current: str, new: str):
        self.request_id, self.current, self.new = request_id, current, new
        super().__init__(f"request {request_id}: cannot go from {current or 'missing'!r} to {new!r}")


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

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    def to_redis(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_redis(cls, h: dict[str, str]) -> WorkerInfo:
        cast = {"int": lambda v: int(float(v)), "float": float}
        return cls(**{f.name: cast.get(f.type, str)(h[f.name]) for f in fields(cls) if f.name in h})


class Keys:
    """The key schema of the module docstring, in one place."""

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        self.prefix = prefix
        self.workers = f"{prefix}workers"
        self.requests = f"{prefix}requests"
        self.active = f"{prefix}requests:active"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def router(self, router_id: str) -> str:
        return f"{self.prefix}router:{router_id}"

    def request(self, request_id: str) -> str:
        return f"{self.prefix}request:{request_id}"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def session_turns(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}:turns"


def _mapping(d: dict[str, Any]) -> dict[str, str]:
    return {k: ("" if v is None else str(v)) for k, v in d.items()}


class _StateBase:
    """Builds the commands; the sync and async subclasses only execute them."""

    def __init__(self, client, prefix: str = DEFAULT_PREFIX, *, heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S,
                 record_ttl_s: int = DEFAULT_RECORD_TTL_S, session_ttl_s: int = DEFAULT_SESSION_TTL_S):
        self.client = client
        self.keys = Keys(prefix)
        self.heartbeat_ttl_ms = max(1, int(heartbeat_ttl_s * 1000))
        self.record_ttl_s = int(record_ttl_s)
        self.session_ttl_s = int(session_ttl_s)
        self._transition = client.register_script(_TRANSITION_LUA)
        self._create = client.register_script(_CREATE_LUA)

    # -- workers --------------------------------------------------------------
    def _heartbeat_pipe(self, info: WorkerInfo):
        info.updated_at = time.time()
        key = self.keys.worker(info.worker_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping=info.to_redis())
        pipe.pexpire(key, self.heartbeat_ttl_ms)
        pipe.zadd(self.keys.workers, {info.worker_id: info.started_at})
        return pipe

    def _deregister_pipe(self, worker_id: str):
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.worker(worker_id))
        pipe.zrem(self.keys.workers, worker_id)
        return pipe

    def _workers_pipe(self, ids: list[str]):
        pipe = self.client.pipeline(transaction=False)
        for wid in ids:
            pipe.hgetall(self.keys.worker(wid))
        return pipe

    @staticmethod
    def _parse_workers(ids: list[str], hashes: list[dict], role: str | None) -> tuple[list[WorkerInfo], list[str]]:
        alive, dead = [], []
        for wid, h in zip(ids, hashes):
            if not h:
                dead.append(wid)
            else:
                info = WorkerInfo.from_redis(h)
                if role is None or info.role == role:
                    alive.append(info)
        return alive, dead

    # -- request records ------------------------------------------------------
    def _create_args(self, request_id: str, extra: dict[str, Any]) -> dict[str, list[str]]:
        args = [repr(time.time()), str(self.record_ttl_s), request_id, str(MAX_RECORDS_INDEXED)]
        for k, v in _mapping(extra).items():
            args += [k, v]
        return {"keys": [self.keys.request(request_id), self.keys.requests, self.keys.active], "args": args}

    def _transition_call(self, request_id: str, new_state: str, extra: dict[str, Any]) -> dict[str, list[str]]:
        if new_state not in TRANSITIONS:
            raise ValueError(f"unknown request state {new_state!r}; states: {STATES}")
        args = [new_state, " ".join(TRANSITIONS[new_state]), repr(time.time()), str(self.record_ttl_s), request_id,
                "1" if new_state in TERMINAL_STATES else "0"]
        for k, v in _mapping(extra).items():
            args += [k, v]
        return {"keys": [self.keys.request(request_id), self.keys.active], "args": args}

    def _router_args(self, router_id: str, ttl_s: float) -> tuple[str, str, int]:
        return self.keys.router(router_id), repr(time.time()), max(1, int(ttl_s * 1000))

    def _orphans_pipe(self, ids: list[str]):
        pipe = self.client.pipeline(transaction=False)
        for rid in ids:
            pipe.hmget(self.keys.request(rid), "router", "state")
        return pipe

    # -- sessions -------------------------------------------------------------
    def _turn_pipe(self, session_id: str, request_id: str, decode_worker: str, prompt_tokens: int,
                   completion_tokens: int):
        now = time.time()
        key, turns = self.keys.session(session_id), self.keys.session_turns(session_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(key, "created_at", repr(now))
        pipe.hset(key, mapping=_mapping({"decode_worker": decode_worker, "last_request_id": request_id,
                                         "updated_at": now}))
        pipe.hincrby(key, "turns", 1)
        pipe.hincrby(key, "prompt_tokens", prompt_tokens)
        pipe.hincrby(key, "completion_tokens", completion_tokens)
        pipe.rpush(turns, request_id)
        pipe.expire(key, self.session_ttl_s)
        pipe.expire(turns, self.session_ttl_s)
        return pipe


class ClusterState(_StateBase):
    """Synchronous access (workers' heartbeat threads, tools, tests)."""

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX, **kw) -> ClusterState:
        return cls(redis.Redis.from_url(url, decode_responses=True), prefix, **kw)

    def ping(self) -> bool:
        return bool(self.client.ping())

    def heartbeat(self, info: WorkerInfo) -> None:
        """Register or refresh a worker (idempotent: survives a Redis restart)."""
        self._heartbeat_pipe(info).execute()

    register = heartbeat

    def deregister(self, worker_id: str) -> None:
        self._deregister_pipe(worker_id).execute()

    def workers(self, role: str | None = None) -> list[WorkerInfo]:
        ids = self.client.zrange(self.keys.workers, 0, -1)
        alive, dead = self._parse_workers(ids, self._workers_pipe(ids).execute(), role)
        if dead:
            self.client.zrem(self.keys.workers, *dead)
        return alive

    def create_request(self, request_id: str, **extra: Any) -> bool:
        """Open a ``queued`` record; False if one with this id exists already."""
        return bool(self._create(**self._create_args(request_id, extra)))

    def transition(self, request_id: str, new_state: str, **extra: Any) -> str:
        """Move a record to ``new_state``; returns the previous state."""
        ok, old = self._transition(**self._transition_call(request_id, new_state, extra))
        if not ok:
            raise InvalidTransition(request_id, old, new_state)
        return old

    def request(self, request_id: str) -> dict[str, str]:
        return self.client.hgetall(self.keys.request(request_id))

    def active_requests(self) -> set[str]:
        return self.client.smembers(self.keys.active)

    def router_alive(self, router_id: str, ttl_s: float = DEFAULT_ROUTER_TTL_S) -> None:
        key, now, ttl_ms = self._router_args(router_id, ttl_s)
        self.client.set(key, now, px=ttl_ms)

    def reap_orphans(self) -> list[str]:
        """Fail the open records whose router is gone (see the module docstring)."""
        ids = sorted(self.client.smembers(self.keys.active))
        rows = self._orphans_pipe(ids).execute()
        alive = {r for r in {r for r, _ in rows if r} if self.client.exists(self.keys.router(r))}
        reaped = []
        for rid, (router, state) in zip(ids, rows):
            if state is None or state in TERMINAL_STATES:
                self.client.srem(self.keys.active, rid)
            elif router not in alive:
                try:
                    self.transition(rid, "failed", error=f"router {router} went away")
                    reaped.append(rid)
                except InvalidTransition:
                    pass
        return reaped

    def recent_requests(self, n: int = 100) -> list[str]:
        return self.client.zrange(self.keys.requests, -n, -1)

    def session(self, session_id: str) -> dict[str, str]:
        return self.client.hgetall(self.keys.session(session_id))

    def session_turns(self, session_id: str) -> list[str]:
        return self.client.lrange(self.keys.session_turns(session_id), 0, -1)

    def record_turn(self, session_id: str, request_id: str, decode_worker: str, prompt_tokens: int,
                    completion_tokens: int) -> None:
        self._turn_pipe(session_id, request_id, decode_worker, prompt_tokens, completion_tokens).execute()


class AsyncClusterState(_StateBase):
    """The same operations for the router's event loop."""

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX, **kw) -> AsyncClusterState:
        return cls(redis.asyncio.Redis.from_url(url, decode_responses=True), prefix, **kw)

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def heartbeat(self, info: WorkerInfo) -> None:
        await self._heartbeat_pipe(info).execute()

    register = heartbeat

    async def deregister(self, worker_id: str) -> None:
        await self._deregister_pipe(worker_id).execute()

    async def workers(self, role: str | None = None) -> list[WorkerInfo]:
        ids = await self.client.zrange(self.keys.workers, 0, -1)
        alive, dead = self._parse_workers(ids, await self._workers_pipe(ids).execute(), role)
        if dead:
            await self.client.zrem(self.keys.workers, *dead)
        return alive

    async def create_request(self, request_id: str, **extra: Any) -> bool:
        return bool(await self._create(**self._create_args(request_id, extra)))

    async def transition(self, request_id: str, new_state: str, **extra: Any) -> str:
        ok, old = await self._transition(**self._transition_call(request_id, new_state, extra))
        if not ok:
            raise InvalidTransition(request_id, old, new_state)
        return old

    async def router_alive(self, router_id: str, ttl_s: float = DEFAULT_ROUTER_TTL_S) -> None:
        key, now, ttl_ms = self._router_args(router_id, ttl_s)
        await self.client.set(key, now, px=ttl_ms)

    async def reap_orphans(self) -> list[str]:
        ids = sorted(await self.client.smembers(self.keys.active))
        rows = await self._orphans_pipe(ids).execute()
        routers = sorted({r for r, _ in rows if r})
        pipe = self.client.pipeline(transaction=False)
        for r in routers:
            pipe.exists(self.keys.router(r))
        alive = {r for r, n in zip(routers, await pipe.execute()) if n}
        reaped = []
        for rid, (router, state) in zip(ids, rows):
            if state is None or state in TERMINAL_STATES:
                await self.client.srem(self.keys.active, rid)
            elif router not in alive:
                try:
                    await self.transition(rid, "failed", error=f"router {router} went away")
                    reaped.append(rid)
                except InvalidTransition:
                    pass
        return reaped

    async def request(self, request_id: str) -> dict[str, str]:
        return await self.client.hgetall(self.keys.request(request_id))

    async def session(self, session_id: str) -> dict[str, str]:
        return await self.client.hgetall(self.keys.session(session_id))

    async def record_turn(self, session_id: str, request_id: str, decode_worker: str, prompt_tokens: int,
                          completion_tokens: int) -> None:
        await self._turn_pipe(session_id, request_id, decode_worker, prompt_tokens, completion_tokens).execute()

    async def aclose(self) -> None:
        await self.client.aclose()
