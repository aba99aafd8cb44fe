"""The Ray Serve application (deploy/ray/dsv32_serve_ray.py).

Fast: its configuration, deployment options and autoscaling policy. Slow: a
local Ray (2 CPUs, temp dir under the test's tmp) runs the application on the
tiny bf16 checkpoint against the session's redis-server; one greedy request
through the router's gRPC endpoint must give the offline ``LLM``'s tokens, and
``serve.shutdown()`` must leave no role process and no registration behind.
deploy/ is not a package: the module is loaded by path, and shipped to the
replicas with the job's runtime env (``py_modules``).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

MODULE_PATH = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "dsv32_serve_ray.py"
PROMPT = "The disaggregated cluster streams tokens"
MAX_TOKENS = 8


def _load_module():
    name = "dsv32_serve_ray"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, MODULE_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


dsr = _load_module()


# -- configuration and policy (no Ray needed) ---------------------------------------------

def test_config_round_trips_and_rejects_unknown_keys():
    cfg = dsr.AppConfig.from_dict({"model": "/m", "redis_url": "redis://r:6379/0",
                                   "decode": {"min_replicas": 1, "max_replicas": 4, "args": ["--max-num-seqs", 32]}})
    assert cfg.decode.max_replicas == 4 and cfg.decode.args == ["--max-num-seqs", "32"]
    assert dsr.AppConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.target_load("prefill") == dsr.DEFAULT_TARGET_LOAD["prefill"]
    with pytest.raises(TypeError, match="prefil"):
        dsr.AppConfig.from_dict({"model": "/m", "redis_url": "redis://r", "prefil": {}})
    with pytest.raises(TypeError, match="decode: unknown key.*max_replica"):
        dsr.AppConfig.from_dict({"model": "/m", "redis_url": "redis://r", "decode": {"max_replica": 2}})
    with pytest.raises(ValueError, match="min_replicas"):
        dsr.RoleConfig(min_replicas=0)
    with pytest.raises(ValueError, match="numerics"):
        dsr.AppConfig(model="/m", redis_url="redis://r", numerics="fp16")


def test_each_role_gets_its_own_autoscaling_and_resources():
    cfg = dsr.AppConfig(model="/m", redis_url="redis://r", router_port=50051,
                        prefill=dsr.RoleConfig(min_replicas=1, max_replicas=8, target_load=4096, num_gpus=1),
                        decode=dsr.RoleConfig(min_replicas=2, max_replicas=6, initial_replicas=3, num_gpus=1))
    opts = {role: dsr.deployment_options(cfg, role) for role in dsr.ROLES}
    assert {o["name"] for o in opts.values()} == set(dsr.ROLES)
    assert opts["prefill"]["autoscaling_config"]["max_replicas"] == 8
    assert opts["prefill"]["autoscaling_config"]["policy"]["policy_kwargs"] == {"target": 4096}
    assert opts["decode"]["autoscaling_config"]["initial_replicas"] == 3
    assert opts["decode"]["autoscaling_config"]["policy"]["policy_kwargs"] == {"target": 48.0}
    assert opts["prefill"]["ray_actor_options"]["num_gpus"] == 1
    assert opts["router"]["max_replicas_per_node"] == 1  # a fixed gRPC port
    cfg.router_port = 0
    assert "max_replicas_per_node" not in dsr.deployment_options(cfg, "router")


def _ctx(loads: dict | None, target_num_replicas: int = 2):
    metrics = None if loads is None else {dsr.LOAD_METRIC: loads}
    return SimpleNamespace(aggregated_metrics=metrics, target_num_replicas=target_num_replicas)


@pytest.mark.parametrize("loads, want", [
    (None, 2),  # nothing reported yet: keep the current target
    ({}, 2),
    ({"a": 0.0, "b": 0.0}, 1),
    ({"a": 100.0, "b": 50.0}, 3),  # 150 / 64 -> 3
    ({"a": 64.0}, 1),
    ({"a": 65.0}, 2),
], ids=["unreported", "empty", "idle", "busy", "at-target", "over-target"])
def test_load_policy_is_total_load_over_target(loads, want):
    policy = dsr.LoadPolicy(target=64)
    replicas, state = policy(_ctx(loads))
    assert replicas == want and state == {}


def test_build_app_makes_three_deployments_with_the_policy():
    pytest.importorskip("ray.serve")
    app = dsr.build_app({"model": "/m", "redis_url": "redis://r", "prefill": {"max_replicas": 3}})
    seen = {}
    todo = [app]
    while todo:
        d = todo.pop()._bound_deployment
        seen[d.name] = d
        todo += [a for a in d.init_args if isinstance(a, type(app))]
    assert set(seen) == set(dsr.ROLES), seen
    for role, d in seen.items():
        auto = d._deployment_config.autoscaling_config
        assert auto.policy.policy_function.endswith("LoadPolicy")
        assert auto.max_replicas == (3 if role == "prefill" else 1)
        assert d.ray_actor_options["num_cpus"] == 1.0


# -- the application on a local Ray ---------------------------------------------------------

def _oracle(model: str, out: dict) -> None:
    try:
        from dsv32_engine import LLM, SamplingParams

        [res] = LLM(model=model).generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        out["tokens"] = list(res.outputs[0].token_ids)
    except BaseException as e:  # reported by the test, not lost in the thread
        out["error"] = e


def _ray_temp_dir(tmp_path_factory) -> str:
    # Ray puts unix sockets under it (session_<date>_<pid>/sockets/plasma_store, ~70
    # characters more); sun_path holds 107. Use the test tmp dir when it is short enough.
    d = str(tmp_path_factory.mktemp("ray"))
    if len(d) > 36:
        d = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    return d


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_app_serves_the_offline_llm_tokens_and_shuts_down_cleanly(redis_server, tmp_path_factory, monkeypatch):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from checkpoints import tiny_checkpoint
    from dsv32_router.client import generate
    from dsv32_cluster.state import ClusterState

    for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}.items():
        monkeypatch.setenv(k, v)
    model = tiny_checkpoint("bf16", seed=0)  # the same cache entry as test_engine_llm
    oracle: dict = {}
    oracle_thread = threading.Thread(target=_oracle, args=(model, oracle), daemon=True)
    oracle_thread.start()  # overlaps with Ray's start

    prefix = f"ray-{uuid.uuid4().hex[:6]}:"
    redis_url = f"redis://{redis_server.host}:{redis_server.port}/4"
    state = ClusterState.from_url(redis_url, prefix)
    log_dir = tmp_path_factory.mktemp("ray-logs")
    role = {"num_cpus": 0.5, "upscale_delay_s": 1.0}
    worker = {**role, "args": ["--num-pages", "64"]}
    cfg = {"model": model, "redis_url": redis_url, "redis_prefix": prefix, "host": "127.0.0.1", "router_port": 0,
           "ready_timeout_s": 90, "stop_grace_s": 5, "log_dir": str(log_dir), "env": {"OMP_NUM_THREADS": "1"},
           "router": role, "prefill": worker, "decode": worker}
    pids: list[int] = []
    t0 = time.monotonic()
    ray.init(num_cpus=2, _temp_dir=_ray_temp_dir(tmp_path_factory), include_dashboard=False,
             runtime_env=dsr.runtime_env(), log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(dsr.build_app(cfg), name="dsv32", route_prefix=None)
        startup_s = time.monotonic() - t0
        target = handle.endpoint.remote().result(timeout_s=30)
        assert target.startswith("127.0.0.1:")
        workers = {w.role: w for w in state.workers()}
        assert set(workers) == {"prefill", "decode"}
        assert all(w.endpoint.startswith("127.0.0.1:") and w.worker_id.startswith(w.role + "-")
                   for w in workers.values())
        assert workers["decode"].transfer_endpoint.startswith("127.0.0.1:")

        out = generate(target, PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, timeout=60)
        oracle_thread.join(120)
        assert "error" not in oracle, oracle.get("error")
        assert out.token_ids == oracle["tokens"]
        assert out.prefill_worker == workers["prefill"].worker_id and out.decode_worker == workers["decode"].worker_id

        # what each deployment reports to its autoscaling policy, through the real metric paths
        for name in dsr.ROLES:
            h = serve.get_deployment_handle(name, app_name="dsv32")
            assert h.record_autoscaling_stats.remote().result(timeout_s=10) == {dsr.LOAD_METRIC: 0.0}, name
            pids.append(h.process_id.remote().result(timeout_s=10))
        print(f"ray app ready in {startup_s:.1f}s, request done at {time.monotonic() - t0:.1f}s")
    except Exception:
        for f in sorted(Path(log_dir).glob("*.log")):
            print(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    # the replicas stopped their processes, and the workers deregistered on the way out
    deadline = time.monotonic() + 15
    while (any(_alive(p) for p in pids) or state.workers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)], "a role process outlived serve.shutdown()"
    assert state.workers() == []
    state.client.close()
    print(f"total {time.monotonic() - t0:.1f}s")
