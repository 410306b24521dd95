"""The package's seams, checked on its source (issue 13): data flows one way
through the layers, and no module uses another module's private names.

Layers, lowest first (a module imports only from lower layers and from its
own package; lazy imports inside functions count the same)::

    errors < ops, units, private < kernels < fs < capture, stream, mirror
           < replication, daemon < dtcl, bench < cli (and the package's facade)

Two packages of one layer do not import each other, except the pairs in
``SAME_LAYER`` (each with the reason)."""
from __future__ import annotations

import ast
import pathlib

import pytest

import smirror

# the package under test, in the checkout or installed from the wheel; only
# its own files are read (an installed one sits among others in site-packages)
PACKAGE = pathlib.Path(smirror.__file__).resolve().parent
SRC = PACKAGE.parent

LAYERS = {
    "errors": 0,
    "ops": 1, "units": 1, "private": 1,
    "kernels": 2,
    "fs": 3,
    "capture": 4, "stream": 4, "mirror": 4,
    "replication": 5, "daemon": 5,
    # front ends: the DTCL language and the smbench harness
    "dtcl": 6, "bench": 6,
    # the root package (its facade) and the smirror command, which runs them all
    "smirror": 7, "__main__": 7, "cli": 7,
}

# (importer, imported): why a package may import another of its own layer
SAME_LAYER = {
    ("replication", "daemon"): "the embedded Replication checks connection options with the "
                               "daemon registry's check_options (one rule for both)",
    ("cli", "smirror"): "smirror --version prints the package's __version__",
    ("__main__", "cli"): "python -m smirror runs the CLI",
}


def _modules(root: pathlib.Path = SRC, pattern: str = "*.py") -> dict[str, pathlib.Path]:
    mods = {}
    for path in sorted((root / PACKAGE.name).rglob(pattern)):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def check_module(module: str, source: str, known: set[str], is_package: bool = False) -> list[str]:
    """What ``module`` (its ``source``) does against the seams; ``known``
    are the names of all modules of the package. Returns one line each."""
    tree = ast.parse(source)
    problems = []
    where = f"{module.replace('.', '/')}.py"
    mine = _package(module)
    smirror_aliases: set[str] = set()     # names bound to a smirror module
    other_aliases: set[str] = set()       # names bound to any other module

    def imported(target: str, line: int) -> None:
        theirs = _package(target)
        if theirs == mine or not target.startswith("smirror"):
            return
        if mine not in LAYERS or theirs not in LAYERS:
            problems.append(f"{where}:{line}: package {mine if mine not in LAYERS else theirs!r} "
                            "has no layer: add it to LAYERS in tests/test_layering.py")
            return
        if LAYERS[theirs] > LAYERS[mine] or (LAYERS[theirs] == LAYERS[mine]
                                              and (mine, theirs) not in SAME_LAYER):
            problems.append(f"{where}:{line}: {mine} (layer {LAYERS[mine]}) imports {target} "
                            f"({theirs}, layer {LAYERS[theirs]}): data flows the other way")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                (smirror_aliases if alias.name.startswith("smirror") else other_aliases).add(bound)
                if alias.name.startswith("smirror"):
                    imported(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source_module = _absolute(module, is_package, node)
            if not source_module.startswith("smirror"):
                other_aliases.update(a.asname or a.name for a in node.names)
                continue
            for alias in node.names:
                full = f"{source_module}.{alias.name}"
                if full in known:                       # a module: smirror.kernels._checksum is fine
                    smirror_aliases.add(alias.asname or alias.name)
                    imported(full, node.lineno)
                    continue
                imported(source_module, node.lineno)
                if _private(alias.name) and source_module != module:
                    problems.append(f"{where}:{node.lineno}: imports the private name {alias.name} "
                                    f"from {source_module}")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Name) and owner.id in other_aliases and owner.id not in smirror_aliases:
            continue                                    # os._exit, sys._getframe: not ours
        problems.append(f"{where}:{node.lineno}: uses the private name {ast.unparse(node)} of "
                        "another module or object: give it a public name")
    return problems


def test_the_package_keeps_its_seams():
    mods = _modules()
    known = set(mods) | set(_modules(pattern="*.pyi"))     # the compiled kernels by their stubs
    problems = []
    for module, path in mods.items():
        problems += check_module(module, path.read_text(), known, path.name == "__init__.py")
    assert not problems, "\n".join(problems)


KNOWN = {"smirror.errors", "smirror.stream.wire", "smirror.daemon.auth", "smirror.kernels._checksum",
         "smirror.capture.inotify", "smirror.fs.files"}


@pytest.mark.parametrize("module, source, expect", [
    # an import against the flow, also a lazy one inside a function
    ("smirror.stream.wire", "from smirror.daemon.auth import User\n", "data flows the other way"),
    ("smirror.stream.wire", "def f():\n    from smirror.daemon import auth\n", "data flows the other way"),
    ("smirror.stream.wire", "import smirror.capture.inotify\n", "data flows the other way"),
    ("smirror.stream.wire", "from ..capture import inotify\n", "data flows the other way"),
    ("smirror.fs.files", "from smirror.stream import wire\n", "data flows the other way"),
    ("smirror.capture.mount.fuse", "from smirror.bogus import x\n", "has no layer"),
    # private names of other modules and objects
    ("smirror.capture.fanotify", "from smirror.capture.inotify import _join\n", "private name _join"),
    ("smirror.daemon.server", "from smirror.fs import files\nfiles._lease(3)\n", "private name files._lease"),
    ("smirror.daemon.server", "def f(cap):\n    cap._lock.acquire()\n", "private name cap._lock"),
    ("smirror.daemon.server", "def f(self):\n    self.capture._lock\n", "private name self.capture._lock"),
])
def test_the_check_finds_a_broken_seam(module, source, expect):
    problems = check_module(module, source, KNOWN)
    assert len(problems) == 1 and expect in problems[0], problems


@pytest.mark.parametrize("module, source", [
    ("smirror.daemon.server", "from smirror.stream import wire\nfrom smirror.errors import AuthError\n"),
    ("smirror.kernels.checksum", "from smirror.kernels import _checksum\n"),
    ("smirror.daemon.server", "import os, sys\nos._exit(1)\nsys._getframe()\n"),
    ("smirror.daemon.server", "class A:\n    def f(self):\n        return self._x\n"),
    ("smirror.replication", "from smirror.daemon.registry import check_options\n"),
])
def test_the_check_lets_a_kept_seam_pass(module, source):
    assert check_module(module, source, KNOWN | {"smirror.daemon.registry"}) == []


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles in ``graph`` (module -> modules it imports), one
    per strongly connected group of modules, each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:       # Tarjan; the package is small enough to recurse
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[module].update(t for t in targets if t in mods and t != module)
    return graph


# cycles left, each with why (and what removes it); none today (fs.files and fs.keep
# were one when LocalTarget lived in fs.files)
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


def test_no_module_imports_itself_around_a_cycle():
    # also lazy imports: a cycle of them still ties the modules into one
    cycles = [c for c in import_cycles(_import_graph()) if tuple(c) not in KNOWN_CYCLES]
    assert cycles == []


def test_the_cycle_check_finds_a_cycle():
    graph = {"cli.main": {"cli.mirror"}, "cli.mirror": {"cli.common", "cli.main"}, "cli.common": set()}
    assert import_cycles(graph) == [["cli.main", "cli.mirror"]]
