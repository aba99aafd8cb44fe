"""The backend switch: auto/triton/torch, the env variable, and the interpreter import-order trap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import pytest  # noqa: E402

import dsv32_kernels as K  # noqa: E402
from dsv32_kernels import testing as kt  # noqa: E402


def test_auto_runs_torch_on_cpu_and_context_manager_restores():
    assert K.get_backend() in K.BACKENDS
    before = K.get_backend()
    with K.backend("torch"):
        assert not K.use_triton(torch.device("cpu"))
        with K.backend("auto"):
            assert K.use_triton(torch.device("cpu")) is False
    assert K.get_backend() == before


def test_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        K.set_backend("cuda")


@pytest.mark.skipif(not K.interpreter_active(), reason="needs the Triton interpreter")
def test_forced_triton_on_cpu_runs_the_kernel():
    layout = kt.small_layout("exact")
    cache = kt.build_cache(layout, [10])
    q = torch.randn(1, 2, layout.latent_dim)
    idx = cache.slots(0)[None].to(torch.int32)
    with K.backend("triton"):
        o, lse = K.sparse_mla_decode(q, cache.latent_pool, idx, 0.1, layout)
    o_ref, lse_ref = K.naive_sparse_mla_decode(q, cache.latent_pool, idx, 0.1, layout)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSV32_KERNELS")}
    full.update(env, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter set-up")
def test_subprocess_torch_first_then_env_then_triton():
    """`import torch`, then TRITON_INTERPRET=1, then triton: the interpreter runs; DSV32_KERNELS is honoured."""
    r = _run("""
        import os, torch
        os.environ["TRITON_INTERPRET"] = "1"
        import triton
        import dsv32_kernels as K
        from dsv32_kernels import testing as kt
        assert K.interpreter_active()
        assert K.get_backend() == "triton", K.get_backend()
        layout = kt.small_layout("exact")
        cache = kt.build_cache(layout, [10])
        q, idx = torch.randn(1, 2, layout.latent_dim), cache.slots(0)[None].to(torch.int32)
        o, _ = K.sparse_mla_decode(q, cache.latent_pool, idx, 0.1, layout)
        o_ref, _ = K.naive_sparse_mla_decode(q, cache.latent_pool, idx, 0.1, layout)
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        print("ok")
    """, {"DSV32_KERNELS": "triton"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter set-up")
def test_subprocess_triton_imported_too_early_gives_a_clear_error():
    r = _run("""
        import triton, torch
        import dsv32_kernels as K
        from dsv32_kernels import testing as kt
        assert not K.interpreter_active()
        layout = kt.small_layout("exact")
        cache = kt.build_cache(layout, [10])
        try:
            with K.backend("triton"):
                K.sparse_mla_decode(torch.randn(1, 2, layout.latent_dim), cache.latent_pool,
                                    cache.slots(0)[None].to(torch.int32), 0.1, layout)
        except RuntimeError as e:
            print("error:", e)
    """, {})
    assert r.returncode == 0 and "TRITON_INTERPRET=1" in r.stdout, r.stdout + r.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available() or K.interpreter_active(),
                    reason="the interpreter tests already run in this process (or compiled ones on CUDA)")
def test_interpreter_tests_in_a_fresh_process():
    """When something imported triton before TRITON_INTERPRET=1 (transformers does), the interpreter
    tests of every test_kernels_*.py file skip in this process; run them in a fresh one instead."""
    here = Path(__file__).parent
    files = sorted(str(p) for p in here.glob("test_kernels_*.py"))
    env = {k: v for k, v in os.environ.items() if k != "DSV32_KERNELS"}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
                        "-k", "(interp or forced_triton or torch_first) and not fresh_process", *files],
                       cwd=here.parent, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1].replace("deselected", ""), \
        r.stdout[-1000:]
