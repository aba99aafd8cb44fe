"""The Ray Serve application (``dsv32_serve.ray_app``, launched by deploy/ray/dsv32_serve_ray.py).

Fast: its configuration (also as ``serve run`` strings), deployment options,
autoscaling policy, and that its replica classes travel by reference. Slow: a
local Ray (2 CPUs, temp dir under a test temp dir) runs the application on the
tiny bf16 checkpoint, once built in this process against the session's
redis-server, once through the documented launcher command with its own private
Redis; a greedy request through the router's gRPC endpoint must give the
offline ``LLM``'s tokens, and stopping must leave no process (and no
registration) behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from dsv32_serve import ray_app as dsr
from test_e2e import _alive, _descendants

LAUNCHER = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "dsv32_serve_ray.py"
PROMPT = "The disaggregated cluster streams tokens"
MAX_TOKENS = 8
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


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


def test_serve_run_string_arguments_build_the_same_application():
    pytest.importorskip("ray.serve")
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # what `serve run` calls

    args = {"model": "/m", "redis_url": "redis://r", "router_port": "0", "env": '{"OMP_NUM_THREADS": "1"}',
            "prefill.max_replicas": "3", "prefill.target_load": "4096", "decode.args": "--num-pages 64"}
    cfg = dsr.AppConfig.from_dict(args)
    assert cfg.router_port == 0 and cfg.env == {"OMP_NUM_THREADS": "1"}
    assert cfg.prefill.max_replicas == 3 and cfg.prefill.target_load == 4096
    assert cfg.decode.args == ["--num-pages", "64"]
    app = call_user_app_builder_with_args_if_necessary(dsr.build_app, args)
    assert app._bound_deployment.name == "router" and app._bound_deployment.init_args[0] == cfg.to_dict()
    with pytest.raises(TypeError, match="unknown key"):
        dsr.AppConfig.from_dict({"model": "/m", "redis_url": "redis://r", "prefil.max_replicas": "2"})
    with pytest.raises(ValueError, match="router_port"):
        dsr.AppConfig.from_dict({"model": "/m", "redis_url": "redis://r", "router_port": "fifty"})


def test_replica_classes_are_pickled_by_reference():
    # the launcher's bug: classes of a __main__ script are pickled by value, with all they hold
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    from dsv32_serve.ray_app import replicas

    for cls in replicas.REPLICA_CLASSES.values():
        blob = cloudpickle.dumps(cls)
        assert len(blob) < 200 and cloudpickle.loads(blob) is cls, cls


# -- the application on a local Ray ---------------------------------------------------------

def _oracle(model: str, out: dict) -> None:
    try:
        from dsv32_engine import LLM, SamplingParams

        [res] = LLM(model=model).generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        out["tokens"] = list(res.outputs[0].token_ids)
    except BaseException as e:  # reported by the test, not lost in the thread
        out["error"] = e


def _start_oracle(model: str) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=_oracle, args=(model, out), daemon=True)
    thread.start()  # overlaps with Ray's start
    return thread, out


@pytest.fixture
def ray_temp_dir(tmp_path_factory):
    # Ray puts unix sockets under it (ray/session_<date>_<pid>/sockets/plasma_store, ~75
    # characters more); sun_path holds 107. Use the test tmp dir when it is short enough.
    d = str(tmp_path_factory.mktemp("ray"))
    own = len(d) > 30
    if own:
        d = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield d
    if own:
        shutil.rmtree(d, ignore_errors=True)


def _print_logs(log_dir: Path) -> None:
    for f in sorted(Path(log_dir).glob("*.log")):
        print(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_app_serves_the_offline_llm_tokens_and_shuts_down_cleanly(redis_server, tmp_path_factory, ray_temp_dir,
                                                                     monkeypatch):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from checkpoints import tiny_checkpoint
    from dsv32_router.client import generate
    from dsv32_cluster.state import ClusterState

    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    model = tiny_checkpoint("bf16", seed=0)  # the same cache entry as test_engine_llm
    oracle_thread, oracle = _start_oracle(model)

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
    # no runtime env: the replicas import dsv32_serve.ray_app from the installed package
    ray.init(num_cpus=2, _temp_dir=ray_temp_dir, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(dsr.build_app(cfg), name=dsr.APP_NAME, route_prefix=None)
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
            h = serve.get_deployment_handle(name, app_name=dsr.APP_NAME)
            assert h.record_autoscaling_stats.remote().result(timeout_s=10) == {dsr.LOAD_METRIC: 0.0}, name
            pids.append(h.process_id.remote().result(timeout_s=10))
        print(f"ray app ready in {startup_s:.1f}s, request done at {time.monotonic() - t0:.1f}s")
    except Exception:
        _print_logs(log_dir)
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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_launcher_command_serves_the_offline_llm_tokens_and_stops_cleanly(tmp_path_factory, ray_temp_dir):
    """The command of deploy/README.md, as a user runs it: a script, its own local Ray and private Redis."""
    pytest.importorskip("ray.serve")
    from checkpoints import tiny_checkpoint
    from dsv32_router.client import stream_responses
    from dsv32_cluster.state import ClusterState

    model = tiny_checkpoint("bf16", seed=0)
    oracle_thread, oracle = _start_oracle(model)
    log_dir = tmp_path_factory.mktemp("ray-launcher-logs")
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": ray_temp_dir, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, str(LAUNCHER), "--model", model, "--num-cpus", "2", "--http-port", "0",
            "--host", "127.0.0.1", "--router-port", "0", "--log-dir", str(log_dir),
            "--prefill-arg=--num-pages=64", "--decode-arg=--num-pages=64",
            "--decode-ep-size", "2",  # the decode replica runs an expert-parallel group of two ranks
            *[f"--{role}-num-cpus=0.5" for role in dsr.ROLES]]
    t0 = time.monotonic()
    err = open(log_dir / "launcher.stderr", "wb")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("ready ") for line in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the launcher did not print `ready` (exit {proc.poll()}):\n"
                                     f"{(log_dir / 'launcher.stderr').read_text(errors='replace')[-5000:]}")
            time.sleep(0.2)
        target = next(line for line in lines if line.startswith("ready ")).split()[1]
        assert target.startswith("127.0.0.1:")
        redis_url = next(line.split()[-1] for line in (log_dir / "launcher.stderr").read_text().splitlines()
                         if "private redis" in line)
        state = ClusterState.from_url(redis_url)  # the default prefix, in the launcher's own Redis
        registered = state.workers()
        workers = {w.role: w for w in registered}
        state.client.close()
        assert set(workers) == {"prefill", "decode"}
        ranks = sorted((w.ep_rank, w.ep_size) for w in registered if w.role == "decode")
        assert ranks == [(0, 2), (1, 2)] and len({w.ep_group for w in registered if w.role == "decode"}) == 1
        # everything it started: Ray's processes, the replicas, their role processes, redis-server
        pids = _descendants(proc.pid)
        assert {w.pid for w in registered} <= pids

        msgs = list(stream_responses(target, PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, timeout=60))
        oracle_thread.join(120)
        assert "error" not in oracle, oracle.get("error")
        assert [t for m in msgs for t in m.token_ids] == oracle["tokens"]
        assert msgs[-1].finish_reason and msgs[0].prefill_worker == workers["prefill"].worker_id
        print(f"launcher ready and request done at {time.monotonic() - t0:.1f}s")
    except Exception:
        _print_logs(log_dir)
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        err.close()
    assert code == 0, (log_dir / "launcher.stderr").read_text(errors="replace")[-3000:]
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for p in left:  # not to leak them into the other tests
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes left behind after the launcher stopped: {left}"
    print(f"total {time.monotonic() - t0:.1f}s")
