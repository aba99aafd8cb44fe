"""The command line as an operator meets it: start failures are one line on stderr with a non-zero
exit, ``--help`` shows defaults, ``--version``, progress bars on the slow one-off work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _cli(*argv: str, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "dsv32_serve.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _one_line_failure(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("role", ["router", "prefill", "decode", "colocated"])
def test_a_bad_model_path_is_one_line(role):
    _one_line_failure(_cli(role, "--model", "/nonexistent"), f"dsv32-serve {role}:", "/nonexistent")


def test_a_bad_environment_value_is_one_line():
    _one_line_failure(_cli("router", env={"DSV32_PORT": "abc"}), "DSV32_PORT", "--port")


def test_a_missing_optional_dependency_is_one_line(tiny_model):
    # the OTLP exporter made unimportable, as on an install without it
    code = ("import sys; sys.modules['opentelemetry.exporter.otlp.proto.grpc.trace_exporter'] = None; "
            "from dsv32_serve.cli import main; "
            f"sys.exit(main(['router', '--model', {tiny_model!r}, '--otel-exporter', 'otlp']))")
    _one_line_failure(_cli(code=code), "opentelemetry-exporter-otlp")
    code = ("import sys; sys.modules['matplotlib'] = None; import dsv32_serve.cli as c; "
            "c.COMMANDS['make-checkpoint'] = ('matplotlib.pyplot', 'x'); sys.exit(c.main(['make-checkpoint']))")
    _one_line_failure(_cli(code=code), "missing optional dependency", "matplotlib")


def test_version():
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("dsv32-serve ")
    assert _cli("router", "--version").stdout == out.stdout


@pytest.mark.parametrize("role", ["router", "prefill", "decode"])
def test_role_help_shows_defaults_and_units(role):
    out = _cli(role, "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "(default: 127.0.0.1)" in text and "(default: 0)" in text or "(default: 50051)" in text
    assert "seconds" in text
    assert "(default: none)" in text  # --otel-exporter


def test_progress_bars_when_asked(tmp_path):
    out = _cli("make-checkpoint", "--preset", "tiny", "--out", str(tmp_path / "ck"), env={"DSV32_PROGRESS": "1"})
    assert out.returncode == 0, out.stderr
    assert "making ck" in out.stderr and "writing ck" in out.stderr and "tensor" in out.stderr
    quiet = _cli("make-checkpoint", "--preset", "tiny", "--out", str(tmp_path / "ck2"), env={"DSV32_PROGRESS": "0"})
    assert quiet.returncode == 0 and "making" not in quiet.stderr
