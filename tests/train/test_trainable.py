import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.train.test_pretrain import small_cfg, torchrun_pretrain, train_losses, weights
from zhllama.config import LoraSettings, TrainConfig
from zhllama.errors import ZhllamaError
from zhllama.train import pretrain
from zhllama.train.pretrain import validate
from zhllama.train.lora_merge import merge_adapters
from zhllama.train.trainable import prepare_trainable


def test_embeddings_mode_trains_only_embed_tokens_and_lm_head(tiny_zh_model, packed_dir, tmp_path):
    run = pretrain(tiny_zh_model, packed_dir, tmp_path / "emb", small_cfg(max_steps=2, trainable="embeddings"))
    before = load_file(str(tiny_zh_model / "model.safetensors"))
    after = load_file(str(run / "final" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.embed_tokens.weight", "lm_head.weight"}
    saved = load_file(str(run / "checkpoints" / "step-000002" / "model.safetensors"))
    assert set(saved) == changed  # checkpoints hold what trains, not the frozen body


def test_lora_mode_exports_a_plain_merged_model_that_learned(tiny_zh_model, packed_dir, tmp_path):
    cfg = small_cfg(max_steps=6, trainable="lora", lr=5e-3, lora=LoraSettings(r=8, alpha=16, dropout=0.0))
    run = pretrain(tiny_zh_model, packed_dir, tmp_path / "lora", cfg)
    losses = train_losses(run)
    assert losses[-1] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    names = {n for n, _ in model.named_parameters()}
    assert not any("lora" in n for n in names)
    base = load_file(str(tiny_zh_model / "model.safetensors"))
    merged = load_file(str(run / "final" / "model.safetensors"))
    assert set(merged) == set(base)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert not torch.equal(base[name], merged[name])
    # The adapter is kept too, and merging it onto the base gives the same model as final/.
    again = load_file(str(merge_adapters(tiny_zh_model, [run / "adapter"], tmp_path / "again") / "model.safetensors"))
    assert all(torch.allclose(again[k], merged[k], atol=1e-6) for k in merged)


def test_qlora_on_a_full_precision_base_is_refused(tiny_zh_model):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_zh_model))
    with pytest.raises(ZhllamaError, match="trainable qlora needs the base model loaded in 4-bit NF4"):
        prepare_trainable(model, TrainConfig(trainable="qlora"))


def assert_only_new_rows_moved(before: dict, after: dict, base_rows: int = 32_000):
    for name in before:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(before[name][:base_rows], after[name][:base_rows]), name  # bitwise
            assert not torch.equal(before[name][base_rows:], after[name][base_rows:]), name
        else:
            assert torch.equal(before[name], after[name]), name


def test_new_rows_mode_trains_only_the_added_rows_even_with_weight_decay(extended_model, packed_dir, tmp_path):
    # A batch of 32 blocks: with fewer, AdamW's full-size steps on the rows of tokens a batch happens to lack
    # outweigh the learning on this tiny random model (measured: batch 4 raises the held-out loss).
    cfg = small_cfg(max_steps=12, batch_size=32, trainable="new-rows", lr=1e-2, weight_decay=0.1, save_every=100,
                    eval_every=100)
    run = pretrain(extended_model, packed_dir, tmp_path / "new-rows", cfg)
    assert_only_new_rows_moved(load_file(str(extended_model / "model.safetensors")), weights(run))
    before = validate(extended_model, packed_dir, 4, 4)["loss"]
    after = validate(run / "final", packed_dir, 4, 4)["loss"]
    print(f"new-rows, 12 steps: held-out loss on Chinese {before:.4f} -> {after:.4f}")
    assert after < before - 0.03  # the new rows learn


def test_new_rows_mode_under_two_process_ddp(extended_model, packed_dir, tmp_path):
    torchrun_pretrain(extended_model, packed_dir, tmp_path / "ddp", "--max-steps", 3, "--batch-size", 2,
                      "--trainable", "new-rows")
    assert_only_new_rows_moved(load_file(str(extended_model / "model.safetensors")), weights(tmp_path / "ddp"))


def test_new_rows_mode_needs_an_extended_model(tiny_zh_model, packed_dir, tmp_path):
    with pytest.raises(ZhllamaError, match="trainable new-rows needs a model written by `zhllama model extend-vocab`"):
        pretrain(tiny_zh_model, packed_dir, tmp_path / "plain", small_cfg(max_steps=1, trainable="new-rows"))
