"""The package's floors (docs/architecture.md, "Floors"): every import of the project, at module
level or inside a function, goes from a floor to a lower one; nothing imports sideways or up, so
there is no import circle between packages. A new package must be given its floor here and in
the doc."""

import ast
from pathlib import Path

from testkit import ROOT

FLOORS = [
    {"config", "compat", "cli", "hashing", "progress"},  # ground: import nothing of the project
    {"platform"},
    {"models", "data"},
    {"checkpoint"},
    {"training", "convert"},
    {"inference"},
    {"eval"},
    {"posttrain"},
    {"curate"},
    {"demo"},
    {"train", "generate"},  # the module entry points (python -m megatron_sail.train / .generate)
    {"bench"},
]
FLOOR = {name: k for k, names in enumerate(FLOORS) for name in names}


def _imports(path: Path):
    """(line, imported megatron_sail module) of every import statement in a file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "megatron_sail":
            if node.module == "megatron_sail":  # from megatron_sail import cli
                yield from ((node.lineno, f"megatron_sail.{a.name}") for a in node.names)
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "megatron_sail")


def _package_edges():
    """(file, line, importing top-level package, imported top-level package) across packages."""
    pkg = ROOT / "megatron_sail"
    for path in sorted(pkg.rglob("*.py")):
        parts = path.relative_to(pkg).with_suffix("").parts
        if parts == ("__init__",):
            continue
        for line, module in _imports(path):
            target = module.split(".")[1] if "." in module else "__init__"
            if target != parts[0]:
                yield f"{path.relative_to(ROOT)}:{line}", parts[0], target


def test_every_package_has_a_floor():
    pkg = ROOT / "megatron_sail"
    names = {
        p.stem if p.is_file() else p.name
        for p in pkg.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    }
    assert names - set(FLOOR) == set(), "give the new package a floor in FLOORS and docs/architecture.md"


def test_imports_only_go_down():
    wrong = [
        f"{where}: {src} (floor {FLOOR[src]}) imports {dst} (floor {FLOOR.get(dst, '?')})"
        for where, src, dst in _package_edges()
        if FLOOR.get(dst, 99) >= FLOOR[src]
    ]
    assert wrong == []


def _module_edges() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a ``from package import name`` that names a
    submodule counts as importing it; a package's own __init__ importing its submodules does not)."""
    pkg = ROOT / "megatron_sail"
    files = {}
    for path in pkg.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_sail"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in files and t != name and not t.startswith(name + ".")}
    return edges


def test_no_import_circle_between_modules():
    """Within a package too, no module imports (at module level or in a function) one that
    imports it back, however long the way round (the error names the circles found)."""
    edges, circles, done = _module_edges(), [], set()

    def walk(node, path):
        for nxt in sorted(edges[node]):
            if nxt in path:
                circle = path[path.index(nxt) :]
                if frozenset(circle) not in done:
                    done.add(frozenset(circle))
                    circles.append(" -> ".join(circle + [nxt]))
            elif nxt not in seen:
                seen.add(nxt)
                walk(nxt, path + [nxt])

    seen: set[str] = set()
    for start in sorted(edges):
        if start not in seen:
            seen.add(start)
            walk(start, [start])
    assert not circles, "import circles: " + "; ".join(circles)
