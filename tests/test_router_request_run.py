"""RequestRun with its collaborators handed in: fake workers, a real redis-server, no router process."""

from __future__ import annotations

import asyncio

from dsv32_cluster.directory import WorkerDirectory
from dsv32_cluster.state import AsyncClusterState
from dsv32_router.limits import RouterLimits
from dsv32_router.policy import PairPolicy
from dsv32_router.request_run import RequestRun
from dsv32_router.stream import TokenStream
from dsv32_router.validation import ResolvedRequest, Sampling
from test_router_fakes import FakeCluster, fake_token


def test_a_run_retries_after_data_loss_and_leaves_the_books_as_it_found_them(redis_url, tmp_path):
    from dsv32_text.tokenizer import load_tokenizer, write_tokenizer_files

    write_tokenizer_files(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    cluster = FakeCluster(redis_url, "rr:", n_prefill=1, n_decode=1)
    cluster.decode_faults.append("data_loss")
    req = ResolvedRequest("rr-1", [5, 6, 7], Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=6, seed=3))

    async def go():
        state = AsyncClusterState.from_url(redis_url, "rr:")
        directory = WorkerDirectory(state)
        policy, spawned = PairPolicy(), []
        try:
            await directory.refresh()
            assert await state.create_request(req.request_id, router="r")
            run = RequestRun(req, None, TokenStream(tokenizer, req, eos_token_id=1), state=state,
                             directory=directory, policy=policy, limits=RouterLimits(),
                             background=lambda coro: spawned.append(asyncio.ensure_future(coro)))
            msgs = [m async for m in run.stream()]
            await asyncio.gather(*spawned)
            return msgs, policy
        finally:
            await directory.close()
            await state.aclose()

    try:
        msgs, policy = asyncio.run(go())
    finally:
        cluster.close()
    assert [t for m in msgs for t in m.token_ids] == [fake_token(3, 3 + i) for i in range(6)]
    assert msgs[-1].finish_reason == "length" and msgs[0].decode_worker == "fd0"
    rec = cluster.state.request("rr-1")
    assert rec["state"] == "finished" and rec["attempts"] == "2" and "checksum" in rec["error"].lower()
    assert all((p.requests, p.pages, p.tokens) == (0, 0, 0) for p in policy.pending.values())
