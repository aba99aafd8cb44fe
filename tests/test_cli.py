"""The CLI as a user runs it: make-checkpoint, then generate --model streams the offline engine's text."""

from __future__ import annotations

import json
import subprocess
import sys

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
