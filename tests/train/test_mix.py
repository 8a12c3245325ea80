"""Pretraining on packed corpora mixed by weight: the realised shares, exact resume, and what is refused."""

import json

import numpy as np
import pytest
import torch

from tests.train.test_pretrain import pretrain_command, resume_after_sigkill, small_cfg, weights
from zhllama.data import builtin
from zhllama.data.pack import pack
from zhllama.errors import ZhllamaError
from zhllama.runs import read_log
from zhllama.train import pretrain
from zhllama.train.loop import sample_ids
from zhllama.train.mixing import MixedTrainData
from zhllama.train.pretrain import PackedTrainData


def write_texts(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def english_packed(workdir, extended_dir):
    corpus = write_texts(workdir / "english.jsonl", builtin.english_texts()[:40])
    return pack(extended_dir, [corpus], 64, workdir / "packed-english", val_fraction=0.05)


@pytest.fixture(scope="module")
def small_packed(workdir, extended_dir):
    """A source of a few blocks, the first to run out."""
    corpus = write_texts(workdir / "small.jsonl", builtin.english_texts()[:3])
    return pack(extended_dir, [corpus], 64, workdir / "packed-small")


def test_a_mixed_run_logs_the_share_of_each_source_it_trained_on(tiny_zh_model, packed_dir, english_packed,
                                                                  tmp_path):
    cfg = small_cfg(max_steps=5)
    run = pretrain(tiny_zh_model, [f"{packed_dir}:0.7", f"{english_packed}:0.3"], tmp_path / "mix", cfg)
    data = MixedTrainData([PackedTrainData(packed_dir, 64), PackedTrainData(english_packed, 64)],
                          ["zh", "en"], [0.7, 0.3], 0, "repeat")
    counts, lengths = data.schedule.counts, [len(s.train) for s in data.sources]
    assert min(c - n for c, n in zip(counts, lengths, strict=True)) == 0  # one source exactly covered, none short
    assert counts / counts.sum() == pytest.approx([0.7, 0.3], abs=1 / counts.sum())
    logged = [r for r in read_log(run) if r["kind"] == "train"]
    drawn = []
    for step, record in enumerate(logged):
        drawn += [data.schedule.locate(i)[0] for i in sample_ids(step, 0, 0, cfg, 1, data.num_train())]
        expected = np.bincount(drawn, minlength=2) / len(drawn)
        assert list(record["source_shares"].values()) == pytest.approx(expected.tolist(), abs=1e-6)
    assert list(logged[0]["source_shares"]) == [str(packed_dir), str(english_packed)]
    assert json.loads((run / "zhllama.json").read_text())["args"]["data"] == [f"{packed_dir}:0.7",
                                                                               f"{english_packed}:0.3"]


def test_a_mixed_batch_holds_the_blocks_the_schedule_names(packed_dir, english_packed):
    data = MixedTrainData([PackedTrainData(packed_dir, 64), PackedTrainData(english_packed, 64)],
                          ["zh", "en"], [1, 1], 5, "repeat")
    samples = [0, data.num_train() - 1, 7]
    batch = data.train_batch(samples)
    for row, sample in zip(batch["input_ids"], samples, strict=True):
        source, block = data.schedule.locate(sample)
        assert torch.equal(row, torch.from_numpy(data.sources[source].train.block(block).astype(np.int64)))


def test_killed_mixed_run_resumes_to_the_same_weights_bitwise(tiny_zh_model, packed_dir, english_packed, tmp_path):
    mix = [f"{packed_dir}:0.6", f"{english_packed}:0.4"]
    reference = pretrain(tiny_zh_model, mix, tmp_path / "ref", small_cfg(max_steps=10, save_every=2))
    run = tmp_path / "killed"
    resume_after_sigkill(pretrain_command(tiny_zh_model, mix, run, tmp_path), run)
    ref, got = weights(reference), weights(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [r["source_shares"] for r in read_log(run) if r["kind"] == "train"] == \
        [r["source_shares"] for r in read_log(reference) if r["kind"] == "train"]


def test_stop_ends_the_run_when_the_first_source_runs_out(tiny_zh_model, packed_dir, small_packed, tmp_path, capfd):
    cfg = small_cfg(max_steps=50, mix_exhausted="stop", save_every=100, eval_every=100)
    run = pretrain(tiny_zh_model, [f"{packed_dir}:1", f"{small_packed}:1"], tmp_path / "stop", cfg)
    blocks = 2 * len(PackedTrainData(small_packed, 64).train)  # half the mix is the small source
    steps = [r["step"] for r in read_log(run) if r["kind"] == "train"]
    assert steps[-1] == blocks // 4 < 50
    assert f"training stops at step {blocks // 4} instead of 50" in capfd.readouterr().err


def test_sources_packed_differently_are_refused(tiny_zh_model, packed_dir, llama2_dir, workdir, tmp_path):
    corpus = write_texts(workdir / "other.jsonl", builtin.english_texts()[:5])
    other_tokenizer = pack(llama2_dir, [corpus], 64, tmp_path / "llama2-packed")
    with pytest.raises(ZhllamaError, match=f"{packed_dir} was packed with tokenizer .* and {other_tokenizer} with"):
        pretrain(tiny_zh_model, [packed_dir, other_tokenizer], tmp_path / "run", small_cfg())
    other_length = pack(tiny_zh_model, [corpus], 32, tmp_path / "short-packed")
    with pytest.raises(ZhllamaError, match="in blocks of 64 tokens and .* in blocks of 32"):
        pretrain(tiny_zh_model, [f"{packed_dir}:2", other_length], tmp_path / "run", small_cfg())
    assert not (tmp_path / "run").exists()
