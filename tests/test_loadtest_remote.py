"""The load tester against a non-loopback address of this machine (its own IP, as a remote deployment
would be reached): a real ``up`` cluster bound to that address, the report's vLLM-style flat keys,
``--metric-percentiles``; and ``--fixed-schedule`` replaying a trace's timestamps."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from dsv32_loadtest.client import is_loopback
from dsv32_loadtest.fake_server import FakeGeneration, start_fake_server
from upproc import up

VLLM_KEYS = {"completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
             "request_goodput", "output_throughput", "total_token_throughput",
             *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p50",
                                                                                  "p90", "p99"))}


def _own_ip() -> str:
    """A non-loopback IPv4 address of this machine (``hostname -I``), else skip."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        out = []
    for ip in out:
        if ":" not in ip and not is_loopback(f"{ip}:1"):
            with socket.socket() as s:
                try:
                    s.bind((ip, 0))
                    return ip
                except OSError:
                    continue
    pytest.skip("this machine has no non-loopback IPv4 address")


def _loadtest(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv32_serve.cli", "loadtest", "--no-progress", "--no-plots", *argv],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_loadtest_of_a_cluster_at_this_machines_own_address(tiny_model, tmp_path):
    ip = _own_ip()
    with up(tiny_model, "--host", ip, "--log-dir", str(tmp_path / "logs")) as (target, _):
        assert target.startswith(f"{ip}:") and not is_loopback(target)
        out = _loadtest("--target", target, "--num-prompts", "6", "--request-rate", "inf", "--input-len", "16",
                        "--output-len", "4", "--metric-percentiles", "50,90,99", "--slo", "ttft=60000",
                        "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    missing = VLLM_KEYS - set(doc)
    assert not missing, missing
    assert doc["completed"] == 6 and doc["total_output_tokens"] == 24
    assert doc["request_throughput"] > 0 and doc["output_throughput"] > 0 and doc["request_goodput"] > 0
    assert 0 < doc["median_ttft_ms"] <= doc["p99_ttft_ms"] <= doc["mean_e2el_ms"] * 6
    assert doc["p50_ttft_ms"] == doc["median_ttft_ms"]
    assert doc["runs"][0]["summary"]["completed"] == 6, "the current structure is still there"
    assert doc["runs"][0]["p99_itl_ms"] == doc["p99_itl_ms"]


def test_fixed_schedule_replays_the_trace_timestamps(tmp_path):
    ip = _own_ip()
    trace = tmp_path / "trace.jsonl"
    stamps = [0, 300, 350, 900]
    trace.write_text("".join(json.dumps({"timestamp": t, "input_length": 8, "output_length": 2, "hash_ids": [i]}) + "\n"
                             for i, t in enumerate(stamps)))
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box = {}

    def serve():
        asyncio.set_event_loop(loop)
        box["server"], box["target"] = loop.run_until_complete(
            start_fake_server(FakeGeneration(ttft_s=0.005, itl_s=0.002), f"{ip}:0"))
        started.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    assert started.wait(10)
    try:
        out = _loadtest("--target", box["target"], "--workload", "trace", "--trace", str(trace), "--fixed-schedule",
                        "--output-dir", str(tmp_path / "out"))
        assert out.returncode == 0, out.stderr
        doc = json.loads((tmp_path / "out" / "report.json").read_text())
        reqs = sorted(doc["runs"][0]["requests"], key=lambda r: r["scheduled_s"])
        assert [round(r["scheduled_s"], 3) for r in reqs] == [t / 1000 for t in stamps]
        assert all(abs(r["start_s"] - r["scheduled_s"]) < 0.1 for r in reqs)
        assert doc["completed"] == 4 and "p99_ttft_ms" in doc
        bad = _loadtest("--target", box["target"], "--fixed-schedule")
        assert bad.returncode == 2 and "--fixed-schedule" in bad.stderr
    finally:
        loop.call_soon_threadsafe(loop.stop)
