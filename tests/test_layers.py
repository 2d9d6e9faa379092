"""Imports follow the layers: a module of ``megatron_longact`` imports only from its own
package and from packages on a lower floor, never upward and never sideways (peers on one floor
stay independent). Lazy imports inside functions count too: they are how the cycles hid.

Static (``ast``), so it costs nothing and needs no dependency. To move a package, change
``LAYERS``, the one place the order is written (README "Layout" describes it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import megatron_longact

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "stats"),  # UserError for user mistakes; sampled-evaluation statistics
    ("device", "config"),  # the one CPU/CUDA answer; typed configs (plain data)
    ("models", "data"),  # GPTModel from HF configs, HF <-> megatron weights; formats, packing
    ("checkpoint",),  # dist_checkpointing saves and loads
    ("runtime",),  # dist init, DDP + optimizer, train step, CPU layer, launcher, save point
    ("longact",),  # the method: saliency -> selection -> masks; works with any algorithm
    ("sft", "rl", "plan", "convert"),  # the loops and commands; sft and rl share the runtime
    ("eval", "study"),  # benchmarks (rollout engines from rl/), analyses (longact/)
    ("cli",),  # the one entry point
)
"""Floors from the bottom up; a top-level module or package of megatron_longact is one name."""

PACKAGE = Path(megatron_longact.__file__).parent
FLOOR = {name: floor for floor, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str | None:
    """The top-level part of ``megatron_longact`` that ``module`` names, else None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "megatron_longact" and len(parts) > 1 else None


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``, relative ones resolved."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            found += [(node.lineno, name) for name in names]
    return found


def _violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        here = rel.parts[0].removesuffix(".py")
        if here == "__init__":
            continue
        for line, module in _imported(path):
            there = _top(module)
            if there is None or there == here:
                continue
            if FLOOR[there] >= FLOOR[here]:
                way = "sideways" if FLOOR[there] == FLOOR[here] else "upward"
                bad.append(f"{rel}:{line} imports {module} ({way}: {here} -> {there})")
    return bad


def test_every_package_has_a_floor():
    names = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()}
    names = {n for n in names if not n.startswith(("_", ".")) and n not in ("assets",)}
    missing, gone = sorted(names - set(FLOOR)), sorted(set(FLOOR) - names)
    assert not missing and not gone, f"add {missing} to LAYERS, drop {gone}"


def test_imports_never_go_up_or_sideways():
    assert not _violations(), "\n".join(_violations())


def test_the_check_sees_a_lazy_upward_import(tmp_path, monkeypatch):
    """The check itself: a lazy import inside a function, upward, is reported."""
    fake = tmp_path / "megatron_longact"
    (fake / "models").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "models" / "bad.py").write_text("def f():\n    from ..rl import step\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _violations() == ["models/bad.py:2 imports megatron_longact.rl (upward: models -> rl)"]
