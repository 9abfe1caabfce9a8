"""Architecture test: the folders are the layers, and the imports obey them.

Every module of the package is parsed (not imported) and every import
statement in it, at module level or inside a function, is checked against the
layer rules below. A violation names the file, the line and the import, so
the message says what to move. A second test builds the import graph of the
package and fails on any circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "extproc"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: What each layer must not import. A rule matches the imported module and all
#: of its submodules ("asyncio" also forbids "asyncio.subprocess").
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # The pure core: no other layer of ours, and nothing that does I/O, reads a
    # clock or draws randomness of its own (clocks and RNGs are passed in).
    "extproc.core": (
        "extproc.serve", "extproc.tools", "extproc.envoy", "extproc.backend",
        "extproc.planner", "extproc.admin", "extproc.cli",
        "asyncio", "socket", "selectors", "ssl", "time", "random", "secrets",
        "threading", "multiprocessing", "subprocess", "signal",
        "urllib", "http", "httpx", "aiohttp", "grpc",
    ),
    # The router's I/O shell serves the core; it never reaches for the tools,
    # the Envoy renderer, the simulated pools or the planner.
    "extproc.serve": ("extproc.tools", "extproc.envoy", "extproc.backend", "extproc.planner", "extproc.cli"),
    # What Envoy is told depends on the configuration, never on routing state.
    "extproc.envoy": ("extproc.core", "extproc.serve", "extproc.tools", "extproc.backend",
                      "extproc.planner", "extproc.admin", "extproc.cli"),
    # Libraries below the commands: only the CLI (and tests) use the tools.
    "extproc.backend": ("extproc.tools", "extproc.cli"),
    "extproc.planner": ("extproc.tools", "extproc.cli", "extproc.serve"),
    "extproc.admin": ("extproc.tools", "extproc.cli"),
    "extproc.config": ("extproc.core", "extproc.serve", "extproc.tools", "extproc.envoy",
                       "extproc.backend", "extproc.planner", "extproc.admin", "extproc.cli"),
    # TLS files of a port: config in, credentials out, nothing of the layers above.
    "extproc.tls": ("extproc.core", "extproc.serve", "extproc.tools", "extproc.envoy",
                    "extproc.backend", "extproc.planner", "extproc.admin", "extproc.cli"),
    "extproc.defaults": ("extproc",),
}


def module_name(path: Path, root: Path = ROOT, package: str = PACKAGE) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(path: Path, module: str) -> list[tuple[int, str, str]]:
    """(line, imported module, source text) for every import in ``path``.

    ``from pkg import name`` yields ``pkg.name`` when that is a module of ours,
    else ``pkg``; relative imports are resolved against ``module``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = path.read_text(encoding="utf-8").splitlines()
    here = module.split(".") if is_package(path) else module.split(".")[:-1]
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        src = lines[node.lineno - 1].strip() if hasattr(node, "lineno") else ""
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, alias.name, src))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if _is_our_module(sub) else target, src))
    return found


def _is_our_module(name: str, root: Path = ROOT) -> bool:
    if not name.startswith(PACKAGE + "."):
        return False
    rel = Path(*name.split(".")[1:])
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path = ROOT, rules: dict[str, tuple[str, ...]] = FORBIDDEN) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        for layer, forbidden in rules.items():
            if not _matches(module, layer):
                continue
            for lineno, target, src in imports_of(path, module):
                bad = next((f for f in forbidden if _matches(target, f)), None)
                # A package may import its own submodules even when the rule
                # names a parent of it ("extproc.defaults" vs "extproc").
                if bad and not _matches(target, layer):
                    out.append(f"{path.relative_to(root.parent)}:{lineno}: {module} imports {target} "
                               f"({src!r}); {layer} must not import {bad}")
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        graph[module] = {t for _, t, _ in imports_of(path, module)
                         if _matches(t, PACKAGE) and t != module and _is_our_module(t)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by depth-first search (one per back edge).

    Edges into a package's own ``__init__`` (a module importing its parent
    package, which Python does implicitly anyway) are not counted.
    """
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_layers_import_only_what_they_may():
    bad = violations()
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_layer_folder_says_what_it_may_import():
    for layer in ("core", "serve", "envoy", "tools", "admin", "backend", "planner"):
        doc = ast.get_docstring(ast.parse((ROOT / layer / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc) > 80, f"extproc/{layer}/__init__.py needs a docstring"
    for layer in ("core", "serve", "envoy", "tools", "admin", "backend", "planner"):
        doc = ast.get_docstring(ast.parse((ROOT / layer / "__init__.py").read_text(encoding="utf-8")))
        assert "may import" in doc.lower(), f"extproc/{layer}/__init__.py: say what it may import"


# The checker itself, on a throwaway package, so the tests above cannot pass
# because it sees nothing.

def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize("line", [
    "import asyncio",
    "from asyncio import sleep",
    "import time as _t",
    "from random import Random",
    "import socket",
    "from ..serve import transport",
    "from ..tools.replay import run",
    "from extproc.planner.sim import fleet",
])
def test_checker_catches_a_core_module_doing_io(tmp_path, line):
    root = _fake_package(tmp_path, {
        "__init__.py": "", "config.py": "", "core/__init__.py": "", "serve/__init__.py": "",
        "serve/transport.py": "", "tools/__init__.py": "", "tools/replay.py": "",
        "planner/__init__.py": "", "planner/fleet.py": "",
        "core/policy.py": "from ..config import X\n\ndef f():\n    " + line + "\n",
    })
    bad = violations(root)
    assert len(bad) == 1 and "core/policy.py:4" in bad[0] and line in bad[0], bad


def test_checker_accepts_what_core_may_import(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "", "config.py": "", "defaults.py": "", "core/__init__.py": "",
        "core/estimator.py": "", "core/policy.py": (
            "import math\nimport orjson\nfrom .. import defaults as D\nfrom ..config import Config\n"
            "from . import estimator\nfrom envoy.config.core.v3 import base_pb2\n"),
    })
    assert violations(root) == []


def test_checker_finds_a_circle(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "", "cli.py": "from .tools import demo\n",
        "tools/__init__.py": "", "tools/demo.py": "def f():\n    from ..cli import load_config\n",
    })
    assert cycles(import_graph(root)) == [["extproc.cli", "extproc.tools.demo", "extproc.cli"]]


# One model of vLLM's scheduler (issue 15): the simulated pool drives the
# planner's Instance, and no other module schedules sequences itself.

#: Where the model lives, and the names a scheduler of its own would need
#: (preempting and stepping a batch).
SCHEDULER_MODULE = "extproc.planner.sim.instance"
SCHEDULER_METHODS = ("_preempt", "_preempt_last", "_schedule", "_step", "_finish_step")


def schedulers(root: Path = ROOT) -> list[str]:
    """Modules defining a class with a scheduler's methods."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(f, ast.FunctionDef) and f.name in SCHEDULER_METHODS for f in node.body):
                out.append(f"{module_name(path, root)}.{node.name}")
    return out


def test_the_simulated_pool_runs_the_planners_model():
    assert SCHEDULER_MODULE in import_graph()["extproc.backend.pool"]
    assert schedulers() == [f"{SCHEDULER_MODULE}.Instance"]


def test_checker_finds_a_second_scheduler(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "", "backend/__init__.py": "",
        "backend/engine.py": "class Engine:\n    def _schedule(self, now):\n        pass\n",
    })
    assert schedulers(root) == ["extproc.backend.engine.Engine"]
