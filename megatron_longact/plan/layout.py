"""The parallel layout (TP x PP x CP x DP) of one run, and the divisibility rules it must meet.

The rules mirror what megatron-core asserts at start-up (``TransformerConfig.__post_init__``,
``initialize_model_parallel``, the CP batch split), so a bad layout is caught in a second on the
login node instead of after the job waited in the queue and loaded the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_longact.errors import UserError
from megatron_longact.plan.model_spec import ModelSpec

# megatron pads the vocabulary to a multiple of this times TP (``make_vocab_size_divisible_by``).
VOCAB_PAD_MULTIPLE = 128


class LayoutError(UserError):
    """A layout megatron-core would reject, or one that does not fit in GPU memory."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How one training run spreads over the GPUs.

    Attributes:
        num_nodes: nodes in the job.
        gpus_per_node: GPUs (or CPU processes) per node.
        tensor_parallel_size: TP, splits every weight matrix; keep it inside one node (NVLink).
        pipeline_parallel_size: PP, splits the layers into stages.
        virtual_pipeline_parallel_size: VPP, model chunks per stage (interleaved 1F1B); 1 =
            plain 1F1B.
        context_parallel_size: CP, splits every sequence into 2*CP chunks (load-balanced causal
            attention) so each rank holds seq_length / CP tokens.
        sequence_parallel: megatron sequence parallelism, which splits the norm/residual
            activations over TP as well; only takes effect with TP > 1.
        seq_length: tokens per (packed) sequence.
        micro_batch_size: sequences per micro-batch on one DP rank.
        global_batch_size: sequences per optimizer step over all DP ranks.
    """

    num_nodes: int
    gpus_per_node: int
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    virtual_pipeline_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = True
    expert_parallel_size: int = 1
    """MoE: EP, experts split over this many ranks (carved out of DP; experts whole inside
    a rank, expert-TP 1)."""
    seq_length: int
    micro_batch_size: int = 1
    global_batch_size: int

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def model_parallel_size(self) -> int:
        """GPUs that hold one replica of the model: TP x PP x CP."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size

    @property
    def uses_sequence_parallel(self) -> bool:
        return self.sequence_parallel and self.tensor_parallel_size > 1


@dataclass(frozen=True)
class LayoutReport:
    """What a valid layout implies.

    Attributes:
        data_parallel_size: DP = world / (TP x PP x CP).
        num_microbatches: micro-batches per DP rank per optimizer step.
        padded_vocab_size: vocabulary after megatron's padding to a multiple of 128 x TP.
        bubble_fraction: pipeline bubble time over ideal compute time per step,
            (PP-1) / (VPP x m) for m micro-batches (Narayanan et al. 2021, "Efficient
            Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
            arXiv:2104.04473, section 2.2: 1F1B and its interleaved form); 0 without PP.
        warnings: legal but slow choices (TP across nodes, pipeline bubbles).
    """

    data_parallel_size: int
    num_microbatches: int
    padded_vocab_size: int
    bubble_fraction: float = 0.0
    warnings: list[str] = field(default_factory=list)


def bubble_fraction(*, pp: int, vpp: int, num_microbatches: int) -> float:
    """(PP-1) / (VPP x m): the 1F1B bubble over ideal compute time (Narayanan et al. 2021,
    section 2.2.1 for VPP 1, 2.2.2 for interleaved stages, which cut it by VPP)."""
    return (pp - 1) / (vpp * num_microbatches) if pp > 1 else 0.0


def padded_vocab_size(vocab_size: int, *, tensor_parallel_size: int) -> int:
    """Vocabulary megatron allocates: ``vocab_size`` rounded up to 128 x TP."""
    multiple = VOCAB_PAD_MULTIPLE * tensor_parallel_size
    return math.ceil(vocab_size / multiple) * multiple


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LayoutError(f"{name} must be a positive integer, got {value!r}")


def check_layout(spec: ModelSpec, layout: Layout) -> LayoutReport:
    """Check ``layout`` against ``spec``; raise :class:`LayoutError` naming the fix.

    Checks, in order: world size divisible by TP x PP x CP; attention heads divisible by TP and
    KV heads a multiple or divisor of TP (megatron replicates KV heads when TP > KV heads); FFN
    width divisible by TP; layers divisible by PP; sequence divisible by 2 x CP (each CP rank
    takes chunks i and 2CP-1-i to balance causal attention) and, with sequence parallel, the
    per-CP-rank sequence divisible by TP; global batch divisible by micro batch x DP.
    """
    for name in (
        "num_nodes",
        "gpus_per_node",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "virtual_pipeline_parallel_size",
        "context_parallel_size",
        "seq_length",
        "micro_batch_size",
        "global_batch_size",
    ):
        _positive(name, getattr(layout, name))
    tp = layout.tensor_parallel_size
    pp = layout.pipeline_parallel_size
    cp = layout.context_parallel_size

    if layout.world_size % layout.model_parallel_size:
        raise LayoutError(
            f"world size {layout.world_size} ({layout.num_nodes} nodes x {layout.gpus_per_node} "
            f"GPUs) is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = "
            f"{layout.model_parallel_size}; change the node count or the parallel sizes so that "
            "world = TP x PP x CP x DP"
        )
    dp = layout.world_size // layout.model_parallel_size

    if spec.num_attention_heads % tp:
        raise LayoutError(
            f"{spec.name}: {spec.num_attention_heads} attention heads are not divisible by "
            f"tensor_parallel_size {tp}; use a TP that divides {spec.num_attention_heads}"
        )
    if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
        raise LayoutError(
            f"{spec.name}: {spec.num_kv_heads} KV heads must be a multiple or a divisor of "
            f"tensor_parallel_size {tp}; use a TP that divides {spec.num_kv_heads} or a multiple "
            "of it"
        )
    if spec.ffn_hidden_size % tp:
        raise LayoutError(
            f"{spec.name}: ffn_hidden_size {spec.ffn_hidden_size} is not divisible by "
            f"tensor_parallel_size {tp}"
        )
    ep = layout.expert_parallel_size
    if ep > 1 and not spec.is_moe:
        raise LayoutError(f"{spec.name} is dense: expert_parallel_size {ep} needs an MoE model")
    if spec.is_moe and spec.num_experts % ep:
        raise LayoutError(
            f"{spec.name}: {spec.num_experts} experts are not divisible by "
            f"expert_parallel_size {ep}"
        )
    if layout.world_size % (pp * ep):
        raise LayoutError(
            f"world size {layout.world_size} is not divisible by pipeline_parallel_size {pp} x "
            f"expert_parallel_size {ep} (megatron's expert grid)"
        )
    if spec.num_layers % pp:
        raise LayoutError(
            f"{spec.name}: {spec.num_layers} layers are not divisible by "
            f"pipeline_parallel_size {pp}; use a PP that divides {spec.num_layers}"
        )
    if cp > 1 and layout.seq_length % (2 * cp):
        raise LayoutError(
            f"seq_length {layout.seq_length} is not divisible by 2 x context_parallel_size = "
            f"{2 * cp} (CP splits each sequence into 2 x CP chunks for load balancing); pick a "
            f"sequence length that is a multiple of {2 * cp}"
        )
    if layout.uses_sequence_parallel and (layout.seq_length // cp) % tp:
        raise LayoutError(
            f"seq_length / context_parallel_size = {layout.seq_length // cp} is not divisible by "
            f"tensor_parallel_size {tp} (sequence parallel splits it over TP); use a sequence "
            f"length that is a multiple of {cp * tp * (2 if cp > 1 else 1)}"
        )
    per_step = layout.micro_batch_size * dp
    if layout.global_batch_size % per_step:
        lower = max(per_step, layout.global_batch_size // per_step * per_step)
        raise LayoutError(
            f"global_batch_size {layout.global_batch_size} is not divisible by micro_batch_size "
            f"x data_parallel_size = {layout.micro_batch_size} x {dp} = {per_step}; use a "
            f"multiple of {per_step} (e.g. {lower} or {lower + per_step})"
        )
    num_microbatches = layout.global_batch_size // per_step
    vpp = layout.virtual_pipeline_parallel_size
    if vpp > 1:
        _check_virtual_pipeline(spec, pp=pp, vpp=vpp, num_microbatches=num_microbatches)

    warnings = []
    if tp > layout.gpus_per_node:
        warnings.append(
            f"TP {tp} spans nodes ({layout.gpus_per_node} GPUs per node): every layer then "
            "all-reduces over the network; keep TP within a node"
        )
    if pp > 1 and num_microbatches < pp:
        warnings.append(
            f"{num_microbatches} micro-batches for {pp} pipeline stages: the pipeline bubble "
            f"idles (PP-1)/(m+PP-1) = {(pp - 1) / (num_microbatches + pp - 1):.0%} of each step"
        )
    return LayoutReport(
        data_parallel_size=dp,
        num_microbatches=num_microbatches,
        padded_vocab_size=padded_vocab_size(spec.vocab_size, tensor_parallel_size=tp),
        bubble_fraction=bubble_fraction(pp=pp, vpp=vpp, num_microbatches=num_microbatches),
        warnings=warnings,
    )


def _check_virtual_pipeline(spec: ModelSpec, *, pp: int, vpp: int, num_microbatches: int) -> None:
    """What megatron-core 0.16.1 asserts for virtual stages: PP > 1 (``parallel_state.py``
    ~745-749), layers divisible by PP x VPP (``TransformerConfig.__post_init__`` ~1471) and,
    with the default micro-batch groups of PP, a micro-batch count that is a multiple of PP
    (``pipeline_parallel/schedules.py`` ~986-1004)."""
    if pp < 2:
        raise LayoutError(
            f"virtual_pipeline_parallel_size {vpp} needs pipeline_parallel_size >= 2 "
            "(interleaved 1F1B); use VPP 1 or raise PP"
        )
    if spec.num_layers % (pp * vpp):
        raise LayoutError(
            f"{spec.name}: {spec.num_layers} layers are not divisible by pipeline_parallel_size "
            f"x virtual_pipeline_parallel_size = {pp} x {vpp}; use a VPP with PP x VPP dividing "
            f"{spec.num_layers}"
        )
    if num_microbatches % pp:
        raise LayoutError(
            f"{num_microbatches} micro-batches per step with virtual pipeline stages: the "
            f"interleaved schedule needs a multiple of pipeline_parallel_size {pp}; change the "
            "global or micro batch size"
        )
