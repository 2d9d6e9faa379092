"""Run megatron-core on a machine without CUDA (gloo backend; fp32, or bf16 with fp32 masters).

megatron-core assumes a GPU in a few places: it asks ``torch.cuda.current_device()``,
creates tensors with ``device='cuda'``, forks a CUDA RNG tracker, checks
``param.type() == 'torch.cuda.FloatTensor'`` in its optimizers and calls
``torch.cuda.synchronize()``. This module, and only this module, bridges those to the
CPU. :func:`enable` is a no-op when CUDA is available, so GPU runs never see it. The globals
it replaces are registered in ``runtime.mcore_compat`` (the version fence).

What it does, and why each piece is needed:

* a :class:`torch.overrides.TorchFunctionMode` that rewrites ``device='cuda'`` to CPU in
  factory calls, ``Tensor.cuda()``/``.to('cuda')`` to no-ops, and reports CPU tensors as
  ``torch.cuda.*Tensor`` from ``Tensor.type()`` (megatron's optimizer dispatch reads it);
* ``torch.cuda.current_device``/``synchronize``/``empty_cache``/``set_device`` as no-ops, and
  streams as a synchronous stand-in (:class:`_CpuStream`, for the MoE token dispatcher);
* a CPU RNG tracker in place of megatron's ``CudaRNGStatesTracker`` (dropout and init under
  ``get_cuda_rng_tracker().fork()`` draw from seeded CPU generator states), and CPU RNG
  get/set for activation recomputation.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: TorchFunctionMode | None = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare ordinal means a CUDA device in torch APIs


_REENTRANT = (torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad)


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device requests to the CPU for every torch call made under it."""

    def __init__(self, *, inner: bool = False):
        super().__init__()
        self.inner = inner  # already re-entered for a backward call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _REENTRANT and not self.inner:
            # A mode is off inside its own handler; backward runs Python (activation
            # recomputation re-runs megatron's forward), which needs the bridge again.
            with _CudaToCpuMode(inner=True):
                return func(*args, **kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # RoPE's CP slicing pins (rope_utils.py ~62); no allocator
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple(
                "cpu" if (i > 0 and _is_cuda_device(a) and not isinstance(a, int)) else a
                for i, a in enumerate(args)
            )
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` backed by CPU generator states.

    ``fork(name)`` swaps the global CPU RNG state for the named state, runs the block, saves
    the advanced state under ``name`` and restores the caller's state, exactly like the CUDA
    tracker does with the device generator.
    """

    def __init__(self, *_, **__):
        self.reset()

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator().manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        caller_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(caller_state)


def _get_cpu_rng_state(*_args, clone: bool = False, **_kwargs) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_cpu_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    from megatron_longact.runtime.mcore_compat import replace_global

    replace_global(mrandom, "_get_cuda_rng_state", _get_cpu_rng_state)
    replace_global(mrandom, "_set_cuda_rng_state", _set_cpu_rng_state)
    replace_global(mrandom, "CudaRNGStatesTracker", CpuRNGStatesTracker)
    replace_global(mrandom, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker())
    replace_global(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``/``Event`` on the CPU, where work is synchronous.

    megatron's all-to-all MoE token dispatcher makes a side stream for its device-to-host
    copies of the split sizes and waits on an event recorded there
    (``transformer/moe/token_dispatcher.py`` ~444-445 and ~862-900).
    """

    def __init__(self, *_, **__):
        pass

    def wait_stream(self, _stream) -> None:
        pass

    def record_event(self, *_):
        return self

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _CpuStream()


def _patch_torch_cuda() -> None:
    from megatron_longact.runtime.mcore_compat import replace_global

    replace_global(torch.cuda, "Stream", _CpuStream)
    replace_global(torch.cuda, "current_stream", lambda *a, **k: _CPU_STREAM)
    replace_global(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    replace_global(torch.cuda, "current_device", lambda: 0)
    replace_global(torch.cuda, "synchronize", lambda *a, **k: None)
    replace_global(torch.cuda, "empty_cache", lambda: None)
    replace_global(torch.cuda, "set_device", lambda *a, **k: None)
    replace_global(torch.cuda, "manual_seed", lambda seed: None)
    replace_global(torch.cuda, "manual_seed_all", lambda seed: None)
    replace_global(torch.cuda, "get_rng_state", functools.partial(_get_cpu_rng_state))
    replace_global(torch.cuda, "set_rng_state", _set_cpu_rng_state)


def _split_sizes_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's ``maybe_move_tensor_to_cpu`` for tensors that are already on the CPU: the
    all-to-all dispatcher asks for its split sizes ``as_numpy`` (``token_dispatcher.py``
    ~874-882), and gloo's ``all_to_all_single`` takes sequences, not tensors. The stock
    function converts only CUDA tensors (``transformer/moe/moe_utils.py`` ~1069-1099)."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _under_mode(backward):
    """``backward`` of an autograd Function, run under the CUDA->CPU mode."""

    @functools.wraps(backward)
    def wrapped(*args, **kwargs):
        with _CudaToCpuMode(inner=True):
            return backward(*args, **kwargs)

    return staticmethod(wrapped)


def _patch_collective_backwards() -> None:
    """The autograd engine runs ``Function.backward`` without the caller's Python function
    modes, so a backward that allocates on ``torch.cuda.current_device()`` fails on the CPU.
    megatron's communication Functions do (``tensor_parallel/mappings.py``: the all-to-all of
    the MoE dispatcher ~439, the sequence-parallel gathers ~143; ``tensor_parallel/layers.py``
    ~549: the linears' sequence-parallel reduce-scatter); their backwards run under the mode.
    The dense path without SP allocates nothing there (its reduces are in place). Each is a
    registered patch (``runtime.mcore_compat``): one a new release adds is refused until listed."""
    from megatron.core.tensor_parallel import layers, mappings

    from megatron_longact.runtime.mcore_compat import replace_global

    for module in (mappings, layers):
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, torch.autograd.Function)
                and "backward" in vars(value)
                and value.__module__ == module.__name__
            ):
                replace_global(value, "backward", _under_mode(vars(value)["backward"].__func__))


def _patch_moe_dispatcher() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    from megatron_longact.runtime.mcore_compat import replace_global

    replace_global(token_dispatcher, "maybe_move_tensor_to_cpu", _split_sizes_to_host)


def enable() -> bool:
    """Turn the CPU bridge on if CUDA is absent; idempotent. Returns True when active.

    Call once per process before building megatron objects. Every rank must call it (it
    is process-local; no collectives).
    """
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    _patch_torch_cuda()
    _patch_rng()
    _patch_moe_dispatcher()
    _patch_collective_backwards()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
    return True


@contextlib.contextmanager
def suspended():
    """Runs the block outside the CUDA->CPU function mode (a no-op where the bridge is off).

    For hot loops of small torch calls that make no CUDA requests (the native rollout engine's
    decode steps), where the mode's Python dispatch on every call costs more than the kernels.
    Process-local; the mode is back on exit.
    """
    if _MODE is None:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()
