"""The router process against in-process fake workers and a real redis-server.

The fakes (``test_router_fakes.py``, which also holds them to the proto) speak
the internal worker protocol with a deterministic "model": the token at
absolute position ``pos`` is ``fake_token(seed, pos)``, so a retry that
continues from prompt + generated tokens must reproduce the same stream, and
duplicated or lost tokens show. Faults are scripted per test.
End-to-end tests with the real engine are in ``test_e2e*.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsv32_router.client import GenerateError, generate, list_models, stream_responses
from dsv32_cluster.procs import free_port
from dsv32_cluster.state import ClusterState
from test_router_fakes import FakeCluster, fake_token

MAX_MODEL_LEN = 512


def write_model_dir(path) -> str:
    from dsv32_text.tokenizer import write_tokenizer_files

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"vocab_size": 129280, "max_position_embeddings": MAX_MODEL_LEN,
                                                  "eos_token_id": 1, "model_type": "deepseek_v32"}))
    (path / "generation_config.json").write_text(json.dumps({"temperature": 1.0, "top_p": 0.95}))
    write_tokenizer_files(path)
    return str(path)


def start_router(model_dir: str, redis_url: str, prefix: str, *extra: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", "router", "--model", model_dir,
                             "--served-model-name", "tiny", "--redis-url", redis_url, "--redis-prefix", prefix,
                             "--port", str(port), "--admission-timeout", "1", "--log-level", "WARNING", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
        try:
            with grpc.insecure_channel(target) as ch:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            return proc, target
        except grpc.RpcError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("router did not start")


@pytest.fixture(scope="module")
def router_env(tmp_path_factory, redis_server):
    url = f"redis://{redis_server.host}:{redis_server.port}/2"
    model_dir = write_model_dir(tmp_path_factory.mktemp("fake-model"))
    cluster = FakeCluster(url, "rt:", n_prefill=2, n_decode=2)
    proc, target = start_router(model_dir, url, "rt:")
    yield cluster, target, model_dir, url
    proc.terminate()
    proc.wait(10)
    cluster.close()


@pytest.fixture
def env(router_env):
    cluster = router_env[0]
    for svc in [*cluster.decode.values(), *cluster.prefill.values()]:
        svc.faults.clear()
    yield router_env
    for d in cluster.decode.values():  # every test leaves the pools as it found them
        deadline = time.monotonic() + 5
        while d.committed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not d.committed, f"{d.worker_id} still holds {d.committed}"


def expected_tokens(prompt_len: int, n: int, seed: int) -> list[int]:
    return [fake_token(seed, prompt_len + i) for i in range(n)]


def test_stream_matches_fake_model_and_records_finish(env):
    cluster, target, _, url = env
    prompt = [5, 6, 7, 8, 9]
    out = generate(target, prompt, max_tokens=12, seed=3, temperature=0.0, request_id="happy-1")
    assert out.token_ids == expected_tokens(5, 12, 3)
    assert out.finish_reason == "length" and out.usage.completion_tokens == 12 and out.usage.prompt_tokens == 5
    assert out.usage.time_to_first_token_s > 0 and out.usage.e2e_s >= out.usage.time_to_first_token_s
    from dsv32_text.tokenizer import load_tokenizer

    tok = load_tokenizer(env[2])
    assert out.text == tok.decode(out.token_ids)
    assert out.prefill_worker in cluster.prefill and out.decode_worker in cluster.decode
    rec = cluster.state.request("happy-1")
    assert rec["state"] == "finished" and rec["finish_reason"] == "length" and rec["completion_tokens"] == "12"
    assert rec["prefill_worker"] == out.prefill_worker and rec["decode_worker"] == out.decode_worker
    for s in ("queued", "prefilling", "transferring", "decoding", "finished"):
        assert f"{s}_at" in rec


def test_max_tokens_one_skips_the_decode_stream_echo(env):
    _, target, _, _ = env
    out = generate(target, [1, 2, 3], max_tokens=1, seed=9)
    assert out.token_ids == expected_tokens(3, 1, 9) and out.finish_reason == "length"


def test_stop_string_cuts_text_and_frees_the_decode_worker(env):
    cluster, target, model_dir, _ = env
    from dsv32_text.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    full = expected_tokens(4, 40, 11)
    text = tok.decode(full)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text.find(stop)
    msgs = list(stream_responses(target, [1, 2, 3, 4], max_tokens=40, seed=11, stop=[stop], request_id="stop-1"))
    got = "".join(m.text for m in msgs)
    assert got == text[:cut] and msgs[-1].finish_reason == "stop"
    assert cluster.state.request("stop-1")["state"] == "finished"


def test_retry_after_checksum_mismatch(env):
    cluster, target, _, _ = env
    cluster.decode_faults.append("data_loss")
    out = generate(target, [3] * 70, max_tokens=8, seed=1, request_id="crc-1")
    assert out.token_ids == expected_tokens(70, 8, 1)
    rec = cluster.state.request("crc-1")
    assert rec["state"] == "finished" and rec["attempts"] == "2" and "checksum" in rec["error"].lower()


def test_retry_mid_stream_continues_without_duplicates(env):
    cluster, target, _, _ = env
    cluster.decode_faults.append(("die_after", 4))
    prompt = [7] * 10
    for p in cluster.prefill.values():
        p.prompts.clear()
    out = generate(target, prompt, max_tokens=10, seed=2, request_id="die-1")
    assert out.token_ids == expected_tokens(10, 10, 2), "a retry must neither repeat nor drop tokens"
    prompts = sorted((p for f in cluster.prefill.values() for p in f.prompts), key=len)
    assert prompts[0] == prompt and prompts[1][:10] == prompt and len(prompts[1]) == 10 + 4
    rec = cluster.state.request("die-1")
    assert rec["state"] == "finished" and rec["attempts"] == "2"


def test_gives_up_with_unavailable_after_max_attempts(env):
    cluster, target, _, _ = env
    cluster.decode_faults.extend(["data_loss"] * 3)
    with pytest.raises(GenerateError) as e:
        generate(target, [1, 2], max_tokens=4, seed=1, request_id="fail-1")
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "checksum" in e.value.details.lower()
    assert cluster.state.request("fail-1")["state"] == "failed"


def test_prefill_failure_frees_the_reservation_and_retries(env):
    cluster, target, _, _ = env
    for p in cluster.prefill.values():
        p.faults.append("unavailable")
    out = generate(target, [4, 4], max_tokens=3, seed=4, request_id="pf-1")
    assert out.token_ids == expected_tokens(2, 3, 4)
    cancelled = [rid for d in cluster.decode.values() for ev, rid in d.log if ev == "cancel"]
    assert "pf-1#1" in cancelled, "the failed attempt's reservation was cancelled"


def test_prefill_refusing_a_decode_worker_that_left_retries_on_another_pair(env):
    """P answers FAILED_PRECONDITION when D is no longer registered (stopped, expired): that is D's
    failure, retried elsewhere, not an INTERNAL error for the client."""
    cluster, target, _, _ = env
    for p in cluster.prefill.values():
        p.faults.append("refuse_endpoint")
    out = generate(target, [5, 5], max_tokens=3, seed=5, request_id="pre-1")
    assert out.token_ids == expected_tokens(2, 3, 5)
    rec = cluster.state.request("pre-1")
    assert rec["state"] == "finished" and int(rec["attempts"]) >= 2 and "not a registered decode worker" in rec["error"]


def test_client_cancel_mid_stream_frees_decode_and_records_cancelled(env):
    cluster, target, _, _ = env
    cluster.decode_faults.append(("slow", 0.05))
    it = stream_responses(target, [1] * 5, max_tokens=200, seed=1, request_id="cancel-1")
    next(it)
    next(it)
    it.close()  # cancels the call
    deadline = time.monotonic() + 5
    while cluster.state.request("cancel-1").get("state") != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    rec = cluster.state.request("cancel-1")
    assert rec["state"] == "cancelled" and rec["error"] == "client cancelled"
    # the env fixture checks that the fake decode worker's pages came back


def test_deadline_expiry_is_deadline_exceeded_and_frees_decode(env):
    cluster, target, _, _ = env
    cluster.decode_faults.append(("slow", 0.05))
    with pytest.raises(GenerateError) as e:
        generate(target, [1] * 5, max_tokens=200, seed=1, request_id="dl-1", timeout=0.5)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while cluster.state.request("dl-1").get("state") != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.state.request("dl-1")["state"] == "cancelled"


BAD = [
    (dict(prompt=""), "INVALID_ARGUMENT", "prompt"),
    (dict(prompt=[]), "INVALID_ARGUMENT", "token_ids.ids"),
    (dict(prompt=[1, 2, 200000]), "INVALID_ARGUMENT", "token_ids.ids[2]"),
    (dict(prompt=[1] * MAX_MODEL_LEN), "OUT_OF_RANGE", "token_ids"),
    (dict(prompt="hi", temperature=-0.5), "INVALID_ARGUMENT", "sampling.temperature"),
    (dict(prompt="hi", temperature=float("nan")), "INVALID_ARGUMENT", "sampling.temperature"),
    (dict(prompt="hi", top_p=1.5), "INVALID_ARGUMENT", "sampling.top_p"),
    (dict(prompt="hi", top_p=0.0), "INVALID_ARGUMENT", "sampling.top_p"),
    (dict(prompt="hi", top_k=-3), "INVALID_ARGUMENT", "sampling.top_k"),
    (dict(prompt="hi", max_tokens=0), "INVALID_ARGUMENT", "sampling.max_tokens"),
    (dict(prompt="hi", max_tokens=10**9), "INVALID_ARGUMENT", "sampling.max_tokens"),
    (dict(prompt="hi", logprobs=50), "INVALID_ARGUMENT", "sampling.logprobs"),
    (dict(prompt="hi", stop=[""]), "INVALID_ARGUMENT", "sampling.stop[0]"),
    (dict(prompt="hi", stop_token_ids=[10**7]), "INVALID_ARGUMENT", "sampling.stop_token_ids[0]"),
    (dict(prompt="hi", model="gpt-17"), "NOT_FOUND", "model"),
    (dict(prompt="hi", request_id="bad id with spaces"), "INVALID_ARGUMENT", "request_id"),
    (dict(messages=[]), "INVALID_ARGUMENT", "chat.messages"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "INVALID_ARGUMENT", "chat.messages[0].role"),
]


@pytest.mark.parametrize("kwargs,code,field", BAD, ids=[f"{c}-{f}" for _, c, f in BAD])
def test_bad_input_is_refused_before_any_worker_is_touched(env, kwargs, code, field):
    cluster, target, _, _ = env
    before = [len(d.log) for d in cluster.decode.values()] + [len(p.prompts) for p in cluster.prefill.values()]
    n_records = len(cluster.state.recent_requests(1000))
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", None)
    with pytest.raises(GenerateError) as e:
        generate(target, prompt, **kwargs)
    assert e.value.code.name == code
    assert e.value.details.startswith(field), e.value.details
    after = [len(d.log) for d in cluster.decode.values()] + [len(p.prompts) for p in cluster.prefill.values()]
    assert after == before, "no worker was disturbed"
    assert len(cluster.state.recent_requests(1000)) == n_records, "no request record was opened"


def test_duplicate_request_id_is_already_exists(env):
    _, target, _, _ = env
    generate(target, [1], max_tokens=2, seed=1, request_id="dup-1")
    with pytest.raises(GenerateError) as e:
        generate(target, [1], max_tokens=2, seed=1, request_id="dup-1")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and e.value.details.startswith("request_id")


def test_chat_prompt_and_text_prompt(env):
    _, target, _, _ = env
    out = generate(target, messages=[{"role": "user", "content": "Hello"}], max_tokens=3, seed=1)
    assert len(out.token_ids) == 3 and out.usage.prompt_tokens > 3
    out = generate(target, "Hello world", max_tokens=2, seed=1)
    assert len(out.token_ids) == 2


def test_requests_spread_and_sessions_stick(env):
    cluster, target, _, _ = env
    time.sleep(0.5)  # the router's registry snapshot shows both decode workers idle again
    seen_d, seen_p = set(), set()
    for i in range(6):
        out = generate(target, [i + 1] * 3, max_tokens=2, seed=i)
        seen_d.add(out.decode_worker)
        seen_p.add(out.prefill_worker)
    assert seen_d == set(cluster.decode) and seen_p == set(cluster.prefill)
    first = generate(target, [1, 2, 3], max_tokens=2, seed=1, session_id="sess-1")
    for _ in range(3):
        again = generate(target, [1, 2, 3, 4, 5], max_tokens=2, seed=1, session_id="sess-1")
        assert again.decode_worker == first.decode_worker
    sess = cluster.state.session("sess-1")
    assert sess["turns"] == "4" and sess["decode_worker"] == first.decode_worker
    assert len(cluster.state.session_turns("sess-1")) == 4


def test_no_capacity_is_resource_exhausted(env):
    cluster, target, _, _ = env
    # needs ceil((100 + 400) / 64) = 8 pages; fill both pools first
    for d in cluster.decode.values():
        d.committed["hog"] = d.total_pages - 4
    try:
        cluster.beat()
        time.sleep(0.4)  # the router's registry snapshot catches up
        with pytest.raises(GenerateError) as e:
            generate(target, [1] * 100, max_tokens=400, seed=1)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for d in cluster.decode.values():
            d.committed.pop("hog", None)


def test_request_larger_than_any_pool_is_resource_exhausted_at_once(env):
    cluster, target, model_dir, url = env
    # 64 pages * 64 = 4096 tokens > context here, so use a smaller pool's cluster view instead:
    for d in cluster.decode.values():
        d.total_pages = 4
    try:
        for info, svc in cluster.infos:
            info.total_pages = 4 if svc in cluster.decode.values() else info.total_pages
        cluster.beat()
        time.sleep(0.4)
        t0 = time.monotonic()
        with pytest.raises(GenerateError) as e:
            generate(target, [1] * 300, max_tokens=100, seed=1)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "largest decode pool" in e.value.details
        assert time.monotonic() - t0 < 0.9, "no point waiting for capacity that can never exist"
    finally:
        for info, svc in cluster.infos:
            if svc in cluster.decode.values():
                svc.total_pages = info.total_pages = 64
        cluster.beat()
        time.sleep(0.3)


def test_health_reflection_and_models(env):
    _, target, _, _ = env
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        for service in ("", "dsv32.serving.v1.Generation"):
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        [resp] = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=2))
        names = {s.name for s in resp.list_services_response.service}
        assert {"dsv32.serving.v1.Generation", "grpc.health.v1.Health"} <= names
    [m] = list_models(target)
    assert (m.id, m.max_model_len, m.vocab_size) == ("tiny", MAX_MODEL_LEN, 129280)


def test_no_workers_is_unavailable(router_env, tmp_path):
    _, _, model_dir, url = router_env
    orphans = ClusterState.from_url(url, "empty:")
    orphans.create_request("orphan-1", router="router-that-died")  # no liveness key: its router is gone
    proc, target = start_router(model_dir, url, "empty:")
    try:
        deadline = time.monotonic() + 5
        while orphans.request("orphan-1")["state"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert orphans.request("orphan-1")["state"] == "failed", "a new router reaps records of dead routers"
        with grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(GenerateError) as e:
            generate(target, "hi", max_tokens=2)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "no workers" in e.value.details
    finally:
        proc.terminate()
        proc.wait(10)


def test_router_never_imports_torch():
    code = ("import sys; import dsv32_router.server, dsv32_router.orchestrator, dsv32_router.request_run, "
            "dsv32_router.client, dsv32_serve.up, dsv32_cluster.runtime, dsv32_text.tokenizer, dsv32_text.detokenizer, "
            "dsv32_text.encoding, dsv32_text.generation_config; from dsv32_serve import cli; "
            "cli.build_parser(['router']); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_tracing_and_metrics_when_enabled(router_env):
    _, _, model_dir, url = router_env
    import urllib.request

    metrics_port = free_port()
    proc, target = start_router(model_dir, url, "rt:", "--otel-exporter", "console", "--metrics-port",
                                str(metrics_port))
    try:
        out = generate(target, [1, 2, 3], max_tokens=3, seed=1)
        assert len(out.token_ids) == 3
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert re.search(r'dsv32_requests_total\{model="[^"]+",role="router",status="OK"\} 1.0', body)
        assert re.search(r'dsv32_time_to_first_token_seconds_count\{model="[^"]+",role="router"\} 1.0', body)
    finally:
        proc.terminate()
        text, _ = proc.communicate(timeout=20)
    for span in ('"name": "admit"', '"name": "prefill"', '"name": "decode"',
                 '"name": "/dsv32.serving.v1.Generation/Generate"', '"name": "/dsv32.worker.v1.PrefillWorker/Prefill"'):
        assert span in text, f"{span} missing from the exported spans"


def test_generate_cli_streams_text_from_a_cluster(env):
    _, target, model_dir, _ = env
    from dsv32_text.tokenizer import load_tokenizer

    out = subprocess.run([sys.executable, "-m", "dsv32_serve.cli", "generate", "--target", target, "Hello",
                          "--max-tokens", "5", "--temperature", "0", "--seed", "3"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    prompt_len = len(load_tokenizer(model_dir).encode("Hello"))
    assert out.stdout == load_tokenizer(model_dir).decode(expected_tokens(prompt_len, 5, 3)) + "\n"


def test_router_admission_is_bounded(router_env):
    cluster, _, model_dir, url = router_env
    proc, target = start_router(model_dir, url, "rt:", "--max-inflight", "1", "--max-waiting", "0")
    try:
        cluster.decode_faults.append(("slow", 0.05))
        it = stream_responses(target, [1, 2], max_tokens=40, seed=1)
        next(it)  # the one slot is taken
        with pytest.raises(GenerateError) as e:
            generate(target, [3, 4], max_tokens=2, seed=1)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "router busy" in e.value.details
        assert sum(1 for _ in it) > 0  # the admitted one completes
        assert len(generate(target, [3, 4], max_tokens=2, seed=1).token_ids) == 2  # and frees its slot
    finally:
        cluster.decode_faults.clear()
        proc.terminate()
        proc.wait(10)
