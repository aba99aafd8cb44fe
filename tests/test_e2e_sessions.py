"""End to end, real processes: multi-turn sessions reuse their KV across the prefill/decode boundary.

Router + one prefill worker + two decode workers (``dsv32-serve router|prefill|decode``) around the
session's redis-server. A turn's prompt is the previous prompt + its answer + a new user message:

* turn 2 moves only the pages the decode worker lacks (its byte counters) and prefills only the tokens
  the prefill worker lacks (its token counters), with the same tokens as the offline engine;
* a short new suffix is prefilled by the decode worker itself (no transfer at all);
* the router sends the turns where the cache is, even without a session id (cache-aware routing);
* ending the session frees the pages only it used;
* with the prefill worker replaced by a fresh one between turns, the turn is recomputed and still right
  (last: it leaves the cluster with the fresh worker gone).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import grpc
import pytest

from dsv32_proto import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc
from dsv32_router.client import end_session, stream_responses
from roles import roles as start_roles

pytestmark = pytest.mark.slow

PAGE = 64
LAYERS = 4  # the tiny preset
MAX_TOKENS = 8
SP = dict(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
R = random.Random(12)
SYSTEM = [R.randrange(100, 8000) for _ in range(200)]
USERS = [[R.randrange(100, 8000) for _ in range(n)] for n in (90, 200, 10, 80)]  # turn 3: short


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server, tmp_path_factory):
    specs = [("prefill", ["--worker-id", "ss-p0"]), ("decode", ["--worker-id", "ss-d0"]),
             ("decode", ["--worker-id", "ss-d1"])]
    logs = tmp_path_factory.mktemp("sessions-logs")
    with start_roles(tiny_model, redis_server, 8, "ss:", logs, specs, 3) as (target, state, _):
        yield target, state, logs


def _stats(w) -> worker_pb2.WorkerStats:
    with grpc.insecure_channel(w.endpoint) as ch:
        stub = (worker_pb2_grpc.PrefillWorkerStub if w.role == "prefill" else worker_pb2_grpc.DecodeWorkerStub)(ch)
        return stub.Stats(worker_pb2.StatsRequest(), timeout=5)


def _all_stats(state) -> dict[str, worker_pb2.WorkerStats]:
    return {w.worker_id: _stats(w) for w in state.workers()}


def _turn(target: str, prompt: list[int], **kw) -> tuple[list[int], serving_pb2.GenerateResponse, str]:
    tokens, last, decode = [], None, ""
    for msg in stream_responses(target, prompt, timeout=120, **SP, **kw):
        tokens += msg.token_ids
        decode = decode or msg.decode_worker
        last = msg
    return tokens, last, decode


def _offline(model: str, prompts: list[list[int]]) -> list[list[int]]:
    from dsv32_engine import LLM, SamplingParams

    llm = LLM(model, prefix_caching=False)
    return [llm.generate([p], SamplingParams(**SP))[0].outputs[0].token_ids for p in prompts]


def _wait_published(state, worker_id: str, n: int, timeout: float = 5.0) -> None:
    """Workers publish their cache keys with each heartbeat (0.5 s): wait until the router can see them."""
    key = state.keys.worker_kv(worker_id)
    deadline = time.monotonic() + timeout
    while state.client.scard(key) < n and time.monotonic() < deadline:
        time.sleep(0.1)


def test_turns_reuse_the_cache_on_both_sides_and_move_only_new_pages(cluster, tiny_model):
    target, state, _ = cluster
    prompts, outs, decodes = [SYSTEM + USERS[0]], [], []
    for turn in range(3):
        before = _all_stats(state)
        out, last, d = _turn(target, prompts[-1], session_id="chat-1", request_id=f"chat-1-{turn}")
        after = _all_stats(state)
        outs.append(out)
        decodes.append(d)
        sent = after["ss-p0"].bytes_sent - before["ss-p0"].bytes_sent
        computed = after["ss-p0"].prefill_forward_tokens - before["ss-p0"].prefill_forward_tokens
        rec = state.request(f"chat-1-{turn}")
        n = len(prompts[-1])
        if turn == 0:
            assert last.usage.cached_tokens == 0 and computed == n
            assert int(rec["transferred_prompt_tokens"]) == n
        else:
            # the decode worker holds every full page of the last prompt + answer (the answer's last token
            # has no KV yet); the prefill worker holds the last prompt's full pages
            held_d = (len(prompts[-2]) + len(outs[-2]) - 1) // PAGE * PAGE
            held_p = len(prompts[-2]) // PAGE * PAGE
            assert d == decodes[0], "the session's turns go where its pages are"
            if turn == 1:
                assert last.usage.cached_tokens == held_p
                assert computed == n - held_p, "the prefill worker computes only what it has not cached"
                page_bytes = sent // (-(-n // PAGE) - held_d // PAGE)
                assert page_bytes > 0 and sent == (-(-n // PAGE) - held_d // PAGE) * page_bytes
                assert int(rec["transferred_prompt_tokens"]) == n - held_d
                assert int(rec["cached_prompt_tokens"]) == held_p and int(rec["computed_prompt_tokens"]) == n - held_p
            else:  # turn 3's new message is short: the decode worker prefills it itself, nothing moves
                assert sent == 0 and computed == 0
                assert int(rec["transferred_prompt_tokens"]) == 0
                assert last.usage.cached_tokens == held_d and int(rec["computed_prompt_tokens"]) == n - held_d
        prompts.append(prompts[-1] + out + USERS[turn + 1])
    assert outs == _offline(tiny_model, prompts[:3])


def test_cache_aware_routing_without_a_session_id(cluster):
    target, state, _ = cluster
    base = [R.randrange(100, 8000) for _ in range(260)]
    out, _, d = _turn(target, base)
    _wait_published(state, d, 4)
    for i in range(3):  # without a session id, rotation alone would alternate between the two decode workers
        more = base + out + [R.randrange(100, 8000) for _ in range(40 + i)]
        _, _, d2 = _turn(target, more)
        assert d2 == d


def test_ending_a_session_frees_its_pages_and_keeps_shared_ones(cluster):
    target, state, _ = cluster
    shared = SYSTEM[:128]
    outs = {}
    for s in ("end-a", "end-b"):
        p = shared + [R.randrange(100, 8000) for _ in range(200)]
        outs[s], _, d = _turn(target, p, session_id=s)
    decode = next(w for w in state.workers("decode") if w.worker_id == d)
    before = _stats(decode).cached_pages
    with grpc.insecure_channel(target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            serving_pb2_grpc.GenerationStub(ch).EndSession(serving_pb2.EndSessionRequest(session_id=""), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    res = end_session(target, "end-b")
    assert res.found and res.released_pages > 0
    after = _stats(decode).cached_pages  # (the prefill worker's count is in released_pages too)
    assert before - res.released_pages <= after < before
    assert not state.client.exists(state.keys.session("end-b"))
    assert not end_session(target, "end-b").found  # twice: nothing left, no error
    # the pages end-a shares with end-b (the system prompt) are still cached: end-a's next turn hits them
    p = shared + [R.randrange(100, 8000) for _ in range(10)]
    _, last, _ = _turn(target, p, session_id="end-a")
    assert last.usage.cached_tokens >= 2 * PAGE


def test_a_fresh_prefill_worker_recomputes_the_prefix_and_the_turn_is_still_right(cluster, tiny_model, redis_server):
    target, state, logs = cluster
    p1 = SYSTEM[:150] + [R.randrange(100, 8000) for _ in range(150)]
    out1, _, _ = _turn(target, p1, session_id="chat-2")
    old = next(w for w in state.workers("prefill"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSV32_MODEL": tiny_model,
           "DSV32_REDIS_URL": f"redis://{redis_server.host}:{redis_server.port}/8", "DSV32_REDIS_PREFIX": "ss:"}
    with open(logs / "prefill-fresh.log", "wb") as log:
        fresh = subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", "prefill", "--worker-id", "ss-p1"],
                                 env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(w.worker_id == "ss-p1" for w in state.workers("prefill")):
            assert fresh.poll() is None and time.monotonic() < deadline, (logs / "prefill-fresh.log").read_text()
            time.sleep(0.2)
        os.kill(old.pid, signal.SIGTERM)  # drains and deregisters: the next turn can only go to the fresh one
        while any(w.worker_id == old.worker_id for w in state.workers("prefill")):
            time.sleep(0.1)
        time.sleep(0.6)  # the router's registry snapshot
        p2 = p1 + out1 + [R.randrange(100, 8000) for _ in range(100)]
        out2, last, _ = _turn(target, p2, session_id="chat-2")
        assert last.usage.cached_tokens == 0  # nothing cached on the fresh worker: all recomputed
        fresh_stats = _stats(next(w for w in state.workers("prefill")))
        assert fresh_stats.prefill_forward_tokens == len(p2)
        assert [out1, out2] == _offline(tiny_model, [p1, p2])
    finally:
        fresh.send_signal(signal.SIGTERM)
        fresh.wait(30)
