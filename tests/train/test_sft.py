"""SFT through the shared loop: packing equals one-per-row, the saved template equals training, LoRA, bad input."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.test_cli import assert_one_line_error, run
from tests.train.test_pretrain import train_losses
from zhllama.config import LoraSettings, SftConfig
from zhllama.data import builtin
from zhllama.data.sft_batches import collate, pack_examples, tokenize_examples
from zhllama.errors import ZhllamaError
from zhllama.model.loading import load_tokenizer
from zhllama.runs import read_log
from zhllama.train import sft
from zhllama.train.loop import sample_ids, token_loss, tokens_seen
from zhllama.train.lora_merge import merge_adapters
from zhllama.train.sft import prepare_sft_data

SEQ_LEN = 96


def sentences(n):
    out = []
    for doc in builtin.documents("train", ["peoples_daily"]):
        for part in doc["text"].split("。"):
            if 6 <= len(part) <= 30:
                out.append(part + "。")
                if len(out) == n:
                    return out
    return out


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    """40 ShareGPT conversations: single-turn, multi-turn and with a system prompt, Chinese replies."""
    s = sentences(120)
    rows = []
    for i in range(40):
        turns = [{"from": "human", "value": f"请复述第{i}句。"}, {"from": "gpt", "value": s[i]}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "再来一句。"}, {"from": "gpt", "value": s[40 + i]}]
        row = {"conversations": turns}
        if i % 4 == 0:
            row["system"] = "你是一个复述句子的助手。"
        rows.append(json.dumps(row, ensure_ascii=False))
    path = tmp_path_factory.mktemp("sft") / "chats.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def cfg_for(**kw):
    base = dict(template="atom", seq_len=SEQ_LEN, max_steps=3, batch_size=4, lr=2e-3, warmup_steps=1,
                save_every=100, eval_every=100, eval_batches=2, log_every=1, seed=0, precision="fp32",
                val_fraction=0.0)
    return SftConfig(**{**base, **kw})


def test_packed_rows_compute_exactly_what_single_rows_do(tiny_zh_model, sft_file):
    from zhllama.data.conversations import read_conversations

    tok = load_tokenizer(tiny_zh_model)
    ex = tokenize_examples(tok, "atom", read_conversations([sft_file])[:12], SEQ_LEN, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_zh_model)).eval()
    model.config._attn_implementation = "sdpa"
    rows = pack_examples(ex.lengths(), SEQ_LEN)
    assert len(rows) < len(ex)  # several conversations do share rows
    with torch.no_grad():
        packed = collate(ex, rows, tok.eos_token_id)
        loss_packed, n_packed, _ = token_loss(model, packed)
        singles = [token_loss(model, collate(ex, [[i]], tok.eos_token_id)) for i in range(len(ex))]
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        r = next(r for r, row in enumerate(rows) if len(row) > 1)
        alone = model(input_ids=torch.from_numpy(ex.input_ids[rows[r][1]])[None]).logits
    start = len(ex.input_ids[rows[r][0]])
    assert torch.allclose(logits[r, start:start + alone.shape[1]], alone[0], atol=1e-4)
    assert n_packed == sum(n for _, n, _ in singles)
    assert float(loss_packed) == pytest.approx(sum(float(loss) for loss, _, _ in singles), rel=1e-5)


def test_packed_and_unpacked_runs_follow_the_same_loss_curve(tiny_zh_model, sft_file, tmp_path):
    # Whole-dataset batches, so that both runs take the same gradient steps whatever the rows hold.
    packed_data, _ = prepare_sft_data(tiny_zh_model, [sft_file], cfg_for(), progress=False)
    rows = packed_data.num_train()
    assert rows < 40
    a = sft(tiny_zh_model, [sft_file], tmp_path / "packed", cfg_for(batch_size=rows))
    b = sft(tiny_zh_model, [sft_file], tmp_path / "single", cfg_for(batch_size=40, packing=False))
    assert len(train_losses(a)) == 3
    assert train_losses(a) == pytest.approx(train_losses(b), rel=1e-4)
    assert train_losses(a)[-1] < train_losses(a)[0]


def test_saved_chat_template_builds_the_training_ids(tiny_zh_model, sft_file, tmp_path):
    from zhllama.data.conversations import read_conversations

    cfg = cfg_for(template="llama2", max_steps=1, val_fraction=0.1)
    out = sft(tiny_zh_model, [sft_file], tmp_path / "run", cfg)
    summary = json.loads((out / "sft_data.json").read_text())
    assert (summary["conversations"], summary["train_examples"], summary["val_examples"]) == (40, 36, 4)
    assert summary["truncated"] > 0 and summary["useful_token_share"] > 0.8
    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    assert "[INST]" in tok.chat_template
    for messages in read_conversations([sft_file])[:8]:
        want = tokenize_examples(tok, "llama2", [messages], 512, progress=False).input_ids[0].tolist()
        got = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(got) == want
    config = json.loads((out / "final" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (out / "final" / "chat_template.jinja").read_text()


def test_lora_sft_learns_and_its_adapter_merges_to_the_same_logits(tiny_zh_model, sft_file, tmp_path):
    from peft import PeftModel

    cfg = cfg_for(max_steps=8, trainable="lora", lr=1e-2, lora=LoraSettings(r=8, alpha=16, dropout=0.0,
                                                                           train_embeddings=False))
    out = sft(tiny_zh_model, [sft_file], tmp_path / "lora", cfg)
    losses = train_losses(out)
    assert losses[-1] < losses[0] - 0.5
    merged = merge_adapters(tiny_zh_model, [out / "adapter"], tmp_path / "merged")
    ids = torch.tensor([[1, 29871, 30275, 30333, 32001, 33500, 13, 2]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_zh_model))
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    with torch.no_grad():
        want = peft_model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(merged)).eval()(ids).logits
        final = AutoModelForCausalLM.from_pretrained(str(out / "final")).eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4) and torch.allclose(final, want, atol=1e-4)


def test_bad_input_is_refused_before_training(tiny_zh_model, sft_file, llama2_dir, tmp_path):
    with pytest.raises(ZhllamaError, match="unknown chat template 'alpaca'.*atom, chatml, llama2"):
        sft(tiny_zh_model, [sft_file], tmp_path / "a", cfg_for(template="alpaca"))
    with pytest.raises(ZhllamaError, match="needs a chat template"):
        sft(tiny_zh_model, [sft_file], tmp_path / "b", cfg_for(template=None))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"conversations": []}\nnot json\n')
    with pytest.raises(ZhllamaError, match="no conversations in .*2 rows skipped"):
        sft(tiny_zh_model, [empty], tmp_path / "c", cfg_for())
    # A model whose folder holds the extended tokenizer but only the base vocabulary's rows.
    from zhllama import model

    small = model.init_model("tiny", llama2_dir, tmp_path / "small", seed=0)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (small / name).write_bytes((tiny_zh_model / name).read_bytes())
    with pytest.raises(ZhllamaError, match="34,000 pieces but the model has 32,000 embedding rows"):
        sft(small, [sft_file], tmp_path / "d", cfg_for())
    assert not any(tmp_path.glob("[abcd]/final"))


def test_cli_sft_run_and_qlora_without_gpu(tiny_zh_model, sft_file, tmp_path):
    result = run("train", "sft", "--model", tiny_zh_model, "--data", sft_file, "--template", "chatml",
                 "--out", tmp_path / "run", "--max-steps", 2, "--batch-size", 2, "--seq-len", 64,
                 "--precision", "fp32", "--no-packing")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "run" / "zhllama.json").read_text())
    assert saved["args"]["config"]["template"] == "chatml" and saved["args"]["config"]["packing"] is False
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    if torch.cuda.is_available():
        pytest.skip("QLoRA's CPU refusal is only checked where there is no GPU")
    result = run("train", "sft", "--model", tiny_zh_model, "--data", sft_file, "--template", "atom",
                 "--out", tmp_path / "q", "--qlora")
    assert_one_line_error(result, "QLoRA needs a CUDA GPU", "--lora")
    assert not (tmp_path / "q").exists()


def test_two_process_sft_follows_the_one_process_loss_curve(tiny_zh_model, sft_file, tmp_path):
    import os
    import subprocess
    import sys

    one = sft(tiny_zh_model, [sft_file], tmp_path / "one", cfg_for(max_steps=3, batch_size=4))
    (tmp_path / "r.yaml").write_text("warmup_steps: 1\nlog_every: 1\neval_batches: 2\nval_fraction: 0.0\n"
                                     "save_every: 100\neval_every: 100\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "zhllama",
           "train", "sft", "--model", str(tiny_zh_model), "--data", str(sft_file), "--template", "atom",
           "--out", str(tmp_path / "two"), "--max-steps", "3", "--batch-size", "2", "--lr", "2e-3",
           "--seq-len", str(SEQ_LEN), "--seed", "0", "--precision", "fp32", "--config", str(tmp_path / "r.yaml")]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(one), rel=1e-5)
    assert (tmp_path / "two" / "final" / "chat_template.jinja").is_file()
    # The log's cumulative tokens are the real tokens of the rows trained on (no padding), on any process count.
    data, _ = prepare_sft_data(tiny_zh_model, [sft_file], cfg_for(), progress=False)
    row_tokens = [sum(len(data.train.input_ids[i]) for i in row) for row in data.train_rows]
    cfg, seen, want = cfg_for(max_steps=3, batch_size=4), 0, []
    for step in range(3):
        seen += sum(row_tokens[i] for i in sample_ids(step, 0, 0, cfg, 1, len(row_tokens)))
        want.append(seen)
    assert logged_tokens(one) == logged_tokens(tmp_path / "two") == want


def logged_tokens(run_dir):
    return [r["tokens"] for r in read_log(run_dir) if r["kind"] == "train"]


def test_tokens_seen_counts_the_samples_of_every_step_across_epochs():
    counts = np.array([5, 1, 7, 3, 2])
    cfg = cfg_for(batch_size=2, grad_accum=2)
    for world in (1, 2):
        total = 0
        for step in range(6):  # 4 or 8 samples a step: several passes over the 5 samples
            assert tokens_seen(step, cfg, world, counts) == total
            total += sum(int(counts[i]) for m in range(2) for r in range(world)
                         for i in sample_ids(step, m, r, cfg, world, len(counts)))
