import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from zhllama.config import TrainConfig
from zhllama.data.pack import PackedData, pack
from zhllama.errors import ZhllamaError
from zhllama.train import pretrain
from zhllama.train.logs import read_log
from zhllama.train.loop import sample_ids


def small_cfg(**kw):
    base = dict(max_steps=6, batch_size=4, lr=2e-3, warmup_steps=2, save_every=3, eval_every=3, eval_batches=2,
                log_every=1, seed=0, precision="fp32")
    return TrainConfig(**{**base, **kw})


def train_losses(run):
    return [r["loss"] for r in read_log(run) if r["kind"] == "train"]


def weights(run):
    return load_file(str(run / "final" / "model.safetensors"))


def test_first_step_loss_is_the_model_loss_on_the_first_batch(tiny_zh_model, packed_dir, tmp_path):
    cfg = small_cfg(max_steps=1, eval_every=100, save_every=100)
    run = pretrain(tiny_zh_model, packed_dir, tmp_path / "run", cfg)
    packed = PackedData(packed_dir)
    ids = sample_ids(0, 0, 0, cfg, 1, len(packed))
    tokens = torch.from_numpy(np.stack([packed.block(i) for i in ids]))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_zh_model))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).item()
    (first,) = [r for r in read_log(run) if r["kind"] == "train"]
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["tokens"] == 4 * 64


def test_same_seed_gives_the_same_losses_and_weights(tiny_zh_model, packed_dir, tmp_path):
    a = pretrain(tiny_zh_model, packed_dir, tmp_path / "a", small_cfg(max_steps=3))
    b = pretrain(tiny_zh_model, packed_dir, tmp_path / "b", small_cfg(max_steps=3))
    assert train_losses(a) == train_losses(b)
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_folder_has_logs_plot_checkpoints_and_a_loadable_model(tiny_zh_model, packed_dir, tmp_path):
    run = pretrain(tiny_zh_model, packed_dir, tmp_path / "run", small_cfg())
    records = read_log(run)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in val] == [3, 6]
    assert all(math.isclose(r["perplexity"], math.exp(r["loss"])) and 0 <= r["accuracy"] <= 1 for r in val)
    assert train[-1]["loss"] < train[0]["loss"]
    assert (run / "loss.png").stat().st_size > 1000 and any((run / "tb").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    model = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    assert model.config.vocab_size == 34_000
    assert json.loads((run / "zhllama.json").read_text())["args"]["config"]["max_steps"] == 6


def test_killed_run_resumes_to_the_same_weights_bitwise(tiny_zh_model, packed_dir, tmp_path):
    reference = pretrain(tiny_zh_model, packed_dir, tmp_path / "ref", small_cfg(max_steps=10, save_every=2))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "zhllama", "train", "pretrain", "--model", str(tiny_zh_model), "--data",
           str(packed_dir), "--out", str(run), "--max-steps", "10", "--batch-size", "4", "--lr", "2e-3",
           "--save-every", "2", "--eval-every", "3", "--seed", "0", "--precision", "fp32"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("warmup_steps: 2\nlog_every: 1\neval_batches: 2\n")
    proc = subprocess.Popen(cmd + ["--config", str(recipe)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    done = subprocess.run(cmd + ["--config", str(recipe), "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    ref, got = weights(reference), weights(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [r["step"] for r in read_log(run) if r["kind"] == "train"] == list(range(1, 11))


def test_two_process_ddp_follows_the_one_process_loss_curve(tiny_zh_model, packed_dir, tmp_path):
    one = pretrain(tiny_zh_model, packed_dir, tmp_path / "one", small_cfg(max_steps=4, batch_size=4))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "zhllama",
           "train", "pretrain", "--model", str(tiny_zh_model), "--data", str(packed_dir), "--out",
           str(tmp_path / "two"), "--max-steps", "4", "--batch-size", "2", "--lr", "2e-3", "--save-every", "3",
           "--eval-every", "3", "--seed", "0", "--precision", "fp32", "--config", str(tmp_path / "r.yaml")]
    (tmp_path / "r.yaml").write_text("warmup_steps: 2\nlog_every: 1\neval_batches: 2\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(train_losses(tmp_path / "two")) == 4
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(one), rel=1e-5)


def test_data_packed_with_another_tokenizer_is_refused(tiny_zh_model, llama2_dir, zh_train_file, tmp_path):
    other = pack(llama2_dir, [zh_train_file], 64, tmp_path / "packed-llama2")
    with pytest.raises(ZhllamaError, match="packed with tokenizer"):
        pretrain(tiny_zh_model, other, tmp_path / "run", small_cfg())


def test_seq_len_longer_than_the_blocks_or_the_model_is_refused(tiny_zh_model, packed_dir, tmp_path):
    with pytest.raises(ZhllamaError, match="longer than the packed blocks"):
        pretrain(tiny_zh_model, packed_dir, tmp_path / "run", small_cfg(seq_len=128))


def test_corrupt_checkpoint_is_a_clear_error_and_partial_ones_are_ignored(tiny_zh_model, packed_dir, tmp_path):
    run = pretrain(tiny_zh_model, packed_dir, tmp_path / "run", small_cfg(max_steps=3, save_every=3))
    (run / "checkpoints" / ".step-000009.partial").mkdir()  # a half-written checkpoint is never picked
    with pytest.raises(ZhllamaError, match="already holds checkpoints"):
        pretrain(tiny_zh_model, packed_dir, run, small_cfg(max_steps=3))
    weights_file = run / "checkpoints" / "step-000003" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    with pytest.raises(ZhllamaError, match="step-000003 is corrupt"):
        pretrain(tiny_zh_model, packed_dir, run, small_cfg(max_steps=5), resume=True)


def test_seq_len_beyond_the_model_positions_is_refused(tiny_zh_model, packed_dir, tmp_path):
    short = tmp_path / "short-context"
    shutil.copytree(tiny_zh_model, short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 32
    (short / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZhllamaError, match="larger than the model supports"):
        pretrain(short, packed_dir, tmp_path / "run", small_cfg())
