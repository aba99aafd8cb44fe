"""Protocol buffers of dsv32-serve, with Python stubs generated on first import.

Sources (the only hand-written files):

* ``dsv32/serving/v1/serving.proto`` — the public API (``dsv32.serving.v1``);
* ``dsv32/worker/v1/worker.proto`` — router ↔ worker services (``dsv32.worker.v1``).

Usage::

    from dsv32_proto import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc

The stubs are generated with ``grpc_tools.protoc`` the first time the package
is imported (or explicitly: ``python -m dsv32_proto``) and whenever a
``.proto`` changes: each generated file starts with the SHA-256 of all sources,
which is compared on import. They are gitignored and never edited by hand.

Two details:

* protoc writes absolute imports (``from dsv32.serving.v1 import serving_pb2``)
  that would need ``dsv32`` on ``sys.path``; the generated files are flattened
  into this package and those imports rewritten to ``from dsv32_proto import …``.
* Several processes may import the package at once (``dsv32-serve up`` starts
  a router and workers together). Each generates into its own temporary
  directory and moves every finished file into place with ``os.replace``, which
  is atomic, so a reader sees either no file or a complete one, never half of
  one. Concurrent writers produce identical bytes, so the last rename wins
  harmlessly. If the package directory is read-only (an installed wheel), the
  stubs go to a per-user cache directory that is appended to ``__path__``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SOURCES = ("dsv32/serving/v1/serving.proto", "dsv32/worker/v1/worker.proto")
_STAMP_PREFIX = "# dsv32-proto-sources-sha256: "
_ABS_IMPORT = re.compile(r"^from dsv32(?:\.\w+)+ import (\w+_pb2)\b", re.MULTILINE)


def _sources_digest() -> str:
    h = hashlib.sha256()
    for rel in _SOURCES:
        h.update(rel.encode() + b"\0" + (_HERE / rel).read_bytes() + b"\0")
    return h.hexdigest()


def _outputs() -> list[str]:
    names = []
    for rel in _SOURCES:
        stem = Path(rel).stem
        names += [f"{stem}_pb2.py", f"{stem}_pb2_grpc.py"]
    return names


def _is_current(out_dir: Path, digest: str) -> bool:
    for name in _outputs():
        try:
            with open(out_dir / name, encoding="utf-8") as f:
                if f.readline().strip() != (_STAMP_PREFIX + digest).strip():
                    return False
        except OSError:
            return False
    return True


def _protoc(tmp: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{_HERE}", f"-I{well_known}",
            f"--python_out={tmp}", f"--grpc_python_out={tmp}", *(_HERE / s for s in _SOURCES)]
    if protoc.main([str(a) for a in args]) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {', '.join(_SOURCES)}")


def generate(out_dir: Path | None = None, force: bool = False) -> Path:
    """Generate the stubs into ``out_dir`` (default: this package) unless current."""
    out_dir = Path(out_dir or _HERE)
    digest = _sources_digest()
    if not force and _is_current(out_dir, digest):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".protoc-", dir=out_dir))
    try:
        _protoc(tmp)
        staged = []
        for rel in _SOURCES:
            src_dir, stem = tmp / Path(rel).parent, Path(rel).stem
            for name in (f"{stem}_pb2.py", f"{stem}_pb2_grpc.py"):
                text = (src_dir / name).read_text(encoding="utf-8")
                text = _STAMP_PREFIX + digest + "\n" + _ABS_IMPORT.sub(r"from dsv32_proto import \1", text)
                flat = tmp / name
                flat.write_text(text, encoding="utf-8")
                staged.append(flat)
        # *_pb2 before *_pb2_grpc: a reader racing us never finds a grpc module
        # whose message module is still the old one.
        for flat in sorted(staged, key=lambda p: p.name.endswith("_grpc.py")):
            os.replace(flat, out_dir / flat.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dsv32_proto" / _sources_digest()[:16]


def _ensure() -> None:
    if _is_current(_HERE, _sources_digest()):
        return
    if os.access(_HERE, os.W_OK):
        generate(_HERE)
        return
    fallback = generate(_cache_dir())
    __path__.append(str(fallback))  # noqa: F821 - the package's own __path__


_ensure()
