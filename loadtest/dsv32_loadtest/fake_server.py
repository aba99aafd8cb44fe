"""A fake ``dsv32.serving.v1.Generation`` server that streams a known sequence.

For the harness's own tests and for trying the harness without a cluster; it
runs no model. Request ``i`` (in arrival order) gets ``max_tokens`` tokens
``(prompt length + k) % vocab_size`` in chunks of ``tokens_per_chunk``, the
first after ``ttft_s`` and the others ``itl_s`` apart, then ``finish_reason``
"length" and a ``Usage`` with the true counts (``token_offset`` shifts every
token: a server whose outputs differ). With ``page_size`` it plays a prefix
cache: ``Usage.cached_tokens`` is the longest whole-page prefix the prompt shares
with an earlier prompt, and ``ttft_s`` is charged only for the uncached share of
the prompt. ``fail(i, request)`` may return
a status code to fail that request with, before its first token or, with
``fail_after_tokens``, in the middle of its stream.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import grpc

from ._api import serving_pb2 as pb
from ._api import serving_pb2_grpc as pb_grpc

FailRule = Callable[[int, "pb.GenerateRequest"], "grpc.StatusCode | None"]


class FakeGeneration(pb_grpc.GenerationServicer):
    def __init__(self, ttft_s: float = 0.01, itl_s: float = 0.002, tokens_per_chunk: int = 1,
                 vocab_size: int = 129280, max_model_len: int = 8192, fail: FailRule | None = None,
                 fail_after_tokens: int = 0, page_size: int = 0, token_offset: int = 0):
        self.ttft_s, self.itl_s, self.tokens_per_chunk = ttft_s, itl_s, tokens_per_chunk
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.fail, self.fail_after_tokens = fail, fail_after_tokens
        self.page_size, self.token_offset = page_size, token_offset
        self._pages: set[tuple[int, ...]] = set()  # every whole-page prefix of the prompts seen
        self.requests: list[pb.GenerateRequest] = []
        self.finished = 0                  # streams completed normally
        self.in_flight = self.max_in_flight = 0
        self.peers: set[str] = set()       # client connections seen

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            id="fake", max_model_len=self.max_model_len, vocab_size=self.vocab_size, numerics="none")])

    async def Generate(self, request, context):
        self.peers.add(context.peer())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async for msg in self._stream(request, context):
                yield msg
            self.finished += 1
        finally:
            self.in_flight -= 1

    async def _stream(self, request, context):
        i = len(self.requests)
        self.requests.append(request)
        n_prompt = len(request.token_ids.ids)
        n_out = request.sampling.max_tokens or 16
        code = self.fail(i, request) if self.fail else None
        if code is not None and not self.fail_after_tokens:
            await context.abort(code, f"injected {code.name} for request {i}")
        cached = self._cache(list(request.token_ids.ids))
        await asyncio.sleep(self.ttft_s * (1 - cached / n_prompt) if n_prompt else self.ttft_s)
        sent = 0
        while sent < n_out:
            if code is not None and sent >= self.fail_after_tokens:
                await context.abort(code, f"injected {code.name} for request {i} after {sent} tokens")
            k = min(self.tokens_per_chunk, n_out - sent)
            msg = pb.GenerateResponse(request_id=request.request_id,
                                      token_ids=[(n_prompt + sent + j + self.token_offset) % self.vocab_size
                                                 for j in range(k)])
            if sent == 0:
                msg.prefill_worker, msg.decode_worker = "fake-p0", "fake-d0"
            sent += k
            if sent == n_out:
                msg.finish_reason = "length"
                msg.usage.CopyFrom(pb.Usage(prompt_tokens=n_prompt, completion_tokens=n_out, cached_tokens=cached))
            yield msg
            if sent < n_out:
                await asyncio.sleep(self.itl_s)


    def _cache(self, ids: list[int]) -> int:
        """Prompt tokens found in the fake prefix cache (whole pages); remembers this prompt's pages."""
        if not self.page_size:
            return 0
        ends = range(self.page_size, len(ids) + 1, self.page_size)
        hit = next((e for e in reversed(ends) if tuple(ids[:e]) in self._pages), 0)
        self._pages.update(tuple(ids[:e]) for e in ends)
        return hit


class _RequireToken(grpc.aio.ServerInterceptor):
    """Refuse every call without ``authorization: Bearer <token>`` (``UNAUTHENTICATED``), as the router does
    when it has ``DSV32_API_TOKEN``."""

    def __init__(self, token: str):
        self.want = f"Bearer {token}"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "fake server: missing or wrong API token")
        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        return await continuation(details) if got == self.want else self._deny


async def start_fake_server(servicer: FakeGeneration, address: str = "127.0.0.1:0",
                            api_token: str = "") -> tuple[grpc.aio.Server, str]:
    """Start ``servicer`` on ``address``; returns the server and its ``host:port`` target. With
    ``api_token``, calls without ``authorization: Bearer <api_token>`` are refused."""
    server = grpc.aio.server(interceptors=[_RequireToken(api_token)] if api_token else None)
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, f"{address.rsplit(':', 1)[0]}:{port}"


async def _serve(address: str, ttft_s: float, itl_s: float) -> None:
    server, target = await start_fake_server(FakeGeneration(ttft_s=ttft_s, itl_s=itl_s), address)
    print(f"fake Generation server on {target}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="a fake Generation server, to try the load tester")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--ttft", type=float, default=0.05, help="seconds to the first token")
    p.add_argument("--itl", type=float, default=0.01, help="seconds between tokens")
    a = p.parse_args()
    try:
        asyncio.run(_serve(a.address, a.ttft, a.itl))
    except KeyboardInterrupt:
        pass
