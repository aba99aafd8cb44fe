"""Request records: the state machine and the commands that move a record along it.

The states, their order and the keys involved are documented with the rest of
the schema in :mod:`dsv32_cluster.state`. Creation and every transition are one
Lua script each, so that the check and the write are atomic and a late writer
can never move a terminal record.
"""

from __future__ import annotations

import time
from typing import Any

DEFAULT_RECORD_TTL_S = 24 * 3600
DEFAULT_ROUTER_TTL_S = 10.0
DEFAULT_STALE_AFTER_S = 2 * 600.0
"""A non-terminal record not updated for this long is failed by the reaper even though its router
lives: 2 × the router's worker timeout (600 s, the bound on one worker call without a client
deadline), so only a record its router has lost track of is that old. (A client deadline longer
than this lets one call outlive the bound: its record is then failed while the stream goes on; the
client's answer is unaffected, the late ``finished`` is refused.)"""
MAX_RECORDS_INDEXED = 100_000

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
TRANSITION_LUA = """
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
CREATE_LUA = """
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


def _pairs(extra: dict[str, Any]) -> list[str]:
    """Field/value pairs as strings; None is stored as the empty string."""
    out: list[str] = []
    for k, v in extra.items():
        out += [k, "" if v is None else str(v)]
    return out


def create_args(keys, request_id: str, record_ttl_s: int, extra: dict[str, Any]) -> dict[str, list[str]]:
    """Arguments of :data:`CREATE_LUA` opening a ``queued`` record with ``extra`` fields."""
    args = [repr(time.time()), str(record_ttl_s), request_id, str(MAX_RECORDS_INDEXED), *_pairs(extra)]
    return {"keys": [keys.request(request_id), keys.requests, keys.active], "args": args}


def transition_args(keys, request_id: str, new_state: str, record_ttl_s: int,
                    extra: dict[str, Any]) -> dict[str, list[str]]:
    """Arguments of :data:`TRANSITION_LUA` moving a record to ``new_state``."""
    if new_state not in TRANSITIONS:
        raise ValueError(f"unknown request state {new_state!r}; states: {STATES}")
    args = [new_state, " ".join(TRANSITIONS[new_state]), repr(time.time()), str(record_ttl_s), request_id,
            "1" if new_state in TERMINAL_STATES else "0", *_pairs(extra)]
    return {"keys": [keys.request(request_id), keys.active], "args": args}


# KEYS[1] = record, KEYS[2] = active set, KEYS[3] = the liveness key of the record's router; ARGV = now,
# ttl, request id, stale cutoff (a record last updated before it is stale), states it may be failed from
# (space separated). Fails the record if it is still in progress and its router is gone or it is stale,
# all in one step (a record that moved on meanwhile, or finished, is left alone; two reapers at once
# fail it once). Returns the error written, or false.
REAP_LUA = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'updated_at', 'router')
local cur = rec[1]
if not cur then redis.call('SREM', KEYS[2], ARGV[3]) return false end
if not string.find(' ' .. ARGV[5] .. ' ', ' ' .. cur .. ' ', 1, true) then return false end
local err
if redis.call('EXISTS', KEYS[3]) == 0 then
  err = 'router ' .. ((rec[3] and rec[3] ~= '') and rec[3] or '(none)') .. ' gone'
elseif (tonumber(rec[2]) or 0) < tonumber(ARGV[4]) then
  err = string.format('stale for %d s', math.floor(tonumber(ARGV[1]) - (tonumber(rec[2]) or 0)))
else
  return false
end
redis.call('HSET', KEYS[1], 'state', 'failed', 'failed_at', ARGV[1], 'updated_at', ARGV[1], 'error', err)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SREM', KEYS[2], ARGV[3])
return err
"""


def router_alive_args(keys, router_id: str, ttl_s: float) -> tuple[str, str, int]:
    """Key, value (now) and TTL in ms of a router's liveness beat."""
    return keys.router(router_id), repr(time.time()), max(1, int(ttl_s * 1000))


def orphans_pipe(client, keys, ids: list[str]):
    """(router, state, updated_at) of each record in ``ids``: what the reaper picks candidates by."""
    pipe = client.pipeline(transaction=False)
    for rid in ids:
        pipe.hmget(keys.request(rid), "router", "state", "updated_at")
    return pipe


def reap_candidates(ids: list[str], rows: list, alive: set[str], now: float,
                    stale_after_s: float) -> tuple[list[str], list[tuple[str, str]]]:
    """From :func:`orphans_pipe`'s rows: the ids to drop from the active set (record terminal or
    expired) and the (id, router) pairs to try :data:`REAP_LUA` on (router not in ``alive``, or not
    updated for ``stale_after_s``). The script decides again, atomically."""
    drop, reap = [], []
    for rid, (router, state, updated) in zip(ids, rows):
        if state is None or state in TERMINAL_STATES:
            drop.append(rid)
        elif router not in alive or now - float(updated or 0) > stale_after_s:
            reap.append((rid, router or ""))
    return drop, reap


def reap_args(keys, request_id: str, router: str, stale_after_s: float, record_ttl_s: int) -> dict[str, list[str]]:
    """Arguments of :data:`REAP_LUA`."""
    now = time.time()
    return {"keys": [keys.request(request_id), keys.active, keys.router(router)],
            "args": [repr(now), str(record_ttl_s), request_id, repr(now - stale_after_s),
                     " ".join(TRANSITIONS["failed"])]}
