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
from zhllama.runs import read_log
from zhllama.train import pretrain
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
    resume_after_sigkill(pretrain_command(tiny_zh_model, [packed_dir], run, tmp_path), run)
    ref, got = weights(reference), weights(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [r["step"] for r in read_log(run) if r["kind"] == "train"] == list(range(1, 11))


def pretrain_command(model, data: list, run, tmp_path) -> list[str]:
    """`train pretrain` as small_cfg(max_steps=10, save_every=2) runs it, from the command line."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("warmup_steps: 2\nlog_every: 1\neval_batches: 2\n")
    return [sys.executable, "-m", "zhllama", "train", "pretrain", "--model", str(model), "--data", *map(str, data),
            "--out", str(run), "--max-steps", "10", "--batch-size", "4", "--lr", "2e-3", "--save-every", "2",
            "--eval-every", "3", "--seed", "0", "--precision", "fp32", "--config", str(recipe)]


def resume_after_sigkill(cmd: list[str], run) -> None:
    """Start `cmd`, SIGKILL it once step 4's checkpoint is in, then run it again with --resume to the end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr


def torchrun_pretrain(model, data, out, *flags):
    """A 2-process DDP (gloo) pretraining run from the command line; its log's train losses."""
    recipe = out.with_name(out.name + ".yaml")
    recipe.write_text("warmup_steps: 2\nlog_every: 1\neval_batches: 2\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "zhllama",
           "train", "pretrain", "--model", str(model), "--data", str(data), "--out", str(out), "--lr", "2e-3",
           "--save-every", "3", "--eval-every", "3", "--seed", "0", "--precision", "fp32", "--config", str(recipe),
           *map(str, flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return train_losses(out)


def test_two_process_ddp_follows_the_one_process_loss_curve(tiny_zh_model, packed_dir, tmp_path):
    one = pretrain(tiny_zh_model, packed_dir, tmp_path / "one", small_cfg(max_steps=4, batch_size=4))
    two = torchrun_pretrain(tiny_zh_model, packed_dir, tmp_path / "two", "--max-steps", 4, "--batch-size", 2)
    assert len(two) == 4
    assert two == pytest.approx(train_losses(one), rel=1e-5)


def max_difference(a, b):
    assert len(a) == len(b) == 4
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_grad_accum_follows_the_big_batch_loss_curve(tiny_zh_model, packed_dir, tmp_path):
    quiet = dict(max_steps=4, save_every=100, eval_every=100)  # one checkpoint and one eval, at the end
    big = pretrain(tiny_zh_model, packed_dir, tmp_path / "big", small_cfg(batch_size=8, **quiet))
    acc = pretrain(tiny_zh_model, packed_dir, tmp_path / "acc", small_cfg(batch_size=2, grad_accum=4, **quiet))
    diff = max_difference(train_losses(big), train_losses(acc))
    print(f"grad-accum 4 x batch 2 against batch 8, 1 process: max |loss difference| {diff:.2e}")
    assert diff <= 1e-5
    assert train_losses(big)[-1] < train_losses(big)[0]  # it did train: the curves are not flat
    norms = [[r["grad_norm"] for r in read_log(run) if r["kind"] == "train"] for run in (big, acc)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)


def test_grad_accum_on_two_processes_follows_the_same_global_batch(tiny_zh_model, packed_dir, tmp_path):
    # 2 processes x --batch-size 2 x --grad-accum 4 is the global batch of --batch-size 8 on 2 processes, and so
    # of --batch-size 16 on one (same global batch, same curve: the DDP test above).
    one = pretrain(tiny_zh_model, packed_dir, tmp_path / "one",
                   small_cfg(max_steps=4, batch_size=16, save_every=100, eval_every=100))
    two = torchrun_pretrain(tiny_zh_model, packed_dir, tmp_path / "two", "--max-steps", 4, "--batch-size", 2,
                            "--grad-accum", 4)
    diff = max_difference(train_losses(one), two)
    print(f"grad-accum 4 x batch 2 x 2 processes against batch 16, 1 process: max |loss difference| {diff:.2e}")
    assert diff <= 1e-5


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


def test_a_block_of_two_documents_gives_the_losses_of_each_document_alone(tiny_zh_model, tmp_path):
    from zhllama.model.loading import load_tokenizer
    from zhllama.train import IGNORE, PackedTrainData, load_for_training

    texts = ["今天天气很好，我们去公园散步。", "人民日报记者报道，新建的铁路今天正式通车了。"]
    tok = load_tokenizer(tiny_zh_model)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) + 2 for t in texts]  # with BOS and EOS
    src = tmp_path / "two.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    packed = pack(tiny_zh_model, [src], sum(lengths), tmp_path / "packed", doc_boundaries=True)

    data = PackedTrainData(packed, sum(lengths), TrainConfig().reset_position_ids)  # the default follows the data
    batch = data.train_batch([0])
    model = load_for_training(tiny_zh_model).eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        targets = batch["labels"][0, 1:]
        in_block = F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE, reduction="none")[targets != IGNORE]
        docs = torch.split(batch["input_ids"][0], lengths)
        alone = torch.cat([F.cross_entropy(model(input_ids=d[None], use_cache=False).logits[0, :-1], d[1:],
                                           reduction="none") for d in docs])
    assert [d[0].item() for d in docs] == [tok.bos_token_id] * 2
    assert in_block.shape == alone.shape == (sum(lengths) - 2,)  # no target crosses from one document to the next
    assert torch.allclose(in_block, alone, atol=1e-5)

    # `train pretrain` with the default recipe trains on exactly those losses.
    run = pretrain(tiny_zh_model, packed, tmp_path / "run", small_cfg(max_steps=1, batch_size=1, eval_every=100))
    (first,) = [r for r in read_log(run) if r["kind"] == "train"]
    assert first["loss"] == pytest.approx(alone.mean().item(), rel=1e-5)
    # reset_position_ids: false in a recipe still turns it off.
    assert "position_ids" not in PackedTrainData(packed, sum(lengths), False).train_batch([0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU (and bitsandbytes) QLoRA runs")
def test_pretrain_with_qlora_and_no_gpu_is_refused(tiny_zh_model, packed_dir, tmp_path):
    from tests.test_cli import assert_one_line_error, run

    result = run("train", "pretrain", "--model", tiny_zh_model, "--data", packed_dir, "--out", tmp_path / "run",
                 "--trainable", "qlora", "--max-steps", 1, "--precision", "fp32")
    assert_one_line_error(result, "QLoRA needs a CUDA GPU")
    assert not (tmp_path / "run").exists()
