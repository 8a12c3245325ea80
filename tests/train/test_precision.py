"""Both precisions on every machine, in any order, in one process.

`precision: auto` picks bf16 only on CPUs with AVX512-BF16 or AMX (and on GPUs), so which path a run takes depends
on the machine. These tests force each path, so every machine runs both.
"""

import pytest
from safetensors.torch import load_file

from tests.train.test_pretrain import small_cfg, train_losses
from tests.train.test_sft import cfg_for, sft_file  # noqa: F401  (sft_file is a module fixture)
from zhllama.runs import read_log
from zhllama.train import loop, pretrain, sft


def precisions(run):
    return {r["precision"] for r in read_log(run) if r["kind"] == "train"}


@pytest.mark.parametrize("fast", [True, False])
def test_auto_follows_the_cpu(monkeypatch, fast):
    monkeypatch.setattr(loop, "bf16_is_fast", lambda: fast)
    assert loop.resolve_precision("auto") == ("bf16" if fast else "fp32")
    assert loop.resolve_precision("fp32") == "fp32" and loop.resolve_precision("bf16") == "bf16"


def test_fp32_and_bf16_runs_in_any_order_in_one_process(tiny_zh_model, packed_dir, sft_file, tmp_path,  # noqa: F811
                                                        monkeypatch):
    """accelerate keeps its settings process-wide; a second run with another precision used to be refused."""
    monkeypatch.setattr(loop, "bf16_is_fast", lambda: True)  # auto behaves as on an AVX512-BF16 CPU
    short = dict(max_steps=2, save_every=2, eval_every=2)
    fp32 = pretrain(tiny_zh_model, packed_dir, tmp_path / "fp32", small_cfg(**short))
    auto = pretrain(tiny_zh_model, packed_dir, tmp_path / "auto", small_cfg(precision="auto", **short))
    sft_bf16 = sft(tiny_zh_model, [sft_file], tmp_path / "sft-bf16", cfg_for(max_steps=2, precision="bf16"))
    sft_fp32 = sft(tiny_zh_model, [sft_file], tmp_path / "sft-fp32", cfg_for(max_steps=2, precision="fp32"))
    fp32_again = pretrain(tiny_zh_model, packed_dir, tmp_path / "fp32-again", small_cfg(**short))

    assert precisions(fp32) == precisions(sft_fp32) == precisions(fp32_again) == {"fp32"}
    assert precisions(auto) == precisions(sft_bf16) == {"bf16"}
    # Nothing of the bf16 runs stays behind: the same fp32 run gives the same losses again.
    assert train_losses(fp32_again) == train_losses(fp32)
    # bf16 autocast really ran (the losses differ from fp32's) and stays close to fp32.
    for bf16_run, fp32_run in ((auto, fp32), (sft_bf16, sft_fp32)):
        assert train_losses(bf16_run) != train_losses(fp32_run)
        assert train_losses(bf16_run) == pytest.approx(train_losses(fp32_run), rel=2e-2)
    # Mixed precision keeps fp32 master weights: what a bf16 run saves is fp32.
    assert {str(t.dtype) for t in load_file(str(auto / "final" / "model.safetensors")).values()} == {"torch.float32"}
