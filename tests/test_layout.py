"""
The package layout, checked by drawing its import graph: every import in nanopost/ and kernels/ is an arrow, a
lazy one inside a function included (it still has to be true when that function runs). The house has three
parts: kernels/ at the bottom (imports nothing of nanopost), the library nanopost/*.py in at most MAX_FLOORS
floors with no cycle, and the studies nanopost/studies/ on the roof (they import the library; the library never
imports them).

floor(m) = 1 + the highest floor among the nanopost modules m imports; a module that imports none is floor 1.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tallest chain today: evaluate -> reward -> loading -> gpt2 -> tokenizer -> config. A seventh floor means a
# module low in the house reached up for something (a lazy import for a command is the usual way)
MAX_FLOORS = 6


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _imports(path, name):
    """The absolute names of every module `path` imports, at any depth of the file (a lazy import is an arrow too).
    `from pkg import x` names pkg.x when that is a module of ours, else pkg."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph():
    """{module: set of our modules it imports} for every .py under nanopost/ and kernels/."""
    paths = {}
    for top in ("nanopost", "kernels"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for file in files:
                if file.endswith(".py"):
                    path = os.path.join(folder, file)
                    paths[_module_name(path)] = path
    graph = {}
    for name, path in paths.items():
        graph[name] = {m for m in _imports(path, name) if m in paths and m != name}
    return graph


def is_library(name):
    return name.startswith("nanopost.") and not name.startswith("nanopost.studies")


def floors(graph, names):
    """{module: floor} over `names`, counting only arrows between them; raises AssertionError on a cycle."""
    floor, visiting = {}, []

    def visit(m):
        if m in floor:
            return floor[m]
        assert m not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(m):] + [m])}"
        visiting.append(m)
        floor[m] = 1 + max((visit(d) for d in graph[m] if d in names), default=0)
        visiting.pop()
        return floor[m]

    for m in sorted(names):
        visit(m)
    return floor


def floor_table(floor):
    by_floor = {}
    for m, f in floor.items():
        by_floor.setdefault(f, []).append(m.removeprefix("nanopost."))
    return "\n".join(f"  floor {f}: {', '.join(sorted(by_floor[f]))}" for f in sorted(by_floor, reverse=True))


def test_kernels_import_nothing_from_nanopost():
    graph = import_graph()
    up = [(m, d) for m, deps in graph.items() if m.startswith("kernels") for d in deps if d.startswith("nanopost")]
    assert not up, f"kernels/ must stand without nanopost: {up}"


def test_nanopost_has_no_import_cycle():
    graph = import_graph()
    floors(graph, {m for m in graph if m.startswith("nanopost")})


def test_library_has_at_most_max_floors():
    graph = import_graph()
    library = {m for m in graph if is_library(m)}
    floor = floors(graph, library)
    arrows = sum(d in library for m in library for d in graph[m])
    assert max(floor.values()) <= MAX_FLOORS, (
        f"the library has {max(floor.values())} floors (at most {MAX_FLOORS}), {arrows} arrows:\n{floor_table(floor)}")


def test_studies_sit_above_the_library():
    graph = import_graph()
    studies = {m for m in graph if m.startswith("nanopost.studies")}
    assert studies, "nanopost/studies/ is missing"
    down = [(m, d) for m in graph if is_library(m) for d in graph[m] if d in studies]
    assert not down, f"the library must not import the studies: {down}"
    assert all(any(is_library(d) for d in graph[m]) for m in studies - {"nanopost.studies"}), \
        "every study is built on the library"


if __name__ == "__main__":
    g = import_graph()
    lib = {m for m in g if is_library(m)}
    print(floor_table(floors(g, lib)))
    print("arrows:", sum(d in lib for m in lib for d in g[m]))
