"""``dsv32-serve router``: the public gRPC API (``dsv32.serving.v1.Generation``).

Also serves standard gRPC health checking (``grpc.health.v1``: the overall
status and ``dsv32.serving.v1.Generation`` are ``SERVING`` while at least one
prefill and one decode worker, or one colocated worker, are registered,
``NOT_SERVING`` otherwise) and
server reflection. Never imports torch (a test checks it in a subprocess).

Every flag has an environment variable (``DSV32_<FLAG>``), for deployments.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import socket
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dsv32_proto import serving_pb2, serving_pb2_grpc
from dsv32_cluster import metrics, telemetry
from dsv32_cluster import auth
from dsv32_cluster.envflags import add_env_argument
from dsv32_cluster.directory import WorkerDirectory
from dsv32_cluster.parent import die_with_parent
from dsv32_cluster.state import DEFAULT_PREFIX, DEFAULT_SESSION_TTL_S, AsyncClusterState
from .limits import RouterLimits
from .orchestrator import Orchestrator
from .validation import ModelSpec, RequestError

log = logging.getLogger("dsv32_router")
SERVICE = serving_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
DEFAULT_MAX_TOKENS = 2048  # see --default-max-tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    arg = functools.partial(add_env_argument, p)  # every default from DSV32_<FLAG>; a bad value is one line
    arg("--model", help="checkpoint directory (tokenizer, config)")
    arg("--served-model-name", help="model id clients send (default: the checkpoint directory's name)")
    arg("--numerics", default="exact", choices=("exact", "fp8"), help="the workers' numerics (validated against)")
    arg("--host", default="127.0.0.1", help="bind address")
    arg("--port", type=int, default=50051, help="0 = any free port")
    arg("--http-port", type=int, default=-1,
        help="OpenAI-compatible HTTP API port (0 = any free port, -1 = off); see http_app.py")
    arg("--redis-url", default="redis://127.0.0.1:6379/0", help="cluster state")
    arg("--redis-prefix", default=DEFAULT_PREFIX, help="key prefix of this cluster in Redis")
    arg("--session-ttl", type=int, default=DEFAULT_SESSION_TTL_S,
        help="seconds a session's record (and the workers' cached pages for it) lives after its last turn")
    arg("--max-inflight", type=int, default=256, help="requests in flight before new ones wait")
    arg("--max-waiting", type=int, default=256, help="requests waiting for admission before RESOURCE_EXHAUSTED")
    arg("--admission-timeout", type=float, default=10.0, help="seconds a request may wait for capacity")
    arg("--max-attempts", type=int, default=3, help="tries of a request over worker failures")
    arg("--tls-cert", help="PEM certificate: serve the public API over TLS (with --tls-key)")
    arg("--tls-key", help="PEM private key of --tls-cert")
    arg("--stall-timeout", type=float, default=30.0,
        help="seconds without a token from a decode stream before it is retried elsewhere (hung worker)")
    arg("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
        help="max_tokens of requests that set none, capped by the context (0 = the rest of the context). "
             "Capacity is committed for prompt + max_tokens up front: the rest of the context for every such "
             "request would admit a handful at a time")
    arg("--ready-file", help="write HOST:PORT here once serving (used by `dsv32-serve up`)")
    arg("--otel-exporter", default="none", choices=telemetry.EXPORTERS, help="tracing exporter (OTLP endpoint: "
        "OTEL_EXPORTER_OTLP_ENDPOINT)")
    arg("--otel-sample-ratio", type=float, default=1.0, help="share of requests traced, 0..1")
    arg("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    arg("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")


class GenerationService(serving_pb2_grpc.GenerationServicer):
    def __init__(self, orch: Orchestrator):
        self.orch = orch

    async def Generate(self, request, context):
        # An async generator (the OpenTelemetry aio interceptor requires one for
        # server streaming). A client cancel reaches it either as CancelledError or,
        # when it was parked at a yield, as GeneratorExit when gRPC drops it; the
        # request's own generator is closed here either way (see RequestRun.stream).
        code = "OK"
        stream = self.orch.generate(request, context)
        try:
            async for out in stream:
                yield out
        except RequestError as e:
            code = e.code.name
            await context.abort(e.code, e.message)
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            await stream.aclose()
            metrics.process().requests(code).inc()

    async def ListModels(self, request, context):
        s = self.orch.spec
        return serving_pb2.ListModelsResponse(models=[serving_pb2.ModelInfo(
            id=s.name, max_model_len=s.max_model_len, vocab_size=s.vocab_size, numerics=s.numerics)])


    async def EndSession(self, request, context):
        try:
            found, freed = await self.orch.end_session(request.session_id)
        except RequestError as e:
            await context.abort(e.code, e.message)
        return serving_pb2.EndSessionResponse(found=found, released_pages=freed)


class Router:
    """The router process: gRPC server, worker directory, health status."""

    def __init__(self, args: argparse.Namespace):
        if not args.model:
            raise SystemExit("router: --model (or DSV32_MODEL) is required")
        from dsv32_text.tokenizer import load_tokenizer

        self.args = args
        self.tracing = telemetry.setup_tracing("dsv32-router", args.otel_exporter, args.otel_sample_ratio)
        self.spec = ModelSpec.from_checkpoint(args.model, args.served_model_name, args.numerics,
                                              args.default_max_tokens)
        metrics.init(self.spec.name, "router")
        self.tokenizer = load_tokenizer(args.model)
        self.router_id = f"router-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.limits = RouterLimits(max_inflight=args.max_inflight, max_waiting=args.max_waiting,
                                   admission_timeout_s=args.admission_timeout, max_attempts=args.max_attempts,
                                   stall_timeout_s=args.stall_timeout)

    async def serve(self) -> None:
        args = self.args
        # one connection per request in flight (each may hold one while it records), plus the loops' own
        state = AsyncClusterState.from_url(args.redis_url, args.redis_prefix, max_connections=args.max_inflight + 32,
                                           session_ttl_s=args.session_ttl)
        directory = WorkerDirectory(state, interceptors=telemetry.grpc_client_interceptors(True, self.tracing))
        await directory.start()
        await state.router_alive(self.router_id)  # before any request of ours can be reaped
        orch = Orchestrator(self.spec, self.tokenizer, state, directory, self.limits, self.router_id)
        server = grpc.aio.server(interceptors=[*auth.router_server_interceptors(),  # DSV32_API_TOKEN: Bearer
                                               *telemetry.grpc_server_interceptors(True, self.tracing)],
                                 options=[("grpc.so_reuseport", 0)])
        serving_pb2_grpc.add_GenerationServicer_to_server(GenerationService(orch), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        if args.tls_cert:  # optional TLS on the public API (clients: --tls-ca / DSV32_TLS_CA)
            with open(args.tls_cert, "rb") as c, open(args.tls_key, "rb") as k:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            port = server.add_secure_port(f"{args.host}:{args.port}", creds)
        else:
            port = server.add_insecure_port(f"{args.host}:{args.port}")
        if port == 0:
            raise SystemExit(f"router: cannot bind {args.host}:{args.port}")
        await server.start()
        telemetry.start_metrics(args.metrics_port, args.host)
        endpoint = f"{args.host}:{port}"
        http = None
        if args.http_port >= 0:  # the OpenAI HTTP front: same orchestrator, same event loop
            from .http_app import build_app, start_http

            http = await start_http(build_app(orch, self.tokenizer), args.host, args.http_port)
            print(f"router http listening {http[2]}", flush=True)
            if args.ready_file:  # read by `up --http-port` before the ready file appears
                with open(f"{args.ready_file}.http.tmp", "w") as f:
                    f.write(http[2] + "\n")
                os.replace(f"{args.ready_file}.http.tmp", f"{args.ready_file}.http")
        log.info("router %s serving %s on %s (redis %s)", self.router_id, self.spec.name, endpoint, args.redis_url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        health_task = asyncio.create_task(self._health_loop(directory, orch, health_servicer))
        liveness_task = asyncio.create_task(self._liveness_loop(state))
        if args.ready_file:
            tmp = f"{args.ready_file}.tmp"
            with open(tmp, "w") as f:
                f.write(endpoint + "\n")
            os.replace(tmp, args.ready_file)
        print(f"router listening {endpoint}", flush=True)
        await stop.wait()
        log.info("router shutting down")
        await health_servicer.enter_graceful_shutdown()
        health_task.cancel()
        liveness_task.cancel()
        if http is not None:
            http[1].should_exit = True
            await asyncio.gather(http[0], return_exceptions=True)
        await server.stop(grace=2.0)
        await directory.close()
        await state.aclose()

    async def _liveness_loop(self, state: AsyncClusterState, beat_s: float = 2.0, reap_every: int = 5) -> None:
        """Beat this router's liveness key; now and then fail the records of dead routers, and stale ones
        (no update for 2 × the worker timeout: see ``dsv32_cluster.state``)."""
        n = 0
        while True:
            try:
                await state.router_alive(self.router_id)
                if n % reap_every == 0:
                    reaped = await state.reap_orphans(stale_after_s=2 * self.limits.worker_timeout_s)
                    if reaped:
                        log.warning("failed %d request records of gone routers or stale", len(reaped))
            except Exception as e:
                log.warning("router liveness/reaper: %s", e)
            n += 1
            await asyncio.sleep(beat_s)

    async def _health_loop(self, directory: WorkerDirectory, orch: Orchestrator, hs) -> None:
        last = None
        while True:
            counts = directory.counts()
            ok = orch.mode() is not None
            if ok != last:
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                await hs.set("", status)
                await hs.set(SERVICE, status)
                log.info("health: %s (%d prefill, %d decode, %d colocated)", "SERVING" if ok else "NOT_SERVING",
                         counts["prefill"], counts["decode"], counts["colocated"])
                last = ok
            await asyncio.sleep(directory.refresh_s)


def run(args: argparse.Namespace) -> int:
    die_with_parent()  # started by `up`: go when it goes
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(Router(args).serve())
    return 0
