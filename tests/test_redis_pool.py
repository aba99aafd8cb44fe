"""Issue 10, finding 7: the router's Redis pool is sized to its in-flight limit and blocks rather than
failing a burst with "Too many connections" (which left records of finished requests non-terminal)."""

from __future__ import annotations

import asyncio

from dsv32_cluster.state import AsyncClusterState


def test_a_burst_wider_than_the_pool_waits_instead_of_failing(redis_url):
    async def main():
        state = AsyncClusterState.from_url(redis_url, "pool:", max_connections=4)
        try:
            ids = [f"r{i}" for i in range(64)]
            await asyncio.gather(*(state.create_request(r) for r in ids))
            for new in ("prefilling", "transferring", "decoding", "finished"):
                await asyncio.gather(*(state.transition(r, new) for r in ids))
            recs = await asyncio.gather(*(state.request(r) for r in ids))
            assert {r["state"] for r in recs} == {"finished"}
            pool = state.client.connection_pool
            assert pool.max_connections == 4 and len(pool._available_connections) + len(pool._in_use_connections) <= 4
        finally:
            await state.aclose()

    asyncio.run(main())


def test_a_request_without_max_tokens_commits_the_documented_default_not_the_context():
    """Finding 8: the router's default (2048, capped by the context) is what such a request reserves."""
    import argparse

    from dsv32_router.server import DEFAULT_MAX_TOKENS, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).default_max_tokens == DEFAULT_MAX_TOKENS == 2048
