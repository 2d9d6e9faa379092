"""Colocated vLLM rollout engine: vLLM shares each GPU with the megatron trainer.

Design (the pattern of verl's megatron hybrid engine and TRL's colocate mode):

* Every training rank builds one ``vllm.LLM`` with ``distributed_executor_backend=
  "external_launcher"``: no worker processes, vLLM joins the torch.distributed world torchrun /
  srun made. vLLM groups consecutive ranks into its TP groups, which are megatron's TP groups in
  megatron's default rank order (checked at start); the other dimensions (DP, CP, PP) become
  independent vLLM replicas, each holding the whole model at the training TP.
* The engine is built from the run's HF folder (``model.hf_path`` or the preset) with
  ``load_format="dummy"``: only ``config.json`` is read. The first :meth:`VLLMEngine.wake` refits
  every tensor from the trainer, so vLLM always generates with the trainer's weights (the SFT
  checkpoint the run loaded, then each RL step's update).
* ``enable_sleep_mode``: :meth:`VLLMEngine.sleep` (``llm.sleep(level=1)``) moves vLLM's
  weights to pinned CPU memory and frees its KV cache while megatron trains; :meth:`wake`
  brings the weights back (``wake_up(tags=["weights"])``), loads the changed tensors, then
  allocates the KV cache (``wake_up(tags=["kv_cache"])``) and resets the prefix cache. Level 1
  keeps the previous weights, which is what makes partial refits valid; it costs one TP shard
  of the model in host memory per rank.
* Refit: :mod:`rl.rollout.refit` produces Hugging Face-layout tensors from the live megatron
  chunk and drops those that did not change since the last refit; the rest go to
  ``model.load_weights`` on the in-process vLLM worker through ``llm.collective_rpc``, one
  tensor at a time (peak extra memory: one full tensor).

Allocator and environment (checked against vLLM 0.10.2, the ``vllm`` extra's range):

* sleep mode allocates through a CUDA memory pool, and vLLM 0.10.x's ``CuMemAllocator.__init__``
  asserts that ``PYTORCH_CUDA_ALLOC_CONF`` does not hold ``expandable_segments:True``
  (``vllm/device_allocator/cumem.py`` ~145-150). The launch scripts set it for the trainer, so
  the engine is built with it switched off (environment and allocator), and each
  :meth:`VLLMEngine.wake` (weights back, refit, KV cache back) runs with it off and switches it
  back on afterwards, as verl does around its rollout mode (volcengine/verl @b178a3cd,
  ``verl/workers/megatron_workers.py`` ``rollout_mode`` ~677-737, with
  ``verl/utils/device.py`` ``set_expandable_segments`` ~128-142);
* before waking, Python garbage and PyTorch's cached blocks are freed (``gc.collect()`` then
  ``torch.cuda.empty_cache()``), so the memory vLLM re-maps is really free;
* ``VLLM_ENABLE_V1_MULTIPROCESSING`` is forced to 0 (the engine core must run in this process
  for ``external_launcher``; an inherited 1 would otherwise win over a default);
* stop strings: vLLM detokenizes (the tokenizer is the run's) and stops with its own stop
  checker; ``include_stop_str_in_output`` keeps the string in the text the reward scores
  (``rl.rollout.stops`` has the semantics the native engine reproduces).

vLLM is imported only here and only when ``rl.engine=vllm``; the refit's tensor iterator and
change detection are pure torch + megatron and tested on CPU (tests/rl/test_vllm_engine.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_longact.models.hf_config import HFArchitecture
from megatron_longact.rl.rollout.refit import ChangeTracker, RefitStats, iter_hf_tensors_from_model
from megatron_longact.rl.rollout.types import Rollout, SamplingParams

INSTALL_HINT = "pip install -e '.[vllm]'"
SLEEP_LEVEL = 1
"""1: weights to CPU, KV cache freed; the CPU copy is what partial refits update."""
GPU_MEMORY_UTILIZATION = 0.5
"""Fraction of each GPU vLLM may take for weights + KV cache; the rest stays with megatron."""


def import_vllm():
    """The ``vllm`` module, or a ValueError saying how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise ValueError(
            f"rl.engine=vllm needs vLLM: {INSTALL_HINT} (or set rl.engine=native)"
        ) from err
    return vllm


def check_tp_group(tp_ranks: list[int], *, rank: int) -> None:
    """vLLM's external launcher puts rank r in TP group [r - r % T, ... + T); megatron's TP
    group of r must be the same ranks (true for megatron's default order tp-cp-ep-dp-pp)."""
    tp = len(tp_ranks)
    expected = list(range(rank - rank % tp, rank - rank % tp + tp))
    if sorted(tp_ranks) != expected:
        raise ValueError(
            f"rank {rank}: megatron's TP group is {sorted(tp_ranks)} but vLLM (external_launcher) "
            f"would use {expected}; rl.engine=vllm needs consecutive TP ranks (megatron's default "
            "rank order)"
        )


EXPANDABLE_ON = "expandable_segments:True"
EXPANDABLE_OFF = "expandable_segments:False"


def without_expandable_segments(conf: str) -> str:
    """``PYTORCH_CUDA_ALLOC_CONF`` with ``expandable_segments:True`` switched off (other options
    kept), the value vLLM's sleep-mode allocator accepts."""
    return conf.replace(EXPANDABLE_ON, EXPANDABLE_OFF)


@contextlib.contextmanager
def expandable_segments_off(*, restore: bool) -> Iterator[None]:
    """The CUDA caching allocator without expandable segments for the block; ``restore``: turn
    them back on after (the trainer asked for them). verl's ``set_expandable_segments``."""
    if restore and torch.cuda.is_available():
        torch.cuda.memory._set_allocator_settings(EXPANDABLE_OFF)
    try:
        yield
    finally:
        if restore and torch.cuda.is_available():
            torch.cuda.memory._set_allocator_settings(EXPANDABLE_ON)


def free_cached_memory() -> None:
    """Drops Python garbage, then PyTorch's cached CUDA blocks (what verl does before waking)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def request_seed(seed: int, index: int) -> int:
    """Seed of request ``index`` in a batch sampled with ``SamplingParams.seed``: distinct per
    request (16 rollouts of one prompt must differ), the same on every TP rank."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


def vllm_sampling_kwargs(params: SamplingParams, *, index: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for request ``index``; ``logprobs=0`` returns
    the sampled token's log-probability."""
    kwargs = dict(
        n=1,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_new_tokens,
        stop_token_ids=list(params.stop_token_ids),
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


def _load_weights_on_worker(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Runs inside the (in-process) vLLM worker: the model copies each HF tensor into its
    fused, TP-sharded parameters."""
    worker.model_runner.model.load_weights(weights=weights)


class VLLMEngine:
    """The :class:`RolloutEngine` on a colocated vLLM (see the module docstring).

    Build with :meth:`from_train_state` on every rank; ``generate``/``sleep``/``wake`` are
    collective over the vLLM TP group (wake over the whole model-parallel group).
    """

    def __init__(self, llm, *, model: list, arch: HFArchitecture) -> None:
        self.llm = llm
        self.model = model
        self.arch = arch
        self.tracker = ChangeTracker()
        self.last_refit = RefitStats()
        self._awake = True
        self.trainer_expandable = False
        """The launch environment asked for expandable segments: on again outside wake()."""

    @classmethod
    def from_train_state(cls, job, state, tokenizer) -> VLLMEngine:
        """Starts vLLM for ``job`` next to the trainer ``state`` and puts it to sleep. All
        ranks must call it after torch.distributed and megatron are initialised.

        Raises:
            ValueError: vLLM missing (names ``rl.engine`` and the install command), no CUDA,
                or a rank order vLLM cannot share.
        """
        vllm = import_vllm()
        if not torch.cuda.is_available():
            raise ValueError("rl.engine=vllm needs CUDA GPUs; use rl.engine=native on CPU")
        from megatron.core import parallel_state

        from megatron_longact.models.hf_config import resolve_model_dir

        check_tp_group(
            dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group()),
            rank=dist.get_rank(),
        )
        from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR

        model_dir = resolve_model_dir(hf_path=job.model.hf_path, preset=job.model.preset)
        # external_launcher runs the engine core in this process (vLLM 0.10.2 sets this itself,
        # config/parallel.py ~345; older 0.10.x read it): force it over an inherited 1.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        # The sleep-mode allocator asserts on this variable when it is created (module
        # docstring); the trainer gets expandable segments back outside wake().
        trainer_expandable = EXPANDABLE_ON in conf
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = without_expandable_segments(conf)
        tokenizer_dir = job.data.tokenizer_path or str(TINY_TOKENIZER_DIR)
        kwargs = dict(
            model=str(model_dir),
            load_format="dummy",  # the first wake() refits every tensor from the trainer
            # Prompts arrive as token ids; the tokenizer is only for stop strings.
            tokenizer=tokenizer_dir,
            skip_tokenizer_init=not job.rl.stop_strings,
            dtype="bfloat16" if state.transformer_config.bf16 else "float32",
            tensor_parallel_size=job.parallel.tensor_model_parallel_size,
            distributed_executor_backend="external_launcher",
            enable_sleep_mode=True,
            enable_prefix_caching=True,  # the rollouts of a prompt share its long context
            max_model_len=job.rl.max_seq_length,
            gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
            disable_custom_all_reduce=True,  # its IPC buffers do not mix with the trainer's
            seed=job.rl.seed,
        )
        if "logprobs_mode" in {f.name for f in dataclasses.fields(vllm.EngineArgs)}:
            # vLLM V1 reports raw (temperature-free) log-probs by default; the Rollout contract
            # is log-probs at the sampling temperature.
            kwargs["logprobs_mode"] = "processed_logprobs"
        with expandable_segments_off(restore=trainer_expandable):
            engine = cls(vllm.LLM(**kwargs), model=state.model, arch=state.arch)
        engine.trainer_expandable = trainer_expandable
        engine.sleep()
        return engine

    def sleep(self) -> None:
        """Weights to CPU, KV cache freed: the GPU is megatron's until :meth:`wake`."""
        if self._awake:
            self.llm.sleep(level=SLEEP_LEVEL)
            torch.cuda.empty_cache()
            self._awake = False

    def wake(self) -> None:
        """Weights back on the GPU, refitted from the trainer; then the KV cache. Collective
        over the model-parallel group (the refit gathers and broadcasts)."""
        if self._awake:
            return
        with expandable_segments_off(restore=self.trainer_expandable):
            free_cached_memory()  # the trainer's cached blocks go back to the driver first
            self.llm.wake_up(tags=["weights"])
            self.last_refit = self.refit()
            free_cached_memory()  # the refit's temporaries, before the KV cache is mapped
            self.llm.wake_up(tags=["kv_cache"])
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self._awake = True

    def refit(self) -> RefitStats:
        """Loads the tensors that changed since the last refit (all of them the first time)."""
        tic = time.perf_counter()
        stats = RefitStats()
        tensors = self.tracker.changed(
            iter_hf_tensors_from_model(self.model, arch=self.arch), stats=stats
        )
        self.llm.collective_rpc(_load_weights_on_worker, args=(tensors,))
        torch.cuda.synchronize()
        stats.seconds = time.perf_counter() - tic
        return stats

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """One response per prompt, in input order; request i samples with seed
        :func:`request_seed` (params.seed, i)."""
        vllm = import_vllm()
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        sampling = [
            vllm.SamplingParams(**vllm_sampling_kwargs(params, index=i))
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        with_text = bool(params.stop_strings)
        return [to_rollout(p, out.outputs[0], with_text=with_text)
                for p, out in zip(prompts, outputs)]  # fmt: skip

    def metrics(self) -> dict[str, float]:
        """The last refit's numbers (``refit/*``), for the step's log."""
        return self.last_refit.metrics()
