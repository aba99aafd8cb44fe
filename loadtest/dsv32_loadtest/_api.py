"""The one place the harness imports the public API's generated stubs from.

``dsv32_proto`` generates ``serving_pb2`` / ``serving_pb2_grpc`` itself; this
shim only exists so that the harness still runs where that package cannot
provide them (an older checkout): then the stubs are generated once per process
into a temporary directory with ``grpc_tools.protoc`` from the same
``serving.proto``, and loaded under private module names so nothing named
``dsv32`` lands on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tempfile
from pathlib import Path
from types import ModuleType

_PROTO = "dsv32/serving/v1/serving.proto"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _generate() -> tuple[ModuleType, ModuleType]:
    import grpc_tools
    from grpc_tools import protoc

    spec = importlib.util.find_spec("dsv32_proto")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("dsv32_proto (which holds serving.proto) is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    out = Path(tempfile.mkdtemp(prefix="dsv32_loadtest_api_"))
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    rc = protoc.main(["protoc", f"-I{root}", f"-I{well_known}", f"--python_out={out}",
                      f"--grpc_python_out={out}", str(root / _PROTO)])
    if rc != 0:
        raise ImportError(f"grpc_tools.protoc failed on {root / _PROTO}")
    gen = out / Path(_PROTO).parent
    pb2 = _load("_dsv32_loadtest_serving_pb2", gen / "serving_pb2.py")
    grpc_src = gen / "serving_pb2_grpc.py"
    # protoc writes `from dsv32.serving.v1 import serving_pb2 as X`; point it at ours.
    text = re.sub(r"^from dsv32\.serving\.v1 import serving_pb2 as",
                  "import _dsv32_loadtest_serving_pb2 as", grpc_src.read_text(), flags=re.M)
    grpc_src.write_text(text)
    return pb2, _load("_dsv32_loadtest_serving_pb2_grpc", grpc_src)


try:
    from dsv32_proto import serving_pb2, serving_pb2_grpc  # type: ignore[attr-defined]
except ImportError:
    serving_pb2, serving_pb2_grpc = _generate()

__all__ = ["serving_pb2", "serving_pb2_grpc"]
