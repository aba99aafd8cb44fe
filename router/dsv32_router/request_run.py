"""One request's run through the router: attempts on worker pairs, retries, the stream.

Steps 3 to 7 of the life cycle told in :mod:`dsv32_router.orchestrator` (pick the
pair, reserve, prefill, decode, finish), and its failures, cancellation and
deadlines, for one request that the orchestrator has validated and admitted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import Callable, Coroutine

import grpc

from dsv32_cluster import metrics, telemetry, tracing
from dsv32_cluster.directory import WorkerDirectory
from dsv32_cluster.state import AsyncClusterState, InvalidTransition, WorkerInfo
from dsv32_proto import serving_pb2, worker_pb2
from .limits import RouterLimits, deadline_passed
from .policy import NeverFits, NoCapacity, NoWorkers, PairPolicy, serving_mode
from .stream import TokenStream
from .validation import RequestError, ResolvedRequest, Sampling
from .worker_calls import (WorkerFailed, _drain, _Hold, _looks_gone, _sampling_pb,  # noqa: F401 (re-exported)
                           cached_prefixes, keep_reserved, prompt_accounting, watched)

log = logging.getLogger(__name__)
RETRY_WAIT_S = 8.0  # a retry waits at most this long for a worker that has not failed it (TTL 5 s + a restart)
# worker failures that another pair may not have
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED,
              grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


class RequestRun:
    """One request's attempts, stream state and bookkeeping.

    Its collaborators are handed in, shared by every run of the router: the cluster
    ``state`` (request records, sessions), the worker ``directory`` (registry
    snapshot, worker stubs, change notifications), the pair ``policy`` and its
    books, the ``limits``, and ``background``, which runs what must outlive the
    run (a late cancel, the record of a cancelled request). ``tokens`` turns the
    workers' tokens into client messages.
    """

    def __init__(self, req: ResolvedRequest, context, tokens: TokenStream, *, state: AsyncClusterState,
                 directory: WorkerDirectory, policy: PairPolicy, limits: RouterLimits,
                 background: Callable[[Coroutine], None]):
        self.req, self.context, self.tokens = req, context, tokens
        self.state, self.directory, self.policy, self.limits = state, directory, policy, limits
        self.background = background
        self.t0 = time.monotonic()
        self.ttft: float | None = None
        self.avoid: set[str] = set()
        self.failed_pids: dict[str, int] = {}  # worker id -> the pid that failed us (a restart is a new pid)
        self.prefill_worker = self.decode_worker = ""
        self._announced = False
        self._last_token_at: float | None = None
        self.cached_tokens: int | None = None  # prompt tokens not computed (prefix caches), from the first token
        self.attempt = 0
        self.span = tracing.current()  # the router's Generate span: the request's attributes go there
        self.span.set_attributes({tracing.REQUEST_ID: req.request_id, tracing.PROMPT_TOKENS: len(req.prompt_ids),
                                  tracing.MODEL: metrics.process().model})

    @property
    def generated(self) -> list[int]:
        return self.tokens.generated

    @property
    def finish_reason(self) -> str:
        return self.tokens.finish_reason

    @property
    def worker_request_id(self) -> str:
        """The id workers see: one per attempt, so that a retry landing on the same
        worker never collides with the remains of the failed attempt there."""
        return f"{self.req.request_id}#{self.attempt}"

    def _timeout(self) -> float:
        return self.limits.worker_timeout(self.context)

    async def _record(self, new_state: str, **extra) -> None:
        """Best effort after creation: a Redis hiccup must not kill a healthy stream. A terminal state is
        tried a few times: a record left active would stay so until its router goes away."""
        tries = 3 if new_state in ("finished", "failed", "cancelled") else 1
        for i in range(tries):
            try:
                await self.state.transition(self.req.request_id, new_state, **extra)
                return
            except InvalidTransition as e:
                log.debug("%s", e)
                return
            except Exception as e:
                log.warning("request %s: could not record %s (try %d of %d): %s", self.req.request_id, new_state,
                            i + 1, tries, e)
                if i + 1 < tries:
                    await asyncio.sleep(0.2 * (i + 1))

    async def stream(self):
        rid = self.req.request_id
        last_error = ""
        try:
            for attempt in range(1, self.limits.max_attempts + 1):
                self.attempt = attempt
                try:
                    async with aclosing(self._attempt()) as msgs:
                        async for out in msgs:
                            yield out
                    await self._finished()
                    return
                except WorkerFailed as e:
                    last_error = str(e)
                    self.avoid.add(e.worker.worker_id)
                    self.failed_pids[e.worker.worker_id] = e.worker.pid
                    metrics.process().retries(e.reason).inc()
                    log.warning("request %s attempt %d failed: %s", rid, attempt, e)
                    if deadline_passed(self.context):
                        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
                    if attempt < self.limits.max_attempts:
                        await self._record("queued", error=last_error)
                        if e.reason == "stalled" or _looks_gone(str(e)):
                            await self._await_alternative(e.worker.role)
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"request failed on {self.limits.max_attempts} worker pairs; last: {last_error}")
        except RequestError as e:
            state = "cancelled" if e.code == grpc.StatusCode.DEADLINE_EXCEEDED else "failed"
            await self._record(state, error=e.message, completion_tokens=len(self.generated))
            raise
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: closed by the handler mid-stream
            why = "deadline exceeded" if deadline_passed(self.context) else "client cancelled"
            self.background(self._record("cancelled", error=why, completion_tokens=len(self.generated)))
            raise
        except Exception as e:
            log.exception("request %s: internal error", rid)
            await self._record("failed", error=f"internal: {e}")
            raise RequestError(grpc.StatusCode.INTERNAL, f"internal error: {e}") from None

    async def _finished(self) -> None:
        rid, n = self.req.request_id, len(self.generated)
        e2e = time.monotonic() - self.t0
        m = metrics.process()
        if n > 1 and self.ttft is not None:
            m.tpot.observe((e2e - self.ttft) / (n - 1))
        m.e2e.observe(e2e)
        m.prompt_tokens.inc(len(self.req.prompt_ids))
        m.generation_tokens.inc(n)
        self.span.set_attributes({tracing.COMPLETION_TOKENS: n, tracing.PREFILL_WORKER: self.prefill_worker,
                                  tracing.DECODE_WORKER: self.decode_worker, "dsv32.finish_reason": self.finish_reason,
                                  tracing.ATTEMPT: self.attempt})
        await self._record("finished", finish_reason=self.finish_reason, completion_tokens=n,
                           ttft_s=round(self.ttft or 0.0, 6), e2e_s=round(e2e, 6))
        if self.req.session_id:
            try:
                await self.state.record_turn(self.req.session_id, rid, self.decode_worker,
                                             len(self.req.prompt_ids), n)
            except Exception as e:
                log.warning("session %s: could not record turn: %s", self.req.session_id, e)

    # -- one attempt ------------------------------------------------------------
    async def _attempt(self):
        prompt = self.req.prompt_ids + self.generated
        sampling = self.req.sampling.remaining(len(self.generated))
        tracer = telemetry.tracer()
        hold = _Hold(self.policy)
        with tracer.start_as_current_span("reserve", attributes={tracing.ATTEMPT: self.attempt}) as span:
            d, p, reservation = await self._reserve(prompt, sampling.max_tokens, hold)
            span.set_attributes({tracing.DECODE_WORKER: d.worker_id, tracing.PREFILL_WORKER: p.worker_id if p else "",
                                 "dsv32.reserved_pages": len(reservation.page_ids),
                                 "dsv32.decode_cached_tokens": reservation.cached_tokens,
                                 "dsv32.local_prefill": reservation.local_prefill})
        if reservation.local_prefill:  # D holds all but a short tail of the prompt: it prefills that itself
            hold.release("prefill")
            p = None
        decode_started = False
        try:
            # p is None on a colocated worker (or a local prefill): d runs the prompt itself, in its Decode stream
            self.prefill_worker, self.decode_worker = (p or d).worker_id, d.worker_id
            await self._record("prefilling", prefill_worker=self.prefill_worker, decode_worker=d.worker_id)
            pre = None
            if p is not None:
                with tracer.start_as_current_span("prefill", attributes={
                        tracing.PREFILL_WORKER: p.worker_id, tracing.PROMPT_TOKENS: len(prompt)}) as span:
                    pre = await self._prefill(p, reservation, prompt, sampling, hold)
                    span.set_attributes({"dsv32.sent_bytes": pre.sent_bytes, "dsv32.prefill_queue_s": pre.queue_s,
                                         "dsv32.prefill_compute_s": pre.compute_s,
                                         "dsv32.transfer_wait_s": pre.transfer_wait_s,
                                         "dsv32.cached_tokens": pre.cached_tokens})
                await self._record("transferring", sent_bytes=pre.sent_bytes, prefill_queue_s=round(pre.queue_s, 6),
                                   prefill_compute_s=round(pre.compute_s, 6),
                                   transfer_wait_s=round(pre.transfer_wait_s, 6), prefill_batch=pre.batch_size,
                                   **prompt_accounting(prompt, pre.computed_tokens,
                                                       len(prompt) - reservation.cached_tokens))
            decode_started = True
            with tracer.start_as_current_span("decode", attributes={tracing.DECODE_WORKER: d.worker_id}) as span:
                async with aclosing(self._decode(d, reservation, prompt, sampling, pre)) as decode:
                    async for out in decode:
                        yield out
                span.set_attribute(tracing.COMPLETION_TOKENS, len(self.generated))
        except BaseException:
            if not decode_started:
                # The Decode stream never took the reservation over: free it.
                self.background(self._cancel_on(d, "aborted before decode"))
            raise
        finally:
            hold.release_all()
            await self.directory.notify_changed()  # what this attempt held may let a waiting request fit

    async def _reserve(self, prompt: list[int], max_tokens: int, hold: _Hold
                       ) -> tuple[WorkerInfo, WorkerInfo | None, worker_pb2.ReserveResponse]:
        """Reserve on D (or on a colocated worker, returned as D with P = None)."""
        policy, directory = self.policy, self.directory
        num_prompt = len(prompt)
        colocated = serving_mode(directory.counts()) == "colocated"
        cached = {} if self.req.sampling.skip_prefix_cache else \
            await cached_prefixes(self.state, self.directory.snapshot, prompt)
        affinity = None
        if self.req.session_id:
            try:
                affinity = (await self.state.session(self.req.session_id)).get("decode_worker")
            except Exception as e:
                log.warning("session %s: lookup failed: %s", self.req.session_id, e)
        deadline = time.monotonic() + self.limits.admission_budget(self.context)
        full: set[str] = set()  # refused us since the last registry refresh
        while True:
            snapshot = [w for w in directory.snapshot if w.worker_id not in full]
            try:
                d = policy.choose_decode(snapshot, num_prompt + max_tokens, affinity=affinity,
                                         avoid=frozenset(self.avoid), role="colocated" if colocated else "decode",
                                         cached=cached)
                p = None if colocated else policy.choose_prefill(snapshot, num_prompt, avoid=frozenset(self.avoid),
                                                                 cached=cached)
            except NeverFits as e:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
            except (NoCapacity, NoWorkers) as e:
                if isinstance(e, NoWorkers) and not directory.snapshot:
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
                left = deadline - time.monotonic()
                if left <= 0:
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(e, NoCapacity) or full \
                        else grpc.StatusCode.UNAVAILABLE
                    raise RequestError(code, f"{e}; gave up after waiting") from None
                await directory.wait_changed(min(left, 0.5))
                full.clear()
                continue
            # Counted as this router's load at once, so that a burst of requests
            # choosing together spreads instead of herding onto one stale report.
            hold.add("decode", d.worker_id, requests=1)
            hold.add("decode_pages", d.worker_id, pages=d.pages_for(num_prompt + max_tokens))
            if p is not None:
                hold.add("prefill", p.worker_id, tokens=num_prompt)
            try:
                res = await directory.decode_stub(d).Reserve(worker_pb2.ReserveRequest(
                    request_id=self.worker_request_id, num_prompt_tokens=num_prompt, max_tokens=max_tokens,
                    prefill_worker_id=p.worker_id if p else "", lease_s=self.limits.reserve_lease_s,
                    prompt_ids=prompt, skip_prefix_cache=self.req.sampling.skip_prefix_cache,
                    session_id=self.req.session_id), timeout=min(self._timeout(), 30))
                hold.release("decode_pages")  # D's own report counts them from now on
                return d, p, res
            except BaseException as e:
                hold.release_all()
                if not isinstance(e, grpc.aio.AioRpcError) or e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                                                           grpc.StatusCode.CANCELLED):
                    # cancelled while D may have reserved already: free it now, not at the lease's end
                    self.background(self._cancel_on(d, "cancelled during reserve"))
                if isinstance(e, grpc.aio.AioRpcError):
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        full.add(d.worker_id)
                        continue
                    self._raise_for(e, d.role, d, "reserve")
                raise

    def _raise_for(self, e: grpc.aio.AioRpcError, role: str, worker: WorkerInfo, phase: str):
        code = e.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline_passed(self.context):
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        if code in _RETRYABLE:
            reason = "checksum" if code == grpc.StatusCode.DATA_LOSS else phase
            raise WorkerFailed(role, worker, f"{phase}: {code.name}: {e.details()}", reason) from None
        raise RequestError(grpc.StatusCode.INTERNAL, f"{role} worker {worker.worker_id} rejected {phase}: "
                           f"{code.name}: {e.details()}") from None

    async def _await_alternative(self, role: str) -> None:
        """Before a retry: if every registered worker of ``role`` has failed this request (a dead one stays
        registered until its heartbeat TTL runs out), wait a little for the registry to change (the dead
        one expires, a restart registers under a new pid, another joins) rather than burn an attempt on it."""
        deadline = time.monotonic() + min(RETRY_WAIT_S, self.limits.admission_budget(self.context))
        while time.monotonic() < deadline:
            for w in self.directory.snapshot:
                if w.role == role and self.failed_pids.get(w.worker_id) != w.pid:
                    self.avoid.discard(w.worker_id)  # a restarted worker is a new one
                    return
            await self.directory.wait_changed(min(0.5, max(0.01, deadline - time.monotonic())))

    def _registered(self, w: WorkerInfo) -> bool:
        return any(x.worker_id == w.worker_id for x in self.directory.snapshot)

    async def _prefill(self, p: WorkerInfo, res: worker_pb2.ReserveResponse, prompt: list[int], sampling: Sampling,
                       hold: _Hold) -> worker_pb2.PrefillResponse:
        d = next((w for w in self.directory.snapshot if w.worker_id == res.decode_worker_id), None)
        keep = asyncio.ensure_future(keep_reserved(self.directory.decode_stub(d), self.worker_request_id,
                                                   self.limits.reserve_lease_s, res.lease_s)) if d is not None else None
        try:
            call = self.directory.prefill_stub(p).Prefill(worker_pb2.PrefillRequest(
                request_id=self.worker_request_id, prompt_ids=prompt, sampling=_sampling_pb(sampling),
                decode_worker_id=res.decode_worker_id, transfer_endpoint=res.transfer_endpoint,
                transfer_id=res.transfer_id, dst_page_ids=res.page_ids, transfer_token=res.transfer_token,
                skip_tokens=res.cached_tokens, session_id=self.req.session_id),
                timeout=self._timeout())
            return await watched(call, [p] + ([d] if d is not None else []), self._registered)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and "transfer_endpoint" in (e.details() or ""):
                # P refused to send to D: D left the registry (stopped, expired) since we reserved on it
                gone = d or WorkerInfo(res.decode_worker_id, "decode", "")
                raise WorkerFailed("decode", gone, f"prefill: {e.details()}", "prefill") from None
            self._raise_for(e, "prefill", p, "prefill")
        finally:
            if keep is not None:
                keep.cancel()
            hold.release("prefill")

    async def _decode(self, d: WorkerInfo, res: worker_pb2.ReserveResponse, prompt: list[int], sampling: Sampling,
                      pre: worker_pb2.PrefillResponse | None):
        """``pre`` None: d is a colocated worker, which runs the prompt and samples the first token."""
        request = worker_pb2.DecodeRequest(request_id=self.worker_request_id, transfer_id=res.transfer_id,
                                           prompt_ids=prompt, sampling=_sampling_pb(sampling))
        if pre is not None:
            request.first.CopyFrom(pre.first)
            request.checksum, request.sent_bytes = pre.checksum, pre.sent_bytes
        call = self.directory.decode_stub(d).Decode(request, timeout=self._timeout())
        first = True
        try:
            while True:
                # a colocated worker's first token waits for its own prefill of the prompt: no stall bound on it
                stall = None if first and pre is None else self.limits.stall_timeout_s
                msg = await watched(call.read(), [d], self._registered, stall)
                if msg is grpc.aio.EOF:
                    break
                if first:
                    first = False
                    got = msg.tokens[0].cached_tokens if msg.tokens else 0
                    if self.cached_tokens is None:
                        self.cached_tokens = got
                    # a colocated worker (or a local prefill) ran the prompt: its first token says what it reused
                    await self._record("decoding", **({"received_bytes": msg.received_bytes} if pre is not None
                                                      else prompt_accounting(prompt, len(prompt) - got, 0)))
                out = self._emit(msg.tokens)
                if out is not None:
                    yield out
                if self.finish_reason:
                    break
            if self.finish_reason:
                # read the stream to its end (the worker ends it right after the last token): a call left
                # open keeps its client span open until it is collected
                await _drain(call, 1.0)
                return
        except grpc.aio.AioRpcError as e:
            self._raise_for(e, d.role, d, "decode" if not first else "verify" if pre is not None else "prefill")
        finally:
            call.cancel()  # no-op when the stream ended; frees D's pages otherwise
        if not self.finish_reason:
            raise WorkerFailed(d.role, d, "stream ended without a finish reason")

    async def _cancel_on(self, d: WorkerInfo, reason: str) -> None:
        try:
            await self.directory.decode_stub(d).Cancel(
                worker_pb2.CancelRequest(request_id=self.worker_request_id, reason=reason), timeout=5)
        except Exception as e:
            log.debug("cancel on %s failed: %s", d.worker_id, e)

    # -- streaming ---------------------------------------------------------------
    def _emit(self, tokens) -> serving_pb2.GenerateResponse | None:
        """The next message for the client (None if nothing to say yet), with timing and usage."""
        out = self.tokens.push(tokens)
        if out is None:
            return None
        now = time.monotonic()
        if out.token_ids:
            if self.ttft is None:
                self.ttft = now - self.t0
                metrics.process().ttft.observe(self.ttft)
            elif self._last_token_at is not None:  # a message of k tokens: k gaps of equal share
                gap = (now - self._last_token_at) / len(out.token_ids)
                for _ in out.token_ids:
                    metrics.process().itl.observe(gap)
            self._last_token_at = now
        if not self._announced:
            self._announced = True
            out.prefill_worker, out.decode_worker = self.prefill_worker, self.decode_worker
        if out.finish_reason:
            out.usage.CopyFrom(serving_pb2.Usage(prompt_tokens=len(self.req.prompt_ids),
                                                 completion_tokens=len(self.generated),
                                                 time_to_first_token_s=self.ttft or 0.0,
                                                 e2e_s=time.monotonic() - self.t0,
                                                 cached_tokens=min(self.cached_tokens or 0, len(self.req.prompt_ids))))
        return out
