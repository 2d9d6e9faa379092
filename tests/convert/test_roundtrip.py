"""HF -> megatron -> HF on tiny random models: logits parity at TP=1 and TP=2, bitwise round
trips (TP=1, TP=2, PP=2, and a training checkpoint with optimizer state), loadability by
transformers, and no half-written export on failure.

Three spawned worlds in all: TP=1 (1 process), TP=2 (2 processes), and the CLI's own PP=2.
"""

from __future__ import annotations

import json
from pathlib import Path

import convert_worlds as worlds
import pytest
import torch

from megatron_longact.convert.cli import main as convert_main
from megatron_longact.convert.mcore_to_hf import export_checkpoint


def _assert_bitwise(original: Path, exported: Path) -> None:
    want, got = worlds.hf_state_dict(original), worlds.hf_state_dict(exported)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logits_match_transformers(worlds_by_tp, tiny_models, tp):
    for name, model in tiny_models.items():
        logits = worlds_by_tp[tp]["logits"][name]
        assert logits.shape == (worlds.BATCH, worlds.SEQ, model.vocab_size)
        torch.testing.assert_close(
            logits,
            model.logits,
            atol=worlds.LOGITS_ATOL,
            rtol=0,
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.mark.parametrize("tp", [1, 2])
def test_export_is_bitwise_and_loads_in_transformers(worlds_by_tp, tiny_models, tmp_path, tp):
    for name, model in tiny_models.items():
        out = tmp_path / name
        export_checkpoint(
            load=worlds_by_tp[tp]["ckpt"][name],
            out_dir=out,
            max_shard_size="8KB",
            show_progress=False,
        )
        _assert_bitwise(model.hf_dir, out)
        assert (out / "model.safetensors.index.json").is_file()
        assert json.loads((out / "config.json").read_text()) == json.loads(
            (model.hf_dir / "config.json").read_text()
        )
        assert (out / "generation_config.json").is_file()
    # The exported folder is a working HF model: same logits as the original, tokenizer too.
    qwen3 = tiny_models["qwen3_tied"]
    torch.testing.assert_close(
        worlds.reference_logits(tmp_path / "qwen3_tied", qwen3.tokens), qwen3.logits, atol=0, rtol=0
    )
    from megatron_longact.data.tokenizer import load_tokenizer

    assert load_tokenizer(tmp_path / "qwen3_tied")("hello").input_ids


def test_bf16_weights_stay_bf16(worlds_by_tp, bf16_model, tmp_path):
    config_yaml = (Path(worlds_by_tp[1]["ckpt"][worlds.BF16_MODEL]) / "config.yaml").read_text()
    assert "precision: bf16" in config_yaml
    out = tmp_path / "bf16"
    export_checkpoint(
        load=worlds_by_tp[1]["ckpt"][worlds.BF16_MODEL], out_dir=out, show_progress=False
    )
    _assert_bitwise(bf16_model, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_training_checkpoint_loads_import_and_exports(worlds_by_tp, tiny_models, tmp_path):
    train = worlds_by_tp[2]["train"]
    # The import's keys are the ones DDP-wrapped training saves and loads.
    assert train["same_params"]
    # A training save (distributed optimizer state, DDP keys, config.yaml) exports without
    # --hf-dir: config.yaml names the model; the optimizer keys are skipped.
    out = tmp_path / "from_training"
    export_checkpoint(load=train["save_dir"], out_dir=out, show_progress=False)
    _assert_bitwise(tiny_models[worlds.TRAIN_COMPAT_MODEL].hf_dir, out)
    assert (out / "model.safetensors").is_file()  # one shard under the default 5GB limit


def test_pipeline_parallel_round_trip_through_cli(tiny_models, tmp_path):
    model = tiny_models["qwen3_tied"]  # tied: the last stage holds a copy of the embedding
    ckpt_dir, out = tmp_path / "mcore_pp2", tmp_path / "hf_pp2"
    args = ["--hf-dir", str(model.hf_dir), "--out", str(ckpt_dir), "--pp", "2", "--quiet"]
    assert convert_main(["--direction", "hf2mcore", *args]) == 0
    assert (ckpt_dir / "latest").read_text().strip() == "iter_0000000"
    config_yaml = (ckpt_dir / "iter_0000000" / "config.yaml").read_text()
    assert "pipeline_model_parallel_size: 2" in config_yaml
    # No --hf-dir: the config and the tokenizer come from the checkpoint's config.yaml.
    args = ["--load", str(ckpt_dir), "--out", str(out), "--max-shard-size", "10KB", "--quiet"]
    assert convert_main(["--direction", "mcore2hf", *args]) == 0
    _assert_bitwise(model.hf_dir, out)
    assert (out / "tokenizer.json").read_bytes() == (model.hf_dir / "tokenizer.json").read_bytes()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1


def test_failed_export_leaves_nothing(worlds_by_tp, tiny_models, tmp_path):
    # A source config whose MLP width disagrees with the checkpoint: the export fails at
    # layer 0, after a shard has already been flushed to the temporary folder.
    model = tiny_models["qwen3_untied"]
    wrong = tmp_path / "wrong_config"
    wrong.mkdir()
    hf_config = json.loads((model.hf_dir / "config.json").read_text())
    hf_config["intermediate_size"] = 24
    (wrong / "config.json").write_text(json.dumps(hf_config))
    out = tmp_path / "export"
    with pytest.raises(ValueError, match="mlp.gate_proj.weight"):
        export_checkpoint(
            load=worlds_by_tp[1]["ckpt"][model.name],
            out_dir=out,
            hf_dir=wrong,
            max_shard_size="1KB",
            show_progress=False,
        )
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong_config"]
