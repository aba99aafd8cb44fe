"""What one attempt on a (prefill, decode) pair uses: its failure type, the router's hold on the
workers' load in its own books, and small helpers for the worker calls (see :mod:`.request_run`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc

from dsv32_cluster.state import WorkerInfo
from dsv32_proto import worker_pb2
from .policy import PairPolicy
from .validation import Sampling

log = logging.getLogger(__name__)
WATCH_S = 0.5  # how often a worker call in flight checks that its workers are still registered


class WorkerFailed(Exception):
    """One attempt failed on a worker; the request may be retried on another pair."""

    def __init__(self, role: str, worker: WorkerInfo, message: str, reason: str = "error"):
        super().__init__(f"{role} worker {worker.worker_id}: {message}")
        self.role, self.worker, self.reason = role, worker, reason


async def _drain(call, timeout_s: float) -> None:
    """Read what is left of a finished stream (nothing but its end, normally); the caller cancels it after."""
    async def rest():  # read(), not iteration: the stream was read with read() (the two may not be mixed)
        while await call.read() is not grpc.aio.EOF:
            pass

    try:
        await asyncio.wait_for(rest(), timeout_s)
    except (asyncio.TimeoutError, grpc.aio.AioRpcError):
        pass


def _looks_gone(message: str) -> bool:
    """The worker process is gone (its socket closed or refused), not merely refusing this request."""
    return any(s in message for s in ("Failed to connect", "failed to connect", "Socket closed", "Connection reset",
                                      "Stream removed"))


def _sampling_pb(s: Sampling) -> worker_pb2.WorkerSampling:
    return worker_pb2.WorkerSampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                     max_tokens=s.max_tokens, seed=s.seed, stop_token_ids=s.stop_token_ids,
                                     ignore_eos=s.ignore_eos, logprobs=s.logprobs, json_schema=s.json_schema,
                                     grammar_replay=s.grammar_replay, skip_prefix_cache=s.skip_prefix_cache)


def prompt_accounting(prompt: list[int], computed: int, transferred: int) -> dict:
    """A request record's split of the prompt: found in a prefix cache, run through a forward, moved over the wire."""
    return {"cached_prompt_tokens": len(prompt) - computed, "computed_prompt_tokens": computed,
            "transferred_prompt_tokens": transferred}


async def cached_prefixes(state, workers: list[WorkerInfo], prompt: list[int]) -> dict[str, int]:
    """Leading prompt tokens each worker holds (its published key set); {} on any trouble (routing then
    goes by load alone)."""
    try:
        return await state.cached_prefix_tokens(workers, prompt)
    except Exception as e:
        log.debug("prefix lookup failed: %s", e)
        return {}


class _Hold:
    """Load one attempt puts on workers in the router's own books, released exactly once."""

    def __init__(self, policy: PairPolicy):
        self.policy = policy
        self.items: dict[str, tuple[str, dict]] = {}

    def add(self, key: str, worker_id: str, **amounts: int) -> None:
        self.release(key)
        self.policy.add(worker_id, **amounts)
        self.items[key] = (worker_id, amounts)

    def release(self, key: str) -> None:
        item = self.items.pop(key, None)
        if item is not None:
            self.policy.remove(item[0], **item[1])

    def release_all(self) -> None:
        for key in list(self.items):
            self.release(key)


async def watched(call, workers: list[WorkerInfo], registered: Callable[[WorkerInfo], bool],
              stall_s: float | None = None):
    """Await ``call`` (a unary call or a stream's ``read()``) while its workers stay alive: ``WorkerFailed``
    when one leaves the registry (dead, or hung: its heartbeat stops) or, with ``stall_s``, when
    nothing came for that long (hung by progress, whatever its heartbeat says)."""
    task = asyncio.ensure_future(call)
    t0, missing = time.monotonic(), 0
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=WATCH_S)
            if done:
                return task.result()
            gone = [w for w in workers if not registered(w)]
            missing = missing + 1 if gone else 0
            if missing >= 2:  # two snapshots in a row: not a refresh race
                w = gone[0]
                raise WorkerFailed(w.role, w, "left the registry mid-request (dead or hung)", "stalled")
            if stall_s is not None and time.monotonic() - t0 > stall_s:
                w = workers[0]
                raise WorkerFailed(w.role, w, f"no progress for {stall_s:g}s (hung?)", "stalled")
    finally:
        if not task.done():
            task.cancel()


async def keep_reserved(stub, request_id: str, lease: float, granted_s: float) -> None:
    """While the prompt waits on the prefill worker (a queue of long prompts can take longer than a lease),
    renew the reservation on D every third of the lease D granted; D caps each renewal and the whole hold."""
    every = min(lease, granted_s or lease) / 3
    while True:
        await asyncio.sleep(every)
        try:
            await stub.Reserve(worker_pb2.ReserveRequest(request_id=request_id, lease_s=lease, renew=True),
                               timeout=5)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return  # taken by the stream, or gone: nothing to keep
            log.debug("renewal of %s: %s", request_id, e)
