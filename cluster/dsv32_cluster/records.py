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


def router_alive_args(keys, router_id: str, ttl_s: float) -> tuple[str, str, int]:
    """Key, value (now) and TTL in ms of a router's liveness beat."""
    return keys.router(router_id), repr(time.time()), max(1, int(ttl_s * 1000))


def orphans_pipe(client, keys, ids: list[str]):
    """(router, state) of each record in ``ids``: what the reaper decides on."""
    pipe = client.pipeline(transaction=False)
    for rid in ids:
        pipe.hmget(keys.request(rid), "router", "state")
    return pipe
