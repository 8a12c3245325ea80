"""GGUF export: llama.cpp must tokenise like our HF tokenizer and compute the same logits.

Measured numbers are printed (run with -s to see them). Tolerances: a random tiny model's logits are near
uniform (std about 0.1-1), so the max-abs bounds are loose multiples of what was measured and top-1 agreement
over every position is the sharper check.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from zhllama.errors import ZhllamaError
from zhllama.export.gguf import export_gguf, read_gguf_info

# qtype -> (max |logit diff| bound, minimum top-1 agreement)
TOLERANCE = {"f32": (1e-2, 0.99), "f16": (5e-2, 0.99), "q8_0": (None, 0.90), "q4_0": (None, 0.50)}
ENGLISH_AND_CODE = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, double  spaces and a tab\there.\nNew line: 12345 + 678 = 13023",
    "def add(a, b):\n    return a + b  # 加法\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", i); }',
]


def llama_cpp_or_skip():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed")
    return llama_cpp


def open_llama(path: Path, n_ctx: int = 256):
    llama_cpp = llama_cpp_or_skip()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.fixture(scope="module")
def hf(tiny_zh_model):
    from zhllama.model.extend_vocab import load_model
    from zhllama.model.init import load_tokenizer

    model = load_model(tiny_zh_model, dtype=torch.float32).eval()
    return model, load_tokenizer(tiny_zh_model)


@pytest.fixture(scope="module")
def corpus(zh_heldout_texts):
    return [t[:300] for t in zh_heldout_texts[:4]] + ENGLISH_AND_CODE


@pytest.fixture(scope="module")
def prompts(hf, zh_heldout_texts):
    _, tok = hf
    texts = [zh_heldout_texts[5][:200], ENGLISH_AND_CODE[0], ENGLISH_AND_CODE[2]]
    return [tok(t)["input_ids"][:96] for t in texts]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_zh_model):
    """One export per type, made on first use."""
    folder, made = tmp_path_factory.mktemp("gguf"), {}

    def get(qtype: str) -> Path:
        if qtype not in made:
            made[qtype] = export_gguf(tiny_zh_model, folder / f"tiny-{qtype}.gguf", qtype)
        return made[qtype]

    return get


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_round_trip_matches_hf(qtype, exported, hf, corpus, prompts):
    llama_cpp_or_skip()
    model, tok = hf
    path = exported(qtype)
    info = read_gguf_info(path)
    assert info["arch"] == "llama" and info["vocab_size"] == len(tok) == 34_000
    llm = open_llama(path)
    try:
        # (1) tokenisation: llama.cpp's SPM tokenizer against our HF tokenizer, BOS included.
        mismatched = [t for t in corpus if llm.tokenize(t.encode(), add_bos=True) != tok(t)["input_ids"]]
        assert not mismatched, f"llama.cpp tokenises differently: {mismatched[:2]}"
        # (2, 3) logits and top-1 over every position.
        diffs, agree, total = [], 0, 0
        for ids in prompts:
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].numpy()
            got = cpp_logits(llm, ids)
            diffs.append(float(np.abs(got - ref).max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(ids)
    finally:
        llm.close()
    max_diff, top1 = max(diffs), agree / total
    print(f"\n[gguf {qtype}] size {path.stat().st_size / 2**20:.1f} MiB, tokenisation {len(corpus)}/{len(corpus)} "
          f"texts identical, max |logit diff| {max_diff:.2e}, top-1 {agree}/{total} = {top1:.1%}, "
          f"tensor types {info['tensor_types']}")
    bound, min_top1 = TOLERANCE[qtype]
    if bound is not None:
        assert max_diff < bound
    assert top1 >= min_top1


def test_chat_template_is_exported(tmp_path, tiny_chat_model):
    from zhllama.model.init import load_tokenizer

    path = export_gguf(tiny_chat_model, tmp_path / "chat.gguf", "f16")
    assert read_gguf_info(path)["chat_template"]
    import gguf

    field = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"]
    assert field.contents() == load_tokenizer(tiny_chat_model).chat_template


def small_model(folder: Path, tokenizer_dir: Path, rows: int, hidden: int = 64, inter: int = 128,
                rope: dict | None = None) -> Path:
    """A 2-layer random Llama with `rows` embedding rows and the given tokenizer folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from zhllama.tokenizer.hf import copy_hf_tokenizer

    config = LlamaConfig(vocab_size=rows, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    copy_hf_tokenizer(Path(tokenizer_dir), folder)
    return folder


def test_rope_linear_survives_save_load_export(tmp_path, tiny_zh_model):
    import gguf
    from transformers import AutoConfig

    folder = Path(shutil.copytree(tiny_zh_model, tmp_path / "rope"))
    config = AutoConfig.from_pretrained(folder)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    config.max_position_embeddings = 4096  # as `--rope linear --factor 2` sets it
    config.save_pretrained(folder)
    assert AutoConfig.from_pretrained(folder).rope_parameters["rope_type"] == "linear"
    path = export_gguf(folder, tmp_path / "rope.gguf", "f16")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == pytest.approx(2.0)
    assert fields["llama.rope.scaling.original_context_length"].contents() == 2048
    assert fields["llama.context_length"].contents() == 4096
    assert read_gguf_info(path)["rope"]["scaling_factor"] == pytest.approx(2.0)


def test_rope_yarn_llama3_dynamic(tmp_path, extended_dir, capsys):
    yarn = small_model(tmp_path / "yarn", extended_dir, 34_000, rope={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 128})
    rope = read_gguf_info(export_gguf(yarn, tmp_path / "yarn.gguf", "f32"))["rope"]
    assert (rope["scaling_type"], rope["scaling_factor"], rope["original_context_length"]) == ("yarn", 4.0, 128)

    llama3 = small_model(tmp_path / "llama3", extended_dir, 34_000, rope={
        "rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    path = export_gguf(llama3, tmp_path / "llama3.gguf", "f32")
    assert read_gguf_info(path)["rope"]["has_rope_freqs"]
    if _has_llama_cpp():  # llama.cpp must accept the rope_freqs tensor's shape
        llm = open_llama(path)
        llm.close()

    dynamic = small_model(tmp_path / "dyn", extended_dir, 34_000,
                          rope={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    rope = read_gguf_info(export_gguf(dynamic, tmp_path / "dyn.gguf", "f32"))["rope"]
    assert rope["scaling_type"] is None
    assert "no GGUF equivalent" in capsys.readouterr().err


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def test_more_rows_than_tokens_pads_the_vocabulary(tmp_path, extended_dir, corpus):
    llama_cpp_or_skip()
    folder = small_model(tmp_path / "rows", extended_dir, 34_048)
    path = export_gguf(folder, tmp_path / "rows.gguf", "q8_0")
    info = read_gguf_info(path)
    assert info["vocab_size"] == 34_048 and info["token_types"][5] == 48  # 48 UNUSED [PAD] tokens
    from zhllama.model.init import load_tokenizer

    tok = load_tokenizer(extended_dir)
    llm = open_llama(path)
    try:
        assert llm.n_vocab() == 34_048
        assert all(llm.tokenize(t.encode(), add_bos=True) == tok(t)["input_ids"] for t in corpus)
        assert cpp_logits(llm, tok(corpus[1])["input_ids"][:16]).shape == (16, 34_048)
    finally:
        llm.close()


def test_more_tokens_than_rows_needs_pad_vocab(tmp_path, extended_dir):
    folder = small_model(tmp_path / "short", extended_dir, 33_990)
    out = tmp_path / "short.gguf"
    with pytest.raises(ZhllamaError, match=r"34000 tokens .* only 33990 rows.*--pad-vocab"):
        export_gguf(folder, out, "f16")
    assert not out.exists() and not list(tmp_path.glob(".short.gguf*"))  # nothing half-written
    path = export_gguf(folder, out, "f16", pad_vocab=64)
    assert read_gguf_info(path)["vocab_size"] == 34_048
    if _has_llama_cpp():
        llm = open_llama(path)
        try:
            assert llm.n_vocab() == 34_048
            logits = cpp_logits(llm, [1, 33_995, 34_000])
            assert np.isfinite(logits).all()
        finally:
            llm.close()


def test_unaligned_widths_fall_back_to_f16(tmp_path, extended_dir, capsys):
    # hidden 80 is not a multiple of 32: 6 projections x 2 layers + token_embd + output fall back;
    # intermediate 96 is, so ffn_down (last dim 96) still quantises.
    folder = small_model(tmp_path / "odd", extended_dir, 34_000, hidden=80, inter=96)
    path = export_gguf(folder, tmp_path / "odd.gguf", "q4_0")
    err = capsys.readouterr().err
    assert "fell back to f16:" in err and "token_embd.weight" in err and "ffn_down" not in err
    assert read_gguf_info(path)["tensor_types"] == {"F16": 14, "Q4_0": 2, "F32": 5}
    if _has_llama_cpp():
        llm = open_llama(path)
        llm.close()


def test_bad_inputs(tmp_path, exported, tiny_zh_model):
    gguf_file = exported("f32")
    with pytest.raises(ZhllamaError, match="is a GGUF file; this command takes an HF model folder"):
        export_gguf(gguf_file, tmp_path / "x.gguf")
    with pytest.raises(ZhllamaError, match=r"unknown GGUF type 'q5_k'; choose one of f32, f16, q8_0, q4_0"):
        export_gguf(tiny_zh_model, tmp_path / "x.gguf", "q5_k")
    with pytest.raises(ZhllamaError, match="does not exist"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    with pytest.raises(ZhllamaError, match="is not a GGUF file"):
        export_gguf(tiny_zh_model, precious)
    assert precious.read_text() == "keep me"
    with pytest.raises(ZhllamaError, match="positive integer"):
        export_gguf(tiny_zh_model, tmp_path / "x.gguf", pad_vocab=0)
    with pytest.raises(ZhllamaError, match="not a readable GGUF"):
        read_gguf_info(precious)
