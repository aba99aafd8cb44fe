"""The life of one request in the router (one ``Generate`` call).

1. **Validate** (:mod:`dsv32_router.validation`): tokenize or render the chat,
   resolve defaults, choose a seed if the client gave none. Invalid input is
   answered at once (``INVALID_ARGUMENT`` naming the field, ``OUT_OF_RANGE``
   for a prompt longer than the context, ``NOT_FOUND`` for an unknown model);
   no worker and no Redis record is touched.
2. **Admit**: take an in-flight slot. At most ``max_inflight`` requests run and
   at most ``max_waiting`` wait; beyond that, and after ``admission_timeout_s``
   of waiting, ``RESOURCE_EXHAUSTED`` (back-pressure, not an unbounded queue).
   A ``queued`` record is opened in Redis.
3. **Pick the pair** (:mod:`dsv32_router.policy`): decode worker D with room
   for prompt + max_tokens (session affinity first), prefill worker P with the
   fewest queued tokens. No registered workers → ``UNAVAILABLE``; no room →
   wait for a registry refresh or a finishing request, within the admission
   timeout.
4. **Reserve** on D: pages for the prompt, D's KV-receiver endpoint and a
   transfer id. D refusing (full) sends us back to 3 with D set aside.
5. **Prefill** on P (record ``prefilling``): P batches the prompt, pushes each
   layer's latent and indexer pages to D as the layer completes, samples the
   first token and returns it with a checksum of everything it sent
   (record ``transferring``).
6. **Decode** stream on D: D waits for the transfer, verifies the checksum,
   admits the request to its running batch and echoes the first token (record
   ``decoding``), then streams the rest. The router detokenizes incrementally,
   applies stop strings (holding back text that could still become one), and
   streams text deltas; the last message carries the finish reason and usage.
7. **Finish**: record ``finished`` and the session turn (D becomes the
   session's affinity). D frees the pages when the request leaves its batch.

Colocated workers (``dsv32-serve up --colocated``, the baseline that
disaggregation is measured against) serve the same ``DecodeWorker`` service
but run the prompt themselves. With no (prefill, decode) pair registered and
colocated workers present, step 3 picks one colocated worker C by the decode
rules; step 4 reserves capacity on C (no pages move yet: C's engine allocates
them as it prefills); step 5 is skipped; the step-6 stream on C admits the
prompt to C's running batch, where it is prefilled in chunks mixed into the
decode steps of the other requests, and its first message is the first
sampled token (record ``prefilling`` until then, then ``decoding``). Retries,
cancellation and deadlines are the same.

Failures. A worker that is unreachable or errs, a checksum mismatch (D answers
``DATA_LOSS``) or a lost reservation sends the record back to ``queued`` and
the request to step 3 on another pair (``max_attempts`` in all), with the
failed workers avoided if anything else fits. Tokens already streamed are not
repeated: the retry prefills prompt + generated tokens and asks for the
remaining ``max_tokens``; sampling is keyed by (seed, position), so the
continuation is the stream the first pair would have produced. When the
attempts run out the client gets ``UNAVAILABLE`` naming the last failure,
never a silently truncated answer.

Cancellation and deadlines. The client's deadline bounds every worker call.
When the client cancels or the deadline passes, the open worker calls are
cancelled (D aborts the request and frees its pages; P drops it from its
queue) and a ``Cancel`` is sent to D in the background in case the
reservation had not reached the decode stream yet; the record ends
``cancelled``.

Steps 1 and 2 are :class:`Orchestrator`; steps 3 to 7, the retries and the
cancellation are :class:`~dsv32_router.request_run.RequestRun`, one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing

import grpc

from dsv32_cluster import metrics, tracing
from dsv32_cluster.directory import WorkerDirectory
from dsv32_cluster.state import AsyncClusterState
from dsv32_proto import serving_pb2, worker_pb2
from .limits import RouterLimits, deadline_passed
from .policy import PairPolicy, serving_mode
from .request_run import RequestRun
from .stream import TokenStream
from .validation import ModelSpec, RequestError, ResolvedRequest, resolve

__all__ = ["Orchestrator", "RouterLimits"]
log = logging.getLogger(__name__)


class Orchestrator:
    """Steps 1 and 2 (validate, admit) and the router-wide parts that every
    :class:`~dsv32_router.request_run.RequestRun` shares (steps 3 to 7)."""

    def __init__(self, spec: ModelSpec, tokenizer, state: AsyncClusterState, directory: WorkerDirectory,
                 limits: RouterLimits, router_id: str):
        self.spec, self.tokenizer, self.state, self.directory = spec, tokenizer, state, directory
        self.limits, self.router_id = limits, router_id
        self.policy = PairPolicy()
        self._slots = asyncio.Semaphore(limits.max_inflight)
        self._waiting = 0
        self._background: set[asyncio.Task] = set()

    def background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def generate(self, request: serving_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        """The ``Generate`` handler body: yields responses or raises :class:`RequestError`."""
        # Tokenizing (or rendering a chat) can take milliseconds: off the event loop.
        req = await asyncio.to_thread(resolve, request, self.tokenizer, self.spec)
        if not self.directory.snapshot:
            await self.directory.refresh()
        if self.mode() is None:
            counts = self.directory.counts()
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no workers: {counts['prefill']} prefill, "
                               f"{counts['decode']} decode and {counts['colocated']} colocated registered")
        with tracing.tracer().start_as_current_span("admit", attributes={tracing.REQUEST_ID: req.request_id}):
            await self._admit(context)
        try:
            try:
                created = await self.state.create_request(
                    req.request_id, router=self.router_id, session_id=req.session_id,
                    prompt_tokens=len(req.prompt_ids), max_tokens=req.sampling.max_tokens)
            except Exception as e:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"cluster state (Redis) unavailable: {e}") from None
            if not created:
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {req.request_id!r} was used before")
            metrics.process().inflight.inc()
            try:
                async with aclosing(self.run(req, context).stream()) as stream:
                    async for out in stream:
                        yield out
            finally:
                metrics.process().inflight.dec()
        finally:
            self._slots.release()

    def run(self, req: ResolvedRequest, context) -> RequestRun:
        """Steps 3 to 7 of ``req``, with this router's collaborators."""
        return RequestRun(req, context, TokenStream(self.tokenizer, req, self.spec.eos_token_id), state=self.state,
                          directory=self.directory, policy=self.policy, limits=self.limits,
                          background=self.background)

    async def _admit(self, context) -> None:
        if self._slots.locked() and self._waiting >= self.limits.max_waiting:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"router busy: {self.limits.max_inflight} requests running and "
                               f"{self._waiting} waiting; retry later")
        self._waiting += 1
        metrics.process().waiting.inc()
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(self._slots.acquire(), self.limits.admission_budget(context))
        except asyncio.TimeoutError:
            if deadline_passed(context):
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while waiting") from None
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "router busy: no slot freed in time") from None
        finally:
            self._waiting -= 1
            metrics.process().waiting.dec()
            metrics.process().queue_time.observe(time.monotonic() - t0)

    async def end_session(self, session_id: str) -> tuple[bool, int]:
        """Drop the session's record and ask every worker to free the cached pages only it used.
        Returns (whether it had a record, pages freed). Workers that do not answer in time free
        them at their own session TTL."""
        if not session_id or len(session_id) > 256:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "session_id: must be 1-256 characters")
        try:
            found = await self.state.end_session(session_id)
        except Exception as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"cluster state (Redis) unavailable: {e}") from None
        if not self.directory.snapshot:
            await self.directory.refresh()
        msg = worker_pb2.ReleaseSessionRequest(session_id=session_id)

        async def release(w) -> int:
            stub = self.directory.prefill_stub(w) if w.role == "prefill" else self.directory.decode_stub(w)
            try:
                return (await stub.ReleaseSession(msg, timeout=5)).released_pages
            except Exception as e:
                log.warning("session %s: release on %s failed: %s", session_id, w.worker_id, e)
                return 0
        freed = await asyncio.gather(*(release(w) for w in self.directory.snapshot))
        return found, sum(freed)

    def mode(self) -> str | None:
        """What the registered workers serve: see :func:`dsv32_router.policy.serving_mode`."""
        return serving_mode(self.directory.counts())
