"""Issue 10, finding 3: prompts within the context are not refused by timing. The decode worker caps
leases at 1 s here; long prompts queue behind each other on one prefill worker for several seconds
(one prompt per batch) before their transfer starts. The router renews each reservation while its
prompt waits, and the lease restarts with every sign of the transfer's progress: all complete."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from dsv32_router.client import generate
from roles import roles as start_roles

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_long_prompts_queued_longer_than_a_lease_all_complete(tiny_model, redis_server, tmp_path):
    specs = [("prefill", ["--worker-id", "lq-p0", "--max-num-batched-tokens", "1024"]),
             ("decode", ["--worker-id", "lq-d0", "--max-reserve-lease", "1", "--num-pages", "256"])]
    with start_roles(tiny_model, redis_server, 7, "lq:", tmp_path, specs, 2) as (target, state, _):
        prompts = [[(97 * i + 13 * j) % 60_000 + 100 for i in range(1000)] for j in range(4)]
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda p: generate(target, p, max_tokens=4, timeout=240), prompts))
        assert all(len(o.token_ids) == 4 for o in outs)
        recs = [state.request(o.request_id) for o in outs]
        assert all(r["state"] == "finished" and r["attempts"] == "1" for r in recs), \
            "no reservation may expire while its prompt waits: no retry"
        waits = sorted(float(r["prefill_queue_s"]) for r in recs)
        assert waits[-1] > 1.5, f"the test needs a queue longer than the 1 s lease: {waits}"
