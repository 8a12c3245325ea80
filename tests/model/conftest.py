"""Fixtures for the model stage: a tiny Llama-2-vocabulary model, a Chinese extension, a briefly trained base.

`llama2_dir` (the real Llama-2 tokenizer) and `workdir` come from tests/conftest.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zhllama import tokenizer
from zhllama.data import builtin
from zhllama.model import init_model
from zhllama.tokenizer.hf import copy_hf_tokenizer

# 3,000 new pieces: about 2,600 characters Llama-2 spells as UTF-8 bytes and about 400 words (with 1,000 they
# would all be characters). Padding to a multiple of 64 adds 8 control pieces, which need handling too.
ZH_VOCAB = 35_000
ZH_PADDED = 35_008
TRAIN_CHARS = 300_000


@pytest.fixture(scope="session")
def zh_small_train_file(workdir):
    path = workdir / "zh_train_300k.jsonl"
    builtin.write_jsonl(path, "train", max_chars=TRAIN_CHARS)
    return path


@pytest.fixture(scope="session")
def zh_tokenizer(workdir, llama2_dir, zh_small_train_file):
    return tokenizer.extend(llama2_dir, [zh_small_train_file], ZH_VOCAB, workdir / "llama2-zh-35k",
                            pad_to_multiple=64)


@pytest.fixture(scope="session")
def tiny_base(workdir, llama2_dir):
    return init_model("tiny", llama2_dir, workdir / "tiny-llama2", seed=0)


@pytest.fixture(scope="session")
def known_texts():
    """A few short People's Daily paragraphs: the text the trained base model has learned."""
    docs = builtin.documents("train", sources=["peoples_daily"])
    return [doc["text"][:24] for doc in docs if len(doc["text"]) >= 24][:8]


@pytest.fixture(scope="session")
def trained_base(workdir, tiny_base, llama2_dir, known_texts):
    """The tiny model after 30 full-batch AdamW steps on `known_texts` (about 20 CPU seconds).

    A freshly initialised model predicts nearly uniformly, so every initialisation of new rows would look
    alike. Fitting a handful of texts makes the model confident on them, with embeddings that carry what it
    learned: the question is then how much of that the extended model still knows.
    """
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    seqs = [tok(text)["input_ids"] for text in known_texts]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.eos_token_id] * (width - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (width - len(s)) for s in seqs])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # fused: the unfused update of 20M parameters costs as much as the forward pass on a batch this small
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, fused=True)
        model.train()
        for _ in range(30):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    out = workdir / "tiny-llama2-trained"
    model.save_pretrained(out)
    copy_hf_tokenizer(llama2_dir, out)
    return out


@pytest.fixture(scope="session")
def llama3_hf(workdir, llama3_gguf):
    """Llama-3's byte-level BPE tokenizer as an HF folder with tokenizer.json only (no tokenizer.model).

    Built with transformers' own GGUF reader, so these tests do not depend on `tokenizer from-gguf` growing BPE
    support. The reader appends an "<|endoftext|>" at id 128256: 128,257 tokens, which the tests take as they are.
    """
    import shutil

    src = workdir / "llama3-gguf-src"
    src.mkdir(exist_ok=True)
    shutil.copy(llama3_gguf, src / "vocab.gguf")
    out = workdir / "llama3-hf"
    AutoTokenizer.from_pretrained(str(src), gguf_file="vocab.gguf").save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_llama3(workdir, llama3_hf):
    """The tiny preset at Llama-3's vocabulary: 128k embedding rows (65M of its 69M parameters)."""
    return init_model("tiny", llama3_hf, workdir / "tiny-llama3", seed=0)
