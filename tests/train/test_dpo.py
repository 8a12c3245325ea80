"""`train dpo` through the shared loop: reference log-probabilities, learning, exact resume, DDP, bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from tests.test_cli import assert_one_line_error, run
from tests.train.test_pretrain import resume_after_sigkill, train_losses, weights
from tests.train.test_sft import sentences
from zhllama.chat import get_template
from zhllama.config import DpoConfig
from zhllama.data.preference import read_preference_pairs, tokenize_pairs
from zhllama.model.loading import load_tokenizer
from zhllama.runs import read_log
from zhllama.train.dpo import REFERENCE_FILE, dpo, reference_logps
from zhllama.train.preference import PreferenceObjective, preference_losses, reply_logps

SEQ_LEN = 128


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """32 pairs: the reply that repeats the quoted sentence is chosen, another sentence is rejected; one
    multi-turn prompt in four, a system prompt in five, and three rows that must be skipped."""
    s = sentences(80)
    rows = []
    for i in range(32):
        prompt = [{"from": "human", "value": f"请复述：{s[i]}"}]
        if i % 4 == 0:
            prompt = [{"from": "human", "value": "你好。"}, {"from": "gpt", "value": "你好！"}] + prompt
        row = {"conversations": prompt, "chosen": {"from": "gpt", "value": s[i]},
               "rejected": {"from": "gpt", "value": s[40 + i]}}
        if i % 5 == 0:
            row["system"] = "你是一个复述句子的助手。"
        rows.append(row)
    rows += [{"conversations": [{"from": "human", "value": "问"}], "chosen": "同一个回答", "rejected": "同一个回答"},
             {"conversations": [{"from": "human", "value": "问"}], "chosen": "只有一个"},
             {"instruction": "问", "chosen": "   ", "rejected": "答"}]
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


SETTINGS = dict(template="atom", seq_len=SEQ_LEN, max_steps=8, batch_size=4, lr=2e-3, warmup_steps=1, save_every=100,
                eval_every=4, eval_batches=2, log_every=1, seed=0, precision="fp32", val_fraction=0.25, beta=0.5)


def cfg_for(**kw):
    return DpoConfig(**{**SETTINGS, **kw})


def direct_logps(model, ids, labels):
    """Summed log-probability of the labelled tokens, one sequence alone, no padding: the definition."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1)
    target = torch.as_tensor(labels[1:])
    keep = target != -100
    return float(logp[keep].gather(1, target[keep][:, None]).sum())


def test_reference_logps_equal_a_direct_computation(tiny_zh_model, pairs_file):
    tok = load_tokenizer(tiny_zh_model)
    examples = tokenize_pairs(tok, "atom", read_preference_pairs([pairs_file]), SEQ_LEN, progress=False)
    assert len(examples) == 32
    model = AutoModelForCausalLM.from_pretrained(str(tiny_zh_model))
    model.config._attn_implementation = "sdpa"
    model.train()
    ref = reference_logps(model, examples, tok.eos_token_id, batch_size=5, precision="fp32", progress=False)
    expected = [[direct_logps(model, examples.chosen_ids[i], examples.chosen_labels[i]) for i in range(32)],
                [direct_logps(model, examples.rejected_ids[i], examples.rejected_labels[i]) for i in range(32)]]
    assert np.abs(ref - np.array(expected)).max() < 1e-4
    assert model.training  # handed back in the mode it came in


def test_dpo_learns_the_pairs_and_logs_rewards(tiny_zh_model, pairs_file, tmp_path):
    run_dir = dpo(tiny_zh_model, [pairs_file], tmp_path / "run", cfg_for(), progress=False)
    log = read_log(run_dir)
    train = [r for r in log if r["kind"] == "train"]
    val = [r for r in log if r["kind"] == "val"]
    # The policy starts as the reference: every reward is 0 and the loss is log 2.
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert train[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert train[-1]["reward_accuracy"] == 1.0 and train[-1]["reward_margin"] > 0
    assert set(val[0]) >= {"loss", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp",
                           "chosen_reward", "rejected_reward"}
    assert [r["step"] for r in val] == [4, 8] and all(0 <= r["reward_accuracy"] <= 1 for r in val)
    report = json.loads((run_dir / "dpo_data.json").read_text())
    assert (report["train_pairs"], report["val_pairs"], report["rows_skipped"]) == (24, 8, 3)
    assert report["rows_skipped_by_reason"] == {"`chosen` equals `rejected`": 1, "no `rejected`": 1,
                                                "empty `chosen` reply": 1}
    assert load_file(str(run_dir / REFERENCE_FILE))["logps"].shape == (2, 32)
    assert (run_dir / "loss.png").is_file() and (run_dir / "final" / "model.safetensors").is_file()
    assert load_tokenizer(run_dir / "final").chat_template == get_template("atom").jinja


def test_the_objective_is_the_loss_of_the_pairs_log_probabilities(tiny_zh_model, pairs_file):
    """One forward of 2B rows gives each pair's log-probabilities as B+B forwards of one sequence do."""
    from zhllama.train.dpo import pair_batch

    tok = load_tokenizer(tiny_zh_model)
    examples = tokenize_pairs(tok, "atom", read_preference_pairs([pairs_file]), SEQ_LEN, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_zh_model))
    model.config._attn_implementation = "sdpa"
    ids = [3, 0, 17]
    ref = np.array([[-30.0, -40.0, -50.0], [-35.0, -38.0, -60.0]])
    batch = pair_batch(examples, ids, tok.eos_token_id, _reference_at(ref, ids, 32))
    with torch.no_grad():
        chosen, rejected, nc, nr = reply_logps(model, batch)
        loss, stats = PreferenceObjective("dpo", beta=0.1)(model, batch)
    direct_c = [direct_logps(model, examples.chosen_ids[i], examples.chosen_labels[i]) for i in ids]
    direct_r = [direct_logps(model, examples.rejected_ids[i], examples.rejected_labels[i]) for i in ids]
    assert chosen.tolist() == pytest.approx(direct_c, abs=1e-4)
    assert rejected.tolist() == pytest.approx(direct_r, abs=1e-4)
    assert nc.tolist() == [int((np.asarray(examples.chosen_labels[i][1:]) != -100).sum()) for i in ids]
    expected, cr, rr = preference_losses("dpo", torch.tensor(direct_c), torch.tensor(direct_r), nc, nr,
                                         torch.tensor(ref[0]), torch.tensor(ref[1]), beta=0.1)
    assert float(loss) == pytest.approx(float(expected.sum()), abs=1e-4)
    assert stats["reward_accuracy"] == float((cr > rr).sum())


def _reference_at(ref, ids, n):
    full = np.zeros((2, n))
    full[:, ids] = ref
    return full


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_reference_free_losses_learn_without_a_reference(tiny_zh_model, pairs_file, tmp_path, loss):
    run_dir = dpo(tiny_zh_model, [pairs_file], tmp_path / loss, cfg_for(loss=loss, beta=None), progress=False)
    train = [r for r in read_log(run_dir) if r["kind"] == "train"]
    assert not (run_dir / REFERENCE_FILE).exists()
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["reward_margin"] > train[0]["reward_margin"]


def test_lora_reference_is_the_base_with_adapters_disabled(tiny_zh_model, pairs_file):
    from zhllama.train.trainable import prepare_trainable

    tok = load_tokenizer(tiny_zh_model)
    examples = tokenize_pairs(tok, "atom", read_preference_pairs([pairs_file]), SEQ_LEN, progress=False)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_zh_model))
    base.config._attn_implementation = "sdpa"
    plain = reference_logps(base, examples, tok.eos_token_id, 8, "fp32", progress=False)
    model = prepare_trainable(base, cfg_for(trainable="lora"))
    with torch.no_grad():  # adapters that already changed the model: the reference must not see them
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora = reference_logps(model, examples, tok.eos_token_id, 8, "fp32", progress=False)
    assert np.abs(lora - plain).max() < 1e-5
    with torch.no_grad():
        changed = reply_logps(model.eval(), _first_pairs(examples, tok))[0]
    assert np.abs(changed.numpy() - plain[0, :4]).max() > 1e-2


def _first_pairs(examples, tok):
    from zhllama.train.dpo import pair_batch

    return pair_batch(examples, [0, 1, 2, 3], tok.eos_token_id)


def dpo_command(model, data, run_dir, *flags, **settings):
    """The command line of a run with cfg_for(**settings), as a recipe file, and `flags` on top."""
    recipe = run_dir.with_name(run_dir.name + ".yaml")
    recipe.write_text(json.dumps({**SETTINGS, **settings}))  # JSON is YAML
    return [sys.executable, "-m", "zhllama", "train", "dpo", "--model", str(model), "--data", str(data), "--out",
            str(run_dir), "--config", str(recipe), *map(str, flags)]


def test_killed_dpo_run_resumes_to_the_same_weights_bitwise(tiny_zh_model, pairs_file, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(dpo_command(tiny_zh_model, pairs_file, straight, save_every=4),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    cmd = dpo_command(tiny_zh_model, pairs_file, killed, save_every=4)
    reference = killed / REFERENCE_FILE
    resume_after_sigkill(cmd, killed)
    a, b = weights(killed), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(killed) == train_losses(straight)
    assert reference.is_file()


def test_two_process_ddp_follows_the_one_process_curve(tiny_zh_model, pairs_file, tmp_path):
    one = dpo(tiny_zh_model, [pairs_file], tmp_path / "one", cfg_for(max_steps=4), progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "zhllama",
           *dpo_command(tiny_zh_model, pairs_file, tmp_path / "two", max_steps=4, batch_size=2)[3:]]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Two processes reduce the gradient in another order (differences of 1e-7); AdamW's first steps scale every
    # entry to about lr whatever its size, so at lr 2e-3 the fourth loss moves by about 1e-5. A wrong normalisation
    # (a factor of the world size or of the batch) moves it by more than 1e-2.
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(one), rel=5e-5)
    two_log = [r for r in read_log(tmp_path / "two") if r["kind"] == "train"]
    one_log = [r for r in read_log(one) if r["kind"] == "train"]
    assert [r["reward_accuracy"] for r in two_log] == [r["reward_accuracy"] for r in one_log]


def test_bad_flags_are_refused_before_any_data_is_read(tiny_zh_model, pairs_file, tmp_path):
    for flags, message in ((["--loss", "kto"], "unknown --loss 'kto'; choose dpo, orpo, simpo"),
                           (["--beta", "-1"], "--beta must be a positive number")):
        done = run(*dpo_command(tiny_zh_model, pairs_file, tmp_path / "bad", *flags)[3:])
        assert_one_line_error(done, message)
        assert not (tmp_path / "bad").exists()
    no_template = dpo_command(tiny_zh_model, pairs_file, tmp_path / "bad", template=None)[3:]
    assert_one_line_error(run(*no_template), "needs a chat template")
