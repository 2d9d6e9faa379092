"""The fence around megatron-core: every place this package replaces one of its attributes.

megatron-core is patched in two ways, both registered here and nowhere else:

* module globals and class attributes replaced for the whole process: by the CPU bridge
  (``runtime.cpu_compat``, only without CUDA) megatron's CUDA RNG tracker and state getters,
  the MoE dispatcher's host copy and the backwards of its communication autograd Functions, by
  ``runtime.lifetime`` the result queue of megatron's checkpoint writers, by
  ``runtime.distributed`` the Transformer Engine GEMM name megatron's MoE router reads even
  without TE;
* methods shadowed per instance, only inside a context manager, by the native rollout engine
  (``rl.rollout.kv_cache``, ``decode_layer``, ``native``): faster decode steps that call
  megatron's own modules.

Both go through :func:`replace_global` and :func:`patched_methods`, which refuse a target that
is not in :data:`PATCHES`. At import this module checks that the installed megatron-core lies in
:data:`TESTED_RANGE` (``setup.py`` pins the same range) and that every patched or relied-on
attribute exists, so a megatron release that moves one fails here, naming it, instead of
silently running megatron's own code or crashing mid-rollout. The patches' comments cite
megatron-core 0.16 line numbers; a new release is adopted by widening the range after running
``tests/runtime/test_mcore_compat.py`` and ``tests/rl/test_rollout_native.py`` on it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

TESTED_RANGE = ">=0.16.1,<0.17"
"""The megatron-core versions the patches were read against and tested on."""


@dataclass(frozen=True)
class Patch:
    """One attribute of megatron (or torch) that this package replaces."""

    owner: str
    """``package.module`` for a module global, ``package.module:Class`` for a method."""
    name: str
    by: str
    """Our module that installs it."""
    why: str
    defines: bool = False
    """The name exists only in some installs (megatron defines it when Transformer Engine
    imports) and the patch defines it where it is absent: the import-time check looks for its
    reader (in :data:`RELIED_ON`) instead of the name."""


PATCHES: tuple[Patch, ...] = (
    # The CPU bridge: megatron forks a CUDA RNG tracker for init and dropout and saves CUDA RNG
    # states for activation recomputation (tensor_parallel/random.py).
    *(
        Patch(
            "megatron.core.tensor_parallel.random",
            name,
            "runtime.cpu_compat",
            "a CPU generator in place of the CUDA one",
        )  # fmt: skip
        for name in (
            "_get_cuda_rng_state",
            "_set_cuda_rng_state",
            "CudaRNGStatesTracker",
            "_CUDA_RNG_STATE_TRACKER",
            "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
        )
    ),
    *(
        Patch("torch.cuda", name, "runtime.cpu_compat", "a no-op or the CPU RNG without CUDA")
        for name in (
            "current_device",
            "synchronize",
            "empty_cache",
            "set_device",
            "manual_seed",
            "manual_seed_all",
            "get_rng_state",
            "set_rng_state",
            # megatron's all-to-all MoE dispatcher copies its split sizes on a side stream.
            "Stream",
            "current_stream",
            "stream",
        )
    ),
    # The CPU bridge for MoE (mixture-of-experts) layers: split sizes as numpy for gloo's
    # all_to_all, and megatron's communication Functions' backwards under the CUDA->CPU mode
    # (the autograd engine runs them without the caller's function modes).
    Patch(
        "megatron.core.transformer.moe.token_dispatcher",
        "maybe_move_tensor_to_cpu",
        "runtime.cpu_compat",
        "split sizes already on the CPU, as numpy when asked",
    ),  # fmt: skip
    *(
        Patch(
            f"megatron.core.tensor_parallel.{owner}",
            "backward",
            "runtime.cpu_compat",
            "the backward allocates on the CPU under the CUDA->CPU mode",
        )  # fmt: skip
        for owner in (
            "mappings:_CopyToModelParallelRegion",
            "mappings:_ReduceFromModelParallelRegion",
            "mappings:_ScatterToModelParallelRegion",
            "mappings:_GatherFromModelParallelRegion",
            "mappings:_ScatterToSequenceParallelRegion",
            "mappings:_GatherFromSequenceParallelRegion",
            "mappings:_ReduceScatterToSequenceParallelRegion",
            "mappings:_AllGatherFromTensorParallelRegion",
            "mappings:_ReduceScatterToTensorParallelRegion",
            "mappings:_AllToAll",
            "layers:LinearWithFrozenWeight",
            "layers:LinearWithGradAccumulationAndAsyncCommunication",
        )
    ),
    # MoE without Transformer Engine: the router's GEMM reads TE's name unconditionally.
    Patch(
        "megatron.core.transformer.moe.moe_utils",
        "te_general_gemm",
        "runtime.distributed",
        "None where TE is absent, which selects the router's torch matmul",
        defines=True,
    ),  # fmt: skip
    # Checkpoint writers: megatron's module-level result queue of its async file writer, made
    # by a Manager that ignores stop signals (runtime.lifetime.start_checkpoint_writer_queue).
    Patch(
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "_results_queue",
        "runtime.lifetime",
        "a writer queue that survives a stop signal",
    ),  # fmt: skip
    # The native rollout engine, per instance and only while it decodes.
    Patch(
        "megatron.core.transformer.attention:Attention",
        "_adjust_key_value_for_inference",
        "rl.rollout.kv_cache",
        "cache keys after RoPE, not before",
    ),  # fmt: skip
    Patch(
        "megatron.core.transformer.dot_product_attention:DotProductAttention",
        "forward",
        "rl.rollout.kv_cache",
        "attend per query group without repeating K/V",
    ),  # fmt: skip
    Patch(
        "megatron.core.transformer.transformer_layer:TransformerLayer",
        "forward",
        "rl.rollout.decode_layer",
        "a decode step without the training bookkeeping",
    ),  # fmt: skip
    Patch(
        "megatron.core.tensor_parallel.layers:ColumnParallelLinear",
        "forward",
        "rl.rollout.native",
        "TP=1 without the TP machinery, tiled matmul",
    ),  # fmt: skip
    Patch(
        "megatron.core.tensor_parallel.layers:RowParallelLinear",
        "forward",
        "rl.rollout.native",
        "TP=1 without the TP machinery, tiled matmul",
    ),  # fmt: skip
)

RELIED_ON: tuple[tuple[str, str], ...] = (
    # Internals the patched code calls or clears: (owner, attribute), as in PATCHES.
    ("megatron.core.transformer.attention", "_yarn_get_concentration_factor_from_config"),
    ("megatron.core.transformer.attention:Attention", "get_query_key_value_tensors"),
    ("megatron.core.models.common.embeddings.rope_utils", "apply_rotary_pos_emb"),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding:RotaryEmbedding", "forward"),
    ("megatron.core.transformer.utils", "set_model_to_sequence_parallel"),
    ("megatron.core.inference.contexts", "StaticInferenceContext"),
    # Reads te_general_gemm (a ``defines`` patch above) and falls back to torch when None.
    ("megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction", "forward"),
    ("megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction", "backward"),
)


def resolve(owner: str):
    """The module or class ``owner`` names (``package.module`` or ``package.module:Class``)."""
    module_name, _, class_name = owner.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name) if class_name else module


def megatron_version() -> str:
    return importlib.metadata.version("megatron-core")


def check_version(version: str) -> None:
    """Raises ImportError when ``version`` of megatron-core lies outside :data:`TESTED_RANGE`."""
    from packaging.specifiers import SpecifierSet

    if version not in SpecifierSet(TESTED_RANGE):
        raise ImportError(
            f"megatron-core {version} is outside the tested range {TESTED_RANGE}: this package "
            "replaces some of its internals (runtime/mcore_compat.py lists them); install "
            f"'megatron-core{TESTED_RANGE}'"
        )


def _defines(owner, name: str) -> bool:
    """Whether ``owner`` has ``name``; for a class, defined by the class or a megatron base (a
    ``forward`` inherited from ``torch.nn.Module`` is not the method the patch replaces)."""
    if not isinstance(owner, type):
        return hasattr(owner, name)
    return any(name in vars(k) for k in owner.__mro__ if k.__module__.startswith("megatron."))


def missing_attributes() -> list[str]:
    """``owner.name`` of every patched or relied-on attribute that does not exist."""
    missing = []
    targets = [(p.owner, p.name) for p in PATCHES if not p.defines] + list(RELIED_ON)
    for owner, name in targets:
        try:
            found = _defines(resolve(owner), name)
        except (ImportError, AttributeError):
            found = False
        if not found:
            missing.append(f"{owner}.{name}")
    return missing


def check() -> None:
    """The import-time check: the version range, then every attribute. Raises ImportError."""
    check_version(megatron_version())
    missing = missing_attributes()
    if missing:
        raise ImportError(
            f"megatron-core {megatron_version()} lacks {', '.join(missing)}, which "
            "runtime/mcore_compat.py patches or relies on; install "
            f"'megatron-core{TESTED_RANGE}'"
        )


def _registered(owner: str, name: str) -> Patch:
    for patch in PATCHES:
        if patch.owner == owner and patch.name == name:
            return patch
    raise AssertionError(f"{owner}.{name} is patched but not registered in mcore_compat.PATCHES")


def _owner_name(target: types.ModuleType | type) -> str:
    if isinstance(target, type):
        return f"{target.__module__}:{target.__qualname__}"
    return target.__name__


def replace_global(target: types.ModuleType | type, name: str, value) -> None:
    """Sets ``target.name`` to ``value`` (a registered patch, process-wide): a module global,
    or an attribute of a class (``package.module:Class`` in :data:`PATCHES`)."""
    _registered(_owner_name(target), name)
    setattr(target, name, value)


@functools.cache
def _method_owners(name: str) -> tuple[type, ...]:
    return tuple(resolve(p.owner) for p in PATCHES if ":" in p.owner and p.name == name)


@contextlib.contextmanager
def patched_methods(modules: list, name: str, pick: Callable) -> Iterator[None]:
    """Inside it, each of ``modules`` has ``pick(module)`` bound as its method ``name`` (an
    instance attribute shadowing the class's); outside it, the class's method is back. Each
    module must be an instance of a class registered for ``name`` in :data:`PATCHES`."""
    owners = _method_owners(name)
    for module in modules:
        if not isinstance(module, owners):
            raise AssertionError(
                f"{type(module).__name__}.{name} is patched but not registered in "
                "mcore_compat.PATCHES"
            )
    for module in modules:
        setattr(module, name, types.MethodType(pick(module), module))
    try:
        yield
    finally:
        for module in modules:
            delattr(module, name)


check()
