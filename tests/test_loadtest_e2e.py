"""The load tester against a live ``dsv32-serve up`` (1 prefill + 1 decode) on the tiny checkpoint.

A short load (a few seconds); every request must be accounted for and the
numbers consistent: E2E >= TTFT, the token counts the client streamed equal
what the server reports in ``Usage``, the server's own timings fit inside the
client's.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from dsv32_loadtest import Arrival, MixedWorkload, SessionWorkload, Slo, run_load
from dsv32_loadtest.report import report_dict, write_json

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target(tiny_model, tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (./run installs it)")
    log_dir = tmp_path_factory.mktemp("loadtest-up")
    err = open(log_dir / "up.stderr", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", "up", "--model", tiny_model, "--prefill", "1",
                             "--decode", "1", "--port", "0", "--log-dir", str(log_dir), "--grace", "5"],
                            stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("ready ") for line in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"up did not become ready:\n{(log_dir / 'up.stderr').read_text()}")
            time.sleep(0.1)
        yield next(line for line in lines if line.startswith("ready ")).split()[1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        err.close()


def _check_consistent(run):
    for r in run.results:
        assert r.ok, (r.status, r.error)
        assert r.e2e_s >= r.ttft_s > 0
        assert r.output_tokens == r.requested_output_tokens == r.server_completion_tokens
        assert r.input_tokens == r.server_prompt_tokens
        assert r.finish_reason == "length" and r.prefill_worker and r.decode_worker
        # the server's clock starts after ours and stops before it (loopback: a few ms apart)
        assert r.server_ttft_s <= r.ttft_s + 0.05 and r.server_e2e_s <= r.e2e_s + 0.05


def test_mixed_load_is_fully_accounted_and_consistent(target, tmp_path):
    report = run_load(target, MixedWorkload(input_len=32, output_len=8, long_input_len=256, long_output_len=4,
                                            long_fraction=0.25),
                      Arrival("poisson", rate=3.0, seed=0), slo=Slo(ttft_ms=600_000), num_prompts=12,
                      request_timeout_s=120, max_duration_s=60)
    assert report.models and report.models[0]["vocab_size"] > 0
    run = report.runs[0]
    s = run.summary(report.slo)
    assert (s["planned"], s["completed"], s["failed"], s["not_sent"]) == (12, 12, 0, 0)
    assert s["output_len_mismatches"] == 0 and s["server_token_count_mismatches"] == 0
    assert s["good_requests"] == 12 and s["goodput"] == pytest.approx(s["request_throughput"])
    assert set(run.summary_by_kind(None)) == {"chat", "long"}
    _check_consistent(run)
    doc = report_dict(report)
    write_json(doc, tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["runs"][0]["summary"]["completed"] == 12


def test_sessions_grow_against_the_live_router(target):
    report = run_load(target, SessionWorkload(turns=2, input_len=16, output_len=4, shared_prefix_len=64),
                      Arrival("closed", concurrency=2), num_prompts=4, request_timeout_s=120, max_duration_s=60)
    run = report.runs[0]
    assert run.summary(None)["completed"] == 4
    _check_consistent(run)
    for first, second in zip(run.results[::2], run.results[1::2]):
        assert first.session_id == second.session_id and (first.turn, second.turn) == (0, 1)
        assert second.input_tokens == first.input_tokens + 4 + 16
