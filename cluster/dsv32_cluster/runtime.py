"""What both worker roles share: their flags, the engine, wire conversions, the
gRPC server with health checking and the Redis registration.

The engine's flags are made from :class:`dsv32_engine.engine_config.EngineConfig`
(one flag per field, its docstring as help) and parsed back into one; every
flag's default may come from ``DSV32_<FLAG>`` (:mod:`.envflags`). Part of the
torch-free control-plane package; the engine is imported only when a worker
builds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import signal
import socket
import threading
import time
from concurrent import futures
from dataclasses import MISSING, fields

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dsv32_proto import serving_pb2, worker_pb2
from . import auth, metrics, telemetry
from .envflags import add_env_argument
from .heartbeat import Heartbeat
from .sessions import DEFAULT_SESSION_TTL_S
from .state import DEFAULT_PREFIX, ClusterState, WorkerInfo

log = logging.getLogger(__name__)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_arguments(p: argparse.ArgumentParser, *, from_env: bool = True, skip: tuple[str, ...] = ()) -> None:
    """One flag per ``EngineConfig`` field (``max_num_seqs`` → ``--max-num-seqs``), its docstring as help.

    ``from_env``: the default is ``DSV32_<FLAG>``, else the field's own (a worker). Otherwise every
    default is None, meaning "not given" (``up``, which passes on what was given: :func:`engine_argv`).
    """
    from dsv32_engine.engine_config import DTYPES, NUMERICS, WEIGHT_FORMATS, EngineConfig, field_docs

    docs = field_docs(EngineConfig)
    choices = {"numerics": NUMERICS, "dtype": DTYPES, "weight_format": WEIGHT_FORMATS}
    for f in fields(EngineConfig):
        if f.name in skip:
            continue
        kind = int if str(f.type).startswith("int") else _on_off if str(f.type) == "bool" else str
        if from_env:
            add_env_argument(p, _flag(f.name), type=kind, default=None if f.default is MISSING else f.default,
                             choices=choices.get(f.name), help=docs[f.name])
        else:
            p.add_argument(_flag(f.name), type=kind, default=None, choices=choices.get(f.name), help=docs[f.name])


def _on_off(text: str) -> bool:
    """A bool engine option on the command line: on | off (also true/false, 1/0, yes/no)."""
    v = str(text).strip().lower()
    if v in ("on", "true", "1", "yes"):
        return True
    if v in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def engine_config(args: argparse.Namespace):
    """The ``EngineConfig`` of parsed engine flags (validated there: a bad value is a ``ConfigError``)."""
    from dsv32_engine.engine_config import EngineConfig

    return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig)})


def engine_argv(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The engine flags that were given (not None), as a worker's command line."""
    from dsv32_engine.engine_config import EngineConfig

    argv = []
    for f in fields(EngineConfig):
        value = getattr(args, f.name, None)
        if f.name not in skip and value is not None:
            argv += [_flag(f.name), ("on" if value else "off") if isinstance(value, bool) else str(value)]
    return argv


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every worker role has: the engine's, then where it serves and registers."""
    add_engine_arguments(p)
    arg = functools.partial(add_env_argument, p)
    arg("--host", default="127.0.0.1", help="address to bind")
    arg("--advertise-host", help="address others use to reach this worker (default: --host, or this host's name "
                                 "when --host is a wildcard)")
    arg("--port", type=int, default=0, help="gRPC port (0 = any free port)")
    arg("--worker-id", help="default: ROLE-HOST-PID")
    arg("--redis-url", default="redis://127.0.0.1:6379/0", help="cluster state (the registry)")
    arg("--redis-prefix", default=DEFAULT_PREFIX, help="key prefix of this cluster in Redis")
    arg("--session-ttl", type=int, default=DEFAULT_SESSION_TTL_S,
        help="seconds a session's cached pages are kept after its last turn (set the router's to the same)")
    arg("--heartbeat-interval", type=float, default=0.5, help="seconds between load reports (and on each change)")
    arg("--transfer-timeout", type=float, default=60.0, help="bound on every wait of a KV transfer, seconds")
    arg("--drain-timeout", type=float, default=30.0, help="on SIGTERM: stop admitting, leave the registry, let "
        "requests in flight finish for at most this many seconds, then stop (Helm: below terminationGracePeriod)")
    arg("--enable-fault-injection", type=bool, default=False, help="honour InjectFault RPCs (tests only)")
    p.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process dies (used by `up`)")
    arg("--ep-size", type=int, default=1, help="ranks of this worker's expert-parallel group: the command starts "
        "them all, one process (one GPU where there are GPUs) per rank; each rank holds 1/N of the routed experts "
        "and its own requests, pages and KV endpoint (data-parallel attention) and registers as its own target")
    arg("--ep-placement", help="JSON file {rank: [expert ids]} placing the routed experts (default: even split)")
    arg("--ep-timeout", type=float, default=30.0, help="bound on every collective of the EP group, seconds")
    p.add_argument("--ep-rank", type=int, default=None, help=argparse.SUPPRESS)  # set for the ranks it starts
    p.add_argument("--ep-master", default=None, help=argparse.SUPPRESS)
    arg("--otel-exporter", default="none", choices=telemetry.EXPORTERS, help="tracing exporter (OTLP endpoint: "
        "OTEL_EXPORTER_OTLP_ENDPOINT)")
    arg("--otel-sample-ratio", type=float, default=1.0, help="share of new traces kept, 0..1 (a request follows the "
        "router's decision)")
    arg("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    arg("--liveness-timeout", type=float, default=300.0, help="seconds the engine loop may go without a step while "
        "requests wait before the health service dsv32.worker.v1.EngineLoop reports NOT_SERVING (liveness)")
    arg("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")


def start_worker(role: str, args: argparse.Namespace):
    """What every worker kind does first: die with its parent (under ``up``), log, start its EP group
    (``--ep-size``: this process becomes rank 0), build the engine, settle its worker id. Returns
    the engine; the EP ranks it started are stopped if the engine cannot be built."""
    from .parent import die_with_parent

    die_with_parent()  # started by `up`: go when it goes
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.model:  # the labels of every series this process exports
        metrics.init(os.path.basename(os.path.abspath(args.model)), role)
    ranks = start_ep_group(role, args)
    try:
        engine = make_engine(args)
    except BaseException:
        for r in ranks:
            r.stop(2.0)
        raise
    args.worker_id = args.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}"
    engine.ep_ranks = ranks  # rank 0 holds its started ranks for the life of the process
    return engine


def start_ep_group(role: str, args: argparse.Namespace) -> list:
    """``ROLE --ep-size N`` (N > 1): this process is rank 0 of the group, starts ranks 1..N-1 (the same
    command plus ``--ep-rank R --ep-master HOST:PORT``) and watches them: when one exits, so does this
    one (the ranks exit when it does: parent-death signal). Every rank registers as
    ``<worker id>-ep<R>`` in EP group ``<worker id>``. Returns the started processes (none for a rank
    that was started, or without EP)."""
    if args.ep_size < 1:
        raise SystemExit(f"{role}: --ep-size must be >= 1, got {args.ep_size}")
    args.ep_group = ""
    if args.ep_size == 1:
        return []
    import sys

    from .procs import RoleProcess, free_port

    base = args.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}"
    children = []
    if args.ep_rank is None:
        # the ranks of a group run on this machine (one pod / node): they meet on loopback
        args.ep_rank, args.ep_master = 0, f"127.0.0.1:{free_port('127.0.0.1')}"
        if args.model:  # a placement that cannot work is one line now, not N crashed ranks later
            from dsv32_engine.config import ModelConfig

            ep_config(args).make_placement(ModelConfig.from_dir(args.model).n_routed_experts or 0)
        for r in range(1, args.ep_size):
            # rank R serves on the given ports + R (a fixed port stays predictable for probes and
            # NetworkPolicies), or on free ports when they were 0
            shift = lambda port: str(port + r if port else 0)  # noqa: E731
            own_ports = ["--port", shift(args.port), "--metrics-port", shift(args.metrics_port)]
            if role == "decode":
                own_ports += ["--transfer-port", shift(args.transfer_port)]
            children.append(RoleProcess(f"{base}-ep{r}", [*sys.argv[1:], *own_ports, "--worker-id", base, "--ep-rank",
                                                          str(r), "--ep-master", args.ep_master, "--exit-with-parent"],
                                        None))
        threading.Thread(target=_watch_ranks, args=(children,), name="ep-ranks", daemon=True).start()
    args.ep_group, args.worker_id = base, f"{base}-ep{args.ep_rank}"
    return children


def _watch_ranks(children) -> None:
    import time

    while all(c.exited() is None for c in children):
        time.sleep(0.2)
    dead = next(c for c in children if c.exited() is not None)
    log.error("EP rank %s exited (status %s): the group is broken; stopping", dead.name, dead.exited())
    os.kill(os.getpid(), signal.SIGTERM)


def ep_config(args: argparse.Namespace):
    """This rank's ``EPConfig`` (None without EP)."""
    if getattr(args, "ep_size", 1) <= 1:
        return None
    import json

    from dsv32_engine.parallel import EPConfig

    placement = None
    if args.ep_placement:
        try:
            placement = json.loads(open(args.ep_placement).read())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--ep-placement {args.ep_placement}: {e}")
    return EPConfig(args.ep_size, args.ep_rank, args.ep_master, group_id=getattr(args, "ep_group", "") or "ep",
                    timeout_s=args.ep_timeout, placement=placement)


def make_engine(args: argparse.Namespace):
    if not args.model:
        raise SystemExit("--model (or DSV32_MODEL) is required")
    from dsv32_engine.engine import EngineCore

    config = engine_config(args)
    ep = ep_config(args)
    if ep is not None and config.device in (None, "cuda"):
        import torch

        if torch.cuda.is_available():  # one rank per GPU (LOCAL_RANK when a launcher sets it)
            local = int(os.environ.get("LOCAL_RANK", ep.rank)) % torch.cuda.device_count()
            config = dataclasses.replace(config, device=f"cuda:{local}")
    return EngineCore(config, ep=ep)


def engine_params(s: worker_pb2.WorkerSampling):
    from dsv32_engine.sampling_params import SamplingParams

    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                          seed=s.seed, stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                          logprobs=s.logprobs or None, json_schema=s.json_schema or None,
                          grammar_replay=s.grammar_replay, skip_prefix_cache=s.skip_prefix_cache)


def token_pb(out) -> worker_pb2.Token:
    """An engine ``StepOutput`` on the wire."""
    tok = worker_pb2.Token(token_id=out.token_id, finished=bool(out.finished), finish_reason=out.finish_reason or "",
                           cached_tokens=out.cached_tokens or 0)
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


def serve_worker(role: str, args, servicer, add_to_server, load, max_threads: int, transfer_endpoint: str = ""):
    """Shared by both roles: gRPC server, health, registration (``load()`` → ``WorkerLoad`` at each beat), signals."""
    tracing = telemetry.setup_tracing(f"dsv32-{role}", args.otel_exporter, args.otel_sample_ratio)
    worker_id = args.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix=f"{role}-rpc"),
                         interceptors=[*auth.worker_server_interceptors(),  # internal plane: DSV32_INTERNAL_TOKEN
                                       *telemetry.grpc_server_interceptors(False, tracing)],
                         options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)])
    add_to_server(servicer, server)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        raise SystemExit(f"{role}: cannot bind {args.host}:{args.port}")
    server.start()
    telemetry.start_metrics(args.metrics_port, args.host)
    metrics.process().watch_load(load)
    from .liveness import EngineWatchdog

    EngineWatchdog(hs, load, lambda: metrics.process().last_step_at, args.liveness_timeout).start()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    state = ClusterState.from_url(args.redis_url, args.redis_prefix)
    info = WorkerInfo(worker_id, role, f"{advertised_host(args)}:{port}", transfer_endpoint=transfer_endpoint,
                      model=os.path.basename(os.path.abspath(args.model)),
                      page_size=servicer.engine.layout.page_size,  # the router counts this worker's pages in it
                      ep_group=getattr(args, "ep_group", ""), ep_rank=args.ep_rank or 0, ep_size=args.ep_size,
                      weight_bytes=servicer.engine.weight_bytes["total"],
                      cache_salt=servicer.engine.cache_salt if servicer.engine.prefix is not None else "")
    info.auth = auth.worker_signature(auth.internal_token(), info.worker_id, role, info.endpoint, transfer_endpoint)
    stop = threading.Event()
    hb = Heartbeat(state, info, load, args.heartbeat_interval, watch_parent=args.exit_with_parent,
                   cache=servicer.engine.allocator if servicer.engine.prefix is not None else None)
    hb.on_orphaned = stop.set
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    hb.start()
    log.info("%s worker %s serving on %s:%d", role, worker_id, args.host, port)
    print(f"{role} worker {worker_id} listening {args.host}:{port}", flush=True)
    return server, hs, hb, stop, worker_id


def drain(busy, timeout_s: float, tick=lambda: None) -> None:
    """Graceful stop: wait (at most ``timeout_s``) until ``busy()`` is 0. The worker has left the registry
    and refuses new work, so the routers send no more; requests in flight finish and stream out."""
    deadline = time.monotonic() + timeout_s
    if busy():
        log.info("draining: %d requests in flight (at most %gs)", busy(), timeout_s)
    while busy() and time.monotonic() < deadline:
        tick()
        time.sleep(0.1)
    if busy():
        log.warning("drain timeout: %d requests still in flight are cut off", busy())
