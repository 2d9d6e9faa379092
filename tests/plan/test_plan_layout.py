"""Divisibility rules of the layout checker and the fixes its errors suggest."""

import pytest

from megatron_longact.plan.layout import Layout, LayoutError, check_layout, padded_vocab_size
from megatron_longact.plan.model_spec import QWEN3_8B, QWEN3_32B, ModelSpec


def _layout(**overrides) -> Layout:
    # The 8B RL layout: 8 nodes x 8 GPUs, TP 2 x CP 4 x DP 8, 32K sequences, 128 rollouts.
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


def test_valid_layout_report():
    report = check_layout(QWEN3_8B, _layout())
    assert report.data_parallel_size == 8
    assert report.num_microbatches == 16
    # 151936 is not a multiple of 128 x 2 = 256: megatron pads to 594 x 256.
    assert report.padded_vocab_size == 152064
    assert report.warnings == []


def test_padded_vocab_size():
    assert padded_vocab_size(151936, tensor_parallel_size=1) == 151936
    assert padded_vocab_size(151936, tensor_parallel_size=8) == 149 * 1024


def test_layout_error_is_a_value_error():
    assert issubclass(LayoutError, ValueError)


def test_world_not_divisible():
    with pytest.raises(
        LayoutError, match=r"world size 64 .* not divisible by TP x PP x CP"
    ) as info:
        check_layout(QWEN3_8B, _layout(tensor_parallel_size=3))
    assert "3 x 1 x 4 = 12" in str(info.value)


def test_heads_not_divisible_by_tp():
    layout = _layout(num_nodes=1, gpus_per_node=6, tensor_parallel_size=3, context_parallel_size=1)
    with pytest.raises(
        LayoutError, match="32 attention heads are not divisible by tensor_parallel_size 3"
    ):
        check_layout(QWEN3_8B, layout)


def test_kv_heads_must_divide_or_be_multiple_of_tp():
    spec = ModelSpec(
        name="odd",
        hidden_size=768,
        num_layers=4,
        num_attention_heads=12,
        num_kv_heads=6,
        head_dim=64,
        ffn_hidden_size=2048,
        vocab_size=1000,
        tied_embeddings=True,
    )
    layout = _layout(num_nodes=1, gpus_per_node=4, tensor_parallel_size=4, context_parallel_size=1)
    with pytest.raises(LayoutError, match="6 KV heads must be a multiple or a divisor"):
        check_layout(spec, layout)
    # TP 16 > 8 KV heads is allowed (megatron replicates the KV heads).
    check_layout(QWEN3_32B, _layout(num_nodes=2, tensor_parallel_size=16, context_parallel_size=1))


def test_layers_not_divisible_by_pp():
    layout = _layout(
        num_nodes=5, tensor_parallel_size=8, pipeline_parallel_size=5, context_parallel_size=1
    )
    with pytest.raises(
        LayoutError, match="36 layers are not divisible by pipeline_parallel_size 5"
    ):
        check_layout(QWEN3_8B, layout)


def test_seq_not_divisible_by_twice_cp():
    with pytest.raises(
        LayoutError, match=r"seq_length 32764 is not divisible by 2 x context_parallel_size = 8"
    ):
        check_layout(QWEN3_8B, _layout(seq_length=32764))


def test_seq_per_cp_rank_not_divisible_by_tp_with_sequence_parallel():
    layout = _layout(
        tensor_parallel_size=8, context_parallel_size=2, seq_length=24, global_batch_size=4
    )
    with pytest.raises(LayoutError, match="sequence parallel"):
        check_layout(QWEN3_8B, layout)
    # Without sequence parallel the same split is legal.
    check_layout(QWEN3_8B, Layout(**{**layout.__dict__, "sequence_parallel": False}))


def test_global_batch_not_divisible_by_micro_times_dp():
    with pytest.raises(LayoutError) as info:
        check_layout(QWEN3_8B, _layout(global_batch_size=100))
    message = str(info.value)
    assert (
        "global_batch_size 100 is not divisible by micro_batch_size x data_parallel_size" in message
    )
    assert "1 x 8 = 8" in message and "e.g. 96 or 104" in message
    with pytest.raises(LayoutError, match="2 x 8 = 16"):
        check_layout(QWEN3_8B, _layout(micro_batch_size=2, global_batch_size=24))


def test_non_positive_sizes_rejected():
    with pytest.raises(LayoutError, match="context_parallel_size must be a positive integer"):
        check_layout(QWEN3_8B, _layout(context_parallel_size=0))


def test_warnings_for_slow_but_legal_layouts():
    report = check_layout(
        QWEN3_32B, _layout(num_nodes=2, tensor_parallel_size=16, context_parallel_size=1)
    )
    assert any("spans nodes" in warning for warning in report.warnings)
    layout = _layout(
        tensor_parallel_size=8,
        pipeline_parallel_size=4,
        context_parallel_size=1,
        global_batch_size=2,
    )
    report = check_layout(QWEN3_8B, layout)
    assert report.num_microbatches == 1
    assert any("bubble" in warning and "75%" in warning for warning in report.warnings)
