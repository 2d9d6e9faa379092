"""The megatron-core fence (``runtime.mcore_compat``): the installed version is in the tested range
that ``setup.py`` pins, every attribute the package patches or relies on exists, a release that
drops one fails the import-time check naming it, and no patch bypasses the registry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import megatron_longact
from megatron_longact.runtime import mcore_compat

ROOT = Path(megatron_longact.__file__).parent


def test_installed_megatron_is_in_the_range_setup_py_pins():
    mcore_compat.check_version(mcore_compat.megatron_version())
    setup = (ROOT.parent / "setup.py").read_text()
    assert f'"megatron-core{mcore_compat.TESTED_RANGE}"' in setup


def test_a_release_outside_the_range_is_refused():
    with pytest.raises(ImportError, match=r"megatron-core 0.17.0 is outside the tested range"):
        mcore_compat.check_version("0.17.0")
    with pytest.raises(ImportError, match="outside the tested range"):
        mcore_compat.check_version("0.15.3")


def test_every_patched_and_relied_on_attribute_exists():
    assert mcore_compat.missing_attributes() == []
    mcore_compat.check()


@pytest.mark.parametrize(
    "patch", [p for p in mcore_compat.PATCHES if not p.defines], ids=lambda p: f"{p.owner}.{p.name}"
)
def test_the_check_fails_when_a_patched_attribute_disappears(patch, monkeypatch):
    monkeypatch.delattr(mcore_compat.resolve(patch.owner), patch.name)
    assert mcore_compat.missing_attributes() == [f"{patch.owner}.{patch.name}"]
    with pytest.raises(ImportError, match=re.escape(f"lacks {patch.owner}.{patch.name}")):
        mcore_compat.check()


def test_a_name_the_package_defines_is_checked_by_its_reader(monkeypatch):
    """``te_general_gemm`` exists only with Transformer Engine, so the check does not ask for
    it; it asks for the router Function that reads it, and fails when that disappears."""
    defined = [p for p in mcore_compat.PATCHES if p.defines]
    assert [(p.owner, p.name) for p in defined] == [
        ("megatron.core.transformer.moe.moe_utils", "te_general_gemm")
    ]
    reader = "megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction"
    assert (reader, "forward") in mcore_compat.RELIED_ON
    monkeypatch.delattr(mcore_compat.resolve(reader), "forward")
    assert mcore_compat.missing_attributes() == [f"{reader}.forward"]


def test_an_unregistered_patch_is_refused():
    from megatron.core.transformer.mlp import MLP

    with pytest.raises(AssertionError, match="MLP.forward is patched but not registered"):
        with mcore_compat.patched_methods([MLP.__new__(MLP)], "forward", lambda _: None):
            pass
    import megatron.core.parallel_state as parallel_state

    with pytest.raises(AssertionError, match="not registered"):
        mcore_compat.replace_global(parallel_state, "get_data_parallel_rank", lambda: 0)


def test_no_module_patches_megatron_or_torch_cuda_around_the_registry():
    """Static: outside mcore_compat, no assignment to an attribute of a megatron module alias or
    of ``torch.cuda``, and no ``setattr`` on one (instance methods go through
    ``patched_methods``)."""
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "mcore_compat.py":
            continue
        tree = ast.parse(path.read_text())
        aliases = {"torch.cuda"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron."):
                aliases |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names if a.name.startswith("megatron")}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and ast.unparse(target.value) in aliases:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
