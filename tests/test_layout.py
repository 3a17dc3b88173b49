"""The house plan holds: what imports no torch, and no import cycles anywhere (function-level imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "worker"

# What a client, the wire models, the pipeline and the tools are: none of them may load torch or transformers.
TORCH_FREE = (
    "worker.client",
    "worker.messages",
    "worker.settings",
    "worker.engine.api",
    "worker.engine.engine",
    "worker.pipeline.runner",
    "worker.pipeline.worker",
    "worker.tools.replay",
    "worker.tools.dlq",
    "worker.cli",
)


def test_the_client_wire_models_pipeline_and_tools_import_no_torch() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"imported by {TORCH_FREE}: {done.stdout.strip()}"


def test_the_check_above_sees_torch_when_it_is_imported() -> None:
    """The same check on the module that loads models: it must report torch, or the test above proves nothing."""
    code = "import sys, worker.engine.load\nprint('torch' in sys.modules and 'transformers' in sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every worker module `name` imports, at any depth of its code (inside functions too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports module a.b where b is a module, else a
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_of_the_package_is_part_of_an_import_cycle() -> None:
    graph = {name: imports_of(name) for name in MODULES}
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", ["worker.engine.load", "worker.engine.qwen3", "worker.pipeline.runner"])
def test_imports_are_read_inside_functions_too(name: str) -> None:
    """The graph above sees imports at any depth: load's function-level import of the kernels is in it."""
    found = imports_of(name)
    assert found, name
    if name == "worker.engine.load":
        assert "worker.engine.kernels" in found


def test_the_engine_imports_nothing_of_kafka_and_the_api_nothing_that_computes() -> None:
    engine = [n for n in MODULES if n.startswith("worker.engine")]
    for name in engine:
        outside = {m for m in imports_of(name) if not m.startswith("worker.engine")}
        assert not outside, f"{name} imports {outside}"
    assert imports_of("worker.engine.api") == {"worker.engine.errors"}
