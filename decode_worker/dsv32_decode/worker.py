"""``dsv32-serve decode``: the decode worker process (life cycle: :mod:`dsv32_decode`).

Every flag has an environment variable ``DSV32_<FLAG>`` for deployments.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import queue
import secrets
import threading
import time
import uuid

import grpc
from grpc_health.v1 import health_pb2

from .queues import Admission, PreallocQueue, RunningBatch
from .transfer_queue import DecodeTransferQueue, Incoming, KVFailed, KVRejected, Verified
from dsv32_proto import worker_pb2, worker_pb2_grpc
from dsv32_cluster import tracing
from dsv32_cluster.envflags import add_env_argument
from dsv32_cluster.heartbeat import WorkerLoad
from dsv32_cluster.sessions import DEFAULT_SESSION_TTL_S
from dsv32_cluster.runtime import (add_worker_arguments, advertised_host, drain, engine_params, serve_worker,
                                   start_worker, step_output, token_pb)

log = logging.getLogger("dsv32_decode")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_worker_arguments(p)
    add_env_argument(p, "--transfer-port", type=int, default=0,
                     help="port of the KV receiver's TCPStore (0 = any free port)")
    add_env_argument(p, "--max-reserve-lease", type=float, default=MAX_LEASE_S,
                     help="cap on a reservation's lease, seconds, whatever Reserve asks for; the lease is "
                          "renewed while the KV arrives")
    add_env_argument(p, "--max-reserve-hold", type=float, default=MAX_HOLD_S,
                     help="cap on how long a reservation may wait for its Decode stream, renewals included, seconds")
    add_env_argument(p, "--local-prefill-tokens", type=int, default=LOCAL_PREFILL_TOKENS,
                     help="when this worker's prefix cache holds the start of a prompt and at most this many "
                          "prompt tokens are left, it prefills them itself instead of receiving them (0 = never)")


LOCAL_PREFILL_TOKENS = 128
MAX_LEASE_S = 60.0
MAX_HOLD_S = 900.0
MAX_TOKENS = 1 << 24


class DecodeService(worker_pb2_grpc.DecodeWorkerServicer):
    role = "decode"
    receives_kv = True
    """False on a colocated worker (:class:`dsv32_decode.colocated.ColocatedService`): no
    receiver, no transfer; the engine runs the prompt itself."""

    def __init__(self, worker_id: str, engine, receiver, transfer_timeout_s: float):
        self.worker_id, self.engine, self.receiver = worker_id, engine, receiver
        self.transfer_timeout_s = transfer_timeout_s
        self.lock = threading.Lock()
        self.prealloc = PreallocQueue(engine, self.lock, self._release_transfer)
        self.batch = RunningBatch(engine, self.lock, on_leave=lambda rid: self.prealloc.drop(rid, free_pages=False))
        self.transfers = (DecodeTransferQueue(receiver, self.batch, lambda rid: self.prealloc.drop(rid, free_pages=True))
                          if receiver is not None else None)
        self.accepting = True
        self.max_lease_s, self.max_hold_s = MAX_LEASE_S, MAX_HOLD_S
        self.local_prefill_tokens = LOCAL_PREFILL_TOKENS if receiver is not None else 0
        from dsv32_engine.prefix_cache import SessionPages

        self.sessions = SessionPages(engine, self.lock, DEFAULT_SESSION_TTL_S)
        self.batch.on_finished = self._finished
        self.leases: dict[str, tuple[float, float]] = {}  # request id -> (lease, hold cap): renewal on progress
        # what prefill workers dial (serve() may advertise another host)
        self.transfer_endpoint = receiver.endpoint if receiver is not None else ""

    # -- reserve -----------------------------------------------------------------
    def _check_reserve(self, request, context) -> float:
        """Every field of a Reserve (any peer can send one); the lease it gets (capped)."""
        if not self.accepting:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"decode worker {self.worker_id} is shutting down")
        if not request.request_id or len(request.request_id) > 256:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must be 1-256 characters")
        limit = MAX_TOKENS  # beyond the pool is RESOURCE_EXHAUSTED below; this only keeps the arithmetic sane
        if not 1 <= request.num_prompt_tokens <= limit:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"num_prompt_tokens: must be in [1, {limit}]")
        if not 0 <= request.max_tokens <= limit:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_tokens: must be in [0, {limit}]")
        if self.receives_kv and not request.prefill_worker_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prefill_worker_id: required")
        if request.prompt_ids and len(request.prompt_ids) != request.num_prompt_tokens:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt_ids: {len(request.prompt_ids)} ids for "
                          f"num_prompt_tokens {request.num_prompt_tokens}")
        if len(request.session_id) > 256:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id: at most 256 characters")
        lease = request.lease_s
        if not math.isfinite(lease) or lease <= 0:  # 0: not given
            lease = self.max_lease_s
        return min(lease, self.max_lease_s)

    def Reserve(self, request, context):
        if request.renew:
            return self._renew(request, context)
        lease = self._check_reserve(request, context)
        tid = f"{request.request_id}/{uuid.uuid4().hex[:8]}"
        try:
            res = self.prealloc.reserve(request.request_id, tid, request.num_prompt_tokens, max(1, request.max_tokens),
                                        request.prefill_worker_id, lease, prompt_pages=self.receives_kv,
                                        prompt_ids=list(request.prompt_ids),
                                        params=engine_params(worker_pb2.WorkerSampling(
                                            skip_prefix_cache=request.skip_prefix_cache)),
                                        local_prefill_tokens=self.local_prefill_tokens,
                                        session_id=request.session_id)
        except KeyError as e:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        if res is None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"decode worker {self.worker_id}: {self.free_pages()} of {self.engine.allocator.num_total} "
                          "pages uncommitted; not enough for this request")
        transfer = self.receives_kv and not res.local
        token = secrets.token_hex(16) if transfer else ""
        if transfer:
            try:
                self.receiver.expect(tid, request.prefill_worker_id, res.transfer_pages, token=token)
            except Exception as e:
                self.prealloc.drop(request.request_id, free_pages=True)
                context.abort(grpc.StatusCode.UNAVAILABLE, f"KV receiver refused the transfer: {e}")
            # renewed on the transfer's progress (renew_leases)
            self.leases[request.request_id] = (lease, time.monotonic() + self.max_hold_s)
        layout, layers = self.engine.layout, len(self.engine.cache.latent)
        return worker_pb2.ReserveResponse(
            decode_worker_id=self.worker_id, transfer_endpoint=self.transfer_endpoint if transfer else "",
            transfer_id=tid, page_ids=res.transfer_pages, page_size=layout.page_size, transfer_token=token,
            lease_s=lease, expected_bytes=len(res.transfer_pages) * layers * self.page_bytes(),
            cached_tokens=res.cached_pages * layout.page_size, local_prefill=res.local)

    def _renew(self, request, context):
        """The router's prompt still waits on its prefill worker: extend the reservation (capped as ever)."""
        rid = request.request_id
        res, lease = self.prealloc.get(rid), self.leases.get(rid)
        if res is None or res.taken or lease is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no reservation for {rid} to renew")
        asked = request.lease_s if math.isfinite(request.lease_s) and request.lease_s > 0 else lease[0]
        self.prealloc.renew(rid, min(asked, self.max_lease_s), lease[1])
        return worker_pb2.ReserveResponse(decode_worker_id=self.worker_id, transfer_id=res.transfer_id,
                                          lease_s=min(asked, self.max_lease_s))

    def page_bytes(self) -> int:
        """Bytes of one page in one layer as transferred (latent + indexer, if the model has one)."""
        cache = self.engine.cache
        index = cache.layout.index_page_bytes if cache.index[0].shape[0] else 0
        return cache.layout.latent_page_bytes + index

    def _release_transfer(self, transfer_id: str) -> None:
        if self.receiver is None:
            return
        try:
            self.receiver.release(transfer_id)
        except Exception as e:
            log.debug("release of %s: %s", transfer_id, e)

    # -- decode ----------------------------------------------------------------------
    def Decode(self, request, context):
        rid = request.request_id
        res = self.prealloc.take(rid, request.transfer_id)
        if res is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no reservation {request.transfer_id} for {rid} "
                          "(lease expired or cancelled)")
        try:
            adm = self._admission(request, res, context)
        except BaseException:
            self.prealloc.drop(rid, free_pages=True)
            raise
        context.add_callback(lambda: self.batch.abort(rid))  # no-op once it has left the batch
        tracing.current().set_attributes({tracing.REQUEST_ID: rid, tracing.WORKER: self.worker_id,
                                          tracing.PROMPT_TOKENS: len(request.prompt_ids)})
        try:
            yield from self._stream(adm, context, request.first if self.receives_kv and not res.local else None)
        finally:
            if self.transfers is not None and self.transfers.discard(rid):
                self.prealloc.drop(rid, free_pages=True)  # the stream ended before its KV arrived
            else:
                self.batch.abort(rid)  # in case the transfer queue admitted it after the callback ran

    def _admission(self, request, res, context) -> Admission:
        """The request, handed to the transfer queue: it joins the running batch once its KV is here and
        verified, and the stream's first message echoes the prefill worker's first token. (A reservation
        that is ``local``: straight to the running batch, which prefills the uncached rest.)"""
        if res.local:
            if request.HasField("first"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"first: decode worker {self.worker_id} prefills "
                              "this prompt itself (its reservation said local_prefill)")
            adm = Admission(request.request_id, list(request.prompt_ids), engine_params(request.sampling),
                            page_ids=None, first=None, cached_pages=res.page_ids, session_id=res.session_id)
            self.batch.admit(adm)
            return adm
        if not request.HasField("first"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"first: missing; decode worker {self.worker_id} "
                          "continues from the prefill worker's first token")
        adm = Admission(request.request_id, list(request.prompt_ids), engine_params(request.sampling), res.page_ids,
                        step_output(request.request_id, request.first), session_id=res.session_id)
        self.transfers.add(Incoming(adm, res.transfer_id, request.checksum, request.sent_bytes,
                                    deadline=time.monotonic() + self.transfer_timeout_s))
        return adm

    def _stream(self, adm: Admission, context, first: worker_pb2.Token | None):
        """Forward the request's output queue: the transfer's outcome (the first message echoes ``first``),
        then lists of tokens, then ``None``."""
        span, n_tokens = tracing.current(), 0
        while True:
            try:
                item = adm.out.get(timeout=0.25)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            items = [item]
            while True:
                try:
                    items.append(adm.out.get_nowait())
                except queue.Empty:
                    break
            tokens, end = [], False
            for it in items:
                if isinstance(it, Verified):
                    tracing.span_between("kv_wait", adm.created, time.monotonic(), {
                        "dsv32.transfer.bytes": it.received.num_bytes, "dsv32.transfer.checksum": it.received.checksum})
                    span.add_event("first_token")  # the prefill worker's, echoed
                    n_tokens += 1
                    yield worker_pb2.DecodeResponse(tokens=[first], received_bytes=it.received.num_bytes,
                                                    checksum=it.received.checksum)
                elif isinstance(it, KVRejected):
                    context.abort(grpc.StatusCode.DATA_LOSS,
                                  f"KV verification failed on decode worker {self.worker_id}: {it}")
                elif isinstance(it, KVFailed):
                    context.abort(grpc.StatusCode.UNAVAILABLE, str(it))
                elif isinstance(it, BaseException):
                    context.abort(grpc.StatusCode.INTERNAL, f"decode worker {self.worker_id}: {it}")
                elif it is None:
                    end = True
                else:
                    tokens += [token_pb(o) for o in it]
            if tokens and not n_tokens:  # colocated: sampled here
                span.add_event("first_token")
            n_tokens += len(tokens)
            span.set_attribute(tracing.COMPLETION_TOKENS, n_tokens)
            if tokens:
                yield worker_pb2.DecodeResponse(tokens=tokens)
            if end:
                if self.batch.error is not None:
                    context.abort(grpc.StatusCode.INTERNAL, f"decode loop failed: {self.batch.error}")
                if not tokens or not tokens[-1].finished:
                    context.abort(grpc.StatusCode.ABORTED, f"request {adm.request_id} aborted on {self.worker_id}")
                return

    # -- control -----------------------------------------------------------------------
    def Cancel(self, request, context):
        return worker_pb2.CancelResponse(found=self.cancel(request.request_id))

    def cancel(self, rid: str) -> bool:
        """Idempotent in every state, and every page is freed exactly once, by its owner: a reservation no
        stream took (freed here), a request whose KV is still arriving (taken out of the transfer queue,
        freed here, its stream told), a running one (aborted by the loop, which frees it), one between
        those (the loop refuses its admission when it comes)."""
        how = self.prealloc.cancel(rid)
        if how == "dropped":
            self.leases.pop(rid, None)
            return True
        inc = self.transfers.discard(rid) if self.transfers is not None else None
        if inc is not None:
            self.prealloc.drop(rid, free_pages=True)
            inc.adm.out.put(KVFailed(f"request {rid} cancelled"))
            return True
        self.batch.abort(rid)
        return how == "taken"

    def _finished(self, adm: Admission) -> None:
        """A session's turn ended here: its pages stay cached for the next turn, until the session ends."""
        self.sessions.note(adm.session_id, adm.prompt_ids + adm.generated)

    def ReleaseSession(self, request, context):
        if not request.session_id or len(request.session_id) > 256:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id: must be 1-256 characters")
        n = self.sessions.release(request.session_id)
        self.prealloc.on_change()
        return worker_pb2.ReleaseSessionResponse(released_pages=n)

    def renew_leases(self) -> None:
        """A reservation whose KV is arriving keeps its pages: its lease restarts at each sign of progress
        (announcement, message landed), up to the hold cap."""
        if self.receiver is None:
            return
        for rid, (lease, cap) in list(self.leases.items()):
            res = self.prealloc.get(rid)
            if res is None or res.taken:
                self.leases.pop(rid, None)
                continue
            at = self.receiver.progress_at(res.transfer_id)
            if at is not None:
                self.prealloc.renew(rid, lease - (time.monotonic() - at), cap)

    def healthy(self) -> str:
        """Why this worker cannot serve ("" if it can): a background thread it depends on has died."""
        if self.batch.error is not None:
            return f"decode loop failed: {self.batch.error}"
        if self.transfers is not None and not self.transfers.healthy:
            return "transfer queue thread died"
        if self.receiver is not None and not self.receiver.healthy:
            return "KV receiver's bootstrap thread died"
        return ""

    def free_pages(self) -> int:
        """Pages not committed to a request (never more than the pool has free)."""
        alloc = self.engine.allocator
        return min(alloc.num_free, alloc.num_total - self.prealloc.committed_pages)

    def load(self) -> WorkerLoad:
        return WorkerLoad(free_pages=self.free_pages(), total_pages=self.engine.allocator.num_total,
                          reserved_pages=self.prealloc.reserved_pages(), running=self.batch.running,
                          queued_requests=len(self.prealloc))

    def report(self) -> dict:
        """``load()`` as a dict."""
        return dataclasses.asdict(self.load())

    def stats(self) -> worker_pb2.WorkerStats:
        st = self.engine.stats
        c = self.transfers.counters if self.transfers is not None else {}
        return worker_pb2.WorkerStats(
            worker_id=self.worker_id, role=self.role, **self.load().stats_fields(),
            prefill_forward_tokens=st.get("prefill_tokens", 0), decode_steps=self.batch.steps,
            bytes_received=c.get("bytes_received", 0), checksum_failures=c.get("checksum_failures", 0),
            requests_finished=self.batch.finished, requests_aborted=self.batch.aborted,
            cached_pages=self.engine.allocator.num_cached,
            cached_tokens=self.engine.prefix.hit_tokens if self.engine.prefix is not None else 0)

    def Stats(self, request, context):
        return self.stats()

    def InjectFault(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "faults are injected on the prefill worker (the sending side)")


def run(args: argparse.Namespace) -> int:
    from dsv32_engine.transfer import KVReceiver

    engine = start_worker("decode", args)  # --ep-size N: this process is rank 0 and starts the others
    worker_id = args.worker_id
    receiver = KVReceiver(engine.cache, args.host, args.transfer_port, worker_id, args.transfer_timeout,
                          require_auth=True, announce_timeout_s=args.max_reserve_hold)
    svc = DecodeService(worker_id, engine, receiver, args.transfer_timeout)
    svc.max_lease_s, svc.max_hold_s = args.max_reserve_lease, args.max_reserve_hold
    svc.local_prefill_tokens = args.local_prefill_tokens
    svc.sessions.ttl_s = args.session_ttl
    svc.transfer_endpoint = f"{advertised_host(args)}:{receiver.port}"
    return serve(args, svc)


def serve(args: argparse.Namespace, svc: DecodeService) -> int:
    """Run a decode (or colocated) service until SIGTERM, the parent's death or a dead loop."""
    svc.batch.start()
    server, hs, hb, stop, _ = serve_worker(svc.role, args, svc, worker_pb2_grpc.add_DecodeWorkerServicer_to_server,
                                           svc.load, max_threads=2 * args.max_num_seqs + 16,
                                           transfer_endpoint=svc.transfer_endpoint)
    svc.prealloc.on_change = hb.poke
    while not stop.wait(0.25):
        try:
            svc.renew_leases()
            svc.prealloc.expire()
            svc.sessions.expire()  # sessions past their TTL give their pages back
        except Exception:
            log.exception("lease upkeep")
        why = svc.healthy()
        if why:  # NOT_SERVING, out of the registry, exit: the supervisor restarts a clean process
            log.error("%s worker %s is broken (%s); exiting", svc.role, svc.worker_id, why)
            hs.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            break
    log.info("%s worker %s shutting down", svc.role, svc.worker_id)
    svc.accepting = False
    hb.stop(deregister=True)
    hs.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    if not svc.healthy():
        drain(lambda: svc.batch.running + len(svc.prealloc), args.drain_timeout, svc.prealloc.expire)
    hs.enter_graceful_shutdown()
    server.stop(grace=2.0).wait()
    if svc.transfers is not None:
        svc.transfers.stop()
    svc.batch.stop()
    if svc.receiver is not None:
        try:
            svc.receiver.close()
        except Exception:
            pass
    return 1 if svc.healthy() else 0
