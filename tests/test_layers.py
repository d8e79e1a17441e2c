"""Layers point one way: entry points and command-line tools -> the engine -> evaluation / modeling / data ->
the small pieces everyone uses. Every import of every module is read (ast, function-level ones too); one that
climbs to a higher layer fails, named."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

# Highest first; a module belongs to the first layer with a prefix naming it (a prefix is a module or a package).
LAYERS = {
    "entry": ("train", "tools", "detlib.tools"),
    "engine": ("detlib.engine", "detlib.predictor"),
    "evaluation, modeling, data": ("detlib.evaluation", "detlib.modeling", "detlib.data"),
    "bottom": ("detlib.config", "detlib.configs", "detlib.compose", "detlib.losses", "detlib.device",
               "detlib.distributed", "detlib.runs", "detlib.errors", "detlib.jsonio", "detlib.export"),
}
FACE = "detlib"  # detlib/__init__.py: hands on Predictor (lazily) to users; nothing imports it for a name of its own


def layer(module: str) -> int | None:
    """0 for the top layer, then down; None for a module outside detlib (torch, hydra, ...)."""
    for rank, prefixes in enumerate(LAYERS.values()):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import, ``from detlib import runs`` read as ``detlib.runs``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                package = module.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                base = ".".join([*package, *([base] if base else [])])
            out += [(node.lineno, f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base) for a in node.names]
    return sorted(set(out))


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _modules() -> list[Path]:
    return sorted([*(ROOT / "detlib").rglob("*.py"), *(ROOT / "tools").glob("*.py"), ROOT / "train.py"])


def test_every_module_has_a_layer():
    assert [_name(p) for p in _modules() if layer(_name(p)) is None and _name(p) != FACE] == []


def test_no_module_imports_from_a_higher_layer():
    names = list(LAYERS)
    upward = []
    for path in _modules():
        module = _name(path)
        if module == FACE:
            continue
        for line, target in _imports(path, module):
            if target == FACE or layer(target) is None:
                continue
            if layer(target) < layer(module):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {module} ({names[layer(module)]}) imports "
                              f"{target} ({names[layer(target)]})")
    assert not upward, "imports that climb a layer:\n" + "\n".join(upward)
