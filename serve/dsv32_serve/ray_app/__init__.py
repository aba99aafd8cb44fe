"""dsv32-serve as a Ray Serve application: each role a deployment with its own autoscaling.

    router   (ingress)  replicas run `dsv32-serve router`   — the public gRPC endpoint
    prefill             replicas run `dsv32-serve prefill`
    decode              replicas run `dsv32-serve decode`   — one EP group (size 1) each

A replica is a supervisor of one child process, the very process `dsv32-serve up`
starts for that role (``python -m dsv32_serve.cli ROLE ...``, configured by
flags, supervised by :mod:`dsv32_cluster.procs`), so the three ways of running
the system (up, Helm, Ray) run the same binaries. Ray places the replica, and
so its process, on a node with the replica's resources (``num_gpus`` for
workers on GPU nodes); this package must be installed on every node.

Finding each other: only through Redis, as everywhere. A worker binds
``host`` (default all interfaces) on a free port, registers
``<advertise host>:<port>`` (and, for decode, its KV-transfer endpoint) with
TTL heartbeats; routers read the registry. The advertise host defaults to the
Ray node's IP. Requests never pass through Serve handles: client → router
(gRPC) → workers. Ray is the process manager and the autoscaler.

A replica's life (:mod:`.replicas`):
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
    serve run dsv32_serve.ray_app:build_app model=DIR redis_url=URL [prefill.max_replicas=4 ...]
or from Python (tests, notebooks)::
    handle = serve.run(build_app({"model": ..., "redis_url": ...}), name="dsv32", route_prefix=None)
    target = handle.endpoint.remote().result()

Nothing else in the repository imports this package: it sits at the top.
"""

from .app import APP_NAME, build_app, config_from_args, deployment_options, main, parse_args
from .config import DEFAULT_TARGET_LOAD, LOAD_METRIC, ROLES, AppConfig, LoadPolicy, RoleConfig

__all__ = ["APP_NAME", "DEFAULT_TARGET_LOAD", "LOAD_METRIC", "ROLES", "AppConfig", "LoadPolicy", "RoleConfig",
           "build_app", "config_from_args", "deployment_options", "main", "parse_args"]
