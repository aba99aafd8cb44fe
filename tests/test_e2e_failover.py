"""End to end: a decode worker dies mid-stream and the client still gets the whole answer.

The cluster is assembled from the individual roles (``dsv32-serve router``,
``prefill``, ``decode`` with flags and ``DSV32_*`` environment variables, as
a deployment would run them) around the session's redis-server. The decode
worker serving a long greedy generation is killed with SIGKILL after a few
tokens; the router retries on the other decode worker, prefilling prompt +
tokens already streamed, and the concatenated stream must equal the offline
``LLM``'s output: nothing repeated, nothing lost.
"""

from __future__ import annotations

import os
import signal

import pytest

from dsv32_router.client import stream_responses
from roles import roles as start_roles

pytestmark = pytest.mark.slow

PROMPT = list(range(2000, 2090))
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def roles(tiny_model, redis_server, tmp_path_factory):
    def oracle():
        from dsv32_engine import LLM, SamplingParams

        [out] = LLM(model=tiny_model).generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                                         ignore_eos=True))
        return out.outputs[0].token_ids

    specs = [("prefill", ["--worker-id", "fo-p0"]), ("decode", ["--worker-id", "fo-d0"]),
             ("decode", ["--worker-id", "fo-d1"])]
    with start_roles(tiny_model, redis_server, 4, "fo:", tmp_path_factory.mktemp("failover-logs"), specs, 3,
                     before_ready=oracle) as cluster:
        yield cluster


def test_decode_worker_killed_mid_stream_the_answer_is_still_complete(roles):
    target, state, expected = roles
    tokens, victim = [], None
    for msg in stream_responses(target, PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                request_id="failover-1", timeout=120):
        if victim is None:
            victim = next(w for w in state.workers("decode") if w.worker_id == msg.decode_worker)
        tokens += msg.token_ids
        if len(tokens) >= 5 and victim.pid:
            os.kill(victim.pid, signal.SIGKILL)  # mid-stream
            victim.pid = 0
    assert tokens == expected, "a retry must neither repeat nor lose tokens"
    rec = state.request("failover-1")
    assert rec["state"] == "finished" and int(rec["attempts"]) == 2
    assert rec["decode_worker"] != victim.worker_id and victim.worker_id in rec["error"]
