"""finish_run writes final/ (and a LoRA run's adapter/) whole or not at all, each with its zhllama.json."""

import json
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from zhllama.artifacts import PROVENANCE
from zhllama.train.run import finish_run


def finish(model, run, tiny_zh_model):
    return finish_run(model, run, tiny_zh_model, "train sft", {"model": str(tiny_zh_model)}, {"tokenizer": "x"})


def test_a_failed_finish_keeps_the_previous_final(tiny_zh_model, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_zh_model))
    final = finish(model, run, tiny_zh_model)
    before = {p.name: p.stat().st_size for p in final.iterdir()}
    assert "model.safetensors" in before and json.loads((final / PROVENANCE).read_text())["command"] == "train sft"

    def half_written(folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed while saving")

    model.save_pretrained = half_written
    with pytest.raises(RuntimeError, match="killed while saving"):
        finish(model, run, tiny_zh_model)
    assert {p.name: p.stat().st_size for p in final.iterdir()} == before
    assert sorted(p.name for p in run.iterdir()) == ["final"]  # no partial folder left


def test_a_lora_run_keeps_its_adapter_with_provenance(tiny_zh_model, tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "stale.bin").write_text("an older zhllama's adapter, from before adapters had zhllama.json")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_zh_model))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    finish(model, run, tiny_zh_model)
    adapter = {p.name for p in (run / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.model", PROVENANCE} <= adapter
    assert "stale.bin" not in adapter
    assert "lora_A" not in "".join((run / "final" / "model.safetensors").read_bytes()[:4096].decode("latin-1"))
