import json

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
        ({"model_dir": tiny_base, "tokenizer_dir": workdir}, "no SentencePiece tokenizer.model"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(ZhllamaError, match=expected) as err:
            extend_vocab(out=out, **kwargs)
        assert "\n" not in str(err.value)
    assert no_output(out)
