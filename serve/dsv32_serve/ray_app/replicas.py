"""The replica classes of the three deployments: each supervises one role process.

They live in an installed module so that Ray pickles them by reference (module
and name) rather than by value, as it does for classes of a ``__main__``
script; every replica node has this package anyway, since it runs
``python -m dsv32_serve.cli ROLE``. Their state is plain attributes set in the
constructor (no ``functools.cached_property``: on Python 3.11 it holds an
``RLock``, which cannot be pickled should the class ever travel by value).
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.request
from pathlib import Path

from dsv32_cluster.procs import WILDCARD_HOSTS, RoleProcess, free_port

from .config import LOAD_METRIC, AppConfig


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
        return self.child.pid

    def __del__(self) -> None:
        child = getattr(self, "child", None)
        if child is not None:
            child.stop(self.cfg.stop_grace_s)


def _node_ip() -> str:
    import ray.util

    return ray.util.get_node_ip_address()


class WorkerReplica(_Replica):
    """A prefill or decode replica: its worker registers itself in Redis."""

    def __init__(self, config: dict):
        from dsv32_cluster.state import ClusterState

        cfg = AppConfig.from_dict(config)
        self.state = ClusterState.from_url(cfg.redis_url, cfg.redis_prefix)  # wait_ready reads it
        self.worker_id, self.rank_ids = "", []
        super().__init__(config)

    def role_flags(self) -> list[str]:
        self.worker_id = f"{self.role}-{self.replica_id}"
        ep = getattr(self.cfg, self.role).ep_size
        # one replica = one EP group: its ranks register as <id>-ep<R> (see dsv32_cluster.runtime)
        self.rank_ids = [f"{self.worker_id}-ep{r}" for r in range(ep)] if ep > 1 else [self.worker_id]
        flags = ["--advertise-host", self.advertise, "--port", "0", "--worker-id", self.worker_id, "--exit-with-parent"]
        flags += ["--ep-size", str(ep)] if ep > 1 else []
        return flags + (["--transfer-port", "0"] if self.role == "decode" else [])

    def infos(self) -> list:
        """The registrations of this replica's worker (every rank of its EP group), or [] while any is missing."""
        mine = {w.worker_id: w for w in self.state.workers(self.role) if w.worker_id in self.rank_ids}
        return [mine[i] for i in self.rank_ids] if len(mine) == len(self.rank_ids) else []

    def ready(self) -> bool:
        return bool(self.infos())

    def check_health(self) -> None:
        super().check_health()
        if not self.infos():
            raise RuntimeError(f"{self.worker_id} is running but not (every rank) registered in Redis "
                               "(heartbeats lapsed)")

    def record_autoscaling_stats(self) -> dict[str, float]:
        ws = self.infos()
        if not ws:
            return {}
        load = sum(w.queued_tokens if self.role == "prefill" else w.running + w.queued_requests for w in ws)
        return {LOAD_METRIC: float(load)}

    def endpoint(self) -> str:
        ws = self.infos()
        return ws[0].endpoint if ws else ""

    def __del__(self) -> None:
        try:
            super().__del__()
        finally:
            state = getattr(self, "state", None)
            if state is not None:
                state.client.close()


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


REPLICA_CLASSES = {"router": RouterReplica, "prefill": PrefillReplica, "decode": DecodeReplica}
