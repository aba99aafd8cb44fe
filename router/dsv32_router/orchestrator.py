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
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from dsv32_proto import serving_pb2, worker_pb2
from dsv32_cluster import telemetry
from dsv32_cluster.directory import WorkerDirectory
from .policy import NeverFits, NoCapacity, NoWorkers, PairPolicy
from dsv32_cluster.state import AsyncClusterState, InvalidTransition, WorkerInfo
from .stream import TokenStream
from .validation import ModelSpec, RequestError, ResolvedRequest, Sampling, resolve

log = logging.getLogger(__name__)
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED,
              grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class RouterLimits:
    max_inflight: int = 256
    """Requests between admission and finish."""
    max_waiting: int = 256
    """Requests waiting for a slot or for capacity; more → RESOURCE_EXHAUSTED at once."""
    admission_timeout_s: float = 10.0
    """How long a request may wait for a slot or for decode capacity."""
    max_attempts: int = 3
    """Pairs tried per request (worker failure, checksum mismatch)."""
    reserve_lease_s: float = 30.0
    """A reservation not followed by its Decode stream within this is freed by D."""
    worker_timeout_s: float = 600.0
    """Bound on a worker call when the client set no deadline."""

    def __post_init__(self) -> None:
        for name in ("max_inflight", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_waiting",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class WorkerFailed(Exception):
    """One attempt failed on a worker; the request may be retried on another pair."""

    def __init__(self, role: str, worker: WorkerInfo, message: str, reason: str = "error"):
        super().__init__(f"{role} worker {worker.worker_id}: {message}")
        self.role, self.worker, self.reason = role, worker, reason


def _sampling_pb(s: Sampling) -> worker_pb2.WorkerSampling:
    return worker_pb2.WorkerSampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                     max_tokens=s.max_tokens, seed=s.seed, stop_token_ids=s.stop_token_ids,
                                     ignore_eos=s.ignore_eos, logprobs=s.logprobs)


class Orchestrator:
    def __init__(self, spec: ModelSpec, tokenizer, state: AsyncClusterState, directory: WorkerDirectory,
                 limits: RouterLimits, router_id: str):
        self.spec, self.tokenizer, self.state, self.directory = spec, tokenizer, state, directory
        self.limits, self.router_id = limits, router_id
        self.policy = PairPolicy()
        self._slots = asyncio.Semaphore(limits.max_inflight)
        self._waiting = 0
        self._background: set[asyncio.Task] = set()
        self.released = asyncio.Event()  # set whenever a request leaves a decode worker

    def background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def record(self, request_id: str, new_state: str, **extra) -> None:
        """Best effort after creation: a Redis hiccup must not kill a healthy stream."""
        try:
            await self.state.transition(request_id, new_state, **extra)
        except InvalidTransition as e:
            log.debug("%s", e)
        except Exception as e:
            log.warning("request %s: could not record %s: %s", request_id, new_state, e)

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
            telemetry.INFLIGHT.labels("router").inc()
            try:
                async with aclosing(RequestRun(self, req, context).stream()) as stream:
                    async for out in stream:
                        yield out
            finally:
                telemetry.INFLIGHT.labels("router").dec()
        finally:
            self._slots.release()

    async def _admit(self, context) -> None:
        if self._slots.locked() and self._waiting >= self.limits.max_waiting:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"router busy: {self.limits.max_inflight} requests running and "
                               f"{self._waiting} waiting; retry later")
        self._waiting += 1
        telemetry.WAITING.labels("router").inc()
        try:
            await asyncio.wait_for(self._slots.acquire(), self.admission_budget(context))
        except asyncio.TimeoutError:
            if _deadline_passed(context):
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while waiting") from None
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "router busy: no slot freed in time") from None
        finally:
            self._waiting -= 1
            telemetry.WAITING.labels("router").dec()

    def mode(self) -> str | None:
        """``disaggregated`` while a (prefill, decode) pair is registered, else ``colocated``
        while a colocated worker is, else None. A cluster is meant to run one mode; one that
        has both serves through its pairs."""
        counts = self.directory.counts()
        if counts["prefill"] and counts["decode"]:
            return "disaggregated"
        return "colocated" if counts["colocated"] else None

    def admission_budget(self, context) -> float:
        left = context.time_remaining() if context is not None else None
        return self.limits.admission_timeout_s if left is None else max(0.0, min(left, self.limits.admission_timeout_s))


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


def _deadline_passed(context) -> bool:
    left = context.time_remaining() if context is not None else None
    return left is not None and left <= 0.05


class RequestRun:
    """One request's attempts, stream state and bookkeeping."""

    def __init__(self, orch: Orchestrator, req: ResolvedRequest, context):
        self.orch, self.req, self.context = orch, req, context
        self.limits = orch.limits
        self.tokens = TokenStream(orch.tokenizer, req, orch.spec.eos_token_id)
        self.t0 = time.monotonic()
        self.ttft: float | None = None
        self.avoid: set[str] = set()
        self.prefill_worker = self.decode_worker = ""
        self._announced = False
        self.attempt = 0

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
        left = self.context.time_remaining() if self.context is not None else None
        return self.limits.worker_timeout_s if left is None else max(0.01, left)

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
                    telemetry.RETRIES.labels(e.reason).inc()
                    log.warning("request %s attempt %d failed: %s", rid, attempt, e)
                    if _deadline_passed(self.context):
                        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
                    if attempt < self.limits.max_attempts:
                        await self.orch.record(rid, "queued", error=last_error)
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"request failed on {self.limits.max_attempts} worker pairs; last: {last_error}")
        except RequestError as e:
            state = "cancelled" if e.code == grpc.StatusCode.DEADLINE_EXCEEDED else "failed"
            await self.orch.record(rid, state, error=e.message, completion_tokens=len(self.generated))
            raise
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: closed by the handler mid-stream
            why = "deadline exceeded" if _deadline_passed(self.context) else "client cancelled"
            self.orch.background(self.orch.record(rid, "cancelled", error=why, completion_tokens=len(self.generated)))
            raise
        except Exception as e:
            log.exception("request %s: internal error", rid)
            await self.orch.record(rid, "failed", error=f"internal: {e}")
            raise RequestError(grpc.StatusCode.INTERNAL, f"internal error: {e}") from None

    async def _finished(self) -> None:
        rid, n = self.req.request_id, len(self.generated)
        e2e = time.monotonic() - self.t0
        if n > 1 and self.ttft is not None:
            telemetry.TPOT.observe((e2e - self.ttft) / (n - 1))
        telemetry.TOKENS.labels("router", "completion").inc(n)
        await self.orch.record(rid, "finished", finish_reason=self.finish_reason, completion_tokens=n,
                               ttft_s=round(self.ttft or 0.0, 6), e2e_s=round(e2e, 6))
        if self.req.session_id:
            try:
                await self.orch.state.record_turn(self.req.session_id, rid, self.decode_worker,
                                                  len(self.req.prompt_ids), n)
            except Exception as e:
                log.warning("session %s: could not record turn: %s", self.req.session_id, e)

    # -- one attempt ------------------------------------------------------------
    async def _attempt(self):
        prompt = self.req.prompt_ids + self.generated
        sampling = self.req.sampling.remaining(len(self.generated))
        tracer = telemetry.tracer()
        hold = _Hold(self.orch.policy)
        with tracer.start_as_current_span("admit"):
            d, p, reservation = await self._reserve(len(prompt), sampling.max_tokens, hold)
        decode_started = False
        try:
            # p is None on a colocated worker: d runs the prompt itself, inside its Decode stream
            self.prefill_worker, self.decode_worker = (p or d).worker_id, d.worker_id
            await self.orch.record(self.req.request_id, "prefilling", prefill_worker=self.prefill_worker,
                                   decode_worker=d.worker_id)
            pre = None
            if p is not None:
                with tracer.start_as_current_span("prefill"):
                    pre = await self._prefill(p, reservation, prompt, sampling, hold)
                await self.orch.record(self.req.request_id, "transferring", sent_bytes=pre.sent_bytes,
                                       prefill_queue_s=round(pre.queue_s, 6), prefill_compute_s=round(pre.compute_s, 6),
                                       transfer_wait_s=round(pre.transfer_wait_s, 6), prefill_batch=pre.batch_size)
            decode_started = True
            with tracer.start_as_current_span("decode"):
                async with aclosing(self._decode(d, reservation, prompt, sampling, pre)) as decode:
                    async for out in decode:
                        yield out
        except BaseException:
            if not decode_started:
                # The Decode stream never took the reservation over: free it.
                self.orch.background(self._cancel_on(d, "aborted before decode"))
            raise
        finally:
            hold.release_all()
            self.orch.released.set()
            self.orch.released = asyncio.Event()

    async def _reserve(self, num_prompt: int, max_tokens: int, hold: _Hold
                       ) -> tuple[WorkerInfo, WorkerInfo | None, worker_pb2.ReserveResponse]:
        """Reserve on D (or on a colocated worker, returned as D with P = None)."""
        orch, policy = self.orch, self.orch.policy
        colocated = orch.mode() == "colocated"
        affinity = None
        if self.req.session_id:
            try:
                affinity = (await orch.state.session(self.req.session_id)).get("decode_worker")
            except Exception as e:
                log.warning("session %s: lookup failed: %s", self.req.session_id, e)
        need_pages = policy.pages_for(num_prompt + max_tokens)
        deadline = time.monotonic() + orch.admission_budget(self.context)
        full: set[str] = set()  # refused us since the last registry refresh
        while True:
            snapshot = [w for w in orch.directory.snapshot if w.worker_id not in full]
            try:
                d = policy.choose_decode(snapshot, num_prompt + max_tokens, affinity=affinity,
                                         avoid=frozenset(self.avoid), role="colocated" if colocated else "decode")
                p = None if colocated else policy.choose_prefill(snapshot, num_prompt, avoid=frozenset(self.avoid))
            except NeverFits as e:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
            except (NoCapacity, NoWorkers) as e:
                if isinstance(e, NoWorkers) and not orch.directory.snapshot:
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
                left = deadline - time.monotonic()
                if left <= 0:
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(e, NoCapacity) or full \
                        else grpc.StatusCode.UNAVAILABLE
                    raise RequestError(code, f"{e}; gave up after waiting") from None
                await self._wait_for_change(min(left, 0.5))
                full.clear()
                continue
            # Counted as this router's load at once, so that a burst of requests
            # choosing together spreads instead of herding onto one stale report.
            hold.add("decode", d.worker_id, requests=1)
            hold.add("decode_pages", d.worker_id, pages=need_pages)
            if p is not None:
                hold.add("prefill", p.worker_id, tokens=num_prompt)
            try:
                res = await orch.directory.decode_stub(d).Reserve(worker_pb2.ReserveRequest(
                    request_id=self.worker_request_id, num_prompt_tokens=num_prompt, max_tokens=max_tokens,
                    prefill_worker_id=p.worker_id if p else "", lease_s=self.limits.reserve_lease_s),
                    timeout=min(self._timeout(), 30))
                hold.release("decode_pages")  # D's own report counts them from now on
                return d, p, res
            except BaseException as e:
                hold.release_all()
                if isinstance(e, grpc.aio.AioRpcError):
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        full.add(d.worker_id)
                        continue
                    self._raise_for(e, d.role, d, "reserve")
                raise

    async def _wait_for_change(self, timeout: float) -> None:
        waits = [asyncio.ensure_future(self.orch.directory.changed.wait()),
                 asyncio.ensure_future(self.orch.released.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _raise_for(self, e: grpc.aio.AioRpcError, role: str, worker: WorkerInfo, phase: str):
        code = e.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and _deadline_passed(self.context):
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        if code in _RETRYABLE:
            reason = "checksum" if code == grpc.StatusCode.DATA_LOSS else phase
            raise WorkerFailed(role, worker, f"{phase}: {code.name}: {e.details()}", reason) from None
        raise RequestError(grpc.StatusCode.INTERNAL, f"{role} worker {worker.worker_id} rejected {phase}: "
                           f"{code.name}: {e.details()}") from None

    async def _prefill(self, p: WorkerInfo, res: worker_pb2.ReserveResponse, prompt: list[int], sampling: Sampling,
                       hold: _Hold) -> worker_pb2.PrefillResponse:
        try:
            return await self.orch.directory.prefill_stub(p).Prefill(worker_pb2.PrefillRequest(
                request_id=self.worker_request_id, prompt_ids=prompt, sampling=_sampling_pb(sampling),
                decode_worker_id=res.decode_worker_id, transfer_endpoint=res.transfer_endpoint,
                transfer_id=res.transfer_id, dst_page_ids=res.page_ids), timeout=self._timeout())
        except grpc.aio.AioRpcError as e:
            self._raise_for(e, "prefill", p, "prefill")
        finally:
            hold.release("prefill")

    async def _decode(self, d: WorkerInfo, res: worker_pb2.ReserveResponse, prompt: list[int], sampling: Sampling,
                      pre: worker_pb2.PrefillResponse | None):
        """``pre`` None: d is a colocated worker, which runs the prompt and samples the first token."""
        request = worker_pb2.DecodeRequest(request_id=self.worker_request_id, transfer_id=res.transfer_id,
                                           prompt_ids=prompt, sampling=_sampling_pb(sampling))
        if pre is not None:
            request.first.CopyFrom(pre.first)
            request.checksum, request.sent_bytes = pre.checksum, pre.sent_bytes
        call = self.orch.directory.decode_stub(d).Decode(request, timeout=self._timeout())
        first = True
        try:
            async for msg in call:
                if first:
                    first = False
                    await self.orch.record(self.req.request_id, "decoding",
                                           **({"received_bytes": msg.received_bytes} if pre is not None else {}))
                out = self._emit(msg.tokens)
                if out is not None:
                    yield out
                if self.finish_reason:
                    return
        except grpc.aio.AioRpcError as e:
            self._raise_for(e, d.role, d, "decode" if not first else "verify" if pre is not None else "prefill")
        finally:
            call.cancel()  # no-op when the stream ended; frees D's pages otherwise
        if not self.finish_reason:
            raise WorkerFailed(d.role, d, "stream ended without a finish reason")

    async def _cancel_on(self, d: WorkerInfo, reason: str) -> None:
        try:
            await self.orch.directory.decode_stub(d).Cancel(
                worker_pb2.CancelRequest(request_id=self.worker_request_id, reason=reason), timeout=5)
        except Exception as e:
            log.debug("cancel on %s failed: %s", d.worker_id, e)

    # -- streaming ---------------------------------------------------------------
    def _emit(self, tokens) -> serving_pb2.GenerateResponse | None:
        """The next message for the client (None if nothing to say yet), with timing and usage."""
        out = self.tokens.push(tokens)
        if out is None:
            return None
        if self.ttft is None and out.token_ids:
            self.ttft = time.monotonic() - self.t0
            telemetry.TTFT.observe(self.ttft)
        if not self._announced:
            self._announced = True
            out.prefill_worker, out.decode_worker = self.prefill_worker, self.decode_worker
        if out.finish_reason:
            out.usage.CopyFrom(serving_pb2.Usage(prompt_tokens=len(self.req.prompt_ids),
                                                 completion_tokens=len(self.generated),
                                                 time_to_first_token_s=self.ttft or 0.0,
                                                 e2e_s=time.monotonic() - self.t0))
        return out
