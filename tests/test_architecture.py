"""The package's import rules (docs/architecture.md), checked on the source with ``ast``.

Every module under ``mmdiff/`` is parsed; its imports (module-level and inside functions, relative
ones resolved) give the graph of mmdiff-internal imports. The test fails on a cycle between
modules or between parts (``LAYERS``), on an import a part's ``LAYERS`` entry does not allow, on a
broken third-party rule (``RULES``), and on two modules of the same name. Run with ``-s`` to see
the report (imports inside functions per module, the largest modules).
"""
from __future__ import annotations

import ast
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]

# Third-party packages that make an import slow (each takes ~1 s or more to import).
HEAVY = ("torch", "lightning", "pytorch_lightning", "diffusers", "open_clip", "transformers", "wandb",
         "webdataset", "sklearn", "scipy", "torchvision", "safetensors", "numpy", "PIL")
@dataclass(frozen=True)
class Rule:
    """Modules under ``importer`` may not import anything under ``forbidden`` (except ``allowed``).

    ``module_level=True`` checks what importing the module loads: the closure of module-level
    imports, through other mmdiff modules (imports inside functions are deferred, so they count
    only there).
    """

    importer: str
    forbidden: Tuple[str, ...]
    why: str
    allowed: Tuple[str, ...] = ()
    module_level: bool = False


# The parts of mmdiff and what each may import of mmdiff (docs/architecture.md): a part is a
# subpackage or a top-level module, or a module that stands alone below its package's layer — the
# torch-free system-name registry, which config reads to check ``system:``. Read bottom-up: every
# part imports only parts listed above it, so the parts cannot form a cycle
# (test_the_layering_itself_has_no_cycle).
_BASE = ("mmdiff.errors", "mmdiff.io")
LAYERS: Dict[str, Tuple[str, ...]] = {
    "mmdiff.errors": (),
    "mmdiff.io": ("mmdiff.errors",),
    "mmdiff.diffusion": (),
    "mmdiff.systems.registry": (),
    "mmdiff.config": _BASE + ("mmdiff.diffusion.options", "mmdiff.systems.registry"),
    "mmdiff.models": _BASE + ("mmdiff.config",),
    "mmdiff.data": _BASE + ("mmdiff.config",),
    "mmdiff.eval": _BASE + ("mmdiff.config", "mmdiff.data", "mmdiff.diffusion", "mmdiff.models"),
    "mmdiff.callbacks": _BASE + ("mmdiff.config", "mmdiff.data", "mmdiff.eval"),
    "mmdiff.systems": _BASE + ("mmdiff.config", "mmdiff.data", "mmdiff.diffusion", "mmdiff.models",
                               "mmdiff.eval", "mmdiff.systems.registry"),
    "mmdiff.run": _BASE + ("mmdiff.config", "mmdiff.data", "mmdiff.callbacks", "mmdiff.systems",
                           "mmdiff.systems.registry"),
    "mmdiff.inference": _BASE + ("mmdiff.config", "mmdiff.data", "mmdiff.diffusion", "mmdiff.models",
                                 "mmdiff.eval", "mmdiff.callbacks", "mmdiff.systems",
                                 "mmdiff.systems.registry", "mmdiff.run"),
    "mmdiff.jobs": _BASE + ("mmdiff.config", "mmdiff.data", "mmdiff.diffusion", "mmdiff.models",
                            "mmdiff.eval", "mmdiff.callbacks", "mmdiff.systems", "mmdiff.systems.registry",
                            "mmdiff.run"),
    "mmdiff.cli": _BASE + ("mmdiff.config", "mmdiff.data", "mmdiff.eval", "mmdiff.inference", "mmdiff.run",
                           "mmdiff.jobs", "mmdiff.diffusion.options"),
    "mmdiff": ("mmdiff.inference",),  # mmdiff.load
}

RULES: Tuple[Rule, ...] = (
    Rule("mmdiff.diffusion", ("lightning", "pytorch_lightning"), "diffusion/ is pure torch"),
    Rule("mmdiff.models", ("lightning", "pytorch_lightning"), "models/ know nothing of training"),
    Rule("mmdiff.config", HEAVY, "config answers in a fraction of a second", module_level=True),
    Rule("mmdiff.systems.registry", HEAVY, "the registry lists systems without importing them",
         module_level=True),
)


# ------------------------------------------------------------------------------------ graph
@dataclass(frozen=True)
class Import:
    target: str  # the imported module, resolved to a module of the package when it is one
    line: int
    in_function: bool


@dataclass
class ImportGraph:
    """``imports[module]``: what each module of the package imports (mmdiff and third-party)."""

    package: str
    imports: Dict[str, List[Import]] = field(default_factory=dict)
    lines: Dict[str, int] = field(default_factory=dict)

    @property
    def modules(self) -> Set[str]:
        return set(self.imports)

    def internal_edges(self, module_level_only: bool = False) -> Dict[str, Set[str]]:
        """module → the package's modules it imports (itself excluded)."""
        return {
            m: {i.target for i in imps if i.target in self.imports and i.target != m
                and not (module_level_only and i.in_function)}
            for m, imps in self.imports.items()
        }


def module_name(path: Path, root: Path) -> str:
    """``root/pkg/a/b.py`` → ``pkg.a.b``; a package's ``__init__.py`` → the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class _ImportVisitor(ast.NodeVisitor):
    """Collects imports with the depth of function nesting; ``if TYPE_CHECKING:`` blocks are skipped
    (they never run)."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package = module, is_package
        self.found: List[Tuple[str, Optional[str], int, bool]] = []  # (base, name, line, in_function)
        self.depth = 0

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
        if name == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, None, node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            anchor = package[: len(package) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            self.found.append((base, alias.name, node.lineno, self.depth > 0))


def build_graph(root: Path) -> ImportGraph:
    """Parse every module of the package at ``root`` (a folder with ``__init__.py``)."""
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    names = {module_name(p, root): p for p in files}
    graph = ImportGraph(package=root.name)
    for name, path in names.items():
        source = path.read_text(encoding="utf-8")
        graph.lines[name] = len(source.splitlines())
        visitor = _ImportVisitor(name, path.name == "__init__.py")
        visitor.visit(ast.parse(source, filename=str(path)))
        graph.imports[name] = [
            Import(_resolve(base, item, names), line, in_function)
            for base, item, line, in_function in visitor.found
        ]
    return graph


def _resolve(base: str, item: Optional[str], modules: Dict[str, Path]) -> str:
    """``from base import item``: the submodule ``base.item`` when it is one, else the longest
    module prefix of ``base`` in the package (third-party names stay as they are)."""
    if item is not None and f"{base}.{item}" in modules:
        return f"{base}.{item}"
    parts = base.split(".")
    while len(parts) > 1 and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) if ".".join(parts) in modules else base


# --------------------------------------------------------------------------------- analysis
def strongly_connected(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's strongly connected components with more than one member, members sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def part_of(module: str, parts: Iterable[str]) -> str:
    """The longest of ``parts`` that ``module`` lies under (``mmdiff.systems.prior`` →
    ``mmdiff.systems``, ``mmdiff.systems.registry`` → itself); the module itself when none."""
    under = [p for p in parts if module == p or module.startswith(p + ".")]
    return max(under, key=len) if under else module


def package_of(module: str, package: str) -> str:
    """The first level below the package: ``mmdiff.systems.prior`` → ``mmdiff.systems``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == package and len(parts) > 1 else module


def cycles(graph: ImportGraph, parts: Optional[Iterable[str]] = None) -> Tuple[List[List[str]], List[List[str]]]:
    """(module cycles, cycles between parts) over all imports, those inside functions included.

    ``parts``: the units of the coarse graph (default: the package's first-level subpackages).
    """
    edges = graph.internal_edges()
    part = (lambda m: package_of(m, graph.package)) if parts is None else (lambda m, ps=tuple(parts): part_of(m, ps))
    coarse: Dict[str, Set[str]] = {}
    for m, targets in edges.items():
        src = part(m)
        coarse.setdefault(src, set()).update(t for t in map(part, targets) if t != src)
    return strongly_connected(edges), strongly_connected(coarse)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_level_closure(graph: ImportGraph, start: str) -> Dict[str, str]:
    """Everything importing ``start`` imports: target → the mmdiff module that imports it."""
    edges = graph.internal_edges(module_level_only=True)
    seen, todo, reached = {start}, [start], {}
    while todo:
        m = todo.pop()
        for imp in graph.imports[m]:
            if imp.in_function:
                continue
            reached.setdefault(imp.target, m)
        for t in sorted(edges[m] - seen):
            seen.add(t)
            todo.append(t)
    return reached


def rule_violations(graph: ImportGraph, rules: Iterable[Rule]) -> Dict[str, str]:
    """``"importer -> target"`` → why it breaks a rule (and where, for module-level closures)."""
    found: Dict[str, str] = {}
    for rule in rules:
        for module in sorted(m for m in graph.modules if _under(m, [rule.importer])):
            if rule.module_level:
                pairs = sorted(_module_level_closure(graph, module).items())
            else:
                pairs = sorted((i.target, module) for i in graph.imports[module])
            for target, via in pairs:
                if _under(target, rule.forbidden) and not _under(target, rule.allowed):
                    where = "" if via == module else f" (through {via})"
                    found[f"{module} -> {target}"] = f"{rule.why}{where}"
    return found


def layer_violations(graph: ImportGraph, layers: Dict[str, Tuple[str, ...]]) -> Dict[str, str]:
    """``"importer -> target"`` for every mmdiff import a part's entry in ``layers`` does not allow."""
    found: Dict[str, str] = {}
    for module, imports in sorted(graph.imports.items()):
        part = part_of(module, layers)
        for imp in imports:
            if imp.target not in graph.imports or _under(imp.target, [part]) and part_of(imp.target, layers) == part:
                continue
            if part not in layers or not _under(imp.target, layers[part]):
                found[f"{module} -> {imp.target}"] = f"{part} may import only {', '.join(layers.get(part, ())) or 'nothing of mmdiff'}"
    return found


def violations(graph: ImportGraph, rules: Iterable[Rule] = RULES,
               layers: Dict[str, Tuple[str, ...]] = LAYERS) -> Dict[str, str]:
    """Every cycle, import across the layering and broken rule, keyed by a stable one-line name."""
    module_cycles, part_cycles = cycles(graph, layers)
    found = {f"module cycle: {', '.join(c)}": "modules import each other" for c in module_cycles}
    found.update({f"part cycle: {', '.join(c)}": "parts import each other" for c in part_cycles})
    found.update(layer_violations(graph, layers))
    found.update(rule_violations(graph, rules))
    return found


def same_named_modules(graph: ImportGraph) -> Dict[str, List[str]]:
    """Module file names used more than once across the package (``__init__`` and ``__main__``,
    Python's own entry-point names, aside)."""
    by_name: Dict[str, List[str]] = {}
    for module in sorted(graph.modules):
        if module != graph.package and not _is_package_init(graph, module) and not module.endswith(".__main__"):
            by_name.setdefault(module.rsplit(".", 1)[-1], []).append(module)
    return {name: mods for name, mods in by_name.items() if len(mods) > 1}


def _is_package_init(graph: ImportGraph, module: str) -> bool:
    return any(other.startswith(module + ".") for other in graph.modules)


def in_function_imports(graph: ImportGraph, internal_only: bool = False) -> Counter:
    """Per module, the imports written inside functions (``internal_only``: of the package)."""
    return Counter({
        m: n for m, imps in graph.imports.items()
        if (n := sum(1 for i in imps if i.in_function and (not internal_only or i.target in graph.imports)))
    })


def report(graph: ImportGraph, found: Dict[str, str]) -> str:
    """The human-readable summary the test prints."""
    inner = in_function_imports(graph)
    inner_mm = in_function_imports(graph, internal_only=True)
    lines = [f"{len(graph.modules)} modules, {sum(graph.lines.values())} lines"]
    lines += [f"violation: {k}  [{v}]" for k, v in sorted(found.items())]
    lines.append(f"imports inside functions: {sum(inner.values())} ({sum(inner_mm.values())} of mmdiff) "
                 f"in {len(inner)} modules")
    lines += [f"  {n:3d} ({inner_mm[m]:3d} mmdiff)  {m}" for m, n in inner.most_common()]
    lines.append("largest modules:")
    lines += [f"  {n:5d}  {m}" for m, n in Counter(graph.lines).most_common(10)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ tests
def test_import_rules_hold() -> None:
    graph = build_graph(REPO / "mmdiff")
    found = violations(graph)
    print("\n" + report(graph, found))
    assert not found, "import-rule violations (docs/architecture.md): " + "; ".join(
        f"{k} [{v}]" for k, v in sorted(found.items()))


def test_the_layering_itself_has_no_cycle() -> None:
    edges = {part: {part_of(t, LAYERS) for t in allowed} - {part} for part, allowed in LAYERS.items()}
    assert strongly_connected(edges) == []
    assert all(_under(t, LAYERS) for allowed in LAYERS.values() for t in allowed), "an allowed import names no part"


def test_every_module_is_in_a_part_and_no_two_share_a_name() -> None:
    graph = build_graph(REPO / "mmdiff")
    assert [m for m in sorted(graph.modules) if not _under(m, LAYERS)] == []
    assert same_named_modules(graph) == {}


def _write(root: Path, files: Dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_checker_finds_cycles_rules_and_function_imports(tmp_path: Path) -> None:
    """The checker itself: relative imports resolve, cycles through function-level imports count,
    layering rules see direct and module-level transitive imports."""
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "from . import b\n",
        "pkg/low/b.py": "def f():\n    from ..high import c\n",
        "pkg/high/__init__.py": "",
        "pkg/high/c.py": "import pkg.low.a\nfrom pkg.cfg import X\n",
        "pkg/cfg.py": "from .light import Y\nX = 1\n",
        "pkg/light.py": "import torch\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import numpy\n"
                        "def g():\n    import lightning\n",
    })
    graph = build_graph(root)
    assert graph.internal_edges()["pkg.low.b"] == {"pkg.high.c"}
    assert graph.internal_edges(module_level_only=True)["pkg.low.b"] == set()
    module_cycles, package_cycles = cycles(graph)
    assert module_cycles == [["pkg.high.c", "pkg.low.a", "pkg.low.b"]]
    assert package_cycles == [["pkg.high", "pkg.low"]]
    rules = [Rule("pkg.low", ("pkg.high",), "low is low"),
             Rule("pkg.cfg", ("torch", "lightning", "numpy"), "light", module_level=True)]
    assert rule_violations(graph, rules) == {
        "pkg.low.b -> pkg.high.c": "low is low",
        "pkg.cfg -> torch": "light (through pkg.light)",
    }
    assert in_function_imports(graph) == Counter({"pkg.low.b": 1, "pkg.light": 1})
    assert in_function_imports(graph, internal_only=True) == Counter({"pkg.low.b": 1})
    layers = {"pkg.cfg": ("pkg.light",), "pkg.light": (), "pkg.low": ("pkg.cfg",), "pkg.high": ("pkg.low", "pkg.cfg")}
    assert layer_violations(graph, layers) == {"pkg.low.b -> pkg.high.c": "pkg.low may import only pkg.cfg"}


@pytest.mark.parametrize("where, bad, expected", [
    ("diffusion/gaussian.py", "from mmdiff.systems.registry import get_system", "mmdiff.diffusion.gaussian -> mmdiff.systems.registry"),
    ("diffusion/gaussian.py", "import lightning", "mmdiff.diffusion.gaussian -> lightning"),
    ("eval/fid.py", "from mmdiff.inference.api import load", "mmdiff.eval.fid -> mmdiff.inference.api"),
    ("models/unet.py", "from mmdiff.systems.base import System", "mmdiff.models.unet -> mmdiff.systems.base"),
    ("callbacks/ema.py", "from mmdiff.run.strategies import build_strategy", "mmdiff.callbacks.ema -> mmdiff.run.strategies"),
    ("systems/prior.py", "from mmdiff.jobs.precompute import precompute", "mmdiff.systems.prior -> mmdiff.jobs.precompute"),
])
def test_a_new_bad_import_is_caught(tmp_path: Path, where: str, bad: str, expected: str) -> None:
    """A copy of today's package with one bad import added (inside a function) fails the rules."""
    import shutil

    copy = tmp_path / "mmdiff"
    shutil.copytree(REPO / "mmdiff", copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / where
    target.write_text(target.read_text() + "\n\ndef _bad():\n    " + bad + "\n")
    assert expected in violations(build_graph(copy))
