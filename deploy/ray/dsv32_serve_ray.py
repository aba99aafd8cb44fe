"""dsv32-serve as a Ray Serve application: each role a deployment with its own autoscaling.

    router   (ingress)  replicas run `dsv32-serve router`   — the public gRPC endpoint
    prefill             replicas run `dsv32-serve prefill`
    decode              replicas run `dsv32-serve decode`   — one EP group (size 1) each

A replica is a supervisor of one child process, the very process `dsv32-serve up`
starts for that role (``python -m dsv32_serve.cli ROLE ...``, configured by
flags), so the three ways of running the system (up, Helm, Ray) run the same
binaries. Ray places the replica, and so its process, on a node with the
replica's resources (``num_gpus`` for workers on GPU nodes).

Finding each other: only through Redis, as everywhere. A worker binds
``host`` (default all interfaces) on a free port, registers
``<advertise host>:<port>`` (and, for decode, its KV-transfer endpoint) with
TTL heartbeats; routers read the registry. The advertise host defaults to the
Ray node's IP. Requests never pass through Serve handles: client → router
(gRPC) → workers. Ray is the process manager and the autoscaler.

A replica's life:
  1. start the child (its own session; ``DSV32_PARENT_PID`` so that it dies
     with the replica process, as under ``up``; workers also get
     ``--exit-with-parent``);
  2. ready — the constructor returns once a worker is registered in Redis
     (what ``up`` waits for) or once the router has bound its port (its ready
     file; its gRPC health turns SERVING when a prefill and a decode worker are
     registered);
  3. ``check_health`` fails when the child has exited (or a worker's
     registration has lapsed): Serve replaces the replica;
  4. ``record_autoscaling_stats`` reports the role's load, which
     :class:`LoadPolicy` turns into a replica count: ``ceil(total / target)``.
     Router: in-flight + waiting requests (its Prometheus gauges). Prefill:
     queued prompt tokens. Decode: running + reserved requests (the load
     reports workers heartbeat into Redis). Serve's default request-based
     autoscaler would see no traffic at all, since none goes through Serve;
  5. shutdown (``__del__``) — SIGTERM to the child's process group (workers
     deregister), SIGKILL after ``stop_grace_s``.

Run it:
    python deploy/ray/dsv32_serve_ray.py --model checkpoints/tiny [--redis-url URL] [--address auto]
or build it yourself (tests, notebooks)::
    ray.init(runtime_env=runtime_env())     # ships this file to the replicas
    handle = serve.run(build_app({"model": ..., "redis_url": ...}), name="dsv32", route_prefix=None)
    target = handle.endpoint.remote().result()
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dsv32_cluster.procs import WILDCARD_HOSTS, RoleProcess, free_port

ROLES = ("router", "prefill", "decode")
LOAD_METRIC = "dsv32_load"
DEFAULT_TARGET_LOAD = {"router": 128.0, "prefill": 8192.0, "decode": 48.0}
"""Per replica: router in-flight + waiting requests; prefill queued tokens; decode running + reserved requests."""


# -- configuration -----------------------------------------------------------------------

@dataclass
class RoleConfig:
    """One role's deployment."""

    min_replicas: int = 1
    """At least 1: with no replica of a role the cluster serves nothing, and reports no load to scale up on."""
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_load: float = 0.0
    """Load per replica the autoscaler aims at (see ``DEFAULT_TARGET_LOAD``); 0 = the role's default."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    args: list[str] = field(default_factory=list)
    """Extra flags of ``dsv32-serve ROLE``, e.g. ``["--max-num-seqs", "32"]``."""
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        if self.target_load < 0 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("target_load, num_cpus and num_gpus must be >= 0")
        self.args = [str(a) for a in self.args]


@dataclass
class AppConfig:
    """The application: where the model and Redis are, how processes bind and advertise, each role."""

    model: str
    """Checkpoint directory, at this path on every node."""
    redis_url: str
    """Reachable from every node (a Redis on 127.0.0.1 only serves a one-node cluster)."""
    redis_prefix: str = "dsv32:"
    numerics: str = "exact"
    host: str = "0.0.0.0"
    """Bind address of every process."""
    advertise_host: str = ""
    """What workers register and the router reports; "" = ``host`` unless a wildcard, else the Ray node's IP."""
    router_port: int = 50051
    """The router's gRPC port; with a fixed port, at most one router replica per node. 0 = any free port."""
    ready_timeout_s: float = 300.0
    stop_grace_s: float = 10.0
    log_dir: str = ""
    """Where the children's logs go, on each node ("" = a temporary directory per replica)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the children (``DSV32_*`` tuning, ``OMP_NUM_THREADS``...)."""
    router: RoleConfig = field(default_factory=RoleConfig)
    prefill: RoleConfig = field(default_factory=RoleConfig)
    decode: RoleConfig = field(default_factory=RoleConfig)

    def __post_init__(self) -> None:
        if not self.model or not self.redis_url:
            raise ValueError("model and redis_url are required")
        if self.numerics not in ("exact", "fp8"):
            raise ValueError(f"numerics must be exact or fp8, got {self.numerics!r}")
        for role in ROLES:
            value = getattr(self, role)
            if isinstance(value, dict):
                setattr(self, role, _strict(RoleConfig, value, role))

    @classmethod
    def from_dict(cls, d: dict) -> AppConfig:
        return _strict(cls, d, "config")

    def to_dict(self) -> dict:
        return asdict(self)

    def target_load(self, role: str) -> float:
        return getattr(self, role).target_load or DEFAULT_TARGET_LOAD[role]


def _strict(cls, d: dict, where: str):
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise TypeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    return cls(**d)


# -- autoscaling ---------------------------------------------------------------------------

class LoadPolicy:
    """Serve autoscaling policy: replicas = ceil(sum of the replicas' ``dsv32_load`` / target).

    Serve wraps it with the deployment's min/max replicas and up/down-scale
    delays. Before any replica has reported, it keeps the current target.
    """

    def __init__(self, target: float):
        if target <= 0:
            raise ValueError("target must be > 0")
        self.target = float(target)

    def __call__(self, ctx) -> tuple[int, dict]:
        loads = (ctx.aggregated_metrics or {}).get(LOAD_METRIC) or {}
        if not loads:
            return ctx.target_num_replicas, {}
        return max(1, math.ceil(sum(loads.values()) / self.target)), {}


# -- the child process ---------------------------------------------------------------------

class _Replica:
    """What the three deployments share: start the child, wait until ready, supervise, stop."""

    role = ""

    def __init__(self, config: dict):
        from ray import serve

        self.cfg = AppConfig.from_dict(config)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        log_dir = Path(self.cfg.log_dir or tempfile.mkdtemp(prefix=f"dsv32-ray-{self.role}-"))
        self.advertise = self.cfg.advertise_host or (
            self.cfg.host if self.cfg.host not in WILDCARD_HOSTS else _node_ip())
        env = {**os.environ, **self.cfg.env}
        argv = ["--model", self.cfg.model, "--numerics", self.cfg.numerics, "--redis-url", self.cfg.redis_url,
                "--redis-prefix", self.cfg.redis_prefix, "--host", self.cfg.host, *self.role_flags(),
                *getattr(self.cfg, self.role).args]
        # Spawned from the replica's constructor thread, which lives as long as the
        # replica: the child's parent-death signal fires when the replica process dies.
        self.child = RoleProcess(self.role, [self.role, *argv], log_dir / f"{self.role}-{self.replica_id}.log", env)
        try:
            self.wait_ready(time.monotonic() + self.cfg.ready_timeout_s)
        except BaseException:
            self.child.stop(self.cfg.stop_grace_s)
            raise

    def role_flags(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def wait_ready(self, deadline: float) -> None:
        while not self.ready():
            if self.child.exited() is not None:
                raise self.child.died("exited before it was ready")
            if time.monotonic() > deadline:
                raise self.child.died(f"not ready after {self.cfg.ready_timeout_s:.0f}s")
            time.sleep(0.2)

    def check_health(self) -> None:
        if self.child.exited() is not None:
            raise self.child.died("exited")

    def process_id(self) -> int:
        """The pid of this replica's ``dsv32-serve`` process (on the replica's node)."""
        return self.child.proc.pid

    def __del__(self) -> None:
        child = getattr(self, "child", None)
        if child is not None:
            child.stop(self.cfg.stop_grace_s)


def _node_ip() -> str:
    import ray.util

    return ray.util.get_node_ip_address()


class WorkerReplica(_Replica):
    """A prefill or decode replica: its worker registers itself in Redis."""

    worker_id = ""

    @functools.cached_property
    def state(self):
        from dsv32_cluster.state import ClusterState

        return ClusterState.from_url(self.cfg.redis_url, self.cfg.redis_prefix)

    def role_flags(self) -> list[str]:
        self.worker_id = f"{self.role}-{self.replica_id}"
        flags = ["--advertise-host", self.advertise, "--port", "0", "--worker-id", self.worker_id, "--exit-with-parent"]
        return flags + (["--transfer-port", "0"] if self.role == "decode" else [])

    def info(self):
        return next((w for w in self.state.workers(self.role) if w.worker_id == self.worker_id), None)

    def ready(self) -> bool:
        return self.info() is not None

    def check_health(self) -> None:
        super().check_health()
        if self.info() is None:
            raise RuntimeError(f"{self.worker_id} is running but not registered in Redis (heartbeats lapsed)")

    def record_autoscaling_stats(self) -> dict[str, float]:
        w = self.info()
        if w is None:
            return {}
        load = w.queued_tokens if self.role == "prefill" else w.running + w.queued_requests
        return {LOAD_METRIC: float(load)}

    def endpoint(self) -> str:
        w = self.info()
        return w.endpoint if w else ""

    def __del__(self) -> None:
        super().__del__()
        if "state" in self.__dict__:
            self.state.client.close()


class PrefillReplica(WorkerReplica):
    role = "prefill"


class DecodeReplica(WorkerReplica):
    role = "decode"


class RouterReplica(_Replica):
    """The ingress: a router process serving the public gRPC API on ``router_port``."""

    role = "router"

    def __init__(self, config: dict, prefill=None, decode=None):
        # The worker deployments are bound here so that they belong to the application;
        # the router finds the workers through Redis, not through these handles.
        self.workers = {"prefill": prefill, "decode": decode}
        self.port = 0
        self.metrics_port = free_port()
        self.ready_file = Path(tempfile.mkdtemp(prefix="dsv32-ray-router-")) / "ready"
        super().__init__(config)

    def role_flags(self) -> list[str]:
        return ["--port", str(self.cfg.router_port), "--ready-file", str(self.ready_file),
                "--metrics-port", str(self.metrics_port)]

    def ready(self) -> bool:
        if not self.ready_file.exists():
            return False
        bound = self.ready_file.read_text().strip()
        if not bound:
            return False
        self.port = int(bound.rsplit(":", 1)[1])
        return True

    def endpoint(self) -> str:
        """``HOST:PORT`` of this replica's gRPC API (``dsv32.serving.v1.Generation``)."""
        return f"{self.advertise}:{self.port}"

    def __call__(self, request=None) -> dict:
        """Through Serve's HTTP proxy (if enabled): where to send gRPC requests."""
        return {"grpc": self.endpoint(), "service": "dsv32.serving.v1.Generation"}

    def record_autoscaling_stats(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
        load = sum(s.value for fam in text_string_to_metric_families(text)
                   if fam.name in ("dsv32_inflight_requests", "dsv32_waiting_requests")
                   for s in fam.samples if s.labels.get("role") == "router")
        return {LOAD_METRIC: float(load)}


# -- the application -----------------------------------------------------------------------

REPLICA_CLASSES = {"router": RouterReplica, "prefill": PrefillReplica, "decode": DecodeReplica}


def deployment_options(cfg: AppConfig, role: str) -> dict:
    """Serve options of one role's deployment (its own autoscaling and resources)."""
    rc: RoleConfig = getattr(cfg, role)
    autoscaling = {"min_replicas": rc.min_replicas, "max_replicas": rc.max_replicas,
                   "upscale_delay_s": rc.upscale_delay_s, "downscale_delay_s": rc.downscale_delay_s,
                   "policy": {"policy_function": LoadPolicy, "policy_kwargs": {"target": cfg.target_load(role)}}}
    if rc.initial_replicas is not None:
        autoscaling["initial_replicas"] = rc.initial_replicas
    opts = {"name": role, "autoscaling_config": autoscaling,
            "ray_actor_options": {"num_cpus": rc.num_cpus, "num_gpus": rc.num_gpus},
            "health_check_period_s": 5.0, "health_check_timeout_s": 30.0,
            # no requests pass through Serve: nothing to drain before __del__ stops the process
            "graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": cfg.stop_grace_s + 10.0}
    if role == "router" and cfg.router_port:
        opts["max_replicas_per_node"] = 1  # a fixed port: one router per node
    return opts


def build_app(config):
    """The Serve application (Serve's app-builder convention: ``serve run dsv32_serve_ray:build_app key=value``).

    ``config``: an :class:`AppConfig` or its dict form (roles as nested dicts).
    """
    from ray import serve

    cfg = config if isinstance(config, AppConfig) else AppConfig.from_dict(config)
    conf = cfg.to_dict()
    bound = {}
    for role in ("prefill", "decode"):
        bound[role] = serve.deployment(REPLICA_CLASSES[role]).options(**deployment_options(cfg, role)).bind(conf)
    router = serve.deployment(RouterReplica).options(**deployment_options(cfg, "router"))
    return router.bind(conf, bound["prefill"], bound["decode"])


def runtime_env() -> dict:
    """The job-level runtime env that makes this file importable in the replicas (on every node)."""
    return {"py_modules": [str(Path(__file__).resolve())]}


# -- command line --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory (same path on every node)")
    p.add_argument("--redis-url", default=os.environ.get("DSV32_REDIS_URL"),
                   help="default: start a private redis-server on 127.0.0.1 (one-node clusters only)")
    p.add_argument("--redis-prefix", default="dsv32:")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--numerics", default="exact", choices=("exact", "fp8"))
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--advertise-host", default="")
    p.add_argument("--router-port", type=int, default=50051)
    p.add_argument("--log-dir", default="")
    for role in ROLES:
        p.add_argument(f"--{role}-replicas", default="1", metavar="MIN[:MAX]",
                       help=f"{role} replicas: a fixed count or an autoscaling range")
        p.add_argument(f"--{role}-target-load", type=float, default=0.0,
                       help=f"load per {role} replica to scale at (default {DEFAULT_TARGET_LOAD[role]:g})")
        p.add_argument(f"--{role}-num-cpus", type=float, default=1.0)
        p.add_argument(f"--{role}-num-gpus", type=float, default=0.0)
        p.add_argument(f"--{role}-arg", action="append", default=[], help=f"extra `dsv32-serve {role}` flag")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace, redis_url: str) -> AppConfig:
    roles = {}
    for role in ROLES:
        lo, _, hi = getattr(a, f"{role}_replicas").partition(":")
        roles[role] = RoleConfig(min_replicas=int(lo), max_replicas=int(hi or lo),
                                 target_load=getattr(a, f"{role}_target_load"),
                                 num_cpus=getattr(a, f"{role}_num_cpus"), num_gpus=getattr(a, f"{role}_num_gpus"),
                                 args=getattr(a, f"{role}_arg"))
    return AppConfig(model=str(Path(a.model).resolve()), redis_url=redis_url, redis_prefix=a.redis_prefix,
                     numerics=a.numerics, host=a.host, advertise_host=a.advertise_host, router_port=a.router_port,
                     log_dir=a.log_dir, **roles)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    redis = None
    if not a.redis_url:
        from dsv32_cluster.redis_server import RedisServer

        redis = RedisServer(die_with_parent=True).start()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        ray.init(address=a.address, runtime_env=runtime_env())
        # Serve's HTTP proxy (if running) answers GET /dsv32 with a router's gRPC endpoint.
        handle = serve.run(build_app(config_from_args(a, a.redis_url or redis.url)), name="dsv32",
                           route_prefix="/dsv32")
        print(f"ready {handle.endpoint.remote().result(timeout_s=60)}", flush=True)
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if redis is not None:
                redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
