"""GGUF export: llama.cpp must tokenise like our HF tokenizer and compute the same logits.

The logits are compared on a briefly trained model (tests/export/conftest.py: GQA, 34,000-piece vocabulary,
trained on the compared prompts so its logits are peaked there and its attention matters), at every position of
4 prompts (189 tokens). Measured numbers are printed (run with -s to see them). The bounds are about 3x the
measured difference (5x for f32, whose rounding depends most on the CPU's kernels) and about 2x the measured top-1
disagreements, measured on a 2-core AVX2 CPU (Dec 2026):

    type   KV cache  max |logit diff|  top-1            bound   min top-1
    f32    f32       9.5e-06           189/189 100%     5e-5    100%
    f16    f16       4.9e-03           189/189 100%     1.5e-2  99%
    q8_0   f16       0.11              185/189 97.9%    0.4     95%
    q4_0   f16       1.39              160/189 84.7%    4.0     75%

f32 runs with an f32 KV cache (llama.cpp's default f16 cache alone adds about 4e-3), so it is exact to float
rounding; the other types run with llama.cpp's defaults, as a user would. The same model exported without the
q/k permutation is off by 10.0 with 70% top-1 (test_unpermuted_qk_is_caught), 200,000x the f32 bound.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from zhllama.errors import ZhllamaError
from zhllama.export.gguf import export_gguf, read_gguf_info

# qtype -> (max |logit diff| bound, minimum top-1 agreement); see the table above.
TOLERANCE = {"f32": (5e-5, 1.0), "f16": (1.5e-2, 0.99), "q8_0": (0.4, 0.95), "q4_0": (4.0, 0.75)}
GGML_TYPE_F32 = 0
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


def open_llama(path: Path, n_ctx: int = 256, f32_cache: bool = False):
    llama_cpp = llama_cpp_or_skip()
    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, **cache)


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.fixture(scope="module")
def hf(trained_zh_model):
    from zhllama.model.loading import load_model, load_tokenizer

    model = load_model(trained_zh_model, dtype=torch.float32).eval()
    return model, load_tokenizer(trained_zh_model)


@pytest.fixture(scope="module")
def corpus(zh_heldout_texts):
    return [t[:300] for t in zh_heldout_texts[:4]] + ENGLISH_AND_CODE


@pytest.fixture(scope="module")
def prompts(gguf_prompts):
    return gguf_prompts


@pytest.fixture(scope="module")
def reference_logits(hf, prompts):
    model, _ = hf
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].numpy() for ids in prompts]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_zh_model):
    """One export per type of the trained model, made on first use."""
    folder, made = tmp_path_factory.mktemp("gguf"), {}

    def get(qtype: str) -> Path:
        if qtype not in made:
            made[qtype] = export_gguf(trained_zh_model, folder / f"trained-{qtype}.gguf", qtype)
        return made[qtype]

    return get


def compare_logits(llm, prompts, reference_logits) -> tuple[float, int, int]:
    """Max |logit diff| and top-1 agreements over every position of every prompt, and the positions counted."""
    diffs, agree, total = [], 0, 0
    for ids, ref in zip(prompts, reference_logits, strict=True):
        got = cpp_logits(llm, ids)
        diffs.append(float(np.abs(got - ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
    return max(diffs), agree, total


def test_trained_model_logits_are_not_flat(reference_logits):
    # Mean over positions of the logits' std across the vocabulary: 0.60 measured, 0.23 for the same model
    # untrained (whose attention barely matters, so q/k errors hide).
    spread = float(np.mean([ref.std(-1).mean() for ref in reference_logits]))
    print(f"\n[trained model] mean logit std {spread:.2f}")
    assert spread > 0.4


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_round_trip_matches_hf(qtype, exported, hf, corpus, prompts, reference_logits):
    llama_cpp_or_skip()
    _, tok = hf
    path = exported(qtype)
    info = read_gguf_info(path)
    assert info["arch"] == "llama" and info["vocab_size"] == len(tok) == 34_000
    llm = open_llama(path, f32_cache=qtype == "f32")
    try:
        # (1) tokenisation: llama.cpp's SPM tokenizer against our HF tokenizer, BOS included.
        mismatched = [t for t in corpus if llm.tokenize(t.encode(), add_bos=True) != tok(t)["input_ids"]]
        assert not mismatched, f"llama.cpp tokenises differently: {mismatched[:2]}"
        # (2, 3) logits and top-1 over every position.
        max_diff, agree, total = compare_logits(llm, prompts, reference_logits)
    finally:
        llm.close()
    top1 = agree / total
    print(f"\n[gguf {qtype}] size {path.stat().st_size / 2**20:.1f} MiB, tokenisation {len(corpus)}/{len(corpus)} "
          f"texts identical, max |logit diff| {max_diff:.2e}, top-1 {agree}/{total} = {top1:.1%}, "
          f"tensor types {info['tensor_types']}")
    bound, min_top1 = TOLERANCE[qtype]
    assert max_diff < bound
    assert top1 >= min_top1


def test_unpermuted_qk_is_caught(tmp_path, monkeypatch, trained_zh_model, prompts, reference_logits):
    """The round trip must be able to fail: q/k written in HF's layout (no permutation for llama.cpp's RoPE)."""
    llama_cpp_or_skip()
    import zhllama.export.gguf as gguf_export

    monkeypatch.setattr(gguf_export, "_permute", lambda w, n_head: w)
    path = export_gguf(trained_zh_model, tmp_path / "unpermuted.gguf", "f32")
    llm = open_llama(path, f32_cache=True)
    try:
        max_diff, agree, total = compare_logits(llm, prompts, reference_logits)
    finally:
        llm.close()
    print(f"\n[gguf f32, q/k not permuted] max |logit diff| {max_diff:.2e}, top-1 {agree}/{total}")
    assert max_diff > 1.0  # 10.0 measured
    assert agree / total < 0.85  # 70% measured


def test_chat_template_is_exported(tmp_path, tiny_chat_model):
    from zhllama.model.loading import load_tokenizer

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
    config.max_position_embeddings = 4096  # as `--rope linear --rope-factor 2` sets it
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
    from zhllama.model.loading import load_tokenizer

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


def test_the_next_export_removes_the_partial_file_of_a_killed_one(tmp_path, tiny_zh_model):
    import subprocess

    killed = subprocess.Popen(["sleep", "60"])
    running = subprocess.Popen(["sleep", "60"])
    try:
        killed.kill()
        killed.wait()  # the pid names no process any more, as after a SIGKILLed export
        stale = tmp_path / f".tiny.gguf.partial-{killed.pid}"
        stale.write_bytes(b"GGUF" + b"\0" * 4096)
        busy = tmp_path / f".tiny.gguf.partial-{running.pid}"  # a concurrent export: not ours to delete
        busy.write_bytes(b"GGUF")
        out = export_gguf(tiny_zh_model, tmp_path / "tiny.gguf", "f16")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny.gguf", busy.name])
        assert read_gguf_info(out)["arch"] == "llama"
    finally:
        running.kill()
        running.wait()
