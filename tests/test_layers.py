"""Layers that stay layers (DESIGN.md contract 7, docs/architecture.md "Layers").

Every module under ``src/advdefense`` is parsed (``ast``; nothing is imported) and each import
it makes of the package -- absolute or relative, at module level or inside a function, or a
``"advdefense.x.y"`` string handed to ``importlib`` -- is checked against the layer table: a
module imports only from its own layer or below.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "advdefense"

# layer of every top-level part of the package (docs/architecture.md keeps the same table)
LAYERS = {
    "errors": 0, "randomness": 0, "distributed": 0, "provenance": 0, "atomic": 0, "data": 0,
    "layout": 0, "precision": 0,
    "models": 1,
    "attacks": 2, "defenses": 2,
    "config": 3, "evaluation": 3, "analysis": 3, "advfile": 3,
    "training": 4,
    "presets": 5, "reproduction": 5, "loading": 5, "zoo": 5,
    "commands": 6, "cli": 6, "__main__": 6,
}
# same-layer arrows that are still wrong (a defense provides models and objectives; how it is
# evaluated is evaluation's part)
FORBIDDEN = {("defenses", "evaluation"), ("defenses", "analysis")}
MODULE_STRING = re.compile(r"advdefense(\.\w+)+(:\w+)?")


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every ``advdefense`` module or attribute ``path`` imports."""
    name, is_package = _module_name(path, root)
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from .. import x`` may name a module x: check ``module.x`` as well
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and MODULE_STRING.fullmatch(node.value)):
            found.append((node.lineno, node.value.split(":")[0]))
    return [(line, mod) for line, mod in found if mod.split(".")[0] == "advdefense"]


def part_of(dotted: str, root: Path = PACKAGE) -> str | None:
    """The top-level part of the package a dotted name lies in (None: the package root)."""
    parts = dotted.split(".")
    if len(parts) < 2:
        return None
    head = parts[1]
    if (root / head).is_dir() or (root / f"{head}.py").is_file():
        return head
    return None  # an attribute of the package root, e.g. ``from .. import __version__``


def violations(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        name, _ = _module_name(path, root)
        if name == root.name:
            continue  # the package root holds no imports of its parts
        own = name.split(".")[1]
        if own not in LAYERS:
            bad.append(f"{path.relative_to(root.parent)}: part {own!r} has no layer in LAYERS")
            continue
        seen = set()
        for line, target in imported_modules(path, root):
            other = part_of(target, root)
            if other is None or other == own or (line, other) in seen:
                continue
            seen.add((line, other))
            if other not in LAYERS:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {target} has no layer")
            elif LAYERS[other] > LAYERS[own] or (own, other) in FORBIDDEN:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {own} (layer "
                           f"{LAYERS[own]}) imports {target} (layer {LAYERS[other]})")
    return bad


def test_every_import_goes_down_the_layers():
    bad = violations()
    assert not bad, "wrong-way imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, target", [
    ("from ..training.checkpoint import load_model_from_checkpoint", "training"),
    ("def f():\n    from ..commands import train", "commands"),
    ("import advdefense.cli", "cli"),
    ("from .. import training", "training"),
    ("from ..evaluation.harness import AttackSpec", "evaluation"),
])
def test_the_scan_sees_wrong_way_imports(tmp_path, source, target):
    root = tmp_path / "advdefense"
    for part in ("defenses", "training", "commands", "evaluation"):
        (root / part).mkdir(parents=True)
        (root / part / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "cli.py").write_text("")
    (root / "defenses" / "bad.py").write_text(source + "\n")
    found = violations(root)
    assert len(found) == 1 and f"imports advdefense.{target}" in found[0]


def test_config_recipe_names_match_the_registry():
    # config validates recipe names without importing training (see config.RECIPE_NAMES)
    from advdefense.config import RECIPE_NAMES
    from advdefense.training.recipes import RECIPES

    assert tuple(RECIPES) == RECIPE_NAMES
