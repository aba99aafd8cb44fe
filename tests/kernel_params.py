"""Device parametrisation shared by the kernel tests.

Imported first by each ``test_kernels_*`` module: the interpreter must be chosen before Triton
is first imported, and the ``interp`` cases skip themselves when something (``transformers``)
imported Triton earlier — ``test_kernels_backend.py`` then reruns them in a fresh process.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import pytest  # noqa: E402

import dsv32_kernels as K  # noqa: E402

DEVICES = [
    pytest.param("cpu", id="interp", marks=pytest.mark.skipif(
        not K.interpreter_active(), reason="Triton interpreter inactive here (triton was imported before TRITON_INTERPRET=1, e.g. by "
        "transformers); test_kernels_backend.py reruns these in a subprocess")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
]
