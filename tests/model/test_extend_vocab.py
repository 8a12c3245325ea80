import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.model.conftest import ZH_PADDED
from zhllama import tokenizer
from zhllama.artifacts import file_sha256, read_provenance
from zhllama.data import builtin
from zhllama.errors import ZhllamaError
from zhllama.model import extend_vocab, initial_loss, text_nll
from zhllama.tokenizer.spm import CONTROL, load_proto

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="session")
def mean_dir(workdir, trained_base, zh_tokenizer):
    return extend_vocab(trained_base, zh_tokenizer, workdir / "tiny-zh-mean", init="mean")


@pytest.fixture(scope="session")
def random_dir(workdir, trained_base, zh_tokenizer):
    return extend_vocab(trained_base, zh_tokenizer, workdir / "tiny-zh-random", init="random", seed=0)


def weights(folder):
    return load_file(folder / "model.safetensors")


def test_base_rows_are_kept_bitwise(trained_base, mean_dir, random_dir):
    before = weights(trained_base)
    for folder in (mean_dir, random_dir):
        after = weights(folder)
        for name in (EMBED, HEAD):
            assert after[name].shape == (ZH_PADDED, 256)
            assert torch.equal(after[name][:32000], before[name])
        # Everything but the two vocabulary matrices is untouched.
        assert all(torch.equal(after[k], before[k]) for k in before if k not in (EMBED, HEAD))


def test_extended_model_loads_with_its_tokenizer(mean_dir, zh_tokenizer, trained_base):
    model = AutoModelForCausalLM.from_pretrained(str(mean_dir))
    assert model.config.vocab_size == ZH_PADDED
    assert json.loads((mean_dir / "config.json").read_text())["vocab_size"] == ZH_PADDED
    tok = AutoTokenizer.from_pretrained(str(mean_dir))
    assert len(tok) == ZH_PADDED
    assert (mean_dir / "tokenizer.model").read_bytes() == (zh_tokenizer / "tokenizer.model").read_bytes()
    text = next(d["text"] for d in builtin.documents("heldout", sources=["peoples_daily"]) if len(d["text"]) > 50)[:100]
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.max() >= 32000  # the new pieces are used, and the model accepts them
    assert model(ids).logits.shape[-1] == ZH_PADDED
    record = read_provenance(mean_dir)
    assert record["command"] == "model extend-vocab" and record["args"]["init"] == "mean"
    assert record["inputs"] == {"base_tokenizer": file_sha256(trained_base / "tokenizer.model"),
                                "tokenizer": file_sha256(zh_tokenizer / "tokenizer.model")}
    assert (record["base_vocab_size"], record["vocab_size"]) == (32000, ZH_PADDED)


def test_mean_rows_average_the_base_spelling(trained_base, mean_dir, zh_tokenizer, llama2_dir):
    base_tok = AutoTokenizer.from_pretrained(str(llama2_dir))
    new_tok = AutoTokenizer.from_pretrained(str(zh_tokenizer))
    vocab = base_tok.get_vocab()
    new_pieces = [p.piece for p in load_proto(zh_tokenizer).pieces[32000:]]
    before, after = weights(trained_base), weights(mean_dir)
    # Spellings worked out by hand: Llama-2 spells a Chinese character as itself when it has it, else as its
    # UTF-8 bytes; it has no two-character Chinese pieces, so a new word is spelled character by character.
    def spell(text):
        return [i for ch in text for i in ([vocab[ch]] if ch in vocab else
                                           [vocab[f"<0x{b:02X}>"] for b in ch.encode("utf-8")])]

    word = next(p for p in new_pieces if len(p) == 2 and "▁" not in p)
    char = next(p for p in new_pieces if len(p) == 1 and p not in vocab)
    spellings = {word: spell(word), char: spell(char)}
    assert len(spellings[char]) == 3
    for piece, base_ids in spellings.items():
        row = new_tok.convert_tokens_to_ids(piece)
        assert row >= 32000
        for name in (EMBED, HEAD):
            expected = before[name][base_ids].mean(dim=0)
            assert torch.allclose(after[name][row], expected, atol=1e-7), (piece, name)
    # Padding pieces have no spelling: they start at the mean of every base row.
    proto = load_proto(zh_tokenizer)
    pad = next(i for i in range(32000, ZH_PADDED) if proto.pieces[i].type == CONTROL)
    for name in (EMBED, HEAD):
        assert torch.allclose(after[name][pad], before[name].mean(dim=0), atol=1e-6)


def test_random_rows_are_small_and_seeded(random_dir, trained_base, zh_tokenizer, workdir):
    new = weights(random_dir)[EMBED][32000:]
    assert abs(new.std().item() - 0.02) < 0.002
    again = extend_vocab(trained_base, zh_tokenizer, workdir / "tiny-zh-random-again", init="random", seed=0)
    assert torch.equal(weights(again)[EMBED], weights(random_dir)[EMBED])


def test_mean_init_keeps_what_the_base_model_knew(trained_base, mean_dir, random_dir, known_texts):
    """On text the base model has learned, mean rows keep most of its loss; random rows lose most of it.

    The extended tokenizer spells the same text in fewer tokens, so per-character loss (total nats over
    characters) is the fair comparison with the base model; per-token loss compares the two inits.
    """
    stats = {name: text_nll(folder, known_texts) for name, folder in
             (("base", trained_base), ("mean", mean_dir), ("random", random_dir))}
    assert stats["mean"]["chars"] == stats["base"]["chars"] == sum(map(len, known_texts))
    per_token = {k: s["nats"] / s["tokens"] for k, s in stats.items()}
    per_char = {k: s["nats"] / s["chars"] for k, s in stats.items()}
    print("\nknown text   per token:", {k: round(v, 3) for k, v in per_token.items()},
          "per char:", {k: round(v, 3) for k, v in per_char.items()})
    assert initial_loss(mean_dir, known_texts, per="char") == pytest.approx(per_char["mean"])
    assert per_token["mean"] < per_token["random"]
    assert per_char["mean"] < per_char["random"]
    # Mean init gives back less than half of what random init gives back, measured from the base model.
    assert per_char["mean"] - per_char["base"] < 0.5 * (per_char["random"] - per_char["base"])


def test_heldout_losses_are_reported(trained_base, mean_dir, random_dir):
    """Reported, not compared: a model trained for seconds has learned nothing that carries to unseen text,
    and there random rows (logits near zero) can score as well as or better than mean rows."""
    texts = [doc["text"][:100] for doc in builtin.documents("heldout", sources=["peoples_daily"])][:8]
    stats = {name: text_nll(folder, texts) for name, folder in
             (("base", trained_base), ("mean", mean_dir), ("random", random_dir))}
    print("\nheld-out     per token:", {k: round(s["nats"] / s["tokens"], 3) for k, s in stats.items()},
          "per char:", {k: round(s["nats"] / s["chars"], 3) for k, s in stats.items()})
    assert all(s["tokens"] > 0 and s["nats"] > 0 for s in stats.values())
    assert stats["mean"]["tokens"] < stats["base"]["tokens"]  # the point of the extension


def no_output(out):
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_tokenizer_that_does_not_extend_the_model_is_refused(tiny_base, zh_small_train_file, workdir, tmp_path):
    # 4,000 pieces: sentencepiece needs one per character of the 300k-character input (3,498).
    standalone = tokenizer.train([zh_small_train_file], 4000, workdir / "standalone-4k", standalone=True)
    out = tmp_path / "out"
    with pytest.raises(ZhllamaError) as err:
        extend_vocab(tiny_base, standalone, out)
    message = str(err.value)
    assert "\n" not in message and "does not extend" in message and "piece 3" in message
    assert "32000" in message and "4000" in message
    assert no_output(out)


def test_smaller_or_equal_tokenizer_is_refused(mean_dir, tiny_base, llama2_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ZhllamaError, match=f"32000 pieces, fewer than the model's {ZH_PADDED}"):
        extend_vocab(mean_dir, llama2_dir, out)
    with pytest.raises(ZhllamaError, match="nothing to extend"):
        extend_vocab(tiny_base, llama2_dir, out)
    assert no_output(out)


def test_bad_arguments_are_one_line_errors(tiny_base, zh_tokenizer, workdir, tmp_path):
    out = tmp_path / "out"
    bare = tmp_path / "bare-model"  # a model folder without the tokenizer it was trained with
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_base / name).read_bytes())
    cases = [
        ({"model_dir": tiny_base, "tokenizer_dir": zh_tokenizer, "init": "zeros"}, "unknown --init 'zeros'"),
        ({"model_dir": tmp_path / "missing", "tokenizer_dir": zh_tokenizer}, "does not exist"),
        ({"model_dir": tiny_base, "tokenizer_dir": tmp_path / "missing"}, "does not exist"),
        ({"model_dir": bare, "tokenizer_dir": zh_tokenizer}, "has no tokenizer.model"),
        ({"model_dir": tiny_base, "tokenizer_dir": workdir}, "no tokenizer.model or tokenizer.json"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(ZhllamaError, match=expected) as err:
            extend_vocab(out=out, **kwargs)
        assert "\n" not in str(err.value)
    assert no_output(out)


# Byte-level BPE (Llama-3): the new tokens are the ids past the base tokenizer.json's, spelled by the base tokenizer.

BPE_WORDS = ("语言模型", "北京大学", "人工智能")


def extend_bpe(base_dir, out, words=BPE_WORDS, special="<|zh_sep|>", swap=None, added_into_vocab=True):
    """A copy of `base_dir`'s tokenizer.json with each word merged into one token, merge by merge from the pieces
    the base tokenizer splits it into (every intermediate merge is a new token too), and one special token.
    `swap` (id, id) exchanges two base tokens' ids, which makes the result no longer an extension."""
    data = json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8"))
    base = AutoTokenizer.from_pretrained(str(base_dir))
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    # An added token outside the vocabulary (the GGUF reader's "<|endoftext|>" at 128256) keeps its id only while it
    # is the vocabulary's next id; into the vocabulary it goes, so that the new tokens can follow it.
    for added in data["added_tokens"] if added_into_vocab else []:
        vocab.setdefault(added["content"], added["id"])
    next_id = 1 + max(max(vocab.values()), *(a["id"] for a in data["added_tokens"]))
    for word in words:
        left, *rest = base.convert_ids_to_tokens(base(word, add_special_tokens=False)["input_ids"])
        for right in rest:
            merges.append([left, right])  # last in rank: the base's own merges all come first
            left += right
            if left not in vocab:
                vocab[left], next_id = next_id, next_id + 1
    data["added_tokens"].append({"id": next_id, "content": special, "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    if swap is not None:
        first, second = (next(text for text, i in vocab.items() if i == j) for j in swap)
        vocab[first], vocab[second] = vocab[second], vocab[first]
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    shutil.copy(base_dir / "tokenizer_config.json", out)
    return out


@pytest.fixture(scope="module")
def llama3_zh(workdir, llama3_hf):
    return extend_bpe(llama3_hf, workdir / "llama3-zh")


@pytest.fixture(scope="module")
def llama3_mean(workdir, tiny_llama3, llama3_zh):
    return extend_vocab(tiny_llama3, llama3_zh, workdir / "tiny-llama3-zh-mean", init="mean")


def test_bpe_new_rows_are_the_mean_of_the_base_split(tiny_llama3, llama3_hf, llama3_zh, llama3_mean):
    base_tok, new_tok = AutoTokenizer.from_pretrained(str(llama3_hf)), AutoTokenizer.from_pretrained(str(llama3_zh))
    rows = len(base_tok)
    before, after = weights(tiny_llama3), weights(llama3_mean)
    # 语言模型 and 北京大学 are one merge each, 人工智能 two (人工, then 人工智能), plus the special token.
    assert len(new_tok) == rows + 5
    for name in (EMBED, HEAD):
        assert after[name].shape == (rows + 5, 256)
        assert torch.equal(after[name][:rows], before[name])  # base rows kept bitwise
    assert all(torch.equal(after[k], before[k]) for k in before if k not in (EMBED, HEAD))
    for word in (*BPE_WORDS, "人工"):
        (row,) = new_tok(word, add_special_tokens=False)["input_ids"]  # the extension makes it one token
        assert row >= rows
        base_ids = base_tok(word, add_special_tokens=False)["input_ids"]
        assert len(base_ids) >= 2
        for name in (EMBED, HEAD):
            assert torch.allclose(after[name][row], before[name][base_ids].mean(dim=0), rtol=0, atol=1e-7), word
    # A special token never comes from text: it starts at the mean of every base row.
    special = new_tok.convert_tokens_to_ids("<|zh_sep|>")
    for name in (EMBED, HEAD):
        assert torch.allclose(after[name][special], before[name].mean(dim=0), atol=1e-6)
    record = read_provenance(llama3_mean)
    assert record["inputs"] == {"base_tokenizer": file_sha256(llama3_hf / "tokenizer.json"),
                                "tokenizer": file_sha256(llama3_zh / "tokenizer.json")}
    assert (record["base_vocab_size"], record["vocab_size"]) == (rows, rows + 5)
    model = AutoModelForCausalLM.from_pretrained(str(llama3_mean))
    ids = new_tok("北京大学的语言模型", return_tensors="pt")["input_ids"]
    assert ids.max() >= rows and model(ids).logits.shape[-1] == rows + 5


def test_bpe_random_init(tiny_llama3, llama3_zh, tmp_path):
    out = extend_vocab(tiny_llama3, llama3_zh, tmp_path / "random", init="random", seed=0)
    new = weights(out)[EMBED]
    assert torch.equal(new[:-5], weights(tiny_llama3)[EMBED])
    assert 0.005 < new[-5:].std().item() < 0.05


def test_bpe_tokenizer_that_does_not_extend_is_refused(tiny_llama3, llama3_hf, zh_tokenizer, tmp_path):
    out = tmp_path / "out"
    changed = extend_bpe(llama3_hf, tmp_path / "changed", swap=(5, 6))
    with pytest.raises(ZhllamaError) as err:
        extend_vocab(tiny_llama3, changed, out)
    message = str(err.value)
    assert "\n" not in message and "does not extend" in message
    assert "token 5 is '&' in the model but \"'\" in the new tokenizer" in message
    with pytest.raises(ZhllamaError, match="nothing to extend"):
        extend_vocab(tiny_llama3, llama3_hf, out)
    # The tokenizers library moves "<|endoftext|>" (added, not in the vocabulary) onto the first new token's id.
    clash = extend_bpe(llama3_hf, tmp_path / "clash", added_into_vocab=False)
    with pytest.raises(ZhllamaError, match="'<|endoftext|>' both have id 128260|both have id"):
        extend_vocab(tiny_llama3, clash, out)
    # A SentencePiece tokenizer cannot extend a BPE one, whatever its size.
    with pytest.raises(ZhllamaError, match="does not extend the model's tokenizer: the model's is BPE"):
        extend_vocab(tiny_llama3, zh_tokenizer, out)
    assert no_output(out)


def test_bpe_tokens_that_split_a_character_are_spelled_by_their_bytes(llama3_hf, tmp_path):
    """A byte-level token can hold part of a UTF-8 character (merging 𪚥's four bytes makes two such tokens on the
    way); it has no text of its own, so the base BPE spells its bytes."""
    from zhllama.model.extend_vocab import bpe_base_splits, bpe_table

    base_tok = AutoTokenizer.from_pretrained(str(llama3_hf))
    new_tok = AutoTokenizer.from_pretrained(str(extend_bpe(llama3_hf, tmp_path / "rare", words=("𪚥",))))
    pieces = base_tok("𪚥", add_special_tokens=False)["input_ids"]
    assert len(pieces) == 4  # one byte each in Llama-3
    rows = len(base_tok)
    splits = bpe_base_splits(base_tok, new_tok, bpe_table(new_tok, "rare"), rows)
    assert splits == [pieces[:2], pieces[:3], pieces, []]  # ð+ª, then +ļ, then the whole 𪚥; the special: none
