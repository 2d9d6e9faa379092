"""Per-GPU memory estimate of a layout: model state, activations, logits, rollout KV cache.

Model state follows megatron-core's mixed-precision distributed optimizer: bf16 weights, fp32
main grads in the DDP grad buffer (not sharded: the buffer is reduce-scattered in place), and
fp32 master weights + Adam m and v sharded over the data-parallel group *including CP ranks*
(megatron builds the optimizer over ``intra_dp_cp_group``).

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv:2205.05198): the tensors each layer keeps for backward, split over
TP inside the TP region and over TP in the norm/residual region only with sequence parallel,
re-derived for a Qwen3 layer (RMSNorm, Q/K norm, GQA, SwiGLU, no dropout, flash attention) and
with the sequence divided by CP. Per layer and micro-batch, with s = seq/CP, b = micro batch,
t = TP, elements of 2 bytes::

    norm/residual region  4*s*b*h            (/t only with sequence parallel)
    TP region             s*b*(3*a*d + 3*g*d + 5*f)/t
        q/k norm inputs (a*d + g*d), attention q, k, v (a*d + 2*g*d), attention output
        (a*d), SwiGLU: 5*f (measured on megatron-core 0.16.1's MLP without
        bias-activation fusion: fc1 output 2f, silu output f, the chunk's up half kept by the
        product f, the product (fc2 input) f)
    flash attention       4*a*s*b/t bytes of fp32 softmax statistics
    unfused attention     + 7*a*s*s*b/t bytes (megatron's local attention: fp32 softmax output
                          4, dropout mask 1, dropout output 2; selective recompute drops it)
    CP all-gather         (our local-spec CP attention, ``models/cp_attention.py``) + the
                          gathered K and V 2*b*S*(g/t)*d*2 bytes, S = s*CP; scores over S keys

Full recompute keeps only each layer's input (2*s*b*h bytes, /t with sequence parallel) plus
one layer's full working set while it is recomputed. The first pipeline stage holds
min(PP, micro-batches) micro-batches in flight under 1F1B; the last holds one, plus the logits.
With VPP virtual stages (interleaved 1F1B) a rank holds chunk-micro-batches of L/(PP x VPP)
layers each: megatron's warmup on rank r runs 2(PP-1-r) + (VPP-1) x PP of them before its first
backward (``pipeline_parallel/schedules.py`` ~773-774, megatron-core 0.16.1), so the first
stage keeps up to 2(PP-1) + (VPP-1) x PP + 1, i.e. PP x (1 + (PP-1)/(PP x VPP)) micro-batches'
worth of its layers: Megatron-LM's "interleaved schedule memory penalty"
(megatron/training/theoretical_memory_usage.py ~343-355 at d98e8a6; Narayanan et al. 2021,
section 2.2.2), and the last stage (VPP-1) x PP + 1 chunk-micro-batches instead of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from megatron_longact.config.schema import LOGPROB_CHUNK_TOKENS
from megatron_longact.errors import UserError
from megatron_longact.plan.layout import Layout, LayoutError, LayoutReport, check_layout
from megatron_longact.plan.model_spec import (
    ModelSpec,
    embedding_parameters,
    expert_layer_parameters,
    layer_parameters,
)

Recompute = Literal["none", "selective", "full"]
AttentionBackend = Literal["te", "local"]
"""``te``: Transformer Engine's flash/fused attention (GPU; CP by ring exchange); ``local``:
megatron's unfused local attention, with CP our all-gather attention (CPU, no TE)."""
RECOMPUTE_CHOICES: tuple[str, ...] = ("none", "selective", "full")

BYTES_PER_GIB = 2**30
WEIGHT_BYTES = 2  # bf16 model weights
GRAD_BYTES = 4  # fp32 main grads (grad_reduce_in_fp32, the default for bf16 training)
OPTIMIZER_BYTES = 12  # fp32 master weight + Adam exp_avg + exp_avg_sq, sharded over DP x CP
ACTIVATION_BYTES = 2  # bf16 activations
SOFTMAX_STATS_BYTES = 4  # flash attention keeps one fp32 log-sum-exp per head and token
SWIGLU_SAVED_PER_FFN = 5
"""Elements per token x ffn_hidden_size a SwiGLU MLP keeps for backward without
bias-activation fusion (megatron-core 0.16.1, measured with saved-tensor hooks)."""
UNFUSED_ATTENTION_BYTES_PER_SCORE = 7
"""megatron's local (unfused) attention keeps per score: the fp32 softmax output (4), the
dropout mask (1, dropout runs even at p=0) and the bf16 dropout output (2)."""
# Logits: bf16 output of the output layer (2) + the fp32 copy the vocab-parallel cross entropy
# keeps for backward (4) + the bf16 logits gradient made in backward (2).
LOGITS_BYTES_PER_ELEMENT = 8
RL_LOGITS_BYTES_PER_ELEMENT = 4
"""The RL policy step's logits over all tokens of a micro-batch: the bf16 logits (2) and their
bf16 gradient (2). The fp32 work is chunked (``rl/chunked_logprobs.py``), see below."""
RL_LOGPROB_CHUNK_BYTES_PER_ELEMENT = 12
"""fp32 temporaries of one ``rl.logprob_chunk_tokens`` chunk of the log-prob/entropy pass: the
scaled logits, their exponentials and their product (forward; the softmax and its scaled copy
in backward). Measured (peak RSS, CPU, fp32 logits) above the logits and their gradient: 12.7 B
per element unchunked, 4.7 B with chunks of 1/4 of the tokens, 2.2 B with 1/16."""
KV_CACHE_BYTES = 2  # bf16 KV cache in the rollout engine
DEFAULT_GPU_MEM_GIB = 80.0  # H800 / H100 80GB
# CUDA context, NCCL buffers, cuBLAS/TE workspaces and allocator fragmentation.
DEFAULT_OVERHEAD_GIB = 4.0


@dataclass(frozen=True, kw_only=True)
class RolloutSpec:
    """The colocated rollout engine that generates on the same GPUs between training steps.

    The engine is assumed to share the training weights and layout (one replica per TP x PP
    group), so it adds only its KV cache: ``(L/PP) * 2 * (g/TP) * d * kv_bytes * tokens * batch``
    bytes per GPU.

    Attributes:
        batch: sequences one replica generates concurrently.
        max_tokens: prompt + response tokens per sequence (``rl.max_seq_length``).
        memory_fraction: fraction of GPU memory the engine reserves up front for its KV pool
            (vLLM's ``gpu_memory_utilization`` style); 0 reserves exactly the KV cache needed.
        sleep: the engine frees its pool during the training step (vLLM sleep mode), so the
            pool and the training activations are never live together.
        kv_bytes: bytes per cached element.
    """

    batch: int
    max_tokens: int
    memory_fraction: float = 0.0
    sleep: bool = False
    kv_bytes: int = KV_CACHE_BYTES


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory of the most loaded pipeline stage, in GiB (2**30 bytes).

    ``stage`` is ``"only"`` without PP, else ``"first"`` or ``"last"``.
    """

    stage: str
    params_per_gpu: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    rollout_kv_gib: float
    overhead_gib: float
    rollout_sleeps: bool
    report: LayoutReport

    @property
    def static_gib(self) -> float:
        """Memory held all the time: weights, grads, optimizer shards, overhead."""
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.overhead_gib

    @property
    def training_gib(self) -> float:
        """Memory that lives only during the forward/backward pass."""
        return self.activations_gib + self.logits_gib

    @property
    def total_gib(self) -> float:
        if self.rollout_sleeps:
            return self.static_gib + max(self.training_gib, self.rollout_kv_gib)
        return self.static_gib + self.training_gib + self.rollout_kv_gib


def kv_heads_per_rank(spec: ModelSpec, *, tensor_parallel_size: int) -> int:
    """KV heads one TP rank holds; megatron replicates KV heads when TP > KV heads."""
    return max(spec.num_kv_heads // tensor_parallel_size, 1)


def layer_parameters_per_rank(
    spec: ModelSpec, *, tensor_parallel_size: int, expert_parallel_size: int = 1
) -> int:
    """Parameters of one layer on one TP rank: matrices split over TP, norms replicated.
    MoE: the routed experts split over EP (whole experts: expert-TP 1), router replicated."""
    tp = tensor_parallel_size
    h = spec.hidden_size
    norms = 2 * h + (2 * spec.head_dim if spec.qk_norm else 0)
    kv_width = kv_heads_per_rank(spec, tensor_parallel_size=tp) * spec.head_dim
    qkv = h * (spec.query_width // tp + 2 * kv_width)
    matrices = qkv + (spec.query_width // tp) * h
    if spec.is_moe:
        matrices += expert_layer_parameters(spec) // expert_parallel_size + spec.num_experts * h
    else:
        matrices += 3 * h * (spec.ffn_hidden_size // tp)
    assert tp > 1 or expert_parallel_size > 1 or matrices + norms == layer_parameters(spec)
    return matrices + norms


def moe_activation_bytes_per_layer(
    spec: ModelSpec, *, tokens_per_rank: float, micro_batch_size: int
) -> float:
    """Bytes a MoE layer keeps for backward beyond attention, per micro-batch: each token is
    dispatched to top-k experts, so the all-to-all dispatcher's permuted input and combined
    output (2 x k x h per token, its buffers) and the experts' SwiGLU saved tensors
    (``SWIGLU_SAVED_PER_FFN`` x k x moe_ffn per token) scale with k, plus fp32 router logits
    and probabilities (2 x E). ``tokens_per_rank``: tokens the layer sees on this rank (s/TP
    with sequence parallel)."""
    tokens = tokens_per_rank * micro_batch_size
    k = spec.moe_router_topk
    dispatched = (
        tokens * k * (2 * spec.hidden_size + SWIGLU_SAVED_PER_FFN * spec.moe_ffn_hidden_size)
    )
    return dispatched * ACTIVATION_BYTES + tokens * 2 * spec.num_experts * 4


def activation_bytes_per_layer(
    spec: ModelSpec,
    *,
    seq_per_rank: int,
    micro_batch_size: int,
    tensor_parallel_size: int,
    sequence_parallel: bool,
    flash_attention: bool = True,
    recompute: Recompute = "none",
    cp_gather: int = 1,
) -> float:
    """Bytes one layer keeps for backward for one micro-batch (no full recompute).

    ``seq_per_rank`` is seq_length / CP. ``recompute="selective"`` recomputes the attention core,
    which only saves memory without flash attention (the s x s softmax output). ``cp_gather``
    > 1 (CP size) models the all-gather CP attention of the local spec: K and V of the whole
    sequence (``cp_gather * s`` tokens) are kept for backward and the scores span them.
    """
    s, b, t = seq_per_rank, micro_batch_size, tensor_parallel_size
    h, a = spec.hidden_size, spec.num_attention_heads
    q_width = spec.query_width
    kv_width = kv_heads_per_rank(spec, tensor_parallel_size=t) * spec.head_dim * t
    residual_region = 4 * s * b * h / (t if sequence_parallel else 1)
    qk_norm_inputs = (q_width + kv_width) if spec.qk_norm else 0
    tp_region = (
        s
        * b
        * (
            qk_norm_inputs
            + (q_width + 2 * kv_width)
            + q_width
            + (0 if spec.is_moe else SWIGLU_SAVED_PER_FFN * spec.ffn_hidden_size)
        )
        / t
    )
    total = (residual_region + tp_region) * ACTIVATION_BYTES
    if spec.is_moe:
        total += moe_activation_bytes_per_layer(
            spec, tokens_per_rank=s / (t if sequence_parallel else 1), micro_batch_size=b
        )
    keys = s * cp_gather
    if cp_gather > 1:
        total += cp_kv_gather_bytes(spec, seq_length=keys, micro_batch_size=b,
                                    tensor_parallel_size=t)  # fmt: skip
    if flash_attention:
        total += SOFTMAX_STATS_BYTES * a * s * b / t
    elif recompute != "selective":
        total += UNFUSED_ATTENTION_BYTES_PER_SCORE * a * s * keys * b / t
    return total


def cp_kv_gather_bytes(
    spec: ModelSpec, *, seq_length: int, micro_batch_size: int, tensor_parallel_size: int
) -> float:
    """The gathered K and V of one layer in the all-gather CP attention (local spec, CP > 1):
    ``2 * b * S * (g/TP) * d`` bf16 elements, S the full sequence (``models/cp_attention.py``)."""
    kv_heads = kv_heads_per_rank(spec, tensor_parallel_size=tensor_parallel_size)
    return 2 * micro_batch_size * seq_length * kv_heads * spec.head_dim * ACTIVATION_BYTES


def rollout_kv_cache_bytes(spec: ModelSpec, layout: Layout, rollout: RolloutSpec) -> float:
    """KV cache per GPU: (L/PP) * 2 (k and v) * KV heads per TP rank * d * bytes * tokens * batch."""
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    per_token = (
        spec.num_layers
        // pp
        * 2
        * kv_heads_per_rank(spec, tensor_parallel_size=tp)
        * spec.head_dim
        * rollout.kv_bytes
    )
    return per_token * rollout.max_tokens * rollout.batch


def rollout_batch_per_replica(
    num_sequences: int, layout: Layout, *, max_batch: int | None = None
) -> int:
    """Sequences one rollout replica decodes at once when a generation round's
    ``num_sequences`` (prompts x gen_batch_multiplier x rollouts) are split as
    ``rl/experience.py`` splits them: each DP rank takes its share of the prompts and its CP
    ranks split that share's rollouts, so every TP group (DP x CP of them; PP ranks share one)
    decodes ceil(n / (DP x CP)) whole sequences, at most ``max_batch`` at a time
    (``rl.generation_batch_size``, per replica)."""
    replicas = layout.world_size // (layout.tensor_parallel_size * layout.pipeline_parallel_size)
    per_replica = math.ceil(num_sequences / max(replicas, 1))
    return per_replica if max_batch is None else min(per_replica, max_batch)


def in_flight_microbatches(layout: Layout, report: LayoutReport, *, stage: str) -> float:
    """Micro-batches whose activations a stage holds at its peak, in units of the whole
    stage's layers: 1F1B keeps min(PP, m) on the first stage and one on the last; with VPP
    virtual stages, (warmup + 1) chunk-micro-batches of 1/VPP of the layers each, the warmup
    of megatron's interleaved schedule (module docstring), at most all m x VPP of them."""
    pp, vpp = layout.pipeline_parallel_size, layout.virtual_pipeline_parallel_size
    m = report.num_microbatches
    first = stage in ("first", "only")
    if vpp == 1:
        return min(pp, m) if first else 1
    rank = 0 if first else pp - 1
    warmup = 2 * (pp - 1 - rank) + (vpp - 1) * pp
    return min(warmup + 1, m * vpp) / vpp


def _stage_estimate(
    spec: ModelSpec,
    layout: Layout,
    report: LayoutReport,
    *,
    stage: str,
    recompute: Recompute,
    flash_attention: bool,
    attention_backend: AttentionBackend,
    rl_policy_step: bool,
    logprob_chunk_tokens: int,
    rollout_bytes: float,
    rollout_sleeps: bool,
    overhead_gib: float,
) -> MemoryEstimate:
    tp, pp, cp = (
        layout.tensor_parallel_size,
        layout.pipeline_parallel_size,
        layout.context_parallel_size,
    )
    first, last = stage in ("first", "only"), stage in ("last", "only")
    layers = spec.num_layers // pp
    vocab_matrix = embedding_parameters(spec, vocab_size=report.padded_vocab_size) // tp
    ep = layout.expert_parallel_size
    params = layers * layer_parameters_per_rank(
        spec, tensor_parallel_size=tp, expert_parallel_size=ep
    )
    # Expert weights are sharded by the distributed optimizer over expert-DP = world/(PP x EP).
    expert_params = layers * expert_layer_parameters(spec) // ep
    if first:
        params += vocab_matrix
    if last:
        params += spec.hidden_size  # final norm
        # Untied: the output layer. Tied with PP > 1: megatron keeps a copy of the embedding
        # on the last stage and all-reduces its grads with the first stage.
        if not spec.tied_embeddings or stage == "last":
            params += vocab_matrix

    seq_per_rank = layout.seq_length // cp
    sp = layout.uses_sequence_parallel
    in_flight = in_flight_microbatches(layout, report, stage=stage)
    layer_bytes = activation_bytes_per_layer(
        spec,
        seq_per_rank=seq_per_rank,
        micro_batch_size=layout.micro_batch_size,
        tensor_parallel_size=tp,
        sequence_parallel=sp,
        flash_attention=flash_attention and attention_backend == "te",
        recompute=recompute,
        cp_gather=cp if attention_backend == "local" else 1,
    )
    if recompute == "full":
        layer_input = (
            seq_per_rank * layout.micro_batch_size * spec.hidden_size * ACTIVATION_BYTES
        ) / (tp if sp else 1)
        activations = layers * in_flight * layer_input + layer_bytes
    else:
        activations = layers * in_flight * layer_bytes
    tokens = seq_per_rank * layout.micro_batch_size
    if not last:
        logits = 0.0
    elif rl_policy_step:
        chunk = tokens if logprob_chunk_tokens <= 0 else min(logprob_chunk_tokens, tokens)
        logits = (report.padded_vocab_size // tp) * (
            tokens * RL_LOGITS_BYTES_PER_ELEMENT + chunk * RL_LOGPROB_CHUNK_BYTES_PER_ELEMENT
        )
    else:
        logits = tokens * (report.padded_vocab_size // tp) * LOGITS_BYTES_PER_ELEMENT
    optimizer_shards = report.data_parallel_size * cp
    return MemoryEstimate(
        stage=stage,
        params_per_gpu=params,
        weights_gib=params * WEIGHT_BYTES / BYTES_PER_GIB,
        grads_gib=params * GRAD_BYTES / BYTES_PER_GIB,
        optimizer_gib=(
            (params - expert_params) * OPTIMIZER_BYTES / optimizer_shards
            + expert_params * OPTIMIZER_BYTES / (layout.world_size // (pp * ep))
        )
        / BYTES_PER_GIB,
        activations_gib=activations / BYTES_PER_GIB,
        logits_gib=logits / BYTES_PER_GIB,
        rollout_kv_gib=rollout_bytes / BYTES_PER_GIB,
        overhead_gib=overhead_gib,
        rollout_sleeps=rollout_sleeps,
        report=report,
    )


def estimate_memory(
    spec: ModelSpec,
    layout: Layout,
    *,
    recompute: Recompute = "none",
    rollout: RolloutSpec | None = None,
    flash_attention: bool = True,
    attention_backend: AttentionBackend = "te",
    rl_policy_step: bool | None = None,
    logprob_chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
    overhead_gib: float = DEFAULT_OVERHEAD_GIB,
    gpu_mem_gib: float = DEFAULT_GPU_MEM_GIB,
    enforce_budget: bool = True,
) -> MemoryEstimate:
    """Estimate peak memory per GPU (GiB) of the most loaded pipeline stage.

    ``rl_policy_step``: the logits term of the RL policy loss (``RL_LOGITS_BYTES_PER_ELEMENT``
    over the tokens, ``RL_LOGPROB_CHUNK_BYTES_PER_ELEMENT`` over one ``logprob_chunk_tokens``
    chunk of them, ``rl.logprob_chunk_tokens``) instead of SFT's cross entropy; default: True
    when a ``rollout`` is given.
    ``attention_backend="local"`` implies unfused attention (``flash_attention`` is ignored).

    Checks the layout first (:func:`check_layout`) and, with ``enforce_budget``, raises
    :class:`LayoutError` when the total exceeds ``gpu_mem_gib`` (see :func:`check_fits`).
    ``gpu_mem_gib`` also sizes the rollout engine's pool when it reserves a memory fraction.
    """
    if recompute not in RECOMPUTE_CHOICES:
        raise UserError(f"recompute must be one of {RECOMPUTE_CHOICES}, got {recompute!r}")
    report = check_layout(spec, layout)
    rollout_bytes = 0.0
    if rollout is not None:
        if rollout.batch < 0 or rollout.max_tokens < 1:
            raise UserError(f"rollout batch must be >= 0 and max_tokens >= 1, got {rollout}")
        if not 0.0 <= rollout.memory_fraction < 1.0:
            raise UserError(
                f"rollout memory_fraction must be in [0, 1), got {rollout.memory_fraction}"
            )
        rollout_bytes = rollout_kv_cache_bytes(spec, layout, rollout)
        if rollout.memory_fraction > 0.0:
            pool = rollout.memory_fraction * gpu_mem_gib * BYTES_PER_GIB
            if rollout_bytes > pool:
                raise LayoutError(
                    f"the rollout KV cache needs {rollout_bytes / BYTES_PER_GIB:.1f} GiB but the "
                    f"engine's memory fraction {rollout.memory_fraction} reserves only "
                    f"{pool / BYTES_PER_GIB:.1f} GiB; lower the rollout batch or raise the fraction"
                )
            rollout_bytes = pool
    stages = ["only"] if layout.pipeline_parallel_size == 1 else ["first", "last"]
    estimates = [
        _stage_estimate(
            spec,
            layout,
            report,
            stage=stage,
            recompute=recompute,
            flash_attention=flash_attention,
            attention_backend=attention_backend,
            rl_policy_step=rollout is not None if rl_policy_step is None else rl_policy_step,
            logprob_chunk_tokens=logprob_chunk_tokens,
            rollout_bytes=rollout_bytes,
            rollout_sleeps=rollout is not None and rollout.sleep,
            overhead_gib=overhead_gib,
        )
        for stage in stages
    ]
    worst = max(estimates, key=lambda estimate: estimate.total_gib)
    if enforce_budget:
        check_fits(worst, gpu_mem_gib=gpu_mem_gib, recompute=recompute)
    return worst


def check_fits(
    estimate: MemoryEstimate, *, gpu_mem_gib: float, recompute: Recompute = "none"
) -> None:
    """Raise :class:`LayoutError` when ``estimate`` exceeds ``gpu_mem_gib``, naming what to change."""
    if estimate.total_gib <= gpu_mem_gib:
        return
    parts = {
        "weights": estimate.weights_gib,
        "fp32 grads": estimate.grads_gib,
        "optimizer shards": estimate.optimizer_gib,
        "activations": estimate.activations_gib,
        "logits": estimate.logits_gib,
        "rollout KV cache": estimate.rollout_kv_gib,
    }
    largest = ", ".join(
        f"{name} {gib:.1f}" for name, gib in sorted(parts.items(), key=lambda kv: -kv[1])[:3]
    )
    hints = []
    if recompute != "full" and estimate.activations_gib > 1.0:
        hints.append("full recompute (train.recompute=full)")
    hints.append("a larger context_parallel_size (activations, logits)")
    hints.append("a larger tensor/pipeline_parallel_size (weights, grads)")
    if estimate.rollout_kv_gib > 0:
        hints.append("a smaller rollout batch")
    raise LayoutError(
        f"estimated {estimate.total_gib:.1f} GiB per GPU ({estimate.stage} pipeline stage) "
        f"exceeds the {gpu_mem_gib:.0f} GiB GPU; largest parts (GiB): {largest}; try "
        + ", or ".join(hints)
    )
