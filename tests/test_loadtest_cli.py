"""``dsv32-serve loadtest`` end to end against a fake server in a thread: files, exit codes, errors."""

import asyncio
import contextlib
import csv
import json
import socket
import sys
import threading

import pytest

from dsv32_serve.cli import main
from dsv32_loadtest.fake_server import FakeGeneration, start_fake_server

PNG = b"\x89PNG\r\n\x1a\n"


@contextlib.contextmanager
def serving(servicer, kill_after_finished=None):
    """The fake server on its own event loop in a thread (the CLI runs its own loop)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def kill(server):
        while servicer.finished < kill_after_finished:
            await asyncio.sleep(0.005)
        await server.stop(None)

    server, target = asyncio.run_coroutine_threadsafe(start_fake_server(servicer), loop).result(10)
    if kill_after_finished is not None:
        killer = asyncio.run_coroutine_threadsafe(kill(server), loop)
    try:
        yield target
    finally:
        if kill_after_finished is not None:
            killer.cancel()
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _strict_json(path):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=no_constants)


def _free_target():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_single_run_writes_report_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    with serving(FakeGeneration(ttft_s=0.01, itl_s=0.002)) as target:
        rc = main(["loadtest", "--target", target, "--workload", "mixed", "--num-prompts", "12",
                   "--input-len", "8", "--output-len", "4", "--long-input-len", "64", "--long-output-len", "2",
                   "--request-rate", "200", "--slo", "ttft=5000,tpot=1000", "--output-dir", str(out),
                   "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "Successful requests:" in stdout and "Request goodput (req/s):" in stdout and "long" in stdout
    doc = _strict_json(out / "report.json")
    assert doc["schema_version"] == 1 and doc["target"] == target
    assert doc["server"]["models"][0]["id"] == "fake"
    assert doc["workload"]["workload"] == "mixed" and doc["slo"]["ttft_ms"] == 5000
    assert doc["args"]["num_prompts"] == 12 and doc["args"]["workload"] == "mixed"
    assert isinstance(doc["argv"], list) and isinstance(doc["command"], str)
    run = doc["runs"][0]
    assert run["arrival"]["process"] == "poisson" and run["arrival"]["rate"] == 200
    assert len(run["requests"]) == 12 and run["summary"]["completed"] == 12
    assert run["summary"]["good_requests"] == 12
    assert set(run["summary_by_kind"]) == {"chat", "long"}
    req = run["requests"][0]
    for key in ("ttft_s", "tpot_s", "e2e_s", "start_s", "end_s", "chunk_times_s", "chunk_tokens", "status",
                "input_tokens", "output_tokens", "server_completion_tokens", "request_id", "kind"):
        assert key in req
    assert req["ttft_s"] == pytest.approx(req["chunk_times_s"][0], abs=1e-6)
    text = (out / "report.json").read_text()
    assert sum(line.startswith('{"index":') for line in text.splitlines()) == 12  # one line a request
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(r["status"] == "OK" and float(r["e2e_ms"]) >= float(r["ttft_ms"]) for r in rows)
    for png in ("latency_cdf.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == PNG
    assert not (out / "sweep.png").exists()


def test_sweep_and_compare(tmp_path, capsys):
    with serving(FakeGeneration(ttft_s=0.005, itl_s=0.001)) as target:
        for name in ("a", "b"):
            rc = main(["loadtest", "--target", target, "--num-prompts", "6", "--input-len", "4", "--output-len", "3",
                       "--request-rate", "100,300", "--slo", "tpot=1000", "--output-dir", str(tmp_path / name),
                       "--no-progress", *(["--no-plots"] if name == "b" else [])])
            assert rc == 0
    doc = _strict_json(tmp_path / "a" / "report.json")
    assert [r["arrival"]["rate"] for r in doc["runs"]] == [100, 300]
    assert (tmp_path / "a" / "sweep.png").read_bytes()[:8] == PNG
    assert "poisson 300/s" in capsys.readouterr().out
    rc = main(["loadtest", "--compare", str(tmp_path / "a" / "report.json"), str(tmp_path / "b" / "report.json"),
               "--output-dir", str(tmp_path / "cmp")])
    stdout = capsys.readouterr().out
    assert rc == 0 and "A = a" in stdout and "B = b" in stdout and "p99 TPOT B/A" in stdout
    assert "stays within the 1000 ms SLO" in stdout
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == PNG


def test_dead_target_is_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["loadtest", "--target", _free_target(), "--num-prompts", "2", "--output-dir", str(tmp_path / "x"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("dsv32-serve loadtest: error: no dsv32 Generation server answers at 127.0.0.1:")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_server_death_mid_run_leaves_a_partial_report(tmp_path, capsys):
    out = tmp_path / "partial"
    with serving(FakeGeneration(ttft_s=0.02, itl_s=0.005), kill_after_finished=4) as target:
        rc = main(["loadtest", "--target", target, "--num-prompts", "300", "--input-len", "4", "--output-len", "8",
                   "--request-rate", "60", "--abort-after-unavailable", "4", "--output-dir", str(out),
                   "--no-progress", "--no-plots"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "run incomplete: target unavailable" in captured.err and "partial report" in captured.err
    assert "Traceback" not in captured.err
    s = _strict_json(out / "report.json")["runs"][0]["summary"]
    assert s["completed"] >= 4 and s["errors"].get("UNAVAILABLE", 0) >= 4
    assert s["completed"] + s["failed"] + s["not_sent"] == 300
    assert "UNAVAILABLE:" in captured.out


def test_malformed_trace_names_the_line(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 4, "output_length": 2}\n{"timestamp": 5, "input_length": 4}\n')
    rc = main(["loadtest", "--target", _free_target(), "--workload", "trace", "--trace", str(trace),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{trace}:2: 'output_length' must be a positive integer" in err and "Traceback" not in err


def test_trace_replay(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    lines = [{"timestamp": 10 * i, "input_length": 20 + i, "output_length": 3, "hash_ids": [i % 2]} for i in range(8)]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with serving(FakeGeneration(ttft_s=0.005, itl_s=0.001)) as target:
        rc = main(["loadtest", "--target", target, "--workload", "trace", "--trace", str(trace),
                   "--trace-block-size", "16", "--trace-time-scale", "2", "--output-dir", str(tmp_path / "o"),
                   "--no-progress", "--no-plots"])
    assert rc == 0
    reqs = _strict_json(tmp_path / "o" / "report.json")["runs"][0]["requests"]
    assert [r["input_tokens"] for r in reqs] == [20 + i for i in range(8)]
    assert [r["scheduled_s"] for r in reqs] == pytest.approx([0.005 * i for i in range(8)])


@pytest.mark.parametrize("argv, message", [
    (["--workload", "trace"], "needs --trace"),
    (["--slo", "ttft"], "bad SLO term"),
    (["--arrival", "closed"], "need a concurrency"),
    (["--request-rate", "1,inf"], "finite rates"),
    (["--target", "router.serving"], "expected HOST:PORT"),
    (["--compare", "nope.json", "nope2.json"], "cannot read report"),
], ids=["trace-without-file", "slo", "closed-without-users", "inf-sweep", "no-port", "compare-missing"])
def test_usage_errors(argv, message, capsys):
    assert main(["loadtest", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["loadtest", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--request-rate", "--burstiness", "--workload", "--slo", "--compare", "--range-ratio"):
        assert opt in out


def test_the_harness_does_not_import_torch():
    import subprocess
    code = ("import sys, dsv32_loadtest.cli, dsv32_loadtest.runner, dsv32_loadtest.report, dsv32_loadtest.plots, "
            "dsv32_loadtest.compare; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
