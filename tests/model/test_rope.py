"""RoPE scaling (zhllama.model.rope): the rope_parameters each type writes, the errors, what survives a save,
and that it reaches the model through load_checked and load_for_training."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from zhllama.config import TrainConfig, load_config
from zhllama.errors import ZhllamaError
from zhllama.model.loading import load_checked
from zhllama.model.presets import llama_config
from zhllama.model.rope import scale_rope


def tiny_config():
    return llama_config("tiny", 512, 1, 2)  # 2048 positions, rope_theta 10000


@pytest.mark.parametrize("rope, factor, extra, context", [
    ("linear", 2, {}, 4096),
    ("dynamic", 2, {}, 2048),  # dynamic NTK measures against the trained context, so it stays
    ("yarn", 4, {"original_max_position_embeddings": 2048}, 8192),
    ("llama3", 8, {"original_max_position_embeddings": 2048, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     16384),
])
def test_each_type_sets_its_rope_parameters(rope, factor, extra, context):
    config = scale_rope(tiny_config(), rope, factor)
    assert config.rope_parameters == {"rope_type": rope, "factor": float(factor), "rope_theta": 10000.0, **extra}
    assert config.max_position_embeddings == context
    model = LlamaForCausalLM(config)  # transformers accepts the parameters and builds that rotary embedding
    assert model.model.rotary_emb.rope_type == rope


def test_no_rope_is_a_no_op():
    config = tiny_config()
    before = dict(config.rope_parameters)
    assert scale_rope(config, None, None).rope_parameters == before


@pytest.mark.parametrize("rope, factor, match", [
    ("linear", 1, "a RoPE factor of 1 or less"),
    ("yarn", 0.5, "a RoPE factor of 1 or less"),
    ("linear", None, "go together"),
    (None, 2.0, "go together"),
    ("ntk", 2, "must be one of linear, dynamic, yarn, llama3"),
])
def test_bad_settings_are_clear_errors(rope, factor, match):
    with pytest.raises(ZhllamaError, match=match):
        scale_rope(tiny_config(), rope, factor)


def test_scaling_does_not_stack():
    config = scale_rope(tiny_config(), "linear", 2)
    with pytest.raises(ZhllamaError, match="already uses linear RoPE scaling"):
        scale_rope(config, "yarn", 2)


def test_scaling_survives_save_and_load(tmp_path):
    config = scale_rope(tiny_config(), "llama3", 4)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters == config.rope_parameters and loaded.max_position_embeddings == 8192
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    reference = LlamaForCausalLM(config).model.rotary_emb.inv_freq
    assert model.model.rotary_emb.rope_type == "llama3"
    assert torch.allclose(model.model.rotary_emb.inv_freq, reference)
    # llama3 keeps the fastest frequencies and divides the slowest by the factor
    default = LlamaForCausalLM(tiny_config()).model.rotary_emb.inv_freq
    assert torch.allclose(reference[0], default[0]) and torch.allclose(reference[-1], default[-1] / 4)


def test_linear_rope_changes_long_logits_but_not_one_token(tiny_zh_model):
    base, tokenizer = load_checked(tiny_zh_model, "cpu")
    scaled, _ = load_checked(tiny_zh_model, "cpu", rope="linear", rope_factor=2)
    assert scaled.config.max_position_embeddings == 4096 and scaled.model.rotary_emb.rope_type == "linear"
    ids = torch.tensor([tokenizer("北京是中国的首都，也是一座历史悠久的城市。" * 4)["input_ids"]])
    with torch.no_grad():
        # position 0 rotates by angle 0 under any scaling: only later positions can differ
        assert torch.allclose(scaled(ids[:, :1]).logits, base(ids[:, :1]).logits, atol=1e-5)
        assert not torch.allclose(scaled(ids).logits, base(ids).logits, atol=1e-3)


def test_training_loads_with_scaling(tiny_zh_model, tmp_path):
    from zhllama.train import load_for_training

    with pytest.raises(ZhllamaError, match="larger than the model supports"):
        load_for_training(tiny_zh_model, seq_len=4096)
    model = load_for_training(tiny_zh_model, seq_len=4096, rope="yarn", rope_factor=2)
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.max_position_embeddings == 4096
    model.save_pretrained(tmp_path)  # what finish_run writes carries the scaling
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters["factor"] == 2.0


def test_train_config_reads_rope_from_yaml_and_flags(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rope: linear\nrope_factor: 2\n", encoding="utf-8")
    cfg = load_config(TrainConfig, recipe)
    assert (cfg.rope, cfg.rope_factor) == ("linear", 2.0) and isinstance(cfg.rope_factor, float)
    cfg = load_config(TrainConfig, recipe, {"rope": "yarn", "rope_factor": 4.0})
    assert (cfg.rope, cfg.rope_factor) == ("yarn", 4.0)
    assert (TrainConfig().rope, TrainConfig().rope_factor) == (None, None)
