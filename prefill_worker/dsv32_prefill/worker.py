"""``dsv32-serve prefill``: the prefill worker process (life cycle: :mod:`dsv32_prefill`).

Every flag has an environment variable ``DSV32_<FLAG>`` for deployments.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

import grpc
from grpc_health.v1 import health_pb2

from dsv32_cluster import tracing
from dsv32_cluster.envflags import add_env_argument
from dsv32_cluster.heartbeat import WorkerLoad
from dsv32_cluster.state import ClusterState
from dsv32_cluster.runtime import (add_worker_arguments, drain, engine_params, serve_worker, start_worker,
                                   token_pb)
from .scheduler import PrefillJob, PrefillScheduler, QueueFull
from dsv32_proto import worker_pb2, worker_pb2_grpc

log = logging.getLogger("dsv32_prefill")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_worker_arguments(p)
    add_env_argument(p, "--max-queued-tokens", type=int, default=65536,
                     help="prompt tokens allowed to wait; beyond, Prefill answers RESOURCE_EXHAUSTED")


class DecodeTargets:
    """The decode workers' transfer endpoints as registered in Redis, re-read at most every ``refresh_s``
    (and at once for a pair not seen yet, at most every ``miss_s``)."""

    def __init__(self, state, refresh_s: float = 2.0, miss_s: float = 0.2):
        self.state, self.refresh_s, self.miss_s = state, refresh_s, miss_s
        self._known: dict[str, str] = {}
        self._at = 0.0
        self._mu = threading.Lock()

    def refusal(self, decode_id: str, endpoint: str) -> str:
        """Why KV must not go to ``endpoint`` for ``decode_id`` ("" if it may)."""
        with self._mu:
            now = time.monotonic()
            stale = now - self._at > self.refresh_s
            if stale or (self._known.get(decode_id) != endpoint and now - self._at > self.miss_s):
                try:
                    self._known = {w.worker_id: w.transfer_endpoint for w in self.state.workers()
                                   if w.role == "decode" and w.transfer_endpoint}
                    self._at = now
                except Exception as e:
                    return f"the worker registry cannot be read ({e})"
            if decode_id not in self._known:
                return f"{decode_id!r} is not a registered decode worker"
            if self._known[decode_id] != endpoint:
                return f"{endpoint!r} is not where decode worker {decode_id} receives KV"
            return ""


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker_id: str, engine, scheduler: PrefillScheduler, fault_injection: bool):
        self.worker_id, self.engine, self.scheduler = worker_id, engine, scheduler
        self.fault_injection = fault_injection
        self.jobs: dict[str, PrefillJob] = {}
        self.draining = False
        self.decode_targets = None
        """``DecodeTargets``: the registered decode workers KV may be sent to (None: no check, in-process tests)."""
        from dsv32_cluster.sessions import DEFAULT_SESSION_TTL_S
        from dsv32_engine.prefix_cache import SessionPages

        self.sessions = SessionPages(engine, scheduler.pages_lock, DEFAULT_SESSION_TTL_S)

    def Prefill(self, request, context):
        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill worker {self.worker_id} is draining")
        if not request.prompt_ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_ids: must not be empty")
        if not request.transfer_id or not request.decode_worker_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "transfer_id, decode_worker_id: required")
        if request.request_id in self.jobs:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {request.request_id} is already prefilling here")
        if request.skip_tokens >= len(request.prompt_ids) or request.skip_tokens % self.engine.layout.page_size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"skip_tokens: {request.skip_tokens} must be a multiple of "
                          f"the page size {self.engine.layout.page_size} below the prompt's {len(request.prompt_ids)}")
        if len(request.session_id) > 256:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id: at most 256 characters")
        if self.decode_targets is not None:
            why = self.decode_targets.refusal(request.decode_worker_id, request.transfer_endpoint)
            if why:  # never dial an address a caller made up: only what a registered decode worker advertises
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"transfer_endpoint: {why}")
        job = PrefillJob(request.request_id, list(request.prompt_ids), engine_params(request.sampling),
                         request.transfer_id, request.transfer_endpoint, request.decode_worker_id,
                         token=request.transfer_token, skip_tokens=request.skip_tokens)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill worker {self.worker_id}: {e}")
        self.jobs[request.request_id] = job
        context.add_callback(lambda: self.scheduler.cancel(job))
        try:
            while not job.done.wait(0.25):
                if not context.is_active():
                    return worker_pb2.PrefillResponse()  # nobody is listening
        finally:
            self.jobs.pop(request.request_id, None)
        if job.error:
            code = grpc.StatusCode.CANCELLED if job.cancelled else grpc.StatusCode.UNAVAILABLE
            context.abort(code, f"prefill worker {self.worker_id}: {job.error}")
        tr = job.transfer
        self._trace(job)
        if not job.params.skip_prefix_cache:
            self.sessions.note(request.session_id, job.prompt_ids)
        job.first.cached_tokens = job.cached_tokens
        return worker_pb2.PrefillResponse(
            first=token_pb(job.first), checksum=tr.checksum, sent_bytes=tr.num_bytes, prompt_tokens=len(job.prompt_ids),
            queue_s=job.queue_s, compute_s=job.compute_s, transfer_wait_s=tr.wait_after_last_layer_s,
            batch_size=job.batch_size, cached_tokens=job.cached_tokens,
            computed_tokens=len(job.prompt_ids) - job.cached_tokens)

    def _trace(self, job: PrefillJob) -> None:
        """The job's phases as spans under this RPC's span (timed on the scheduler's threads)."""
        tr, start = job.transfer, job.enqueued_at + job.queue_s
        span = tracing.current()
        if not span.is_recording():
            return
        span.set_attributes({tracing.REQUEST_ID: job.request_id, tracing.WORKER: self.worker_id,
                             tracing.PROMPT_TOKENS: len(job.prompt_ids), tracing.DECODE_WORKER: job.decode_id})
        tracing.span_between("queue", job.enqueued_at, start)
        compute = tracing.span_between("compute", start, start + job.compute_s,
                                       {"dsv32.batch_size": job.batch_size, tracing.PROMPT_TOKENS: len(job.prompt_ids)})
        for layer, t0, t1 in job.layer_sends:
            tracing.child_between(compute, "send_layer", t0, t1, {"dsv32.layer": layer})
        pages = self.engine.layout.pages_for(len(job.prompt_ids))
        tracing.span_between("transfer", start, start + tr.elapsed_s, {
            "dsv32.transfer.bytes": tr.num_bytes, "dsv32.transfer.pages": pages,
            "dsv32.transfer.checksum_s": tr.checksum_s, "dsv32.transfer.wait_after_last_layer_s":
            tr.wait_after_last_layer_s, "dsv32.transfer.id": job.transfer_id, tracing.DECODE_WORKER: job.decode_id})

    def ReleaseSession(self, request, context):
        if not request.session_id or len(request.session_id) > 256:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id: must be 1-256 characters")
        return worker_pb2.ReleaseSessionResponse(released_pages=self.sessions.release(request.session_id))

    def Cancel(self, request, context):
        job = self.jobs.get(request.request_id)
        if job is not None:
            self.scheduler.cancel(job)
        return worker_pb2.CancelResponse(found=job is not None)

    def healthy(self) -> str:
        """Why this worker cannot serve ("" if it can): the batch loop or the inflight poller has died."""
        s = self.scheduler
        if not s._stop and s._thread.ident and not s._thread.is_alive():
            return "prefill loop died"
        if not s.inflight._stop and s.inflight._thread.ident and not s.inflight._thread.is_alive():
            return "inflight poller died"
        return ""

    def load(self) -> WorkerLoad:
        """Pages held by transfers in flight are not free; the router balances on the tokens still to compute."""
        s, alloc = self.scheduler, self.engine.allocator
        return WorkerLoad(free_pages=alloc.num_free, total_pages=alloc.num_total, running=1 if s.running_tokens else 0,
                          queued_requests=s.num_waiting, queued_tokens=s.queued_tokens + s.running_tokens)

    def stats(self) -> worker_pb2.WorkerStats:
        c = self.scheduler.counters
        return worker_pb2.WorkerStats(
            worker_id=self.worker_id, role="prefill", **self.load().stats_fields(),
            prefill_forward_tokens=self.engine.stats.get("prefill_tokens", 0), bytes_sent=c["bytes_sent"],
            requests_finished=c["requests"], requests_aborted=c["failed"], cached_pages=self.engine.allocator.num_cached,
            cached_tokens=self.engine.prefix.hit_tokens if self.engine.prefix is not None else 0)

    def Stats(self, request, context):
        return self.stats()

    def InjectFault(self, request, context):
        """Test hook: corrupt the next ``count`` transfers in flight (after the sender's checksum)."""
        if not self.fault_injection:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "fault injection is off (--enable-fault-injection)")
        kinds = {"corrupt_next_transfer": "corrupt-index", "corrupt_index": "corrupt-index",
                 "corrupt_latent": "corrupt-latent", "none": "", "": ""}
        if request.kind not in kinds:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kind: unknown fault {request.kind!r}")
        sender = self.scheduler.sender
        if kinds[request.kind]:
            sender.arm_fault(kinds[request.kind], max(1, request.count))
        else:
            sender.disarm_fault()
        return worker_pb2.FaultResponse()


def run(args: argparse.Namespace) -> int:
    from dsv32_engine.transfer import KVSender

    engine = start_worker("prefill", args)  # --ep-size N: this process is rank 0 and starts the others
    worker_id = args.worker_id
    sender = KVSender(engine.cache, worker_id, args.transfer_timeout)
    sched = PrefillScheduler(engine, sender, budget_tokens=args.max_num_batched_tokens,
                             max_queued_tokens=args.max_queued_tokens, transfer_timeout_s=args.transfer_timeout).start()
    svc = PrefillService(worker_id, engine, sched, args.enable_fault_injection)
    svc.decode_targets = DecodeTargets(ClusterState.from_url(args.redis_url, args.redis_prefix))
    svc.sessions.ttl_s = args.session_ttl
    server, hs, hb, stop, _ = serve_worker("prefill", args, svc, worker_pb2_grpc.add_PrefillWorkerServicer_to_server,
                                           svc.load, max_threads=64)
    sched.on_change = hb.poke
    while not stop.wait(0.25):
        try:
            svc.sessions.expire()  # sessions past their TTL give their pages back
        except Exception:
            log.exception("session expiry")
        why = svc.healthy()
        if why:  # NOT_SERVING, out of the registry, exit: the supervisor restarts a clean process
            log.error("prefill worker %s is broken (%s); exiting", worker_id, why)
            hs.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            break
    log.info("prefill worker %s shutting down", worker_id)
    hb.stop(deregister=True)
    hs.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    if not svc.healthy():  # requests in flight finish (their RPCs stay open), nothing new is queued meanwhile
        svc.draining = True
        drain(lambda: sched.num_waiting + (1 if sched.running_tokens else 0) + len(sched.inflight),
              args.drain_timeout)
    hs.enter_graceful_shutdown()
    server.stop(grace=2.0).wait()
    sched.stop()
    try:
        sender.close()
    except Exception:
        pass
    return 1 if svc.healthy() else 0
