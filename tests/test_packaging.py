"""The repository installs as one package, `rlhf`, whose parts import each other in one direction."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# On disk -> import name: the role folders sit at the top of the repository and install inside rlhf.
SOURCES = {
    "rlhf": ROOT / "rlhf",
    "rlhf.rollout": ROOT / "rollout",
    "rlhf.reward": ROOT / "reward",
    "rlhf.trainer": ROOT / "trainer",
}
# The core imports no role; every other unit may import the core and whatever sits below it.
CORE = {
    "rlhf.config",
    "rlhf.types",
    "rlhf.algorithms",
    "rlhf.data",
    "rlhf.user_code",
    "rlhf.environment",
    "rlhf.actor_group",
    "rlhf.tasks",
}


def _modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join((prefix, *rel))
            if prefix == "rlhf" and len(rel) and rel[0] in ("rollout", "reward", "trainer"):
                continue
            out[name] = path
    return out


def _unit(module: str) -> str | None:
    """rlhf.sync.wire -> rlhf.sync; rlhf.types -> rlhf.types; anything outside rlhf -> None."""
    parts = module.split(".")
    if parts[0] != "rlhf" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def _imports(path: Path, module: str) -> set[str]:
    """Every project module the file imports, at the top or inside functions, and literal
    importlib.import_module("...") targets."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return {m for m in found if m.startswith(("rlhf.", "rollout", "reward", "trainer"))}


def _unit_graph() -> dict[str, dict[str, set[str]]]:
    """unit -> {unit it imports: {the modules that do it}}."""
    graph: dict[str, dict[str, set[str]]] = {}
    for module, path in _modules().items():
        src = _unit(module)
        if src is None:
            continue
        for target in _imports(path, module):
            dst = _unit(target)
            if dst and dst != src:
                graph.setdefault(src, {}).setdefault(dst, set()).add(module)
    return graph


def test_no_old_top_level_imports():
    """Nothing imports the role folders as top-level packages any more."""
    bad = []
    for module, path in _modules().items():
        for target in _imports(path, module):
            if target.split(".")[0] in ("rollout", "reward", "trainer"):
                bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not bad, "\n".join(bad)


def test_core_imports_no_role():
    graph = _unit_graph()
    bad = [
        f"{unit} -> {dst} (in {', '.join(sorted(mods))})"
        for unit in CORE
        for dst, mods in graph.get(unit, {}).items()
        if dst not in CORE
    ]
    assert not bad, "the core imports beyond the core:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages():
    graph = {u: set(d) for u, d in _unit_graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for unit in sorted(graph):
        if unit not in state and (cycle := visit(unit)):
            full = _unit_graph()
            why = [f"{a} -> {b} (in {', '.join(sorted(full[a][b]))})" for a, b in zip(cycle, cycle[1:])]
            pytest.fail("import cycle between packages:\n" + "\n".join(why))


@pytest.mark.slow
def test_wheel_installs_rlhf_alone(tmp_path):
    """The wheel puts one top-level name into site-packages, and every source file is inside it."""
    # Built from a copy of the tracked files: an in-tree build leaves build/ behind, whose stale
    # copies of moved modules would end up in the next wheel.
    source = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("rlhf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"rlhf"}, tops
    expected = {
        "rlhf/" + "/".join(m.split(".")[1:]) + ("/__init__.py" if p.name == "__init__.py" else ".py")
        for m, p in _modules().items()
        if m != "rlhf"
    }
    missing = sorted(expected - set(names))
    assert not missing, f"source files the wheel leaves out (add their package to pyproject.toml): {missing}"
