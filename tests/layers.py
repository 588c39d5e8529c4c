"""The layer contract of the package, read from its source: the tier of each subpackage, and
a checker that sees every import, inside functions too (not those under ``if TYPE_CHECKING:``,
which never run). The layer test runs it on the package, and on copies with a planted import to
show it fails; the README test checks the README's "Layout" section against the same table."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "m3i_lightning"

# Bottom up: a subpackage may import its own tier and the tiers below, never one above.
TIERS: dict[str, int] = {
    "core": 0,
    "components": 1, "backbone": 1, "data": 1,
    "objectives": 2,
    "engine": 3,
    "runtime": 4, "evaluation": 4, "finetune": 4,
    "config": 5, "conf": 5,
    "commands": 6,
}
# The root entry modules (and every ``__main__``) sit above everything: they may import
# anything, and nothing in the library may import them.
ENTRIES = {"__init__", "__main__", "eval", "export", "consolidate", "losses", "ablate"}
ENTRY_TIER = max(TIERS.values()) + 1
# Third-party packages kept out of the lower tiers: the config vocabulary stays in config/ and
# above; objectives, components and core are plain torch.
BARRED = {
    "hydra": {name for name, tier in TIERS.items() if tier < TIERS["config"]},
    "omegaconf": {name for name, tier in TIERS.items() if tier < TIERS["config"]},
    "lightning": {"objectives", "components", "core"},
    "pytorch_lightning": {"objectives", "components", "core"},
}


@dataclass
class Module:
    """One module of the package: its dotted name, file, layer and what it imports."""

    name: str
    path: Path
    layer: str  # a key of TIERS, or "entry"
    imports: dict[str, int] = field(default_factory=dict)  # library module → first line
    external: dict[str, int] = field(default_factory=dict)  # top-level package → first line

    @property
    def tier(self) -> int:
        return ENTRY_TIER if self.layer == "entry" else TIERS.get(self.layer, -1)


def layer_of(parts: tuple[str, ...]) -> str:
    """The layer of the module at ``parts`` (relative to the package, without ``.py``)."""
    if parts[-1] == "__main__" or (len(parts) == 1 and parts[0] in ENTRIES):
        return "entry"
    return parts[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement, at any depth, except the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def read_package(src: Path) -> dict[str, Module]:
    """The modules of the package under ``src`` (the folder holding ``m3i_lightning/``)."""
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src / PACKAGE).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        dotted = ".".join((PACKAGE, *(parts[:-1] if is_package else parts)))
        key = parts[:-1] if is_package and len(parts) > 1 else parts
        modules[dotted] = Module(dotted, path, layer_of(key))
    for module in modules.values():
        is_package = module.path.name == "__init__.py"
        for node in _imports(ast.parse(module.path.read_text())):
            for name in _imported_names(module.name, is_package, node):
                if name.split(".")[0] != PACKAGE:
                    module.external.setdefault(name.split(".")[0], node.lineno)
                    continue
                target = name
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module.name:
                    module.imports.setdefault(target, node.lineno)
    return modules


def _imported_names(current: str, is_package: bool, node: ast.Import | ast.ImportFrom):
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = current.split(".")
    if node.level:
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix, *(f"{prefix}.{alias.name}" for alias in node.names)]


def module_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    """Module → the library modules it imports. A package's ``__init__`` importing its own
    submodules is how it re-exports them, not a dependency of those submodules' users, so
    those edges are left out."""
    return {name: {t for t in m.imports if not (m.path.name == "__init__.py"
                                                 and t.startswith(name + "."))}
            for name, m in modules.items()}


def layer_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    """Subpackage → the other subpackages its modules import (entry modules left out)."""
    graph: dict[str, set[str]] = {}
    for m in modules.values():
        if m.layer != "entry":
            graph.setdefault(m.layer, set()).update(
                modules[t].layer for t in m.imports if modules[t].layer not in ("entry", m.layer))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def violations(src: Path) -> list[str]:
    """Every breach of the contract in the package under ``src``, one line each: a cycle, an
    import of a higher tier (or of an entry module) from the library, a subpackage missing
    from :data:`TIERS`, a barred third-party package below its tier."""
    modules = read_package(src)
    found = [f"cycle between modules: {', '.join(c)}" for c in cycles(module_graph(modules))]
    found += [f"cycle between subpackages: {', '.join(c)}"
              for c in cycles(layer_graph(modules))]
    for m in modules.values():
        where = f"{m.path.relative_to(src)}"
        if m.layer != "entry" and m.layer not in TIERS:
            found.append(f"{where}: subpackage '{m.layer}' has no tier in the table")
            continue
        for target, line in sorted(m.imports.items()):
            other = modules[target]
            if m.layer != "entry" and other.tier > m.tier:
                found.append(f"{where}:{line}: {m.layer} (tier {m.tier}) imports {target} "
                             f"({other.layer}, tier {other.tier})")
        for package, line in sorted(m.external.items()):
            if m.layer in BARRED.get(package, ()):
                found.append(f"{where}:{line}: {m.layer} imports {package}")
    return found
