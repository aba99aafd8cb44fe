"""Sessions: a conversation's decode-worker affinity and per-turn totals.

The keys are documented with the rest of the schema in
:mod:`dsv32_cluster.state`. The router reads a session before choosing a decode
worker and records a turn when a request finishes.
"""

from __future__ import annotations

import time

DEFAULT_SESSION_TTL_S = 3600


def turn_pipe(client, keys, session_id: str, request_id: str, decode_worker: str, prompt_tokens: int,
              completion_tokens: int, session_ttl_s: int):
    """One finished turn: affinity to ``decode_worker``, totals, the turn list; renews the TTL."""
    now = time.time()
    key, turns = keys.session(session_id), keys.session_turns(session_id)
    pipe = client.pipeline(transaction=True)
    pipe.hsetnx(key, "created_at", repr(now))
    pipe.hset(key, mapping={"decode_worker": decode_worker, "last_request_id": request_id, "updated_at": repr(now)})
    pipe.hincrby(key, "turns", 1)
    pipe.hincrby(key, "prompt_tokens", prompt_tokens)
    pipe.hincrby(key, "completion_tokens", completion_tokens)
    pipe.rpush(turns, request_id)
    pipe.expire(key, session_ttl_s)
    pipe.expire(turns, session_ttl_s)
    return pipe
