"""Long context: length parsing, passkey prompts and scoring, RoPE scaling, and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from zhllama.errors import ZhllamaError
from zhllama.eval.long import (
    KEY_SENTENCE,
    load_scaled,
    long_context_report,
    parse_lengths,
    passkey_accuracy,
    passkey_prompt,
    passkey_trials,
    scale_rope,
)

DEPTHS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def tiny(tiny_zh_model):
    model, tokenizer, trained = load_scaled(tiny_zh_model, device="cpu")
    return model, tokenizer, trained


def test_parse_lengths():
    assert parse_lengths("1k,2k,4k,8k") == [1024, 2048, 4096, 8192]
    assert parse_lengths("256, 64,128,64") == [64, 128, 256]
    assert parse_lengths("1.5K") == [1536]
    for bad in ("", "4x", "0", "1.3"):
        with pytest.raises(ZhllamaError, match="--lengths"):
            parse_lengths(bad)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_prompt_has_the_length_and_the_key_at_its_depth(tiny, depth):
    _, tokenizer, _ = tiny
    for length in (128, 256):
        ids = passkey_prompt(tokenizer, length, depth, "68431")
        assert length - 12 <= len(ids) <= length
        text = tokenizer.decode(ids, skip_special_tokens=True)
        haystack = text[:text.rindex("\n")]
        key = KEY_SENTENCE.format(key="68431")
        assert haystack.count(key) == 1 and text.endswith("通行密码是")
        before = haystack.index(key) / (len(haystack) - len(key))
        assert before == pytest.approx(depth, abs=0.08)
    with pytest.raises(ZhllamaError, match="too short"):
        passkey_prompt(tokenizer, 10, 0.5, "68431")


def test_likelihood_rank_equals_a_plain_forward(tiny):
    model, tokenizer, _ = tiny
    prompt = passkey_prompt(tokenizer, 96, 0.5, "24680")
    trial, twin = passkey_trials(model, tokenizer, [prompt, prompt], ["24680", "13579"],
                                 [["13579", "11111"], ["24680", "11111"]])

    def logprob(key):
        full = tokenizer(tokenizer.decode(prompt, skip_special_tokens=True) + key)["input_ids"]
        assert full[:len(prompt)] == prompt
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([full])).logits[0, :-1].float(), -1)
        targets = torch.tensor(full[len(prompt):])
        return logp[len(prompt) - 1:].gather(1, targets[:, None]).sum().item()

    scores = [logprob(k) for k in ("24680", "13579", "11111")]
    assert trial["logprob"] == pytest.approx(scores[0], abs=1e-3)
    assert trial["rank"] == 1 + sum(s > scores[0] for s in scores[1:])
    assert twin["logprob"] == pytest.approx(scores[1], abs=1e-3)  # the second row of the batch
    with torch.no_grad():  # the greedy reply is the argmax continuation
        ids = torch.tensor([prompt])
        reply = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert trial["reply"] == twin["reply"] == tokenizer.decode(reply[0, len(prompt):], skip_special_tokens=True)


class IdCache:
    """Stands in for a KV cache: it only remembers the ids seen so far."""

    def __init__(self, ids):
        self.ids = ids

    def batch_repeat_interleave(self, repeats):
        self.ids = self.ids.repeat_interleave(repeats, 0)


class Oracle(torch.nn.Module):
    """A planted model that reads the passkey out of its prompt and always says it next."""

    def __init__(self, tokenizer, config):
        super().__init__()
        self.tokenizer, self.config = tokenizer, config
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.digits = {d: tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}

    def next_token(self, ids) -> int:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        key = re.search(r"通行密码是 ?(\d{5})", text).group(1)
        said = text[text.rindex("通行密码是") + len("通行密码是"):].strip()
        return self.digits[key[len(said)]] if len(said) < 5 else self.tokenizer.eos_token_id

    def forward(self, input_ids, past_key_values=None, logits_to_keep=0, **_):
        seen = input_ids if past_key_values is None else torch.cat([past_key_values.ids, input_ids], 1)
        keep = input_ids.shape[1] if logits_to_keep == 0 else logits_to_keep
        logits = torch.full((len(seen), keep, len(self.tokenizer)), -30.0)
        for row in range(len(seen)):
            for i, t in enumerate(range(seen.shape[1] - keep, seen.shape[1])):
                logits[row, i, self.next_token(seen[row, :t + 1].tolist())] = 30.0
        return SimpleNamespace(logits=logits, past_key_values=IdCache(seen))


def test_passkey_accuracy_is_one_for_an_oracle_and_deterministic_for_the_tiny_model(tiny):
    model, tokenizer, _ = tiny
    oracle = passkey_accuracy(Oracle(tokenizer, model.config), tokenizer, 64, DEPTHS, n_keys=1)
    assert oracle["accuracy"] == 1.0 and oracle["rank1"] == 1.0 and len(oracle["trials"]) == len(DEPTHS)
    assert all(t["found"] and t["rank"] == 1 for t in oracle["trials"])
    first = passkey_accuracy(model, tokenizer, 64, (0.0, 1.0), n_keys=1, seed=3)
    assert 0 <= first["accuracy"] <= 1 and 1 <= first["mean_rank"] <= 5
    assert first == passkey_accuracy(model, tokenizer, 64, (0.0, 1.0), n_keys=1, seed=3)


def test_report_flags_lengths_beyond_the_context(tiny):
    model, tokenizer, _ = tiny
    report = long_context_report(model, tokenizer, [64, 96], depths=(0.5,), n_keys=1, trained_context=64)
    assert [(r["length"], r["beyond_context"], r["note"]) for r in report["lengths"]] == [
        (64, False, ""), (96, True, "beyond trained context")]
    for row in report["lengths"]:
        assert row["perplexity"]["windows"] == 2 and row["perplexity"]["nll"] > 0
        assert row["perplexity"]["ppl"] == pytest.approx(torch.tensor(row["perplexity"]["nll"]).exp().item())


def test_rope_scaling_sets_rope_parameters(tiny_zh_model):
    from transformers import AutoConfig

    def scaled(rope, factor):
        return scale_rope(AutoConfig.from_pretrained(str(tiny_zh_model)), rope, factor)

    theta = AutoConfig.from_pretrained(str(tiny_zh_model)).rope_parameters["rope_theta"]
    linear = scaled("linear", 2)
    assert linear.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": theta}
    assert linear.max_position_embeddings == 4096
    yarn = scaled("yarn", 4)
    assert yarn.rope_parameters["original_max_position_embeddings"] == 2048 and yarn.max_position_embeddings == 8192
    dynamic = scaled("dynamic", 2)
    assert dynamic.rope_parameters["rope_type"] == "dynamic" and dynamic.max_position_embeddings == 2048
    for rope, factor, match in [("linear", None, "go together"), ("ntk", 2, "must be one of"),
                                ("linear", 1.0, "greater than 1")]:
        with pytest.raises(ZhllamaError, match=match):
            scaled(rope, factor)


def test_linear_rope_changes_long_logits_but_not_position_zero(tiny_zh_model, tiny):
    base, tokenizer, _ = tiny
    model, _, trained = load_scaled(tiny_zh_model, "linear", 2.0, device="cpu")
    assert trained == 2048 and model.config.max_position_embeddings == 4096
    assert model.model.rotary_emb.rope_type == "linear"
    ids = torch.tensor([passkey_prompt(tokenizer, 128, 0.5, "12345")])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-3)
        assert torch.allclose(model(ids[:, :1]).logits, base(ids[:, :1]).logits, atol=1e-5)


def test_cli_writes_the_json(tmp_path, tiny_zh_model):
    out = tmp_path / "long.json"
    result = subprocess.run([sys.executable, "-m", "zhllama", "eval", "long", "--model", str(tiny_zh_model),
                             "--lengths", "64", "--rope", "linear", "--rope-factor", "2", "--out", str(out),
                             "--device", "cpu"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["rope"] == {"type": "linear", "factor": 2.0} and report["usable_context"] == 4096
    assert [r["length"] for r in report["lengths"]] == [64]
    assert 0 <= report["lengths"][0]["passkey"]["accuracy"] <= 1
    assert "passkey" in result.stdout and not list(tmp_path.glob(".*partial*"))
