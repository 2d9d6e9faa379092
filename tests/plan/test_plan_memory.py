"""Per-GPU memory estimates: hand-checked numbers and the directions every knob must move them."""

import dataclasses

import pytest

from megatron_longact.plan.layout import Layout, LayoutError
from megatron_longact.plan.memory import (
    BYTES_PER_GIB,
    RolloutSpec,
    activation_bytes_per_layer,
    estimate_memory,
    rollout_batch_per_replica,
    rollout_kv_cache_bytes,
)
from megatron_longact.plan.model_spec import QWEN3_4B, QWEN3_8B, QWEN3_32B, ModelSpec

TINY = ModelSpec(
    name="tiny",
    hidden_size=8,
    num_layers=2,
    num_attention_heads=2,
    num_kv_heads=1,
    head_dim=4,
    ffn_hidden_size=16,
    vocab_size=16,
    tied_embeddings=False,
)


def _layout(**overrides) -> Layout:
    values = dict(
        num_nodes=8,
        gpus_per_node=8,
        tensor_parallel_size=2,
        context_parallel_size=4,
        seq_length=32768,
        global_batch_size=128,
    )
    values.update(overrides)
    return Layout(**values)


def _estimate(spec=QWEN3_8B, layout=None, **kwargs):
    return estimate_memory(spec, layout or _layout(), enforce_budget=False, **kwargs)


def test_tiny_case_by_hand():
    layout = Layout(num_nodes=1, gpus_per_node=1, seq_length=4, global_batch_size=1)
    estimate = _estimate(TINY, layout, overhead_gib=0.0)
    # Vocab 16 is padded to 128: each vocab matrix is 128 x 8 = 1024 parameters.
    # 2 layers x 600 + embedding 1024 + output layer 1024 + final norm 8 = 3256 parameters.
    assert estimate.params_per_gpu == 3256
    # bf16 weights 2 B, fp32 grads 4 B, fp32 master + Adam m, v 12 B (DP x CP = 1).
    assert estimate.weights_gib * BYTES_PER_GIB == 2 * 3256
    assert estimate.grads_gib * BYTES_PER_GIB == 4 * 3256
    assert estimate.optimizer_gib * BYTES_PER_GIB == 12 * 3256
    # Per layer (s=4, b=1, t=1), bf16 elements: residual 4*s*h = 128; TP region
    # s*(q/k norm in 8+4 + q,k,v 8+4+4 + attn out 8 + SwiGLU 5*16) = 4*116 = 464;
    # -> 592 * 2 B = 1184 B, plus flash-attention statistics 4 B * a*s = 32 B -> 1216 B.
    assert estimate.activations_gib * BYTES_PER_GIB == 2 * 1216
    # Logits: s * padded vocab * 8 B = 4 * 128 * 8.
    assert estimate.logits_gib * BYTES_PER_GIB == 4096
    assert estimate.total_gib * BYTES_PER_GIB == 6512 + 13024 + 39072 + 2432 + 4096
    # The RL policy step's logits peak: 4 B per element over the tokens plus 12 B over one
    # log-prob chunk (rl/chunked_logprobs.py); here the 4 tokens fit one chunk.
    rl = _estimate(TINY, layout, overhead_gib=0.0, rl_policy_step=True)
    assert rl.logits_gib * BYTES_PER_GIB == 4 * 128 * (4 + 12)
    chunked = _estimate(TINY, layout, overhead_gib=0.0, rl_policy_step=True,
                        logprob_chunk_tokens=1)  # fmt: skip
    assert chunked.logits_gib * BYTES_PER_GIB == 128 * (4 * 4 + 1 * 12)


def test_qwen3_8b_rl_layout_by_hand():
    # TP 2 x CP 4 (shipped before chunked log-probs): ~76 GiB of 80 once SwiGLU's 5sf and the RL logits
    # peak are counted (the hand estimate), under the 10% headroom rule.
    estimate = _estimate(rollout=RolloutSpec(batch=4, max_tokens=32768))
    # Per TP rank and layer: qkv 4096*(2048 + 2*512) + o 2048*4096 + MLP 3*4096*6144 + norms
    # 2*4096 + 2*128 = 96,477,440; 36 layers + embedding and output layer of the padded vocab
    # (152064 x 4096 / 2 each) + final norm 4096.
    assert estimate.params_per_gpu == 36 * 96_477_440 + 2 * 152064 * 4096 // 2 + 4096
    # Optimizer sharded over DP x CP = 8 x 4 = 32 ranks.
    assert estimate.optimizer_gib == pytest.approx(
        estimate.params_per_gpu * 12 / 32 / BYTES_PER_GIB
    )
    # KV cache: 36 layers * 2 * 4 KV heads per rank * 128 * 2 B = 73,728 B per token;
    # 4 sequences x 32768 tokens -> exactly 9 GiB.
    assert estimate.rollout_kv_gib == 9.0
    # Chunked log-probs (4096 tokens per chunk): 5.8 GiB of logits instead of 12.8 (22 B per
    # element unchunked before), ~69 GiB in all.
    assert 67.0 < estimate.total_gib < 71.0
    assert estimate.logits_gib == pytest.approx(152064 / 2 * (8192 * 4 + 4096 * 12) / BYTES_PER_GIB)


def test_rollout_kv_cache_formula_matches_the_brief():
    # layers * 2 * kv_heads * head_dim * bytes * tokens * batch / TP
    layout = _layout(tensor_parallel_size=8, context_parallel_size=1)
    rollout = RolloutSpec(batch=16, max_tokens=32768)
    expected = 64 * 2 * 8 * 128 * 2 * 32768 * 16 / 8
    assert rollout_kv_cache_bytes(QWEN3_32B, layout, rollout) == expected
    # 128 rollouts over 64 / (TP 2) = 32 replicas (DP 8 x CP 4: rl/experience.py splits the
    # prompts over DP and each share's rollouts over CP) -> 4 each; a DAPO multiplier of 3
    # makes 384 per round, capped by the native engine's generation_batch_size.
    assert rollout_batch_per_replica(128, _layout()) == 4
    assert rollout_batch_per_replica(384, _layout()) == 12
    assert rollout_batch_per_replica(384, _layout(), max_batch=8) == 8


def test_local_cp_attention_keeps_gathered_kv():
    # megatron's local spec with CP > 1 uses the all-gather CP attention: each layer keeps the
    # gathered K and V of the whole sequence, 2 * S * (g/TP) * d bf16 elements, and unfused
    # scores over all S keys.
    te = _estimate(layout=_layout(global_batch_size=64))
    local = _estimate(layout=_layout(global_batch_size=64), attention_backend="local")
    layer_te = activation_bytes_per_layer(QWEN3_8B, seq_per_rank=8192, micro_batch_size=1,
                                          tensor_parallel_size=2, sequence_parallel=True)  # fmt: skip
    gathered = 2 * 32768 * 4 * 128 * 2
    scores = 7 * 32 / 2 * 8192 * 32768
    softmax_stats = 4 * 32 / 2 * 8192
    expected = 36 * (layer_te - softmax_stats + gathered + scores)
    assert local.activations_gib * BYTES_PER_GIB == pytest.approx(expected)
    assert local.activations_gib > te.activations_gib


def test_recompute_lowers_activations():
    none = _estimate(recompute="none")
    selective = _estimate(recompute="selective")
    full = _estimate(recompute="full")
    assert full.activations_gib < selective.activations_gib <= none.activations_gib
    # Full recompute keeps each layer's input (s/CP * h / TP bytes with SP) plus one layer.
    layer = activation_bytes_per_layer(
        QWEN3_8B,
        seq_per_rank=8192,
        micro_batch_size=1,
        tensor_parallel_size=2,
        sequence_parallel=True,
    )
    expected = 36 * 8192 * 4096 * 2 / 2 + layer
    assert full.activations_gib * BYTES_PER_GIB == pytest.approx(expected)
    # Selective recompute drops the s x s softmax of unfused attention.
    unfused = _estimate(flash_attention=False)
    unfused_selective = _estimate(flash_attention=False, recompute="selective")
    assert unfused_selective.activations_gib < unfused.activations_gib
    assert unfused.activations_gib > none.activations_gib


def test_context_parallel_lowers_activations_and_logits():
    estimates = [
        _estimate(layout=_layout(context_parallel_size=cp, global_batch_size=64))
        for cp in (1, 2, 4)
    ]
    for smaller, larger in zip(estimates[1:], estimates[:-1]):
        assert smaller.activations_gib == pytest.approx(larger.activations_gib / 2, rel=1e-6)
        assert smaller.logits_gib == pytest.approx(larger.logits_gib / 2)


def test_tensor_parallel_lowers_weights_and_grads():
    estimates = [
        _estimate(
            layout=_layout(tensor_parallel_size=tp, context_parallel_size=1, global_batch_size=64)
        )
        for tp in (1, 2, 4, 8)
    ]
    for more_tp, less_tp in zip(estimates[1:], estimates[:-1]):
        assert more_tp.weights_gib < less_tp.weights_gib
        assert more_tp.grads_gib < less_tp.grads_gib
        assert more_tp.activations_gib < less_tp.activations_gib


def test_pipeline_parallel_lowers_weights_and_moves_logits_to_the_last_stage():
    layout = _layout(tensor_parallel_size=8, context_parallel_size=1, global_batch_size=64)
    flat = _estimate(QWEN3_32B, layout)
    piped = _estimate(QWEN3_32B, dataclasses.replace(layout, pipeline_parallel_size=2))
    assert piped.weights_gib < flat.weights_gib
    # No recompute: the first stage keeps 2 micro-batches of 32 layers, the most memory.
    assert piped.stage == "first" and piped.logits_gib == 0.0
    assert piped.activations_gib == pytest.approx(flat.activations_gib)
    # Full recompute: activations are small, the logits make the last stage the peak.
    piped_full = _estimate(
        QWEN3_32B, dataclasses.replace(layout, pipeline_parallel_size=2), recompute="full"
    )
    assert piped_full.stage == "last" and piped_full.logits_gib > 0.0


def test_tied_embeddings_counted_once_without_pp():
    layout = _layout(tensor_parallel_size=1, context_parallel_size=1, global_batch_size=64)
    untied = dataclasses.replace(QWEN3_4B, tied_embeddings=False)
    difference = (
        _estimate(untied, layout).params_per_gpu - _estimate(QWEN3_4B, layout).params_per_gpu
    )
    assert difference == 151936 * 2560


def test_larger_data_parallel_shrinks_optimizer_shards():
    small = _estimate(layout=_layout(num_nodes=2, global_batch_size=32))
    large = _estimate(layout=_layout(num_nodes=8, global_batch_size=32))
    assert large.optimizer_gib == pytest.approx(small.optimizer_gib / 4)
    assert large.weights_gib == small.weights_gib


def test_rollout_sleep_and_memory_fraction():
    resident = _estimate(rollout=RolloutSpec(batch=4, max_tokens=32768))
    asleep = _estimate(rollout=RolloutSpec(batch=4, max_tokens=32768, sleep=True))
    assert resident.total_gib == pytest.approx(
        resident.static_gib + resident.training_gib + resident.rollout_kv_gib
    )
    assert asleep.total_gib == pytest.approx(
        asleep.static_gib + max(asleep.training_gib, asleep.rollout_kv_gib)
    )
    assert asleep.total_gib < resident.total_gib
    # A reserved pool larger than the cache counts in full ...
    pooled = estimate_memory(
        QWEN3_8B,
        _layout(),
        rollout=RolloutSpec(batch=4, max_tokens=32768, memory_fraction=0.2),
        enforce_budget=False,
    )
    assert pooled.rollout_kv_gib == pytest.approx(0.2 * 80.0)
    # ... and one smaller than the cache is an error.
    with pytest.raises(LayoutError, match="reserves only 8.0 GiB"):
        _estimate(rollout=RolloutSpec(batch=4, max_tokens=32768, memory_fraction=0.1))


def test_over_budget_raises_with_hints():
    layout = _layout(tensor_parallel_size=1, context_parallel_size=1, global_batch_size=64)
    with pytest.raises(LayoutError) as info:
        estimate_memory(QWEN3_32B, layout, gpu_mem_gib=80.0)
    message = str(info.value)
    assert "exceeds the 80 GiB GPU" in message
    assert "full recompute" in message and "context_parallel_size" in message
    # The same layout is only estimated when the budget is not enforced.
    assert _estimate(QWEN3_32B, layout).total_gib > 80.0


def test_chosen_layouts_fit_on_80_gib():
    # The layouts in launch/slurm/longact_{4b,8b,32b}.sh (see docs/planner.md), each with at
    # least 10% headroom (72 GiB of 80).
    chosen = [
        (QWEN3_4B, 1, 4, 16384, 32, 0, "none"),
        (QWEN3_4B, 1, 8, 32768, 128, 128, "none"),
        (QWEN3_8B, 2, 2, 16384, 32, 0, "none"),
        (QWEN3_8B, 4, 2, 32768, 128, 128, "none"),
        (QWEN3_32B, 8, 2, 16384, 32, 0, "none"),
        (QWEN3_32B, 8, 4, 32768, 128, 128, "full"),
    ]
    for spec, tp, cp, seq, global_batch, rollouts, recompute in chosen:
        layout = _layout(
            tensor_parallel_size=tp,
            context_parallel_size=cp,
            seq_length=seq,
            global_batch_size=global_batch,
        )
        rollout = None
        if rollouts:
            rollout = RolloutSpec(batch=rollout_batch_per_replica(rollouts, layout), max_tokens=seq)
        estimate = estimate_memory(
            spec, layout, rollout=rollout, recompute=recompute, gpu_mem_gib=80.0
        )
        assert estimate.total_gib <= 0.9 * 80.0, (spec.name, tp, cp, seq, estimate.total_gib)
