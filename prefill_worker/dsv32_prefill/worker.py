"""``dsv32-serve prefill``: the prefill worker process (life cycle: :mod:`dsv32_prefill`).

Every flag has an environment variable ``DSV32_<FLAG>`` for deployments.
"""

from __future__ import annotations

import argparse
import logging

import grpc

from dsv32_cluster.envflags import add_env_argument
from dsv32_cluster.heartbeat import WorkerLoad
from dsv32_cluster.runtime import (add_worker_arguments, engine_params, serve_worker, start_worker,
                                   token_pb)
from .scheduler import PrefillJob, PrefillScheduler, QueueFull
from dsv32_proto import worker_pb2, worker_pb2_grpc

log = logging.getLogger("dsv32_prefill")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_worker_arguments(p)
    add_env_argument(p, "--max-queued-tokens", type=int, default=65536,
                     help="prompt tokens allowed to wait; beyond, Prefill answers RESOURCE_EXHAUSTED")


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker_id: str, engine, scheduler: PrefillScheduler, fault_injection: bool):
        self.worker_id, self.engine, self.scheduler = worker_id, engine, scheduler
        self.fault_injection = fault_injection
        self.jobs: dict[str, PrefillJob] = {}

    def Prefill(self, request, context):
        if not request.prompt_ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_ids: must not be empty")
        job = PrefillJob(request.request_id, list(request.prompt_ids), engine_params(request.sampling),
                         request.transfer_id, request.transfer_endpoint, request.decode_worker_id)
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
        return worker_pb2.PrefillResponse(
            first=token_pb(job.first), checksum=tr.checksum, sent_bytes=tr.num_bytes, prompt_tokens=len(job.prompt_ids),
            queue_s=job.queue_s, compute_s=job.compute_s, transfer_wait_s=tr.wait_after_last_layer_s,
            batch_size=job.batch_size)

    def Cancel(self, request, context):
        job = self.jobs.get(request.request_id)
        if job is not None:
            self.scheduler.cancel(job)
        return worker_pb2.CancelResponse(found=job is not None)

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
            requests_finished=c["requests"], requests_aborted=c["failed"])

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
    server, hs, hb, stop, _ = serve_worker("prefill", args, svc, worker_pb2_grpc.add_PrefillWorkerServicer_to_server,
                                           svc.load, max_threads=64)
    sched.on_change = hb.poke
    stop.wait()
    log.info("prefill worker %s shutting down", worker_id)
    hb.stop(deregister=True)
    hs.enter_graceful_shutdown()
    server.stop(grace=2.0).wait()
    sched.stop()
    try:
        sender.close()
    except Exception:
        pass
    return 0
