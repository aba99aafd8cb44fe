"""``dsv32-serve up``: a whole cluster on this machine.

Starts (unless ``--redis-url`` names one) a private ``redis-server`` on a free
port, then ``--decode`` decode workers, ``--prefill`` prefill workers and one
router, each a separate process (``python -m dsv32_serve.cli ROLE ...``).
Once every worker is registered in Redis and the router answers its gRPC
health check with ``SERVING``, prints ``ready HOST:PORT`` (the router's
endpoint) on stdout.

No orphans: every child runs in its own session (so its process group can be
signalled as a whole) and asks for SIGTERM when ``up`` dies, even by SIGKILL
(``PR_SET_PDEATHSIG``, see :mod:`dsv32_cluster.parent`). Ctrl-C or SIGTERM stops the
router, then the workers (they deregister), then Redis: SIGTERM to each
process group, SIGKILL to whatever is left after ``--grace`` seconds. If a
child dies on its own, ``up`` stops the rest and exits non-zero, printing the
tail of its log. Logs go to ``--log-dir`` (a temporary directory by default).

``--colocated`` starts the baseline instead: ``--workers`` colocated workers
(default ``--prefill`` + ``--decode``, so the two modes compare at an equal
number of worker processes), each running prefill and decode in one engine
(chunked prefill mixed into its decode batches), behind the same router.

From Python: ``with local_cluster(model, prefill=1, decode=1) as target: ...``
(``colocated=True, workers=2`` for the baseline).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsv32_cluster.procs import ChildDied, RoleProcess, cli_argv, stop_all
from dsv32_cluster import auth
from dsv32_cluster.redis_server import RedisServer
from dsv32_cluster.runtime import add_engine_arguments, engine_argv
from dsv32_cluster.telemetry import EXPORTERS
from dsv32_cluster.state import DEFAULT_PREFIX, ClusterState

def add_arguments(p: argparse.ArgumentParser) -> None:
    e = os.environ.get
    p.add_argument("--model", default=e("DSV32_MODEL"),
                   help="checkpoint directory (default: checkpoints/tiny, made with make-checkpoint if missing)")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--colocated", action="store_true",
                   help="the baseline: workers that each run prefill and decode in one process (chunked prefill "
                        "mixed into decode batches) instead of prefill and decode pools; same router and API")
    p.add_argument("--workers", type=int, default=None,
                   help="with --colocated: colocated workers (default --prefill + --decode, the same number of "
                        "worker processes as the disaggregated cluster)")
    p.add_argument("--redis-url", default=e("DSV32_REDIS_URL"), help="use this Redis instead of starting one")
    p.add_argument("--redis-prefix", default=DEFAULT_PREFIX)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="router port (0 = any free port)")
    p.add_argument("--http-port", type=int, default=-1,
                   help="router's OpenAI-compatible HTTP port (0 = any free port, -1 = off); printed as `http URL`")
    engine = p.add_argument_group("engine (of every worker; one not given is the worker's default or its DSV32_ "
                                  "variable; --numerics also goes to the router)")
    add_engine_arguments(engine, from_env=False, skip=("model",))
    p.add_argument("--prefill-ep", type=int, default=1, help="expert-parallel ranks of each prefill worker "
                   "(its --ep-size: one process per rank, each registered as its own target)")
    p.add_argument("--decode-ep", type=int, default=1, help="expert-parallel ranks of each decode worker (--ep-size)")
    p.add_argument("--colocated-ep", type=int, default=1, help="expert-parallel ranks of each colocated worker")
    p.add_argument("--enable-fault-injection", action="store_true", help="(tests) workers honour InjectFault")
    p.add_argument("--router-arg", action="append", default=[], help="extra router flag (repeatable)")
    p.add_argument("--prefill-arg", action="append", default=[], help="extra prefill worker flag (repeatable)")
    p.add_argument("--decode-arg", action="append", default=[], help="extra decode worker flag (repeatable)")
    p.add_argument("--colocated-arg", action="append", default=[], help="extra colocated worker flag (repeatable)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics of every process: the router on "
                   "this port, then each worker (each EP rank) on the next ones, printed at start (0 = off)")
    p.add_argument("--otel-exporter", default=None, choices=EXPORTERS,
                   help="tracing exporter of every process (default: each one's DSV32_OTEL_EXPORTER, else none)")
    p.add_argument("--otel-sample-ratio", type=float, default=None, help="share of requests traced, 0..1 (default 1)")
    p.add_argument("--log-dir", default=None, help="where the processes' logs go (default: a temp dir)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL at shutdown")
    p.add_argument("--api-token", default=os.environ.get("DSV32_API_TOKEN", ""),
                   help="public API bearer token; 'auto' makes one and prints how clients pass it (default: "
                        "$DSV32_API_TOKEN, else none). The internal plane and Redis always get secrets of their own")


class Cluster:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="dsv32-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[RoleProcess] = []
        self.redis: RedisServer | None = None
        self.stopping = False
        self.secret_env: dict[str, str] = {}  # see secrets()
        self.argvs: dict[str, tuple[list[str], dict]] = {}  # name -> (argv, env): what a restart runs
        self.started_at: dict[str, float] = {}
        self.restarts: dict[str, tuple[int, float | None]] = {}  # name -> (restarts so far, restart due at)
        self.metrics_ports: dict[str, int] = {}
        """Process name (a worker id, ``-ep<R>`` for EP ranks, or ``router``) -> its /metrics port."""

    # -- starting --------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str]) -> RoleProcess:
        env = {**os.environ, **self.secret_env}
        env.setdefault("OMP_NUM_THREADS", "1")
        child = RoleProcess(name, argv, self.log_dir / f"{name}.log", env)
        self.children.append(child)
        self.argvs[name] = (argv, env)
        self.started_at[name] = time.monotonic()
        return child

    def secrets(self, redis_url: str) -> None:
        """A local cluster's secrets, made here unless given: the internal-plane token (router ↔ workers,
        worker registrations), the Redis URL (with our redis-server's password), and with
        ``--api-token auto`` the public API token, printed with how clients pass it."""
        env = self.secret_env  # added to the children's environment only (this process may be a library user)
        env["DSV32_REDIS_URL"] = redis_url
        env[auth.INTERNAL_ENV] = os.environ.get(auth.INTERNAL_ENV) or secrets.token_hex(16)
        if self.args.api_token == "auto":
            env[auth.API_ENV] = secrets.token_hex(16)
            print(f"up: the API needs a token; clients: export {auth.API_ENV}={env[auth.API_ENV]} "
                  "(gRPC metadata authorization: Bearer <token>)", file=sys.stderr, flush=True)
        elif self.args.api_token:
            env[auth.API_ENV] = self.args.api_token

    # -- supervision (once ready) ----------------------------------------------------------
    def supervise(self) -> None:
        """Restart what died: our redis-server on its port at once (workers and routers reconnect and
        re-register), a role process after a backoff (1 s, doubling to 30 s; reset after 60 s up). The rest
        of the cluster keeps serving meanwhile: the router retries on the workers still registered."""
        if self.redis is not None and self.redis.proc is not None and self.redis.proc.poll() is not None:
            print(f"up: redis-server exited ({self.redis.proc.returncode}); restarting it on port "
                  f"{self.redis.port}", file=sys.stderr, flush=True)
            self.redis.start()
        now = time.monotonic()
        for i, c in enumerate(self.children):
            code = c.exited()
            if code is None:
                if now - self.started_at[c.name] > 60:
                    self.restarts.pop(c.name, None)
                continue
            count, not_before = self.restarts.get(c.name, (0, None))
            if not_before is None:
                delay = min(30.0, 2.0 ** count)
                print(f"up: {c.name} exited ({code}); restarting it in {delay:g}s", file=sys.stderr, flush=True)
                self.restarts[c.name] = (count, now + delay)
            elif now >= not_before:
                argv, env = self.argvs[c.name]
                self.children[i] = RoleProcess(c.name, argv, c.log, env)
                self.started_at[c.name] = now
                self.restarts[c.name] = (count + 1, None)
                print(f"up: {c.name} restarted (pid {self.children[i].pid})", file=sys.stderr, flush=True)

    def start(self) -> str:
        a = self.args
        model = ensure_model(a.model)
        if a.redis_url:
            redis_url, suffix = a.redis_url, "-" + uuid.uuid4().hex[:4]
        else:
            self.redis = RedisServer(host="127.0.0.1", workdir=str(self.log_dir / "redis"), die_with_parent=True,
                                     password=secrets.token_hex(16))
            (self.log_dir / "redis").mkdir(exist_ok=True)
            redis_url, suffix = self.redis.start().url, ""
        self.secrets(redis_url)  # the processes inherit them through the environment, not their command lines
        common = ["--model", model, "--redis-prefix", a.redis_prefix, "--host", a.host]
        if a.numerics is not None:  # the router validates requests against it too
            common += ["--numerics", a.numerics]
        if a.otel_exporter is not None:
            common += ["--otel-exporter", a.otel_exporter]
        if a.otel_sample_ratio is not None:
            common += ["--otel-sample-ratio", str(a.otel_sample_ratio)]
        next_metrics_port = a.metrics_port + 1
        engine = engine_argv(a, skip=("model", "numerics"))
        if a.enable_fault_injection:
            engine.append("--enable-fault-injection")
        counts = {"colocated": colocated_workers(a)} if a.colocated else {"decode": a.decode, "prefill": a.prefill}
        workers = {role: [f"{role}-{i}{suffix}" for i in range(n)] for role, n in counts.items()}
        extras = {"decode": a.decode_arg, "prefill": a.prefill_arg, "colocated": a.colocated_arg}
        ep = {"decode": a.decode_ep, "prefill": a.prefill_ep, "colocated": a.colocated_ep}
        ids = {}  # what registers: the worker itself, or each rank of its EP group (``<id>-ep<R>``)
        for role, extra in ((r, extras[r]) for r in workers):
            ep_flags = ["--ep-size", str(ep[role])] if ep[role] > 1 else []
            for wid in workers[role]:
                metrics_flags = []
                if a.metrics_port:  # rank R of an EP group serves on the given port + R
                    metrics_flags = ["--metrics-port", str(next_metrics_port)]
                    self.metrics_ports.update({f"{wid}-ep{r}" if ep[role] > 1 else wid: next_metrics_port + r
                                               for r in range(ep[role])})
                    next_metrics_port += ep[role]
                self.spawn(wid, [role, *common, *engine, *ep_flags, "--port", "0", "--worker-id", wid,
                                 "--exit-with-parent", *metrics_flags, *extra])
                ids.setdefault(role, []).extend([f"{wid}-ep{r}" for r in range(ep[role])] if ep[role] > 1 else [wid])
        ready_file = self.log_dir / "router.ready"
        ready_file.unlink(missing_ok=True)
        router_metrics = ["--metrics-port", str(a.metrics_port)] if a.metrics_port else []
        if a.metrics_port:
            self.metrics_ports["router"] = a.metrics_port
        router_http = ["--http-port", str(a.http_port)] if a.http_port >= 0 else []
        self.spawn("router", ["router", *common, "--port", str(a.port), "--ready-file", str(ready_file),
                              *router_metrics, *router_http, *a.router_arg])
        for name, port in self.metrics_ports.items():
            print(f"up: metrics {name} http://{a.host}:{port}/metrics", file=sys.stderr, flush=True)
        print(f"up: redis {redis_url}, logs in {self.log_dir}", file=sys.stderr, flush=True)
        return self.wait_ready(ClusterState.from_url(redis_url, a.redis_prefix), ids, ready_file)

    def wait_ready(self, state: ClusterState, ids: dict[str, list[str]], ready_file: Path) -> str:
        deadline = time.monotonic() + self.args.ready_timeout
        want = {wid for role_ids in ids.values() for wid in role_ids}
        endpoint = None
        while time.monotonic() < deadline and not self.stopping:
            self.check_children()
            if endpoint is None and ready_file.exists():
                endpoint = ready_file.read_text().strip() or None
            registered = {w.worker_id for w in state.workers()} & want
            if endpoint and registered == want and _serving(endpoint):
                state.client.close()
                return endpoint
            time.sleep(0.2)
        state.client.close()
        if self.stopping:
            raise KeyboardInterrupt
        raise RuntimeError(f"cluster not ready after {self.args.ready_timeout:.0f}s (logs in {self.log_dir})")

    def check_children(self) -> None:
        for c in self.children:
            if c.exited() is not None:
                raise c.died("exited")

    # -- stopping ------------------------------------------------------------------------
    def stop(self) -> None:
        # router first (no new requests), then workers, then Redis (they deregister in it)
        stop_all([[c for c in self.children if c.name == "router"], [c for c in self.children if c.name != "router"]],
                 self.args.grace)
        if self.redis is not None:
            self.redis.stop()


def _serving(endpoint: str) -> bool:
    try:
        with grpc.insecure_channel(endpoint) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def colocated_workers(args: argparse.Namespace) -> int:
    return args.workers if args.workers is not None else args.prefill + args.decode


def ensure_model(model: str | None) -> str:
    """The checkpoint directory; the default tiny one is made on first use."""
    if model:
        if not Path(model, "config.json").is_file():
            raise SystemExit(f"up: {model} is not a checkpoint directory (no config.json)")
        return str(Path(model).resolve())
    default = Path("checkpoints/tiny").resolve()
    if not (default / "config.json").is_file():
        print(f"up: making the tiny checkpoint in {default}", file=sys.stderr, flush=True)
        subprocess.run(cli_argv("make-checkpoint", "--preset", "tiny", "--out", str(default)), check=True)
    return str(default)


@contextmanager
def local_cluster(model: str | None = None, *, prefill: int = 1, decode: int = 1, port: int = 0,
                  **options) -> Iterator[str]:
    """The cluster of ``dsv32-serve up`` from Python: yields the router's ``HOST:PORT`` once
    ready and stops every process on exit. ``options``: the other ``up`` flags by
    their dest names (``redis_url``, ``num_pages``, ``log_dir``, ``ready_timeout``...)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    unknown = set(options) - set(vars(args))
    if unknown:
        raise TypeError(f"unknown up option(s): {', '.join(sorted(unknown))}")
    for k, v in dict(options, model=model, prefill=prefill, decode=decode, port=port).items():
        setattr(args, k, v)
    cluster = Cluster(args)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def run(args: argparse.Namespace) -> int:
    if args.prefill < 1 or args.decode < 1:
        raise SystemExit("up: --prefill and --decode must be >= 1")
    if min(args.prefill_ep, args.decode_ep, args.colocated_ep) < 1:
        raise SystemExit("up: --prefill-ep, --decode-ep and --colocated-ep must be >= 1")
    if args.workers is not None and (not args.colocated or args.workers < 1):
        raise SystemExit("up: --workers N (>= 1) goes with --colocated")
    cluster = Cluster(args)

    def on_signal(signum, frame):
        cluster.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        endpoint = cluster.start()
        print(f"ready {endpoint}", flush=True)
        if args.http_port >= 0:  # the router wrote it before its ready file
            http = (cluster.log_dir / "router.ready.http").read_text().strip()
            print(f"http http://{http}/v1", flush=True)
        while not cluster.stopping:
            cluster.supervise()
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    except ChildDied as e:
        print(f"up: stopping the cluster: {e}", file=sys.stderr)
        code = 1
    except Exception as e:
        print(f"up: {e}", file=sys.stderr)
        for c in cluster.children:
            print(f"--- {c.name} ({c.log}) ---\n{c.tail(1500)}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
        print("up: stopped", file=sys.stderr, flush=True)
    return code
