"""The Serve application (:func:`build_app`, also Serve's application builder) and the
launcher behind ``python deploy/ray/dsv32_serve_ray.py`` (:func:`main`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from .config import DEFAULT_TARGET_LOAD, ROLES, AppConfig, LoadPolicy, RoleConfig

APP_NAME = "dsv32"


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
    """The Serve application: ``router`` (ingress) bound to ``prefill`` and ``decode``.

    ``config``: an :class:`AppConfig` or anything :meth:`AppConfig.from_dict`
    reads, so this is also Serve's application builder:
    ``serve run dsv32_serve.ray_app:build_app model=DIR redis_url=URL prefill.max_replicas=4``.
    """
    from ray import serve

    from .replicas import REPLICA_CLASSES

    cfg = config if isinstance(config, AppConfig) else AppConfig.from_dict(config)
    conf = cfg.to_dict()
    bound = {}
    for role in ("prefill", "decode"):
        bound[role] = serve.deployment(REPLICA_CLASSES[role]).options(**deployment_options(cfg, role)).bind(conf)
    router = serve.deployment(REPLICA_CLASSES["router"]).options(**deployment_options(cfg, "router"))
    return router.bind(conf, bound["prefill"], bound["decode"])


# -- the launcher ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsv32_serve_ray.py",
                                description="dsv32-serve as a Ray Serve application (one deployment per role)")
    p.add_argument("--model", required=True, help="checkpoint directory (same path on every node)")
    p.add_argument("--redis-url", default=os.environ.get("DSV32_REDIS_URL"),
                   help="default: start a private redis-server on 127.0.0.1 (one-node clusters only)")
    p.add_argument("--redis-prefix", default="dsv32:")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="Serve's HTTP proxy port (GET /dsv32 answers the router's endpoint); 0 = no HTTP proxy")
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
        if role != "router":
            p.add_argument(f"--{role}-ep-size", type=int, default=1,
                           help="expert-parallel ranks per replica (one process and one GPU each)")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace, redis_url: str) -> AppConfig:
    roles = {}
    for role in ROLES:
        lo, _, hi = getattr(a, f"{role}_replicas").partition(":")
        roles[role] = RoleConfig(min_replicas=int(lo), max_replicas=int(hi or lo),
                                 target_load=getattr(a, f"{role}_target_load"),
                                 num_cpus=getattr(a, f"{role}_num_cpus"), num_gpus=getattr(a, f"{role}_num_gpus"),
                                 args=getattr(a, f"{role}_arg"), ep_size=getattr(a, f"{role}_ep_size", 1))
    return AppConfig(model=str(Path(a.model).resolve()), redis_url=redis_url, redis_prefix=a.redis_prefix,
                     numerics=a.numerics, host=a.host, advertise_host=a.advertise_host, router_port=a.router_port,
                     log_dir=a.log_dir, **roles)


def main(argv: list[str] | None = None) -> int:
    """Start (or join) Ray, run the application, print ``ready HOST:PORT``, serve until
    SIGINT / SIGTERM, then shut Serve, a local Ray and a private Redis down."""
    a = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    redis = None
    try:
        if not a.redis_url:
            from dsv32_cluster.redis_server import RedisServer

            redis = RedisServer(die_with_parent=True).start()
            print(f"dsv32_serve_ray: private redis {redis.url}", file=sys.stderr, flush=True)
        cfg = config_from_args(a, a.redis_url or redis.url)
        ray.init(address=a.address, num_cpus=a.num_cpus)
        # After ray.init, which makes SIGTERM a sys.exit: both signals stop a startup too.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        if a.http_port:
            serve.start(http_options={"port": a.http_port})
        else:
            serve.start(proxy_location="Disabled")
        # Serve's HTTP proxy (if running) answers GET /dsv32 with a router's gRPC endpoint.
        handle = serve.run(build_app(cfg), name=APP_NAME, route_prefix="/dsv32" if a.http_port else None)
        print(f"ready {handle.endpoint.remote().result(timeout_s=60)}", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C would orphan what is still stopping
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if redis is not None:
                redis.stop()
    print("dsv32_serve_ray: stopped", file=sys.stderr, flush=True)
    return 0
