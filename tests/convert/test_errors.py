"""Bad input fails fast with a message naming the file or field, and writes nothing.

hf2mcore checks its input in the calling process before it spawns ranks, so none of these
tests starts a megatron world.
"""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_longact.convert.cli import main as convert_main


def _copy(tiny_models, name, tmp_path):
    folder = tmp_path / name
    shutil.copytree(tiny_models[name].hf_dir, folder)
    return folder


def _edit_config(folder, **fields):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def _hf2mcore(folder, out):
    return convert_main(["--direction", "hf2mcore", "--hf-dir", str(folder), "--out", str(out)])


def test_missing_shard_names_the_file(tiny_models, tmp_path):
    folder = _copy(tiny_models, "qwen3_untied", tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=shard.name):
        _hf2mcore(folder, out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("model", "fields", "named"),
    [
        ("qwen3_untied", {"hidden_act": "gelu"}, "hidden_act"),
        ("qwen3_untied", {"model_type": "mixtral"}, "model_type"),
        ("llama_gqa", {"attention_bias": True}, "attention_bias"),
        ("llama_gqa", {"mlp_bias": True}, "mlp_bias"),
        ("qwen2_bias", {"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_unmappable_config_names_the_field(tiny_models, tmp_path, model, fields, named):
    folder = _copy(tiny_models, model, tmp_path)
    _edit_config(folder, **fields)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=named):
        _hf2mcore(folder, out)
    assert not out.exists()


def test_rope_theta_is_never_misread(tiny_models, tmp_path):
    # transformers 5 writes rope_parameters instead of a top-level rope_theta: the import must
    # either read that base or stop, never build a model with another RoPE.
    from megatron_longact.models.hf_weights.hf_to_mcore import inspect_hf_dir

    folder = _copy(tiny_models, "qwen3_untied", tmp_path)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    theta = config.pop("rope_theta")
    config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    path.write_text(json.dumps(config))
    try:
        source = inspect_hf_dir(folder)
    except ValueError as err:
        assert "rope_parameters.rope_theta" in str(err)
    else:
        assert source.arch.rotary_base == theta


def test_weights_that_disagree_with_the_config(tiny_models, tmp_path):
    folder = _copy(tiny_models, "qwen2_bias", tmp_path)
    _edit_config(folder, num_hidden_layers=3)
    with pytest.raises(ValueError, match="model.layers.2"):
        _hf2mcore(folder, tmp_path / "out")
    _edit_config(folder, num_hidden_layers=2, intermediate_size=40)
    with pytest.raises(ValueError, match="gate_proj.weight has shape"):
        _hf2mcore(folder, tmp_path / "out")


def test_refuses_a_non_empty_out(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        _hf2mcore(tiny_models["qwen3_tied"].hf_dir, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_export_without_a_checkpoint(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "hf"
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        convert_main(["--direction", "mcore2hf", "--load", str(empty), "--out", str(out)])
    assert not out.exists()


def test_missing_required_arguments():
    with pytest.raises(SystemExit):
        convert_main(["--direction", "mcore2hf", "--out", "x"])
    with pytest.raises(SystemExit):
        convert_main(["--direction", "hf2mcore", "--out", "x"])
