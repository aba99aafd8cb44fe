"""What both worker roles share: engine flags, the engine, wire conversions, the
gRPC server with health checking and the Redis registration.

Part of the torch-free control-plane package; the engine is imported only
when a worker builds it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dsv32_proto import serving_pb2, worker_pb2
from . import telemetry
from .heartbeat import Heartbeat
from .state import DEFAULT_PREFIX, ClusterState, WorkerInfo

log = logging.getLogger(__name__)


def env(name: str, default=None):
    return os.environ.get(f"DSV32_{name.upper()}", default)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by both worker roles (the prefill worker imports this)."""
    p.add_argument("--model", default=env("model"), help="checkpoint directory [DSV32_MODEL]")
    p.add_argument("--numerics", default=env("numerics", "exact"), choices=("exact", "fp8"))
    p.add_argument("--dtype", default=env("dtype"), help="float32 | bfloat16 (default: by device)")
    p.add_argument("--device", default=env("device"), help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--num-pages", type=int, default=int(env("num_pages", "0")) or None,
                   help="cache pages of this worker's pool (default: the engine's budget)")
    p.add_argument("--max-num-seqs", type=int, default=int(env("max_num_seqs", "64")))
    p.add_argument("--max-num-batched-tokens", type=int, default=int(env("max_num_batched_tokens", "2048")))
    p.add_argument("--host", default=env("host", "127.0.0.1"), help="address to bind [DSV32_HOST]")
    p.add_argument("--advertise-host", default=env("advertise_host"),
                   help="address others use to reach this worker (default: --host, or this host's name "
                        "when --host is a wildcard) [DSV32_ADVERTISE_HOST]")
    p.add_argument("--port", type=int, default=int(env("port", "0")), help="gRPC port (0 = any free port)")
    p.add_argument("--worker-id", default=env("worker_id"), help="default: ROLE-HOST-PID")
    p.add_argument("--redis-url", default=env("redis_url", "redis://127.0.0.1:6379/0"))
    p.add_argument("--redis-prefix", default=env("redis_prefix", DEFAULT_PREFIX))
    p.add_argument("--heartbeat-interval", type=float, default=float(env("heartbeat_interval", "0.5")))
    p.add_argument("--transfer-timeout", type=float, default=float(env("transfer_timeout", "60")),
                   help="bound on every wait of a KV transfer, seconds")
    p.add_argument("--enable-fault-injection", action="store_true",
                   default=env("enable_fault_injection", "") not in ("", "0", "false"),
                   help="honour InjectFault RPCs (tests only)")
    p.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process dies (used by `up`)")
    p.add_argument("--otel-exporter", default=env("otel_exporter", "none"), choices=telemetry.EXPORTERS)
    p.add_argument("--metrics-port", type=int, default=int(env("metrics_port", "0")))
    p.add_argument("--log-level", default=env("log_level", "INFO"))


def make_engine(args: argparse.Namespace):
    if not args.model:
        raise SystemExit("--model (or DSV32_MODEL) is required")
    from dsv32_engine.engine import EngineCore

    return EngineCore(args.model, numerics=args.numerics, dtype=args.dtype, num_pages=args.num_pages,
                      max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      device=args.device)


def engine_params(s: worker_pb2.WorkerSampling):
    from dsv32_engine.sampling_params import SamplingParams

    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                          seed=s.seed, stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                          logprobs=s.logprobs or None)


def token_pb(out) -> worker_pb2.Token:
    """An engine ``StepOutput`` on the wire."""
    tok = worker_pb2.Token(token_id=out.token_id, finished=bool(out.finished), finish_reason=out.finish_reason or "")
    if out.logprob is not None:
        top = sorted((out.top_logprobs or {}).items(), key=lambda kv: -kv[1])
        tok.logprobs.CopyFrom(serving_pb2.Logprobs(token_id=out.token_id, logprob=out.logprob, top=[
            serving_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in top]))
    return tok


def step_output(request_id: str, tok: worker_pb2.Token):
    """A wire token back into an engine ``StepOutput``."""
    from dsv32_engine.engine import StepOutput

    lp = tok.logprobs if tok.HasField("logprobs") else None
    return StepOutput(request_id, tok.token_id, lp.logprob if lp else None,
                      {t.token_id: t.logprob for t in lp.top} if lp else None,
                      tok.finished, tok.finish_reason or None)


def advertised_host(args) -> str:
    if args.advertise_host:
        return args.advertise_host
    if args.host in ("", "0.0.0.0", "::", "[::]"):
        return socket.getfqdn()
    return args.host


def serve_worker(role: str, args, servicer, add_to_server, report, max_threads: int, transfer_endpoint: str = ""):
    """Shared by both roles: gRPC server, health, registration, signals, lease reaper hook."""
    tracing = telemetry.setup_tracing(f"dsv32-{role}", args.otel_exporter)
    worker_id = args.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix=f"{role}-rpc"),
                         interceptors=telemetry.grpc_server_interceptors(False, tracing),
                         options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)])
    add_to_server(servicer, server)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        raise SystemExit(f"{role}: cannot bind {args.host}:{args.port}")
    server.start()
    telemetry.start_metrics(args.metrics_port, args.host)
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    state = ClusterState.from_url(args.redis_url, args.redis_prefix)
    info = WorkerInfo(worker_id, role, f"{advertised_host(args)}:{port}", transfer_endpoint=transfer_endpoint,
                      model=os.path.basename(os.path.abspath(args.model)))
    stop = threading.Event()
    hb = Heartbeat(state, info, report, args.heartbeat_interval, watch_parent=args.exit_with_parent)
    hb.on_orphaned = stop.set
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    hb.start()
    log.info("%s worker %s serving on %s:%d", role, worker_id, args.host, port)
    print(f"{role} worker {worker_id} listening {args.host}:{port}", flush=True)
    return server, hs, hb, stop, worker_id


