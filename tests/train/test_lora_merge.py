import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tests.test_cli import assert_one_line_error, run
from zhllama.errors import ZhllamaError
from zhllama.train.lora_merge import merge_adapters


def make_adapter(model_dir, out, seed, train_embeddings=False, r=4):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False,  # non-zero B, so that merging has something to show
                        modules_to_save=["embed_tokens", "lm_head"] if train_embeddings else None)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))
    return out


def test_merged_logits_equal_the_peft_model(tiny_zh_model, tmp_path):
    from peft import PeftModel

    first = make_adapter(tiny_zh_model, tmp_path / "a1", seed=1)
    second = make_adapter(tiny_zh_model, tmp_path / "a2", seed=2, train_embeddings=True)
    merged_dir = merge_adapters(tiny_zh_model, [first, second], tmp_path / "merged")
    ids = torch.tensor([[1, 29871, 30275, 30333, 32001, 33500, 13, 2]])
    stacked = AutoModelForCausalLM.from_pretrained(str(tiny_zh_model))
    stacked = PeftModel.from_pretrained(stacked, str(first)).merge_and_unload()
    stacked = PeftModel.from_pretrained(stacked, str(second)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_zh_model)).eval()
    with torch.no_grad():
        want, got, before = stacked(ids).logits, merged(ids).logits, base(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, before, atol=1e-3)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_adapter_for_another_vocabulary_names_both_sizes(tiny_zh_model, workdir, llama2_dir, tmp_path):
    from zhllama import model

    base_32k = model.init_model("tiny", llama2_dir, workdir / "tiny-llama2-for-lora", seed=0)
    adapter = make_adapter(tiny_zh_model, tmp_path / "zh-adapter", seed=3, train_embeddings=True)
    with pytest.raises(ZhllamaError, match="vocabulary of 34000 tokens but the base model has 32000"):
        merge_adapters(base_32k, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = run("lora", "merge", "--base", base_32k, "--adapter", adapter, "--out", tmp_path / "out")
    assert_one_line_error(result, "34000", "32000")


@pytest.mark.parametrize("template", ["atom", "llama2", "chatml"])
def test_merged_sft_adapter_keeps_the_training_template(tiny_zh_model, tmp_path, template):
    """`lora merge` of an SFT adapter serves the prompts training saw: the merged tokenizer's own
    apply_chat_template gives the training ids, and the generation settings are the run's."""
    import json

    from transformers import AutoTokenizer

    from tests.train.test_sft import cfg_for
    from zhllama.config import LoraSettings
    from zhllama.data.sft_batches import tokenize_examples
    from zhllama.train import sft

    conversation = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                    {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"},
                    {"role": "assistant", "content": "再见。"}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": conversation}, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = cfg_for(template=template, max_steps=1, batch_size=1, trainable="lora",
                  lora=LoraSettings(r=2, alpha=4, dropout=0.0, train_embeddings=False))
    run_dir = sft(tiny_zh_model, [data], tmp_path / "run", cfg)
    merged = merge_adapters(tiny_zh_model, [run_dir / "adapter"], tmp_path / "merged")

    tok = AutoTokenizer.from_pretrained(str(merged))
    want = tokenize_examples(tok, template, [conversation], 512, progress=False).input_ids[0].tolist()
    assert list(tok.apply_chat_template(conversation, tokenize=True, return_dict=False)) == want
    assert (merged / "chat_template.jinja").read_text() == (run_dir / "final" / "chat_template.jinja").read_text()
    assert json.loads((merged / "generation_config.json").read_text()) == \
        json.loads((run_dir / "final" / "generation_config.json").read_text())
    assert not (tiny_zh_model / "chat_template.jinja").exists()  # the template came from the adapter, not the base
