"""The shape of the house: imports between the project's packages run only downhill.

The table below is the README's layout graph. A package may import itself and
the packages listed for it, nothing else; the walk reads every ``import`` and
``from ... import`` (at any depth, so lazy imports inside functions count too)
with ``ast``. The router never imports the engine or torch, at any depth.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> (folder, packages it may import). Levels, bottom to top:
#   dsv32_proto, dsv32_text, dsv32_kernels  (import no project package)
#   dsv32_engine                            (the library: kernels + text)
#   dsv32_cluster                           (the runtime workers join)
#   dsv32_router, dsv32_prefill, dsv32_decode, dsv32_loadtest
#   dsv32_serve                             (the front door)
ALLOWED: dict[str, tuple[str, set[str]]] = {
    "dsv32_proto": ("proto", set()),
    "dsv32_text": ("text", set()),
    "dsv32_kernels": ("kernels", set()),
    "dsv32_engine": ("engine", {"dsv32_kernels", "dsv32_text"}),
    "dsv32_cluster": ("cluster", {"dsv32_engine", "dsv32_kernels", "dsv32_text", "dsv32_proto"}),
    "dsv32_router": ("router", {"dsv32_cluster", "dsv32_text", "dsv32_proto"}),
    "dsv32_prefill": ("prefill_worker", {"dsv32_cluster", "dsv32_engine", "dsv32_kernels", "dsv32_text",
                                         "dsv32_proto"}),
    "dsv32_decode": ("decode_worker", {"dsv32_cluster", "dsv32_engine", "dsv32_kernels", "dsv32_text",
                                       "dsv32_proto"}),
    "dsv32_loadtest": ("loadtest", {"dsv32_text", "dsv32_proto"}),
    "dsv32_serve": ("serve", {"dsv32_router", "dsv32_prefill", "dsv32_decode", "dsv32_loadtest", "dsv32_cluster",
                              "dsv32_engine", "dsv32_kernels", "dsv32_text", "dsv32_proto"}),
}
# What the router may import of dsv32_cluster: its torch-free modules (the worker runtime builds engines).
ROUTER_FORBIDDEN_MODULES = {"dsv32_cluster.runtime", "dsv32_engine", "torch"}


def project_imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (relative imports stay inside the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def package_files(folder: str, package: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder / package).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))


def test_every_package_folder_is_in_the_table():
    found = {p.name for p in ROOT.glob("*/dsv32_*") if p.is_dir() and (p / "__init__.py").is_file()}
    assert found == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_downhill(package):
    folder, allowed = ALLOWED[package]
    bad = []
    for path in package_files(folder, package):
        for name in project_imports(path):
            top = name.split(".")[0]
            if top.startswith("dsv32_") and top != package and top not in allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "imports that climb the house:\n" + "\n".join(bad)


def test_allowed_table_has_no_cycle():
    graph = {pkg: deps for pkg, (_, deps) in ALLOWED.items()}
    seen, done = set(), set()

    def visit(pkg, path):
        assert pkg not in seen or pkg in done, f"cycle: {' -> '.join(path + [pkg])}"
        if pkg in done:
            return
        seen.add(pkg)
        for dep in graph[pkg]:
            visit(dep, path + [pkg])
        done.add(pkg)

    for pkg in graph:
        visit(pkg, [])


def test_router_never_reaches_the_engine():
    bad = [f"{p.relative_to(ROOT)} imports {n}" for p in package_files("router", "dsv32_router")
           for n in project_imports(p) if any(n == m or n.startswith(m + ".") for m in ROUTER_FORBIDDEN_MODULES)]
    assert not bad, "\n".join(bad)


def test_router_process_imports_neither_torch_nor_the_engine():
    code = ("import sys, dsv32_router.server, dsv32_router.client; "
            "bad = [m for m in ('torch', 'dsv32_engine', 'dsv32_kernels') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
