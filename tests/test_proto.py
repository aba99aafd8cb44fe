"""Stub generation from the .proto files: imports, staleness, concurrent first imports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dsv32_proto

PKG = Path(dsv32_proto.__file__).resolve().parent
IMPORT_ALL = "from dsv32_proto import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc; print(dsv32_proto.__file__)"


def _copy_package(tmp_path: Path) -> Path:
    dst = tmp_path / "dsv32_proto"
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("*_pb2*.py", "__pycache__", ".protoc-*"))
    return dst


def _run(code: str, root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-c", "import dsv32_proto; " + code], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_public_and_worker_stubs_import():
    from dsv32_proto import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc

    req = serving_pb2.GenerateRequest(prompt="hi", sampling=serving_pb2.SamplingParams(temperature=0.0))
    assert req.sampling.HasField("temperature") and req.WhichOneof("input") == "prompt"
    assert serving_pb2.DESCRIPTOR.package == "dsv32.serving.v1"
    assert worker_pb2.DESCRIPTOR.package == "dsv32.worker.v1"
    tok = worker_pb2.Token(token_id=3, logprobs=serving_pb2.Logprobs(token_id=3, logprob=-0.5))
    assert worker_pb2.Token.FromString(tok.SerializeToString()) == tok
    for stub in (serving_pb2_grpc.GenerationStub, worker_pb2_grpc.DecodeWorkerStub, worker_pb2_grpc.PrefillWorkerStub):
        assert callable(stub)
    for name in ("serving_pb2.py", "serving_pb2_grpc.py", "worker_pb2.py", "worker_pb2_grpc.py"):
        text = (PKG / name).read_text()
        assert "\nfrom dsv32." not in text and "\nimport dsv32." not in text, f"absolute import left in {name}"


def test_generated_files_are_ignored_by_git():
    root = PKG.parent.parent
    if not (root / ".git").exists() or shutil.which("git") is None:
        return
    out = subprocess.run(["git", "check-ignore", "proto/dsv32_proto/serving_pb2.py",
                          "proto/dsv32_proto/worker_pb2_grpc.py"], cwd=root, capture_output=True, text=True)
    assert len(out.stdout.split()) == 2


def test_concurrent_first_import_generates_once_consistently(tmp_path):
    pkg = _copy_package(tmp_path)
    procs = [_run(IMPORT_ALL, tmp_path) for _ in range(6)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.strip() == str(pkg / "__init__.py")
    names = sorted(p.name for p in pkg.iterdir())
    assert names == ["__init__.py", "__main__.py", "dsv32", "serving_pb2.py", "serving_pb2_grpc.py",
                     "worker_pb2.py", "worker_pb2_grpc.py"], "no temp dirs left behind"


def test_regenerates_when_a_proto_changes(tmp_path):
    pkg = _copy_package(tmp_path)
    p = _run(IMPORT_ALL, tmp_path)
    assert p.wait(120) == 0, p.stderr.read()
    first = (pkg / "worker_pb2.py").read_text().splitlines()[0]
    proto = pkg / "dsv32/worker/v1/worker.proto"
    proto.write_text(proto.read_text() + "\nmessage AddedLater { uint32 x = 1; }\n")
    p = _run("from dsv32_proto import worker_pb2; print(worker_pb2.AddedLater(x=1).x)", tmp_path)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert out.strip() == "1"
    assert (pkg / "worker_pb2.py").read_text().splitlines()[0] != first
