"""One constant, one place: a drifted copy of a constant changes results.

Every module of the package is parsed (not imported) and each module-level
UPPER_CASE constant whose value can be read from the source (numbers,
strings, tuples, arithmetic, other constants, ``D.NAME``) is evaluated.
Two tests follow:

- a router default (a name ``extproc.defaults`` defines) is defined there
  only; any other module that needs it binds ``D.NAME`` (or imports it), so
  the planner simulates the router it sizes for;
- a name defined in two modules has one value, unless ALLOWED says why the
  two mean different things (better: rename one of them).
"""

from __future__ import annotations

import ast
import operator
import re
from pathlib import Path
from typing import Any

import pytest

from tests.test_architecture import _fake_package

PACKAGE = "extproc"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
DEFAULTS = f"{PACKAGE}.defaults"

#: Names defined in several modules with values that differ on purpose:
#: name -> (the modules, why they are not one constant).
ALLOWED: dict[str, tuple[frozenset[str], str]] = {}

#: Known drift being fixed on another branch: name -> (module, what fixes it).
#: Each entry has an xfail(strict) test below, so the entry must go the day
#: the drift does.
PENDING: dict[str, tuple[str, str]] = {}

_UPPER = re.compile(r"^[A-Z][A-Z0-9_]*$")

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.BitOr: operator.or_,
           ast.BitAnd: operator.and_}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}


class Unknown(Exception):
    """A value the source alone does not give (a call, a class, ...)."""


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class Package:
    """The parsed modules of a package and their module-level constants."""

    def __init__(self, root: Path = ROOT, package: str = PACKAGE):
        self.package, self.root = package, root
        self.paths = {_module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
        self._values: dict[str, dict[str, Any]] = {}
        self._busy: set[str] = set()

    def _resolve(self, module: str, level: int, name: str | None, is_pkg: bool) -> str:
        if not level:
            return name or ""
        here = module.split(".") if is_pkg else module.split(".")[:-1]
        base = here[: len(here) - (level - 1)]
        return ".".join(base + ([name] if name else []))

    def definitions(self, module: str) -> list[tuple[str, ast.expr, int]]:
        """(name, value node, line) of each module-level UPPER_CASE assignment."""
        tree = ast.parse(self.paths[module].read_text(encoding="utf-8"))
        out = []
        for node in tree.body:
            if isinstance(node, ast.Assign):
                targets = [t for t in node.targets if isinstance(t, ast.Name)]
                out += [(t.id, node.value, node.lineno) for t in targets if _UPPER.match(t.id)]
            elif isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name):
                if _UPPER.match(node.target.id):
                    out.append((node.target.id, node.value, node.lineno))
        return out

    def aliases(self, module: str) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
        """Module aliases (``D`` -> ``extproc.defaults``) and names imported
        from our modules (``X`` -> (module, ``X``)), at module level."""
        tree = ast.parse(self.paths[module].read_text(encoding="utf-8"))
        is_pkg = self.paths[module].name == "__init__.py"
        mods: dict[str, str] = {}
        names: dict[str, tuple[str, str]] = {}
        for node in tree.body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in self.paths:
                        mods[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                target = self._resolve(module, node.level, node.module, is_pkg)
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in self.paths:
                        mods[a.asname or a.name] = sub
                    elif target in self.paths:
                        names[a.asname or a.name] = (target, a.name)
        return mods, names

    def values(self, module: str) -> dict[str, Any]:
        """The constants of ``module`` whose value the source gives."""
        if module in self._values:
            return self._values[module]
        if module in self._busy:  # an import circle: what is known so far
            return {}
        self._busy.add(module)
        mods, names = self.aliases(module)
        env: dict[str, Any] = {}
        for name, node, _ in self.definitions(module):
            try:
                env[name] = self._eval(node, env, mods, names)
            except (Unknown, ArithmeticError, TypeError, ValueError):
                pass
        self._busy.discard(module)
        self._values[module] = env
        return env

    def _eval(self, node: ast.expr, env: dict[str, Any], mods: dict[str, str],
              names: dict[str, tuple[str, str]]) -> Any:
        def ev(n: ast.expr) -> Any:
            if isinstance(n, ast.Constant):
                return n.value
            if isinstance(n, (ast.Tuple, ast.List)):
                return tuple(ev(e) for e in n.elts)
            if isinstance(n, ast.Set):
                return frozenset(ev(e) for e in n.elts)
            if isinstance(n, ast.Dict) and None not in n.keys:
                return {ev(k): ev(v) for k, v in zip(n.keys, n.values)}  # type: ignore[arg-type]
            if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
                return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
            if isinstance(n, ast.UnaryOp) and type(n.op) in _UNARY:
                return _UNARY[type(n.op)](ev(n.operand))
            if isinstance(n, ast.Name):
                if n.id in env:
                    return env[n.id]
                if n.id in names:
                    mod, attr = names[n.id]
                    if attr in self.values(mod):
                        return self.values(mod)[attr]
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in mods:
                vals = self.values(mods[n.value.id])
                if n.attr in vals:
                    return vals[n.attr]
            raise Unknown(ast.dump(n))
        return ev(node)

    def reads_from(self, module: str, node: ast.expr, name: str, source: str) -> bool:
        """Whether ``node`` is ``source``'s own ``name`` (``D.NAME``, or a name
        imported from ``source``), not a copy of its value."""
        mods, names = self.aliases(module)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            return mods.get(node.value.id) == source and node.attr == name
        if isinstance(node, ast.Name):
            return names.get(node.id) == (source, name)
        return False


def copies_of_defaults(pkg: Package, defaults: str = DEFAULTS) -> list[str]:
    """Every module-level definition, outside ``defaults``, of a name
    ``defaults`` defines that is not ``defaults``' own value."""
    own = {name for name, _, _ in pkg.definitions(defaults)}
    out = []
    for module, path in pkg.paths.items():
        if module == defaults:
            continue
        for name, node, line in pkg.definitions(module):
            if name in own and not pkg.reads_from(module, node, name, defaults):
                out.append(f"{path.relative_to(pkg.root.parent)}:{line}: "
                           f"{module}.{name} = {ast.unparse(node)}; the router's default is "
                           f"{defaults}.{name}: bind D.{name}, or rename it if it means something else")
    return out


def drift(pkg: Package) -> dict[str, dict[str, Any]]:
    """name -> {module: value} for each name defined with different values
    (a value the source does not give stands as its expression, so a name
    defined twice is compared even then)."""
    seen: dict[str, dict[str, Any]] = {}
    for module in pkg.paths:
        values = pkg.values(module)
        for name, node, _ in pkg.definitions(module):
            seen.setdefault(name, {})[module] = (values[name] if name in values
                                                 else f"<not evaluated: {ast.unparse(node)}>")
    return {name: where for name, where in seen.items()
            if len(where) > 1 and len({repr(v) for v in where.values()}) > 1}


def unexplained(found: dict[str, dict[str, Any]], allowed=ALLOWED, pending=PENDING) -> list[str]:
    out = []
    for name, where in sorted(found.items()):
        if name in allowed and set(where) <= allowed[name][0]:
            continue
        if name in pending and pending[name][0] in where:
            continue
        out.append(f"{name}: " + ", ".join(f"{m} = {v!r}" for m, v in sorted(where.items())))
    return out


@pytest.fixture(scope="module")
def pkg() -> Package:
    return Package()


def test_router_defaults_are_defined_once(pkg):
    bad = [b for b in copies_of_defaults(pkg)
           if not any(f"{m}.{n} =" in b for n, (m, _) in PENDING.items())]
    assert not bad, "copies of router defaults:\n" + "\n".join(bad)


def test_no_constant_has_two_values(pkg):
    bad = unexplained(drift(pkg))
    assert not bad, ("constants defined with different values (one place for one constant; "
                     "rename look-alikes, or explain them in ALLOWED):\n" + "\n".join(bad))


def test_the_scan_sees_the_constants(pkg):
    """The tests above cannot pass by reading nothing."""
    d = pkg.values(DEFAULTS)
    assert d["MAX_BODY_BYTES"] == 8 * 1024 * 1024 and d["ENVOY_BUFFER_BYTES"] == 9 * 1024 * 1024
    assert pkg.values("extproc.tools.burst")["MONITOR_INTERVAL_S"] == d["MONITOR_INTERVAL_S"]
    assert sum(len(pkg.values(m)) for m in pkg.paths) > 300


@pytest.mark.parametrize("name", sorted(PENDING))
@pytest.mark.xfail(strict=True, reason="known drift, fixed on another branch (PENDING): "
                                       "when this passes, delete the PENDING entry")
def test_pending_drift_is_gone(pkg, name):
    module, _ = PENDING[name]
    assert not [b for b in copies_of_defaults(pkg) if f"{module}.{name} =" in b]
    assert name not in drift(pkg)


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_allowed_look_alikes_are_real(pkg, name):
    """An ALLOWED entry names modules that define the name (a stale entry
    would let a new copy through)."""
    modules, _ = ALLOWED[name]
    defined = {m for m in pkg.paths if any(n == name for n, _, _ in pkg.definitions(m))}
    assert defined & modules, f"ALLOWED[{name!r}] names no module that defines it"


# The checker itself, on a throwaway package.

def _fake(tmp_path: Path, files: dict[str, str]) -> Package:
    return Package(_fake_package(tmp_path, files))


_FILES = {
    "__init__.py": "",
    "defaults.py": "MARGIN_SIGMAS = 1.25\nMAX_BODY = 8 * 1024 * 1024\nBUFFER = MAX_BODY + (1 << 20)\n",
    "planner/__init__.py": "",
    "tools/__init__.py": "",
    "tools/pool.py": "MAX_LEN = 2048\n",
}


@pytest.mark.parametrize("source, finds", [
    ("from .. import defaults as D\nMARGIN_SIGMAS = D.MARGIN_SIGMAS\n", False),
    ("from ..defaults import MARGIN_SIGMAS\n", False),
    ("from ..defaults import MARGIN_SIGMAS as M\nMARGIN_SIGMAS = M\n", False),
    ("import extproc.defaults as D\nMARGIN_SIGMAS = D.MARGIN_SIGMAS\n", False),
    ("MARGIN_SIGMAS = 2.0\n", True),      # drifted
    ("MARGIN_SIGMAS = 1.25\n", True),     # a copy: equal today, drifts tomorrow
    ("from .. import defaults as D\nMARGIN_SIGMAS = D.MARGIN_SIGMAS * 2\n", True),
])
def test_checker_finds_copies_of_defaults(tmp_path, source, finds):
    pkg = _fake(tmp_path, {**_FILES, "planner/fleet.py": source})
    found = copies_of_defaults(pkg, "extproc.defaults")
    assert bool(found) == finds, found
    if finds:
        assert found[0].startswith("extproc/planner/fleet.py:") and "D.MARGIN_SIGMAS" in found[0]


def test_checker_compares_what_it_cannot_evaluate(tmp_path):
    pkg = _fake(tmp_path, {**_FILES, "planner/a.py": "HEADER = f'{1:>4}'\nINF = float('inf')\n",
                           "tools/b.py": "HEADER = 'x'\nINF = float('inf')\n"})
    assert set(drift(pkg)) == {"HEADER"}


def test_checker_finds_drift_and_honours_the_lists(tmp_path):
    pkg = _fake(tmp_path, {**_FILES,
                           "planner/fleet.py": "from .. import defaults as D\nBUFFER = D.MAX_BODY + 1024 * 1024\n"
                                               "MAX_LEN = 8192\nOK = 3\n",
                           "tools/other.py": "from .pool import MAX_LEN as L\nMAX_LEN = L\nOK = 1 + 2\n"})
    assert pkg.values("extproc.defaults")["BUFFER"] == 9 * 1024 * 1024
    found = drift(pkg)
    assert set(found) == {"MAX_LEN"}  # BUFFER evaluates equal, OK too
    assert found["MAX_LEN"] == {"extproc.planner.fleet": 8192, "extproc.tools.pool": 2048,
                                "extproc.tools.other": 2048}
    assert unexplained(found, {}, {}) != []
    allowed = {"MAX_LEN": (frozenset({"extproc.planner.fleet", "extproc.tools.pool", "extproc.tools.other"}),
                           "why")}
    assert unexplained(found, allowed, {}) == []
    narrow = {"MAX_LEN": (frozenset({"extproc.planner.fleet", "extproc.tools.pool"}), "why")}
    assert unexplained(found, narrow, {}) != []  # a module the entry does not name
    assert unexplained(found, {}, {"MAX_LEN": ("extproc.planner.fleet", "fix")}) == []
