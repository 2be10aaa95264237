"""The architecture holds: PEFT untouched by ``import peft_gp``, three layers with imports pointing down, small
modules and functions (issue 18's measures, read from the code itself)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_gp"
LAYERS = {"core": 1, "wiring": 2}  # everything else (training, hub, continual, cli, the package) is layer 3


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The peft_gp modules ``name`` imports, at module level or inside functions."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {target for target in found if target in known and target != name}


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.get(parts[1], 3) if len(parts) > 1 else 3


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def test_import_peft_gp_leaves_peft_classes_as_they_are():
    script = (
        "import peft, peft.peft_model as pm\n"
        "classes = [c for c in vars(pm).values() if isinstance(c, type) and issubclass(c, peft.PeftModel)]\n"
        "before = {c: (c.__dict__.get('forward'), c.__dict__.get('save_pretrained'), "
        "c.__dict__.get('_setup_prompt_encoder')) for c in classes}\n"
        "import peft_gp\n"
        "after = {c: (c.__dict__.get('forward'), c.__dict__.get('save_pretrained'), "
        "c.__dict__.get('_setup_prompt_encoder')) for c in classes}\n"
        "assert len(classes) >= 7 and before == after, [c for c in classes if before[c] != after[c]]\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_imports_point_down_the_layers_without_cycles():
    upward = [(a, b) for a, targets in GRAPH.items() for b in targets if layer(b) > layer(a)]
    assert not upward, upward

    def cycle_from(start, node, seen):
        for target in GRAPH[node]:
            if target == start:
                return [node, target]
            if target not in seen:
                seen.add(target)
                rest = cycle_from(start, target, seen)
                if rest:
                    return [node, *rest]
        return None

    cycles = [cycle for name in GRAPH if (cycle := cycle_from(name, name, set()))]
    assert not cycles, cycles[:3]


def test_no_import_is_hidden_inside_a_function():
    lazy = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                text = ast.unparse(node)
                if "peft_gp" in text or (isinstance(node, ast.ImportFrom) and node.level):
                    lazy.append(f"{name}: {text}")
    assert not lazy, lazy


@pytest.mark.parametrize("limit", [300])
def test_modules_and_functions_stay_small(limit):
    long_modules = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert all(lines <= limit for lines in long_modules.values()), {n: v for n, v in long_modules.items() if v > limit}
    long_functions = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long_functions, long_functions


def import_levels() -> dict[str, int]:
    """Each module's level: 1 for one that imports no other peft_gp module, else 1 + its imports' deepest level."""
    levels: dict[str, int] = {}

    def level_of(name: str) -> int:
        if name not in levels:
            levels[name] = 0  # cycles are caught by their own test
            levels[name] = 1 + max((level_of(target) for target in GRAPH[name]), default=0)
        return levels[name]

    for name in GRAPH:
        level_of(name)
    return levels


MOST_IMPORT_LEVELS = 13  # measured 2026-11-30 (14 before); issue 18 aims at 5: lower this as the tower comes down


def test_the_import_tower_grows_no_taller():
    levels = import_levels()
    deepest = max(levels.values())
    print(f"{len(levels)} modules on {deepest} import levels")
    chain, name = [], max(levels, key=levels.get)
    while name:  # the longest chain, for the failure message
        chain.append(name)
        name = max(GRAPH[name], key=levels.get, default=None)
    assert deepest <= MOST_IMPORT_LEVELS, " -> ".join(chain)


def test_no_file_under_tests_imports_a_test_module():
    """Shared helpers live in ``tests/testing.py`` and shared fixtures in ``tests/conftest.py``, which pytest finds by
    itself: no file under tests/ (nor the code it runs in a subprocess) imports a test module, itself included, or
    takes names from conftest."""
    tests = Path(__file__).resolve().parent
    found = set()
    for path in sorted(tests.rglob("*.py")):
        package = list(path.relative_to(tests.parent).parts[:-1])
        trees = [ast.parse(path.read_text())]
        while trees:
            for node in ast.walk(trees.pop()):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
                    # code run in a subprocess; a template's import lines, which parse alone
                    lines = [line for line in node.value.splitlines() if line.startswith(("from ", "import "))]
                    for source in [node.value, *lines]:
                        try:
                            trees.append(ast.parse(source))
                        except (SyntaxError, ValueError):
                            pass  # prose, or a template
                if isinstance(node, ast.ImportFrom):
                    base = package[: len(package) - node.level + 1] if node.level else []
                    target = ".".join(base + ([node.module] if node.module else []))
                    targets = [target, *(f"{target}.{alias.name}" for alias in node.names)]
                elif isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                else:
                    continue
                modules = {target.removeprefix("tests.").split(".")[0] for target in targets}
                if any(module.startswith("test_") or module == "conftest" for module in modules):
                    found.add(f"{path.relative_to(tests.parent)}: {ast.unparse(node)}")
    assert not found, sorted(found)
