"""The layers of the code base point one way, and no module imports itself back.

    cli ─▶ bench  ─▶ engines ─▶ export ─▶ core (rpiae/)
      ├──▶ verify ─┤
      └──▶ jobs ───┘

Every import statement counts, at module level or inside a function (a lazy import is still a
dependency), read from the source with `ast`: a layer may import its own modules and the layers
below it, never one above, and `bench`, `verify` and `jobs` not each other. docs/ARCHITECTURE.md
explains what lives in each layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> import package (pyproject's package-dir), lowest layer first
FOLDERS = {"rpiae": "rpiae", "export": "rpiae.export", "engines": "rpiae.engines", "verify": "rpiae.verify",
           "jobs": "rpiae.jobs", "bench": "rpiae.bench", "cli": "rpiae.cli"}
RANK = {"rpiae": 0, "rpiae.export": 1, "rpiae.engines": 2, "rpiae.verify": 3, "rpiae.jobs": 3, "rpiae.bench": 3,
        "rpiae.cli": 4}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (root / folder).rglob("*.py"):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The project modules `path` imports (`from pkg import submodule` counts as the submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            names = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import rpiae.engines.tensorrt.x` -> the module part
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def layer(module: str) -> str:
    return next((p for p in RANK if p != "rpiae" and (module == p or module.startswith(p + "."))), "rpiae")


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {m: imports(p, m, set(files)) for m, p in files.items()}


def upward(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in edges.items():
        for b in targets:
            la, lb = layer(a), layer(b)
            if la != lb and (RANK[lb] > RANK[la] or RANK[lb] == RANK[la]):
                bad.append(f"{a} ({la}) imports {b} ({lb})")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_import_points_down_the_layers():
    assert not upward(graph()), "\n".join(upward(graph()))


def test_no_import_cycles_between_modules():
    assert not cycles(graph()), cycles(graph())


def test_every_module_is_in_a_layer():
    files = module_files()
    assert {"rpiae.model", "rpiae.export.bundle", "rpiae.engines.base", "rpiae.verify.parity", "rpiae.jobs.extract",
            "rpiae.bench.runner", "rpiae.cli.main"} <= set(files)
    assert all(layer(m) in RANK for m in files)


@pytest.mark.parametrize("source,target,bad", [
    ("export/late.py", "from rpiae.engines.base import Backend", True),  # export reaching up into a runtime
    ("rpiae/late.py", "def f():\n    from rpiae.export import bundle\n", True),  # a lazy import counts too
    ("bench/late.py", "import rpiae.verify.parity", True),  # siblings stay apart
    ("verify/late.py", "from rpiae.engines import open_backend", False),
    ("cli/late.py", "from rpiae.bench import runner", False),
    ("rpiae/data/late.py", "from rpiae.jobs import extract", True),  # the core does not run jobs
    ("jobs/late.py", "from rpiae.verify import parity", True),
    ("jobs/late.py", "from rpiae.engines.base import Backend", False),  # jobs call the runtimes directly
    ("bench/late.py", "from rpiae.jobs.late import x", True),
])
def test_the_check_catches_an_upward_import(tmp_path, source, target, bad):
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "engines" / "base.py").write_text("")
    (tmp_path / "export" / "bundle.py").write_text("")
    (tmp_path / "verify" / "parity.py").write_text("")
    (tmp_path / "bench" / "runner.py").write_text("")
    (tmp_path / "rpiae" / "data").mkdir()
    (tmp_path / "jobs" / "extract.py").write_text("")
    (tmp_path / source).write_text(target + "\n")
    assert bool(upward(graph(tmp_path))) == bad


def test_the_check_catches_a_cycle(tmp_path):
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "rpiae" / "model.py").write_text("def load():\n    from rpiae import checkpoints\n")
    (tmp_path / "rpiae" / "checkpoints.py").write_text("from rpiae.model import load\n")
    assert cycles(graph(tmp_path)) == [["rpiae.checkpoints", "rpiae.model"]]
