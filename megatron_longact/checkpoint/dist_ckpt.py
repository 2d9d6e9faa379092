"""Sharded checkpoints with megatron ``dist_checkpointing``, saved atomically.

Layout of ``save_dir``::

    latest                 text: the name of the newest complete checkpoint ("iter_0000100")
    iter_0000100/          megatron torch_dist checkpoint (model, optimizer, common state)
        rng/rank00003.pt   this rank's RNG states (restored only at the same layout)
        config.yaml        the run's config, for humans and tools
        checksums.json     size and CRC-32 of every other file (see integrity.py)

A save writes into ``iter_XXXXXXX.tmp``; all ranks meet at a barrier; the ranks hash the files
into ``checksums.json``; rank 0 renames the folder and then replaces ``latest``
(write-then-rename). A crash or a full disk at any point leaves the previous ``latest`` and its
directory untouched. Every load verifies the checksums first; ``checkpoint.on_corrupt``
decides between failing and falling back to the previous good checkpoint. What is
reshardable: model weights load at any TP/PP/VPP/EP (megatron sharded tensors under global
layer numbers; virtual pipeline chunks are saved as ``model0``, ``model1``...); the distributed
optimizer is saved ``dp_reshardable`` (its CPU-capable format, see docs), so optimizer state
carries over when only DP changes; at another TP/PP/VPP (or EP/ETP for an MoE model) the
optimizer restarts from fresh moments with a warning.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_longact.checkpoint.integrity import corrupt_error, verify_checkpoint, write_manifest
from megatron_longact.device import current_device, on_cuda
from megatron_longact.errors import UserError

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
OPTIMIZER_SHARDING = "dp_reshardable"
CHECKPOINT_NAME = re.compile(r"iter_\d{7}")
OPTIMIZER_KEY = re.compile(r"(chained_\d+\.)?optimizer\.")
# Parallel sizes that fix how the distributed optimizer's dp_reshardable state is cut: its
# buckets follow the model's TP/PP shards, and for an MoE model the expert optimizer's also the
# EP/ETP split (its keys carry the rank in the expert TP x EP x PP group, its shards the
# expert-DP rank: megatron/core/optimizer/__init__.py ~666-680). A dense model has no experts,
# whatever ETP says.
DENSE_OPTIMIZER_LAYOUT = ("tp", "pp", "vpp")
MOE_OPTIMIZER_LAYOUT = ("tp", "pp", "vpp", "ep", "etp")
# errno values of a write that ran out of room: disk full, file-size limit (ulimit -f), quota.
NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# What a failed read or write raises: torch DCP's CheckpointException (megatron re-raises the
# ranks' errors in one) derives from BaseException, not Exception.
IO_FAILURES = (Exception, CheckpointException)


@dataclass(frozen=True, kw_only=True)
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored."""

    path: Path
    step: int
    progress: dict
    extra: dict
    optimizer_restored: bool


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The directory ``save_dir/latest`` points at, or None when there is no complete save.

    Accepts a checkpoint directory itself too (one holding ``metadata.json``).

    Raises:
        ValueError: ``latest`` names something other than an ``iter_*`` folder directly inside
            ``save_dir`` (e.g. another run's checkpoint), or an incomplete checkpoint.
    """
    root = Path(save_dir)
    if (root / "metadata.json").is_file():
        return root
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except UnicodeDecodeError:
        name = "<binary data>"
    target = root / name
    # A run resumes only its own saves: a pointer into another run's folder (absolute, "..",
    # a symlinked iter_* folder) would silently continue someone else's trajectory.
    inside = CHECKPOINT_NAME.fullmatch(name) and target.resolve().parent == root.resolve()
    if not inside:
        raise UserError(
            f"{pointer} names {name!r}, which is not an iter_* folder inside {root}; a "
            "checkpoint.save_dir resumes only its own saves: write the name of one of its "
            "iter_* folders into it, or delete it to start fresh (checkpoint.load_dir loads "
            "another run's weights)"
        )
    if not (target / "metadata.json").is_file():
        raise UserError(
            f"{pointer} names {target.name}, which is not a complete checkpoint; restore the "
            "directory or point 'latest' at an older iter_* folder"
        )
    return target


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    layout = {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
    }
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp is not None and vpp > 1:  # absent without virtual stages: older saves compare equal
        layout["vpp"] = vpp
    return layout


def _saved_layout(common: dict) -> dict[str, int]:
    """The layout a checkpoint was saved at; saves from before expert parallel lack ``ep``
    and ``etp``, which were 1 and TP (megatron's default expert TP size) then."""
    saved = dict(common.get("layout", {}))
    saved.setdefault("ep", 1)
    if "tp" in saved:
        saved.setdefault("etp", saved["tp"])
    return saved


def _has_optimizer_state(ckpt: Path) -> bool:
    """Whether ``ckpt`` holds optimizer state. A single (distributed) optimizer's keys start
    with ``optimizer.``; megatron's ChainedOptimizer (dense + expert optimizers of an MoE
    model, ``optimizer/__init__.py`` ~600-686) prefixes its members' keys with
    ``chained_<i>.`` (``optimizer.py`` ~1184-1213)."""
    return any(OPTIMIZER_KEY.match(k) for k in _saved_keys(ckpt))


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if on_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and on_cuda():
        torch.cuda.set_rng_state(state["cuda"])


def _model_sharded_state_dict(chunk) -> dict:
    # Checkpoint keys are those of the DDP-wrapped model ("module.decoder..."); a bare
    # GPTModel (reference policy, inference) gets the same keys through the prefix.
    if hasattr(chunk, "module"):
        return chunk.sharded_state_dict()
    return chunk.sharded_state_dict(prefix="module.")


def _load_model_state(chunk, state: dict) -> None:
    from megatron_longact.models.gpt import unwrap_gpt

    def bare(key: str) -> str:
        while key.startswith("module."):
            key = key[len("module.") :]
        return key

    # The checkpoint's keys carry the wrappers' "module." prefixes, which megatron's wrapper
    # load_state_dict would pass on unchanged (and non-strict loading would then silently skip
    # every tensor); load into the bare GPTModel and check nothing is missing.
    state = {bare(k): v for k, v in state.items()}
    result = unwrap_gpt(chunk).load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise UserError(f"checkpoint lacks model tensors {missing[:5]}... ({len(missing)})")


def _model_keys(model: list) -> list[str]:
    """The checkpoint key of each model chunk: ``model`` for one, ``model0``, ``model1``... for
    virtual pipeline stages, as Megatron-LM names them (megatron/training/checkpointing.py
    ~1576-1580 at d98e8a6). The tensors inside carry global layer numbers whatever the chunk
    (megatron's TransformerBlock.sharded_state_dict offsets them), so weights load across
    VPP settings; the optimizer's buffer layout does not (see :func:`_layout`)."""
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _model_sharded_states(model: list) -> dict:
    """``{chunk key: sharded state dict}`` of every model chunk (:func:`_model_keys`)."""
    return {key: _model_sharded_state_dict(chunk) for key, chunk in zip(_model_keys(model), model)}


def _sharded_state(model: list, optimizer, *, with_optimizer: bool, is_loading: bool) -> dict:
    state = _model_sharded_states(model)
    if with_optimizer:
        # The optimizer finds each parameter's sharded tensor anywhere in what it is given:
        # one chunk's dict (as before virtual stages), or all chunks' as Megatron-LM passes.
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"] if len(model) == 1 else dict(state),
            is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING},
        )
    return state


def save_checkpoint(
    save_dir: str | Path,
    *,
    step: int,
    model: list,
    optimizer=None,
    scheduler=None,
    progress: dict | None = None,
    extra: dict | None = None,
    config_yaml: str | None = None,
    keep_last: int = 2,
) -> Path:
    """Saves model, optimizer, scheduler, RNG, ``progress`` and ``extra`` for ``step``.

    ``extra`` holds small picklable state that is identical on all ranks (e.g. LongAct's
    saliency and masks, the RL data cursor). ``optimizer``/``scheduler`` None saves weights
    only (e.g. a converted Hugging Face model). All ranks must call it (collective).
    Returns the final checkpoint directory.

    Raises:
        OSError: (errno ENOSPC) the filesystem ran out of room (disk full, quota, file-size
            limit); the half-written folder is removed and ``latest`` keeps naming the
            previous save.
    """
    from megatron.core import dist_checkpointing

    root = Path(save_dir)
    final = root / checkpoint_name(step)
    tmp = root / (checkpoint_name(step) + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.tmp"):  # left by a save that crashed midway
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state(model, optimizer, with_optimizer=optimizer is not None, is_loading=False)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["progress"] = dict(progress or {}, step=step)
    state["layout"] = _layout()
    state["extra"] = extra or {}
    try:
        dist_checkpointing.save(state, str(tmp))
        # After megatron's save: it warns about any folder it finds non-empty.
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank{rank:05d}.pt")
        if rank == 0 and config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        failure = None
    except IO_FAILURES as err:  # every rank must learn of any rank's failure
        failure = err
    _raise_if_any_failed(failure, tmp=tmp, root=root)
    dist.barrier()
    write_manifest(tmp)
    dist.barrier()
    if rank == 0:
        if final.exists():  # a re-save of the same step (e.g. after a requeue)
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / (LATEST_FILE + ".tmp")
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, root / LATEST_FILE)
        _prune(root, keep_last=keep_last, keep=final.name)
    dist.barrier()
    return final


def _no_room(err: BaseException) -> bool:
    """Whether ``err`` (or an error it wraps) is a write that ran out of room."""
    seen = set()
    pending = [err]
    while pending:
        err = pending.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_ROOM_ERRNOS:
            return True
        if isinstance(err, CheckpointException):  # {rank: (exception, traceback)}
            failed = err.failures.values()
            pending += [f[0] if isinstance(f, tuple) else f for f in failed]
        else:
            text = str(err)
            # torch.save's C++ writer reports a short write as "unexpected pos N vs M", and
            # megatron's writer processes send back the message of the OSError they hit.
            if any(s in text for s in ("unexpected pos", "No space left", "File too large")):
                return True
        pending += [err.__cause__, err.__context__]
    return False


def _raise_if_any_failed(failure: BaseException | None, *, tmp: Path, root: Path) -> None:
    """After every rank's writes: when any failed, all ranks remove the half-written folder
    and raise (a one-line OSError naming ENOSPC for a full disk). Collective."""
    flag = torch.tensor([0 if failure is None else 2 if _no_room(failure) else 1])
    flag = flag.to(current_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    code = int(flag.item())
    if code == 0:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = (root / LATEST_FILE).read_text().strip() if (root / LATEST_FILE).is_file() else None
    kept = f"{root / LATEST_FILE} still names {previous}" if previous else "no earlier save exists"
    if code == 2:
        raise OSError(
            errno.ENOSPC,
            f"no space left on device (ENOSPC) writing checkpoint {tmp.name[:-4]} into {root}; "
            f"the partial save was removed and {kept}; free space (or raise the quota) or set "
            "checkpoint.save_dir to a larger filesystem, then resume",
        )
    if failure is not None:
        raise failure
    raise RuntimeError(f"another rank failed writing checkpoint {tmp} ({kept}); see its log")


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    """Puts the saved Adam step count back into torch Adam's per-parameter state.

    megatron 0.16 without TE/Apex keeps the step in ``param_groups`` of the saved state, but
    its dp_reshardable load leaves torch's per-parameter ``state['step']`` at the dummy
    initialisation's 1, so bias correction would restart. Measured on CPU; harmless where the
    count is already right.
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    saved = loaded if isinstance(loaded, list) else [loaded] if len(inners) == 1 else None
    if saved is None:  # ChainedOptimizer saves a dict keyed by index
        saved = [loaded[i] for i in range(len(inners))]
    for inner, state in zip(inners, saved):
        steps = {g["step"] for g in state["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for param_state in inner.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = torch.tensor(step, dtype=torch.float32)


def _saved_keys(ckpt: Path) -> set[str]:
    from megatron.core import dist_checkpointing

    return set(dist_checkpointing.load_tensors_metadata(str(ckpt)).keys())


def _prune(root: Path, *, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: str | Path,
    *,
    model: list,
    optimizer=None,
    scheduler=None,
    weights_only: bool = False,
    verify: bool = True,
) -> LoadedCheckpoint:
    """Loads a checkpoint directory (or a ``save_dir`` with ``latest``) into the live objects.

    ``weights_only``: model weights only (a fine-tuning start: fresh optimizer, scheduler and
    step). Otherwise restores optimizer (when the TP/PP layout matches), scheduler, progress and
    RNG (when the whole layout matches). ``verify``: check the files' checksums first (False
    only when the caller just did). All ranks must call it (collective).

    Raises:
        FileNotFoundError: naming ``path`` when it holds no complete checkpoint.
        CheckpointCorruptError: (a ValueError) a file is missing, truncated or fails its
            checksum; the message names the checkpoint and the file.
        ValueError: the checkpoint holds another model (names a tensor and both shapes), or
            cannot be read.
    """
    from megatron.core import dist_checkpointing

    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(
            f"{path}: no checkpoint (no 'latest' file and no metadata.json); check "
            "checkpoint.load_dir / checkpoint.save_dir"
        )
    if verify and (problem := verify_checkpoint(ckpt)) is not None:
        raise corrupt_error(ckpt, problem)
    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except IO_FAILURES as err:  # megatron raises anything from a missing file on
        raise _unreadable(ckpt, "common.pt", err) from err
    if not isinstance(common, dict):
        raise _unreadable(ckpt, "common.pt", TypeError(type(common).__name__))
    saved_layout = _saved_layout(common)
    layout = _layout()
    # Virtual stages change each DDP grad buffer's parameter order, so the dp_reshardable
    # optimizer state follows VPP too (absent from both layouts without virtual stages).
    sizes = _optimizer_layout(model)
    same_model_layout = all(saved_layout.get(k) == layout.get(k) for k in sizes)
    has_optimizer = _has_optimizer_state(ckpt)
    with_optimizer = (
        not weights_only and optimizer is not None and same_model_layout and has_optimizer
    )
    if not weights_only and optimizer is not None and has_optimizer and not same_model_layout:
        logger.warning(
            "%s was saved at %s; loading at %s: model weights only, the optimizer restarts "
            "with fresh Adam moments",
            ckpt,
            _describe(saved_layout, sizes),
            _describe(layout, sizes),
        )
    if with_optimizer:
        # dp_reshardable loading fills existing Adam state tensors in place, so they must
        # exist first; the dummy step's effects are all overwritten by the load below.
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            inner._init_optimizer_states_with_dummy_values()
    template = _sharded_state(model, optimizer, with_optimizer=with_optimizer, is_loading=True)
    for key in _model_keys(model):
        _check_same_model(ckpt, template[key])
    try:
        loaded = dist_checkpointing.load(template, str(ckpt))
    except IO_FAILURES as err:  # EOFError, pickle and reader errors alike
        raise _unreadable(ckpt, "its tensor shards", err) from err
    for key, chunk in zip(_model_keys(model), model):
        _load_model_state(chunk, loaded[key])
    if with_optimizer:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    elif optimizer is not None:
        # The optimizer copied the construction-time weights into its fp32 masters; without
        # this the first step writes them back over the loaded weights (bf16). As Megatron-LM's
        # load_checkpoint does when the optimizer is not loaded (megatron/training/
        # checkpointing.py ~3056-3060 at d98e8a6).
        optimizer.reload_model_params()
    progress = dict(common.get("progress", {}))
    if weights_only:
        return LoadedCheckpoint(
            path=ckpt, step=0, progress={}, extra=common.get("extra", {}), optimizer_restored=False
        )
    if scheduler is not None and common.get("scheduler") is not None:
        scheduler.load_state_dict(common["scheduler"])
    rng_file = ckpt / "rng" / f"rank{dist.get_rank():05d}.pt"
    if saved_layout == layout and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return LoadedCheckpoint(
        path=ckpt,
        step=int(progress.get("step", 0)),
        progress=progress,
        extra=common.get("extra", {}),
        optimizer_restored=with_optimizer,
    )


def _optimizer_layout(model: list) -> tuple[str, ...]:
    from megatron_longact.models.gpt import unwrap_gpt

    has_experts = getattr(unwrap_gpt(model[0]).config, "num_moe_experts", None)
    return MOE_OPTIMIZER_LAYOUT if has_experts else DENSE_OPTIMIZER_LAYOUT


def _describe(layout: dict[str, int], sizes: tuple[str, ...]) -> str:
    return " ".join(f"{k.upper()}={layout.get(k, 1)}" for k in sizes)  # no vpp: 1


def _unreadable(ckpt: Path, what: str, err: BaseException) -> UserError:
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    return UserError(
        f"checkpoint {ckpt}: cannot read {what} ({type(err).__name__}: {first_line}); the "
        "folder is incomplete or corrupt (a save from an older version without checksums?): "
        "restore it or point 'latest' at an older iter_* folder"
    )


def _check_same_model(ckpt: Path, model_template: dict) -> None:
    """Raises a one-line ValueError when the checkpoint holds a model of another shape.

    megatron would fail deep inside the load with "Global shape mismatch" (53 lines); the
    saved global shapes are in the checkpoint's metadata (``load_tensors_metadata``).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
    for item in model_template.values():
        if not isinstance(item, ShardedTensor):
            continue  # factories and objects: their plain tensors are checked through others
        if item.key not in saved:
            raise UserError(
                f"checkpoint {ckpt} has no tensor {item.key}: it holds another architecture; "
                "point checkpoint.load_dir/save_dir at a checkpoint of this model "
                "(model.preset / model.hf_path)"
            )
        shape = tuple(saved[item.key].global_shape)
        if shape != tuple(item.global_shape):
            raise UserError(
                f"checkpoint {ckpt} holds a model of another size: {item.key} is "
                f"{list(shape)} there, {list(item.global_shape)} in this model; point "
                "checkpoint.load_dir/save_dir at a checkpoint of this model, or set "
                "model.preset / model.hf_path to the model it was saved from"
            )


def _candidates(save_dir: str | Path) -> list[Path]:
    """``latest`` first, then the older complete ``iter_*`` folders, newest first."""
    first = latest_checkpoint(save_dir)
    if first is None:
        return []
    root = Path(save_dir)
    older = sorted(
        (p for p in root.glob("iter_*") if CHECKPOINT_NAME.fullmatch(p.name)),
        reverse=True,
    )
    return [first] + [p for p in older if p.name < first.name and (p / "metadata.json").is_file()]


def verified_checkpoint(save_dir: str | Path, *, on_corrupt: str = "fail") -> Path | None:
    """The checkpoint to resume from: ``latest`` when its files verify; with ``on_corrupt``
    ``previous``, else the newest older one that verifies (with a warning). None when there
    is none. All ranks must call it (collective).

    Raises:
        CheckpointCorruptError: ``latest`` is corrupt and ``on_corrupt`` is ``fail``, or no
            checkpoint verifies.
    """
    first_error = None
    for ckpt in _candidates(save_dir):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            if first_error is not None:
                logger.warning("resuming from %s instead (checkpoint.on_corrupt=previous)", ckpt)
            return ckpt
        error = corrupt_error(ckpt, problem)
        if on_corrupt != "previous":
            raise error
        logger.warning("checkpoint %s is corrupt: %s; trying an older one", ckpt, problem)
        first_error = first_error or error
    if first_error is not None:
        raise first_error
    return None


def resume_or_load(
    *,
    save_dir: str | None,
    load_dir: str | None,
    load_weights_only: bool,
    model: list,
    optimizer,
    scheduler,
    on_corrupt: str = "fail",
) -> LoadedCheckpoint | None:
    """Start-of-run policy: resume ``save_dir``'s latest if any, else load ``load_dir``.

    Resuming restores everything (the run continues its exact trajectory); loading
    ``load_dir`` takes weights only when ``load_weights_only`` (e.g. SFT -> RL). Returns None
    for a fresh start. ``on_corrupt`` (``checkpoint.on_corrupt``): ``previous`` resumes from
    an older good save of ``save_dir`` when ``latest`` fails its checksums. All ranks must
    call it.
    """
    if save_dir is not None:
        ckpt = verified_checkpoint(save_dir, on_corrupt=on_corrupt)
        if ckpt is not None:
            return load_checkpoint(
                ckpt, model=model, optimizer=optimizer, scheduler=scheduler, verify=False
            )
    if load_dir is not None:
        return load_checkpoint(
            load_dir,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            weights_only=load_weights_only,
        )
    return None


def save_if_due(
    state,
    checkpoint,
    *,
    step: int,
    last_step: int,
    stopping: bool,
    extra: dict | None = None,
    config_yaml: str = "",
) -> None:
    """Saves a :class:`runtime.setup.TrainState` when ``step`` is a save point: every
    ``checkpoint.save_interval`` steps, the last step, or a requested stop. No-op without
    ``checkpoint.save_dir``. All ranks must call it."""
    interval = checkpoint.save_interval
    due = stopping or step == last_step or (interval and step % interval == 0)
    if not checkpoint.save_dir or not due:
        return
    save_checkpoint(
        checkpoint.save_dir,
        step=step,
        model=state.model,
        optimizer=state.optimizer,
        scheduler=state.scheduler,
        progress=state.progress.state_dict(),
        extra=extra,
        config_yaml=config_yaml,
        keep_last=checkpoint.keep_last,
    )
