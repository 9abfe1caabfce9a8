"""Architecture test: the folders are the layers, and the imports obey them.

Every module of the package is parsed (not imported) and every import
statement in it, at module level or inside a function, is checked against the
layer rules below. A violation names the file, the line and the import, so
the message says what to move. The core's purity is checked through
everything it imports, transitively (a pure-looking module that pulls in a
file reader makes the core impure too). Further tests build the import graph
of the package and fail on any circle, between modules and between folders.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "extproc"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: What the pure core must not reach, directly or through anything it imports:
#: no shell layer of ours, nothing that does I/O (files included), reads a clock
#: or draws randomness of its own (clocks and RNGs are passed in).
PURE_FORBIDDEN: tuple[str, ...] = (
    "extproc.serve", "extproc.tools", "extproc.envoy", "extproc.backend",
    "extproc.planner", "extproc.admin", "extproc.cli", "extproc.tls", "extproc.dns",
    "extproc.config.loader",
    "asyncio", "socket", "selectors", "ssl", "time", "random", "secrets",
    "threading", "multiprocessing", "subprocess", "signal",
    "urllib", "http", "httpx", "aiohttp", "grpc",
    "os", "io", "stat", "pathlib", "shutil", "tempfile", "glob", "tomllib",
)

#: What each layer must not import. A rule matches the imported module and all
#: of its submodules ("asyncio" also forbids "asyncio.subprocess").
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # The core takes its configuration's schema only (ALLOWED below): not the
    # package, whose loader reads files and the environment.
    "extproc.core": PURE_FORBIDDEN + ("extproc.config",),
    # The router's I/O shell serves the core; it never reaches for the tools,
    # the Envoy renderer, the simulated pools or the planner.
    "extproc.serve": ("extproc.tools", "extproc.envoy", "extproc.backend", "extproc.planner", "extproc.cli"),
    # What Envoy is told depends on the configuration, never on routing state.
    "extproc.envoy": ("extproc.core", "extproc.serve", "extproc.tools", "extproc.backend",
                      "extproc.planner", "extproc.admin", "extproc.cli"),
    # Libraries below the commands: only the CLI (and tests) use the tools.
    "extproc.backend": ("extproc.tools", "extproc.cli"),
    "extproc.planner": ("extproc.tools", "extproc.cli", "extproc.serve"),
    # serve starts the admin plane, so admin must not import serve (what both
    # need, like the DNS resolver, sits below them).
    "extproc.admin": ("extproc.tools", "extproc.cli", "extproc.serve"),
    "extproc.config": ("extproc.core", "extproc.serve", "extproc.tools", "extproc.envoy",
                       "extproc.backend", "extproc.planner", "extproc.admin", "extproc.cli",
                       "extproc.tls", "extproc.dns"),
    # TLS files and DNS names of a port: config in, credentials or addresses
    # out, nothing of the layers above (serve and admin both use them).
    "extproc.tls": ("extproc.core", "extproc.serve", "extproc.tools", "extproc.envoy",
                    "extproc.backend", "extproc.planner", "extproc.admin", "extproc.cli", "extproc.dns"),
    "extproc.dns": ("extproc.core", "extproc.serve", "extproc.tools", "extproc.envoy",
                    "extproc.backend", "extproc.planner", "extproc.admin", "extproc.cli", "extproc.tls"),
    "extproc.defaults": ("extproc",),
}

#: Exceptions to FORBIDDEN: what a layer may import although a rule above
#: names a parent of it.
ALLOWED: dict[str, tuple[str, ...]] = {
    "extproc.core": ("extproc.config.schema",),
}

#: The package root runs before any module of any layer. It only pins BLAS
#: threads through the environment (so it imports os) and imports nothing of
#: ours (test_package_root_imports_only_os): the transitive check skips it.
ROOT_IMPORTS = ("os",)


def module_name(path: Path, root: Path = ROOT, package: str = PACKAGE) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(path: Path, module: str, root: Path = ROOT) -> list[tuple[int, str, str]]:
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
                found.append((node.lineno, sub if _is_our_module(sub, root) else target, src))
    return found


def _is_our_module(name: str, root: Path = ROOT) -> bool:
    if not name.startswith(PACKAGE + "."):
        return False
    rel = Path(*name.split(".")[1:])
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _forbidden(target: str, layer: str, rules: dict[str, tuple[str, ...]],
               allowed: dict[str, tuple[str, ...]]) -> str | None:
    """The rule of ``layer`` that ``target`` breaks, or None. A package may
    import its own submodules even when a rule names a parent of it
    ("extproc.defaults" vs "extproc"); ``allowed`` lists exceptions."""
    if _matches(target, layer) or any(_matches(target, a) for a in allowed.get(layer, ())):
        return None
    return next((f for f in rules[layer] if _matches(target, f)), None)


def violations(root: Path = ROOT, rules: dict[str, tuple[str, ...]] = FORBIDDEN,
               allowed: dict[str, tuple[str, ...]] = ALLOWED) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        for layer in rules:
            if not _matches(module, layer):
                continue
            for lineno, target, src in imports_of(path, module, root):
                bad = _forbidden(target, layer, rules, allowed)
                if bad:
                    out.append(f"{path.relative_to(root.parent)}:{lineno}: {module} imports {target} "
                               f"({src!r}); {layer} must not import {bad}")
    return out


def _module_paths(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _parents(module: str) -> list[str]:
    """The packages Python runs before ``module`` (its ``__init__``s), the
    package root excepted (ROOT_IMPORTS)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def impure_reach(layer: str = "extproc.core", root: Path = ROOT,
                 forbidden: tuple[str, ...] = PURE_FORBIDDEN) -> list[str]:
    """Every forbidden import reachable from ``layer``: each module of ours
    that a module of ``layer`` imports (at any depth, in functions too, and
    with the packages Python runs first), checked against ``forbidden``.
    A violation names the chain of imports that reaches it."""
    paths = _module_paths(root)
    via: dict[str, list[str]] = {}
    todo = []
    for m in paths:
        if _matches(m, layer):
            via[m] = [m]
            todo.append(m)
    out = []
    while todo:
        module = todo.pop(0)
        chain = via[module]
        for lineno, target, src in imports_of(paths[module], module, root):
            bad = next((f for f in forbidden if _matches(target, f)), None)
            if bad:
                out.append(f"{' -> '.join(chain)}: {paths[module].relative_to(root.parent)}:{lineno} "
                           f"imports {target} ({src!r}); {layer} must not reach {bad}")
                continue
            if not _matches(target, PACKAGE):
                continue
            for nxt in [*_parents(target), target]:
                if nxt in paths and nxt not in via:
                    via[nxt] = chain + [nxt]
                    todo.append(nxt)
        for parent in _parents(module):
            if parent in paths and parent not in via:
                via[parent] = chain + [parent]
                todo.append(parent)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        graph[module] = {t for _, t, _ in imports_of(path, module, root)
                         if _matches(t, PACKAGE) and t != module and _is_our_module(t, root)}
    return graph


def cycles(graph: dict[str, set[str]], skip_parents: bool = True) -> list[list[str]]:
    """Every elementary cycle found by depth-first search (one per back edge).

    Edges into a package's own ``__init__`` (a module importing its parent
    package, which Python does implicitly anyway) are not counted, unless
    ``skip_parents`` is False (folders: a sub-folder using its parent
    folder's modules is a real edge).
    """
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if skip_parents and node.startswith(nxt + "."):
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


def folder_of(path: Path, root: Path = ROOT, package: str = PACKAGE) -> str:
    """The folder a module lives in, as a dotted name (a package's
    ``__init__`` lives in its own folder); a module directly in the package
    root stands for itself (the root is not a room: it holds the CLI and the
    shared modules below every layer)."""
    if path.parent == root:
        return module_name(path, root, package)
    return ".".join([package, *path.parent.relative_to(root).parts])


def folder_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """The import graph with each module replaced by its folder: an edge A -> B
    when a module in folder A imports a module in folder B (A != B)."""
    paths = _module_paths(root)
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        here = folder_of(path, root)
        graph.setdefault(here, set())
        for _, target, _ in imports_of(path, module, root):
            if target in paths and folder_of(paths[target], root) != here:
                graph[here].add(folder_of(paths[target], root))
    return graph


def test_layers_import_only_what_they_may():
    bad = violations()
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def test_core_is_pure_through_everything_it_imports():
    bad = impure_reach()
    assert not bad, "the core reaches impure code:\n" + "\n".join(bad)


def test_package_root_imports_only_os():
    imported = {t for _, t, _ in imports_of(ROOT / "__init__.py", PACKAGE)}
    assert imported <= set(ROOT_IMPORTS) | {"__future__"}, imported


def test_importing_the_core_loads_no_file_reader():
    """What the static check claims, run: importing every core module loads
    only the core, the config's pure modules and defaults (the config
    package's lazy re-exports are invisible to a parser, so this is the check
    that they stay lazy), and never tomllib."""
    core = sorted(m for m in _module_paths() if _matches(m, "extproc.core"))
    code = ("import importlib, sys\n"
            f"for m in {core!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'tomllib' or m.startswith('extproc')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout
    loaded = set(ast.literal_eval(out.strip()))
    pure_config = {"extproc.config", "extproc.config.schema", "extproc.config.parse", "extproc.config.errors",
                   "extproc.config.validation", "extproc.config.endpoints", "extproc.config.render"}
    assert loaded - set(core) - pure_config - {"extproc", "extproc.defaults"} == set()
    assert "extproc.config.schema" in loaded  # the check saw the import it is about


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_folder_circles():
    found = cycles(folder_graph(), skip_parents=False)
    assert not found, "folder circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_layer_folder_says_what_it_may_import():
    layers = ("core", "serve", "envoy", "tools", "admin", "backend", "planner", "config")
    for layer in layers:
        doc = ast.get_docstring(ast.parse((ROOT / layer / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc) > 80, f"extproc/{layer}/__init__.py needs a docstring"
    for layer in layers:
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
    "import tomllib",
    "from os import environ",
    "from pathlib import Path",
    "from ..serve import transport",
    "from ..tools.replay import run",
    "from extproc.planner.sim import fleet",
    "from ..config import Config",
    "from .. import config",
    "from ..config.loader import load",
    "from .. import dns",
])
def test_checker_catches_a_core_module_doing_io(tmp_path, line):
    root = _fake_package(tmp_path, {
        "__init__.py": "", "dns.py": "", "config/__init__.py": "", "config/schema.py": "",
        "config/loader.py": "", "core/__init__.py": "", "serve/__init__.py": "",
        "serve/transport.py": "", "tools/__init__.py": "", "tools/replay.py": "",
        "planner/__init__.py": "", "planner/sim/__init__.py": "", "planner/sim/fleet.py": "",
        "core/policy.py": "from ..config.schema import X\n\ndef f():\n    " + line + "\n",
    })
    bad = violations(root)
    assert len(bad) == 1 and "core/policy.py:4" in bad[0] and line in bad[0], bad


def test_checker_accepts_what_core_may_import(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "", "config/__init__.py": "", "config/schema.py": "", "defaults.py": "",
        "core/__init__.py": "", "core/estimator.py": "", "core/policy.py": (
            "import math\nimport orjson\nfrom .. import defaults as D\nfrom ..config.schema import Config\n"
            "from ..config import schema\nfrom . import estimator\nfrom envoy.config.core.v3 import base_pb2\n"),
    })
    assert violations(root) == []
    assert impure_reach(root=root) == []


#: A core that looks pure module by module: it imports the config's schema only.
_PURE_LOOKING_CORE = {
    "__init__.py": "import os\n", "defaults.py": "", "core/__init__.py": "",
    "core/policy.py": "from ..config.schema import Config\n",
    "config/__init__.py": "from .schema import Config\n",
    "config/files.py": "import tomllib\n",
}


@pytest.mark.parametrize("files, chain", [
    # the schema reads files itself
    ({"config/schema.py": "import tomllib\n"}, "extproc.core.policy -> extproc.config.schema: "),
    # ... through a helper, in a function (it runs when called)
    ({"config/schema.py": "from .. import defaults\ndef f():\n    from . import files\n"},
     "extproc.core.policy -> extproc.config.schema -> extproc.config.files: "),
    # ... through the package Python runs before the schema
    ({"config/schema.py": "", "config/__init__.py": "from . import files\n"},
     "extproc.core.policy -> extproc.config -> extproc.config.files: "),
    # the config's loader itself, by name
    ({"config/schema.py": "from .loader import load\n", "config/loader.py": ""},
     "extproc.core.policy -> extproc.config.schema: "),
])
def test_checker_follows_the_core_through_what_it_imports(tmp_path, files, chain):
    root = _fake_package(tmp_path, {**_PURE_LOOKING_CORE, **files})
    assert violations(root) == []  # each module alone obeys the core's direct rule
    bad = impure_reach(root=root)
    assert len(bad) == 1 and bad[0].startswith(chain), bad


def test_checker_skips_only_the_package_root(tmp_path):
    root = _fake_package(tmp_path, {**_PURE_LOOKING_CORE, "config/schema.py": ""})
    assert impure_reach(root=root) == []  # the root's "import os" is not the core's
    root = _fake_package(tmp_path / "b", {**_PURE_LOOKING_CORE, "config/schema.py": "",
                                          "config/__init__.py": "import os\nfrom .schema import Config\n"})
    assert [b.split(":")[0] for b in impure_reach(root=root)] == ["extproc.core.policy -> extproc.config"]


def test_checker_finds_a_circle(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "", "cli.py": "from .tools import demo\n",
        "tools/__init__.py": "", "tools/demo.py": "def f():\n    from ..cli import load_config\n",
    })
    assert cycles(import_graph(root)) == [["extproc.cli", "extproc.tools.demo", "extproc.cli"]]


#: admin's warm start used serve's resolver while serve starts admin's plane:
#: no module imports itself back, but the folders do.
_ADMIN_SERVE = {
    "__init__.py": "", "config.py": "", "admin/__init__.py": "", "admin/plane.py": "",
    "serve/__init__.py": "", "serve/monitor.py": "from .dns import addresses\n",
    "serve/server.py": "from ..admin import plane\nfrom . import monitor\n",
    "serve/dns.py": "from ..config import split_endpoint\n",
    "admin/warm.py": "from ..serve.dns import addresses\n",
}


def test_checker_finds_a_folder_circle_the_module_graph_misses(tmp_path):
    root = _fake_package(tmp_path, _ADMIN_SERVE)
    assert cycles(import_graph(root)) == []
    assert cycles(folder_graph(root), skip_parents=False) == [["extproc.admin", "extproc.serve", "extproc.admin"]]
    assert [b.split(": ")[0] for b in violations(root)] == ["extproc/admin/warm.py:1"]


def test_checker_accepts_the_resolver_below_both(tmp_path):
    files = {k: v for k, v in _ADMIN_SERVE.items() if k != "serve/dns.py"}
    root = _fake_package(tmp_path, {**files, "dns.py": "from .config import split_endpoint\n",
                                    "serve/monitor.py": "from ..dns import addresses\n",
                                    "admin/warm.py": "from ..dns import addresses\n"})
    assert cycles(folder_graph(root), skip_parents=False) == []
    assert violations(root) == []


def test_checker_finds_a_circle_between_sub_folders(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "", "planner/__init__.py": "", "planner/cli.py": "from .sizing import plan\n",
        "planner/sim/__init__.py": "", "planner/sim/fleet.py": "from ..report import emit\n",
        "planner/sizing/__init__.py": "", "planner/sizing/plan.py": "from ..sim import fleet\n",
        "planner/report/__init__.py": "", "planner/report/emit.py": "from ..sizing import plan\n",
    })
    assert cycles(import_graph(root)) != []  # a module circle too, here
    (found,) = cycles(folder_graph(root), skip_parents=False)
    assert sorted(found[:-1]) == ["extproc.planner.report", "extproc.planner.sim", "extproc.planner.sizing"]


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
