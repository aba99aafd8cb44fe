"""The CLI as a user runs it: make-checkpoint, then generate --model streams the offline engine's text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

from dsv32_engine import LLM, SamplingParams


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv32_serve.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_make_checkpoint_then_generate_streams_the_offline_text(tmp_path):
    out = tmp_path / "ck"
    r = cli("make-checkpoint", "--preset", "tiny", "--out", str(out), "--dtype", "fp8", "--seed", "5")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    r = cli("generate", "--model", str(out), "Hello there", "--max-tokens", "8", "--temperature", "0", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    want = LLM(str(out)).generate(["Hello there"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert r.stdout == want[0].outputs[0].text + "\n"


def test_bad_checkpoint_dir_is_a_clear_error(tmp_path):
    r = cli("generate", "--model", str(tmp_path), "hi")
    assert r.returncode == 2 and "config.json does not exist" in r.stderr and "Traceback" not in r.stderr


def test_a_bad_environment_default_is_one_line_naming_the_variable():
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSV32_")}
    r = subprocess.run([sys.executable, "-m", "dsv32_serve.cli", "prefill", "--help"], capture_output=True, text=True,
                       timeout=120, env={**env, "DSV32_PORT": "abc"})
    assert r.returncode != 0 and r.stderr == "DSV32_PORT='abc': not an integer (sets --port)\n"


def test_the_engine_flags_are_the_engine_config_fields():
    from dsv32_cluster.runtime import engine_argv, engine_config
    from dsv32_engine.engine_config import EngineConfig
    from dsv32_serve.cli import build_parser

    clean = {k: v for k, v in os.environ.items() if not k.startswith("DSV32_")}
    with mock.patch.dict(os.environ, {**clean, "DSV32_MAX_NUM_SEQS": "8"}, clear=True):
        for role in ("prefill", "decode", "colocated"):
            args = build_parser([role]).parse_args([role, "--model", "m", "--num-pages", "16"])
            assert engine_config(args) == EngineConfig("m", num_pages=16, max_num_seqs=8)
        up = build_parser(["up"]).parse_args(["up", "--num-pages", "16", "--dtype", "bf16"])
    assert engine_argv(up, skip=("model",)) == ["--dtype", "bf16", "--num-pages", "16"], "up passes on what was given"
