"""The house rules, checked on the source: layers, no import cycles, imports at the top.

Every module of the package sits on a layer (docs/architecture.md draws them); a module imports
only from its own layer or the layers below, and never in a cycle. Function-level imports count
(they are what hid the cycles before). The imports of the package's own modules inside
functions are few and deliberate: a CLI that delays its heavy imports until after
`console.quiet_startup` says so in a comment next to the import.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "siglip_jax"

# Lowest first. A module's layer is that of the longest matching name ("data" covers data.*).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("siglip_jax", "config", "records", "sharding", "losses", "metrics", "console", "shutdown",
     "tpu_slices", "distributed", "fsutil",
     "hlo_cost"),
    ("data",),
    ("models",),
    ("objectives", "evaluators", "recipes"),
    ("schema", "optim", "step", "checkpoints", "hooks"),
    ("experiment", "compiled_step", "evaluators.builder", "cost_model"),
    ("trainer", "evaluation", "planner", "exporter", "predict", "api", "export"),
    ("train", "evaluate", "plan", "plot"),
)
ENTRY_POINTS = LAYERS[-1] + ("predict", "export")
# Files in the longest chain of imports (function-level and type-only imports count, and so do
# the package `__init__`s an import runs). A ratchet: 7 today (was 16, then 11, then 8), e.g.
# train → trainer → experiment → objectives.registry → objectives.decoder → models.config →
# records; docs/architecture.md says why each edge is a use. It may shrink, never grow.
MAX_CHAIN = 7
MAX_FUNCTION_IMPORTS = 20  # imports of the package's own modules inside functions
MAX_LINES = 600
# The one deliberate upward import: the package's `siglip_jax.load` is api.load, imported on
# first use by a module-level __getattr__ in siglip_jax/__init__.py (so `import siglip_jax`
# stays light). It is left out of the layer, cycle and chain checks, and only this one.
LAZY_EXPORTS = {("siglip_jax", "api")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "siglip_jax"


@functools.cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int | None:
    best, found = -1, None
    for level, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), level
    return found


def _own(name: str) -> str | None:
    """The package module an imported dotted name refers to (None: not the package's)."""
    if name == "siglip_jax":
        return "siglip_jax"
    if not name.startswith("siglip_jax."):
        return None
    name = name[len("siglip_jax."):]
    while name and name not in _modules():
        name = name.rpartition(".")[0]
    return name or "siglip_jax"


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each import of the package's modules."""
    path = _modules()[module]
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree)
                   if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = ["siglip_jax", *module.split(".")] if module != "siglip_jax" else [module]
                if path.name != "__init__.py":
                    here = here[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        targets = {_own(name) for name in names} - {None, module}
        targets = {t for t in targets if (module, t) not in LAZY_EXPORTS}
        found += [(t, node.lineno, id(node) in in_function) for t in sorted(targets)]
    return found


def _packages_run_first(module: str, target: str) -> set[str]:
    """The packages whose `__init__` an import of `target` from `module` runs first:
    `target`'s enclosing packages, except `module`'s own (already running) and the root."""
    def ancestors(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    return ancestors(target) - ancestors(module) - {module}


@functools.cache
def _graph() -> dict[str, frozenset[str]]:
    """Module -> the modules its imports run: the imported ones and the packages around them
    (importing `siglip_jax.objectives.options` runs `siglip_jax/objectives/__init__.py`)."""
    return {m: frozenset(set().union(*({t} | _packages_run_first(m, t)
                                       for t, _, _ in _imports(m))))
            for m in _modules()}


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if _layer(m) is None]
    assert not missing, f"modules on no layer (add them to LAYERS here and to " \
                        f"docs/architecture.md): {missing}"


def test_no_upward_imports():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)}) at line {line}"
              for m in _modules() for t, line, _ in _imports(m)
              if None not in (_layer(m), _layer(t)) and _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def _cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a hand-made graph with one cycle of three and a tail."""
    graph = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a", "d"}),
             "d": frozenset()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def _longest_chain(graph: dict[str, frozenset[str]]) -> list[str]:
    @functools.cache
    def chain(v: str) -> tuple[str, ...]:
        return (v, *max((chain(w) for w in graph[v]), key=len, default=()))

    return list(max((chain(v) for v in graph), key=len))


def test_longest_import_chain():
    graph = _graph()
    assert _cycles(graph) == [], "the chain length is defined once there are no cycles"
    longest = _longest_chain(_graph())
    assert len(longest) <= MAX_CHAIN, " → ".join(longest)


def test_imports_at_the_top():
    inside = [f"{m}:{line} imports {t}" for m in _modules() for t, line, f in _imports(m) if f]
    assert len(inside) <= MAX_FUNCTION_IMPORTS, "\n".join(inside)


def test_delayed_imports_say_why():
    """A function-level import of the package has a comment (on its line or just above it)
    saying why it waits."""
    silent = []
    for module, path in _modules().items():
        lines = path.read_text().splitlines()
        for _, line, inside in _imports(module):
            above = [text.strip() for text in lines[max(0, line - 4):line - 1]]
            commented = "#" in lines[line - 1] or any(t.startswith("#") for t in above)
            if inside and not commented:
                silent.append(f"{module}:{line}")
    assert not silent, f"function-level imports without a comment: {silent}"


def test_no_file_is_too_long():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines()))
            > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_private_names_across_modules():
    """No module imports another module's _private names."""
    private = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("siglip_jax"):
                private += [f"{module} imports {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, "\n".join(private)


BENCHMARKS = sorted(f"benchmarks/{p.name}" for p in (REPO / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", [f"siglip_jax/{m}.py" for m in ENTRY_POINTS] + BENCHMARKS)
def test_no_entry_point_imports_another(path):
    """Entry points import library modules only (what they share lives below them)."""
    own = Path(path).stem
    names: set[str] = set()
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    others = {f"siglip_jax.{m}" for m in ENTRY_POINTS if m != own}
    assert not names & others, f"{path} imports {sorted(names & others)}"
