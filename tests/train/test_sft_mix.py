"""SFT on files mixed by weight and with pretraining blocks replayed in: one loss normalisation over both."""

import json

import pytest
import torch
import torch.nn.functional as F

from tests.train.test_pretrain import train_losses
from tests.train.test_sft import SEQ_LEN, cfg_for, sft_file  # noqa: F401  (sft_file is a fixture)
from zhllama.errors import ZhllamaError
from zhllama.scoring import IGNORE
from zhllama.train import sft
from zhllama.train.loop import sample_ids
from zhllama.train.run import load_for_training
from zhllama.train.sft import parse_replay, prepare_sft_data


def test_replay_rows_join_sft_batches_under_one_loss_normalisation(tiny_zh_model, sft_file, packed_dir,  # noqa: F811
                                                                     tmp_path):
    cfg = cfg_for(max_steps=1, batch_size=8, replay=f"{packed_dir}:0.4")
    run = sft(tiny_zh_model, [sft_file], tmp_path / "run", cfg)
    data, summary = prepare_sft_data(tiny_zh_model, [sft_file], cfg, progress=False)
    assert summary["sources"] == {"conversations": 0.6, f"replay {packed_dir}": 0.4}
    batch = data.train_batch(sample_ids(0, 0, 0, cfg, 1, data.num_train()))
    targets = batch["labels"] != IGNORE
    replayed = targets[:, 1:64].all(dim=1)  # a replayed block of 64: every token after the first is a target
    assert 0 < int(replayed.sum()) < 8 and 64 < batch["input_ids"].shape[1] <= SEQ_LEN  # blocks of 64, padded
    model = load_for_training(tiny_zh_model).eval()  # with the span attention: conversations attend one at a time
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    # one mean over every target of the batch: reply tokens and replayed tokens weigh the same
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE)
    assert train_losses(run) == pytest.approx([expected.item()], rel=1e-5)


def test_files_mix_by_weight(tiny_zh_model, sft_file, tmp_path):  # noqa: F811
    other = tmp_path / "other.jsonl"
    other.write_text(sft_file.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = cfg_for(replay=None)
    data, summary = prepare_sft_data(tiny_zh_model, [f"{sft_file}:3", f"{other}:1"], cfg, progress=False)
    assert summary["sources"] == {str(sft_file): 0.75, str(other): 0.25}
    counts = data.schedule.counts
    assert counts[0] == pytest.approx(3 * counts[1], abs=1)
    assert summary["train_examples"] == 2 * prepare_sft_data(tiny_zh_model, [sft_file], cfg, False)[1][
        "train_examples"]
    run = sft(tiny_zh_model, [f"{sft_file}:3", f"{other}:1"], tmp_path / "run", cfg_for(max_steps=2))
    shares = [r["source_shares"] for r in json.loads("[" + ",".join(
        (run / "log.jsonl").read_text().splitlines()) + "]") if r["kind"] == "train"]
    assert len(shares) == 2 and set(shares[0]) == {str(sft_file), str(other)}


@pytest.mark.parametrize("spec", ["packed", "packed:1", "packed:1.5", "packed:-0.1", "packed:abc"])
def test_a_replay_fraction_outside_zero_to_one_is_refused(spec):
    with pytest.raises(ZhllamaError, match=f"--replay {spec}: give DIR:FRACTION with a fraction in"):
        parse_replay(spec)
    assert parse_replay("runs/packed:0.2") == (parse_replay("runs/packed:0.2")[0], 0.2)
