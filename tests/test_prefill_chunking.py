"""Issue 10, finding 9: the prefill worker chunks long prompts so short ones are not stuck behind them.

The scheduler on a real tiny engine with the in-process fake KV transfer: a long prompt runs in
chunks of the token budget, a short prompt that arrived behind it gets its first token from the
second step (a step of its own), the first tokens and the KV that lands equal one unchunked pass, and a partial prompt
that is cancelled, fails or is stopped gives its pages back. Then the same with real processes.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from checkpoints import tiny_checkpoint

from test_worker_queues import _until as wait_until  # noqa: E402

BUDGET = 64
LONG, SHORT = [(37 * i) % 5000 + 100 for i in range(300)], [11, 12, 13, 14, 15]


def _until(cond, timeout=10.0) -> bool:
    return wait_until(cond, timeout)


@pytest.fixture(scope="module")
def engines():
    from dsv32_engine.engine import EngineCore

    ckpt = tiny_checkpoint()
    return (EngineCore(ckpt, num_pages=16, max_num_batched_tokens=BUDGET),  # prefill
            EngineCore(ckpt, num_pages=16),  # decode: receives the KV
            EngineCore(ckpt, num_pages=16))  # reference: one unchunked pass


class Steps:
    """Wraps ``engine.prefill``: records each step's chunks as (request id, start, end); ``hook(i)``
    runs after step ``i``'s forward (on the loop thread)."""

    def __init__(self, engine, hook=None):
        self.engine, self.hook, self.log = engine, hook, []
        self._prefill = engine.prefill
        engine.prefill = self

    def __call__(self, inputs, on_layer_done=None):
        self.log.append([(i.request_id, i.start, i.stop) for i in inputs])
        out = self._prefill(inputs, on_layer_done=on_layer_done)
        if self.hook:
            self.hook(len(self.log) - 1)
        return out

    def restore(self):
        self.engine.prefill = self._prefill


def _setup(engines, hook=None):
    from dsv32_engine.transfer.fake import FakeKVReceiver, FakeKVSender, FakeTransferHub
    from dsv32_prefill.scheduler import PrefillScheduler

    P, D, _ = engines
    for e in engines:  # each test starts cold: no prompt of an earlier test in a prefix cache
        e.allocator.evict()
    hub = FakeTransferHub()
    receiver = FakeKVReceiver(D.cache, worker_id="d0", timeout_s=10, hub=hub)
    sender = FakeKVSender(P.cache, worker_id="p0", timeout_s=10, hub=hub)
    sched = PrefillScheduler(P, sender, budget_tokens=BUDGET, max_queued_tokens=10_000, transfer_timeout_s=10)
    return sched, receiver, Steps(P, hook)


def _job(rid, prompt, receiver):
    from dsv32_engine import SamplingParams
    from dsv32_prefill.scheduler import PrefillJob

    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    return PrefillJob(rid, list(prompt), sp, f"t-{rid}", receiver.endpoint, "d0")


def test_a_long_prompt_runs_in_chunks_and_a_short_one_behind_it_goes_first(engines):
    from dsv32_engine import SamplingParams
    from dsv32_engine.engine import PrefillInput

    P, D, R = engines
    load = []
    sched, receiver, steps = None, None, None

    def hook(i):
        load.append((sched.running_tokens, sched.queued_tokens, sched.num_waiting))

    sched, receiver, steps = _setup(engines, hook)
    long, short = _job("long", LONG, receiver), _job("short", SHORT, receiver)
    dst = {j.request_id: D.allocator.allocate(D.layout.pages_for(len(j.prompt_ids))) for j in (long, short)}
    for j in (long, short):
        receiver.expect(j.transfer_id, "p0", dst[j.request_id])
    sched.submit(long)
    sched.submit(short)  # behind the long one in arrival order
    try:
        sched.start()
        assert long.done.wait(60) and short.done.wait(5), (long.error, short.error)
        assert long.error is None and short.error is None
        log = steps.log
        assert log[0] == [("long", 0, BUDGET)], "a long prompt gets a chunk of the budget, not the whole step"
        assert log[1] == [("short", 0, len(SHORT))], "the short prompt has the next step, alone"
        assert all(sum(e - s for _, s, e in step) <= BUDGET for step in log)
        long_chunks = [(s, e) for step in log for rid, s, e in step if rid == "long"]
        assert len(long_chunks) >= 5 and long_chunks[-1][1] == len(LONG) and \
            all(a[1] == b[0] for a, b in zip(long_chunks, long_chunks[1:])), long_chunks
        assert long.chunks == len(long_chunks) and short.chunks == 1 and short.batch_size == 1
        # the books, seen from inside the first two steps
        assert load[0] == (BUDGET, len(LONG) + len(SHORT) - BUDGET, 2)
        assert load[1] == (len(SHORT), len(LONG) - BUDGET, 1)

        # the same first tokens and the same KV as one unchunked pass
        sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        for job in (long, short):
            pages = R.allocator.allocate(R.layout.pages_for(len(job.prompt_ids)))
            (ref,) = R.prefill([PrefillInput(job.request_id, job.prompt_ids, sp, pages)])
            assert job.first.token_id == ref.token_id, job.request_id
            n = len(job.prompt_ids)
            for layer in range(R.config.num_hidden_layers):
                for pool in ("latent", "index"):
                    got = getattr(D.cache, pool)[layer][dst[job.request_id]].flatten(0, 1)[:n]
                    want = getattr(R.cache, pool)[layer][pages].flatten(0, 1)[:n]
                    torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-4,
                                               msg=f"{job.request_id} {pool} {layer}")
            R.allocator.free(pages)
        assert _until(lambda: P.allocator.num_free == P.allocator.num_total)
        P.allocator.check_no_leaks()
        assert (sched.queued_tokens, sched.running_tokens, sched.num_waiting) == (0, 0, 0)
        assert sched.counters["requests"] == 2 and sched.counters["failed"] == 0
    finally:
        sched.stop()
        steps.restore()
        for pages in dst.values():
            D.allocator.free(pages)
        receiver.close()


@pytest.mark.parametrize("how", ["cancel", "error", "stop"])
def test_a_partial_prompt_that_is_cancelled_fails_or_is_stopped_frees_its_pages(engines, how):
    P = engines[0]
    gate, stepped = threading.Event(), threading.Event()
    sched = None

    def hook(i):
        if i == 0 and how == "cancel":
            sched.cancel(job)  # lands between two chunks: the job is dropped before the next step
        if i == 0 and how == "error":
            steps.engine.prefill = boom
        if i == 0 and how == "stop":
            stepped.set()
            gate.wait(10)

    def boom(inputs, on_layer_done=None):
        steps.log.append([(x.request_id, x.start, x.stop) for x in inputs])
        raise RuntimeError("injected")

    sched, receiver, steps = _setup(engines, hook)
    job = _job("victim", LONG, receiver)
    sched.submit(job)
    try:
        sched.start()
        if how == "stop":
            assert stepped.wait(30)
            stopper = threading.Thread(target=sched.stop)
            stopper.start()
            assert _until(lambda: sched._stop)
            gate.set()
            stopper.join(30)
        assert job.done.wait(30)
        want = {"cancel": "cancelled", "error": "prefill failed: injected", "stop": "shutting down"}[how]
        assert job.error and want in job.error, job.error
        assert len(steps.log) == (2 if how == "error" else 1), "dropped between chunks"
        assert _until(lambda: P.allocator.num_free == P.allocator.num_total), "the partial prompt's pages are back"
        P.allocator.check_no_leaks()
        assert (sched.queued_tokens, sched.running_tokens, sched.num_waiting) == (0, 0, 0)
    finally:
        gate.set()
        sched.stop()
        steps.restore()
        receiver.close()


def test_the_plan_under_a_stream_of_short_prompts():
    """Instant fake forwards, a new 20-token prompt before every step: no step exceeds the budget, the
    long prompt gets a chunk at least every other step, every short prompt runs in the step after it
    arrived, and a prompt of more than half the budget that came in behind the long one runs before
    the long one ends."""
    from test_worker_queues import FakeEngine, FakeSender

    from dsv32_prefill.scheduler import PrefillJob, PrefillScheduler

    engine = FakeEngine(num_pages=64)
    sched = PrefillScheduler(engine, FakeSender(), budget_tokens=BUDGET, max_queued_tokens=10_000,
                             transfer_timeout_s=10)
    sizes = {"long": 640, "medium": 50}

    def job(rid, n):
        sizes.setdefault(rid, n)
        return PrefillJob(rid, [1] * n, None, f"t-{rid}", "e", "d0")

    sched.submit(job("long", 640))
    steps, arrived = [], {}
    for i in range(200):
        if i < 30:
            sched.submit(job(f"s{i}", 20))
            arrived[f"s{i}"] = i
        if i == 2:
            sched.submit(job("medium", 50))
        batch = sched._next_batch(wait_s=0)
        if not batch:
            break
        sched._step(batch)
        sched.running_tokens = 0
        steps.append({c.job.request_id: (c.start, c.end) for c in batch})
    assert all(sum(e - s for s, e in step.values()) <= BUDGET for step in steps)
    long_steps = [i for i, step in enumerate(steps) if "long" in step]
    assert steps[long_steps[-1]]["long"][1] == 640
    assert all(b - a <= 2 for a, b in zip(long_steps, long_steps[1:])), long_steps
    ends = {rid: i for i, step in enumerate(steps) for rid, (s, e) in step.items() if e == sizes[rid]}
    assert all(ends[rid] <= at + 1 for rid, at in arrived.items()), "a short prompt runs in the next step"
    assert ends["medium"] < ends["long"], ends
    assert (sched.queued_tokens, sched.num_waiting) == (0, 0) and len(sched.inflight) == 32


# -- real processes ---------------------------------------------------------------------------------

E2E_BUDGET, E2E_LONG, E2E_SHORT = 256, [(97 * i) % 60_000 + 100 for i in range(1500)], [101, 102, 103, 104, 105]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_short_request_behind_a_long_one_gets_its_first_token_first(tiny_model, redis_server, tmp_path):
    from dsv32_router.client import stream_responses
    from roles import roles as start_roles

    max_tokens = 4

    def oracle():
        from dsv32_engine import LLM, SamplingParams

        outs = LLM(model=tiny_model, num_pages=64).generate(
            [E2E_LONG, E2E_SHORT], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        return [o.outputs[0].token_ids for o in outs]

    def run(prompt):
        tokens, first_at = [], None
        for msg in stream_responses(target, prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                    timeout=240):
            if msg.token_ids and first_at is None:
                first_at = time.monotonic()
            tokens += msg.token_ids
        return tokens, first_at

    specs = [("prefill", ["--worker-id", "ch-p0", "--max-num-batched-tokens", str(E2E_BUDGET)]),
             ("decode", ["--worker-id", "ch-d0"])]
    with start_roles(tiny_model, redis_server, 9, "ch:", tmp_path, specs, 2, before_ready=oracle) as \
            (target, state, expected):
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(run, E2E_LONG)
            time.sleep(0.3)  # the long prompt is on the prefill worker first
            t_short = time.monotonic()
            short = pool.submit(run, E2E_SHORT)
            (long_tokens, long_first), (short_tokens, short_first) = long.result(), short.result()
        print(f"short TTFT behind a {len(E2E_LONG)}-token prompt: {short_first - t_short:.2f} s; "
              f"the long one's first token {long_first - short_first:.2f} s later")
        assert short_first < long_first, "the short request's first token comes before the long one's"
        assert [long_tokens, short_tokens] == expected, "chunked prefill equals offline generation"
