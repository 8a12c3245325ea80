"""Session fixtures shared by all stages: the real Llama-2 vocabulary and a Chinese extension of it."""

from __future__ import annotations

import pytest

from zhllama import tokenizer
from zhllama.assets import LLAMA3_TEMPLATE, QWEN25_TEMPLATE, cache_dir, llama2_vocab_gguf, sdist_file, vocab_gguf
from zhllama.data import builtin

EXTENDED_SIZE = 34_000


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("zhllama")


@pytest.fixture(scope="session")
def llama2_gguf():
    return llama2_vocab_gguf(download=False)


@pytest.fixture(scope="session")
def llama2_dir(workdir, llama2_gguf):
    return tokenizer.from_gguf(llama2_gguf, workdir / "llama2")


def bpe_vocab_gguf(name: str):
    """A cached llama.cpp vocabulary (`zhllama.assets.VOCABS`): "llama-bpe", "qwen2", ... (`make setup` caches them)."""
    return vocab_gguf(name, download=False)


@pytest.fixture(scope="session")
def llama3_gguf():
    """Llama-3's byte-level BPE vocabulary (128,256 tokens, pre-tokenizer "llama-bpe")."""
    return bpe_vocab_gguf("llama-bpe")


@pytest.fixture(scope="session")
def llama3_dir(workdir, llama3_gguf):
    """The HF tokenizer folder (tokenizer.json only, no tokenizer.model) that `tokenizer from-gguf` makes."""
    return tokenizer.from_gguf(llama3_gguf, workdir / "llama3")


@pytest.fixture(scope="session")
def qwen2_gguf():
    return bpe_vocab_gguf("qwen2")


@pytest.fixture(scope="session")
def llama3_template_jinja():
    """Path of Meta's Llama-3.1 Instruct chat template as llama.cpp ships it."""
    return sdist_file(LLAMA3_TEMPLATE, download=False)


@pytest.fixture(scope="session")
def qwen25_template_jinja():
    """Path of Qwen2.5-7B-Instruct's chat template as llama.cpp ships it (taken from the cached sdist when an older
    `make setup` did not extract it; never downloaded here)."""
    sdist_cached = any((cache_dir() / "downloads").glob("llama_cpp_python-*.tar.gz"))
    return sdist_file(QWEN25_TEMPLATE, download=sdist_cached)


@pytest.fixture(scope="session")
def zh_train_file(workdir):
    path = workdir / "zh_train.jsonl"
    builtin.write_jsonl(path, "train", max_chars=600_000)
    return path


@pytest.fixture(scope="session")
def zh_heldout_texts():
    return [doc["text"] for doc in builtin.documents("heldout")][:400]


@pytest.fixture(scope="session")
def extended_dir(workdir, llama2_dir, zh_train_file):
    return tokenizer.extend(llama2_dir, [zh_train_file], EXTENDED_SIZE, workdir / "llama2-zh")


@pytest.fixture(scope="session")
def tiny_zh_model(workdir, extended_dir):
    """A random tiny Llama (hidden 256, 4 layers) with the extended vocabulary."""
    from zhllama import model

    return model.init_model("tiny", extended_dir, workdir / "tiny-zh", seed=0)


@pytest.fixture(scope="session")
def tiny_chat_model(workdir, tiny_zh_model):
    """The tiny model with the atom template as its own chat_template, as `zhllama train sft` writes it."""
    import shutil
    from pathlib import Path

    from zhllama.chat import get_template
    from zhllama.tokenizer.hf import set_chat_template

    folder = Path(shutil.copytree(tiny_zh_model, workdir / "tiny-chat"))
    set_chat_template(folder, get_template("atom").jinja)
    return folder


@pytest.fixture(scope="session")
def tiny_engine(tiny_chat_model):
    """One HF engine (continuous batching thread included) for the whole session."""
    from zhllama.infer import load_engine

    engine = load_engine(tiny_chat_model, device="cpu", name="tiny-chat", max_tokens_limit=512)
    yield engine
    engine.close()
