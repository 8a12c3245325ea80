import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from zhllama.errors import ZhllamaError
from zhllama.eval.ppl import PplResult, perplexity, read_documents, run_ppl, windows
from zhllama.model.loading import load_checked

SEQ_LEN = 32


@pytest.fixture(scope="module")
def loaded(tiny_zh_model):
    return load_checked(tiny_zh_model, "cpu")


@pytest.fixture(scope="module")
def long_text(zh_heldout_texts):
    return next(t for t in zh_heldout_texts if 110 <= len(t) <= 250)


def ids_of(tokenizer, text):
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]


@torch.no_grad()
def nll_of_targets(model, ids, first_target):
    """Summed NLL of ids[first_target:] in one forward pass over ids, and how many tokens that is."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, first_target - 1:-1].float()
    target = torch.tensor(ids[first_target:])
    return F.cross_entropy(logits, target, reduction="sum").item(), len(target)


def test_short_text_is_the_mean_nll_of_one_forward_pass(loaded):
    model, tokenizer = loaded
    text = "中国的首都是北京。"
    ids = ids_of(tokenizer, text)
    assert len(ids) < SEQ_LEN
    nll, n = nll_of_targets(model, ids, 1)
    result = perplexity(model, tokenizer, [text], SEQ_LEN, SEQ_LEN // 2, progress=False)
    assert result.tokens == n == len(ids) - 1 and result.chars == len(text) and result.docs == 1
    assert result.nll_sum / result.tokens == pytest.approx(nll / n, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_stride_equal_to_seq_len_is_the_sum_over_chunks(loaded, long_text):
    model, tokenizer = loaded
    ids = ids_of(tokenizer, long_text)
    assert len(ids) > 3 * SEQ_LEN
    # Chunks of seq_len - 1 targets that do not overlap, each read with the one token before it as context.
    total = count = 0
    for first in range(1, len(ids), SEQ_LEN - 1):
        nll, n = nll_of_targets(model, ids[first - 1:first - 1 + SEQ_LEN], 1)
        total, count = total + nll, count + n
    result = perplexity(model, tokenizer, [long_text], SEQ_LEN, SEQ_LEN, progress=False)
    assert result.tokens == count == len(ids) - 1
    assert result.nll_sum == pytest.approx(total, rel=1e-5)


@torch.no_grad()
def test_overlapping_windows_match_the_hugging_face_loop(loaded, long_text):
    model, tokenizer = loaded
    ids = torch.tensor([ids_of(tokenizer, long_text)])
    stride, total, count, prev_end = 12, 0.0, 0, 0
    # The loop of the Hugging Face "perplexity of fixed-length models" guide.
    for begin in range(0, ids.size(1), stride):
        end = min(begin + SEQ_LEN, ids.size(1))
        target_len = end - prev_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-target_len] = -100
        n = int((labels[:, 1:] != -100).sum())
        total += model(input_ids=input_ids, labels=labels).loss.item() * n
        count += n
        prev_end = end
        if end == ids.size(1):
            break
    result = perplexity(model, tokenizer, [long_text], SEQ_LEN, stride, progress=False)
    assert result.tokens == count == ids.size(1) - 1
    assert result.nll_sum == pytest.approx(total, rel=1e-5)


def test_every_token_is_a_target_exactly_once_with_bounded_context():
    for n, stride in [(1, 4), (2, 4), (33, 32), (100, 32), (100, 7), (100, 1), (64, 16)]:
        spans = windows(n, SEQ_LEN, stride)
        targets = [t for _, end, first in spans for t in range(first, end)]
        assert targets == list(range(1, n))
        assert all(end - begin <= SEQ_LEN and begin < first for begin, end, first in spans)


def test_bits_per_char_is_the_nll_in_bits_over_the_characters(loaded, zh_heldout_texts):
    model, tokenizer = loaded
    texts = [t[:200] for t in zh_heldout_texts[:5]]
    result = perplexity(model, tokenizer, texts, SEQ_LEN, 16, progress=False)
    assert result.chars == sum(len(t) for t in texts)
    assert result.bits_per_char == result.nll_sum / math.log(2) / result.chars
    assert result.tokens_per_char == result.tokens / result.chars
    assert (PplResult(2.0, 4, 8, 1) + PplResult(1.0, 2, 4, 1)).to_dict()["bits_per_char"] == 3.0 / math.log(2) / 12


def test_batching_does_not_change_the_result(loaded, zh_heldout_texts):
    model, tokenizer = loaded
    texts = [t[:120] for t in zh_heldout_texts[:4]]
    one = perplexity(model, tokenizer, texts, SEQ_LEN, 16, batch_size=1, progress=False)
    many = perplexity(model, tokenizer, texts, SEQ_LEN, 16, batch_size=5, progress=False)
    assert one.tokens == many.tokens and one.chars == many.chars
    assert many.nll_sum == pytest.approx(one.nll_sum, rel=1e-5)


def test_cli_prints_the_table_and_writes_the_json(loaded, tiny_zh_model, zh_heldout_texts, tmp_path):
    model, tokenizer = loaded
    texts = zh_heldout_texts[10:14]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "report" / "ppl.json"
    done = subprocess.run([sys.executable, "-m", "zhllama", "eval", "ppl", "--model", str(tiny_zh_model), "--data",
                           str(data), "--seq-len", str(SEQ_LEN), "--stride", "16", "--out", str(out),
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bits/char" in done.stdout and "tokens/char" in done.stdout
    report = json.loads(out.read_text())
    direct = perplexity(model, tokenizer, texts, SEQ_LEN, 16, progress=False)
    (row,) = report["files"]
    assert row["file"] == str(data) and row["docs"] == 4 and row["chars"] == direct.chars
    assert row["tokens"] == direct.tokens and report["overall"]["tokens"] == direct.tokens
    assert row["nll_sum"] == pytest.approx(direct.nll_sum, rel=1e-5)
    assert row["bits_per_char"] == pytest.approx(direct.bits_per_char, rel=1e-5)
    assert (report["seq_len"], report["stride"]) == (SEQ_LEN, 16)


def test_cli_reports_a_malformed_line_in_one_line(tiny_zh_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好"}\n{"text": 不是JSON\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "zhllama", "eval", "ppl", "--model", str(tiny_zh_model), "--data",
                           str(bad), "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {bad}:2: malformed JSON (Expecting value)"]


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_bad_input_is_a_one_line_error(tiny_zh_model, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("你好，世界。\n", encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"text": "好"}\n{"content": "好"}\n', encoding="utf-8")
    with pytest.raises(ZhllamaError) as exc:
        read_documents(empty)
    assert one_line(exc).startswith(f"{empty}: no documents")
    with pytest.raises(ZhllamaError) as exc:
        read_documents(no_text)
    assert one_line(exc) == f"{no_text}:2: no string `text` field"
    with pytest.raises(ZhllamaError) as exc:
        run_ppl(tiny_zh_model, [good], seq_len=16, stride=17)
    assert "--stride 17 must be between 1 and --seq-len (16)" in one_line(exc)
    with pytest.raises(ZhllamaError) as exc:
        run_ppl(tiny_zh_model, [good], seq_len=16, stride=0)
    assert "--stride 0" in one_line(exc)
    with pytest.raises(ZhllamaError) as exc:
        run_ppl(tiny_zh_model, [good], seq_len=4096)
    assert "larger than the model supports" in one_line(exc)
    with pytest.raises(ZhllamaError) as exc:
        run_ppl(tiny_zh_model, [tmp_path / "missing.jsonl"])
    assert one_line(exc).endswith("missing.jsonl: no such file")
