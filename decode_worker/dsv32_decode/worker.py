"""``dsv32-serve decode``: the decode worker process (life cycle: :mod:`dsv32_decode`).

Every flag has an environment variable ``DSV32_<FLAG>`` for deployments.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import queue
import threading
import time
import uuid

import grpc

from .queues import Admission, PreallocQueue, RunningBatch
from .transfer_queue import DecodeTransferQueue, Incoming, KVFailed, KVRejected, Verified
from dsv32_proto import worker_pb2, worker_pb2_grpc
from dsv32_cluster.envflags import add_env_argument
from dsv32_cluster.heartbeat import WorkerLoad
from dsv32_cluster.runtime import (add_worker_arguments, advertised_host, engine_params, serve_worker,
                                   start_worker, step_output, token_pb)

log = logging.getLogger("dsv32_decode")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_worker_arguments(p)
    add_env_argument(p, "--transfer-port", type=int, default=0,
                     help="port of the KV receiver's TCPStore (0 = any free port)")


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
        # what prefill workers dial (serve() may advertise another host)
        self.transfer_endpoint = receiver.endpoint if receiver is not None else ""

    # -- reserve -----------------------------------------------------------------
    def Reserve(self, request, context):
        if not self.accepting:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"decode worker {self.worker_id} is shutting down")
        if request.num_prompt_tokens < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_prompt_tokens: must be >= 1")
        tid = f"{request.request_id}/{uuid.uuid4().hex[:8]}"
        try:
            res = self.prealloc.reserve(request.request_id, tid, request.num_prompt_tokens, max(1, request.max_tokens),
                                        request.prefill_worker_id, request.lease_s or 60.0,
                                        prompt_pages=self.receives_kv)
        except KeyError as e:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        if res is None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"decode worker {self.worker_id}: {self.free_pages()} of {self.engine.allocator.num_total} "
                          "pages uncommitted; not enough for this request")
        if self.receives_kv:
            try:
                self.receiver.expect(tid, request.prefill_worker_id, res.page_ids)
            except Exception as e:
                self.prealloc.drop(request.request_id, free_pages=True)
                context.abort(grpc.StatusCode.UNAVAILABLE, f"KV receiver refused the transfer: {e}")
        layout, layers = self.engine.layout, len(self.engine.cache.latent)
        return worker_pb2.ReserveResponse(
            decode_worker_id=self.worker_id, transfer_endpoint=self.transfer_endpoint, transfer_id=tid,
            page_ids=res.page_ids, page_size=layout.page_size,
            expected_bytes=len(res.page_ids) * layers * self.page_bytes())

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
        try:
            yield from self._stream(adm, context, request.first if self.receives_kv else None)
        finally:
            if self.transfers is not None and self.transfers.discard(rid):
                self.prealloc.drop(rid, free_pages=True)  # the stream ended before its KV arrived
            else:
                self.batch.abort(rid)  # in case the transfer queue admitted it after the callback ran

    def _admission(self, request, res, context) -> Admission:
        """The request, handed to the transfer queue: it joins the running batch once its KV is here and
        verified, and the stream's first message echoes the prefill worker's first token."""
        if not request.HasField("first"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"first: missing; decode worker {self.worker_id} "
                          "continues from the prefill worker's first token")
        adm = Admission(request.request_id, list(request.prompt_ids), engine_params(request.sampling), res.page_ids,
                        step_output(request.request_id, request.first))
        self.transfers.add(Incoming(adm, res.transfer_id, request.checksum, request.sent_bytes,
                                    deadline=time.monotonic() + self.transfer_timeout_s))
        return adm

    def _stream(self, adm: Admission, context, first: worker_pb2.Token | None):
        """Forward the request's output queue: the transfer's outcome (the first message echoes ``first``),
        then lists of tokens, then ``None``."""
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
        found = self.prealloc.drop(request.request_id, free_pages=True) is not None
        self.batch.abort(request.request_id)
        return worker_pb2.CancelResponse(found=found)

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
            requests_finished=self.batch.finished, requests_aborted=self.batch.aborted)

    def Stats(self, request, context):
        return self.stats()

    def InjectFault(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "faults are injected on the prefill worker (the sending side)")


def run(args: argparse.Namespace) -> int:
    from dsv32_engine.transfer import KVReceiver

    engine = start_worker("decode", args)  # --ep-size N: this process is rank 0 and starts the others
    worker_id = args.worker_id
    receiver = KVReceiver(engine.cache, args.host, args.transfer_port, worker_id, args.transfer_timeout)
    svc = DecodeService(worker_id, engine, receiver, args.transfer_timeout)
    svc.transfer_endpoint = f"{advertised_host(args)}:{receiver.port}"
    return serve(args, svc)


def serve(args: argparse.Namespace, svc: DecodeService) -> int:
    """Run a decode (or colocated) service until SIGTERM, the parent's death or a dead loop."""
    svc.batch.start()
    server, hs, hb, stop, _ = serve_worker(svc.role, args, svc, worker_pb2_grpc.add_DecodeWorkerServicer_to_server,
                                           svc.load, max_threads=2 * args.max_num_seqs + 16,
                                           transfer_endpoint=svc.transfer_endpoint)
    svc.prealloc.on_change = hb.poke
    while not stop.wait(0.5):
        svc.prealloc.expire()
        if svc.batch.error is not None:
            log.error("%s loop died; exiting", svc.role)
            break
    log.info("%s worker %s shutting down", svc.role, svc.worker_id)
    svc.accepting = False
    hb.stop(deregister=True)
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
    return 1 if svc.batch.error is not None else 0
