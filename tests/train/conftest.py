import pytest

from zhllama.data import builtin
from zhllama.data.pack import pack

SEQ_LEN = 64


@pytest.fixture(scope="session")
def packed_dir(workdir, extended_dir):
    corpus = workdir / "pretrain.jsonl"
    builtin.write_jsonl(corpus, "train", ["peoples_daily"], max_chars=120_000)
    return pack(extended_dir, [corpus], SEQ_LEN, workdir / "packed", val_fraction=0.05)


@pytest.fixture(scope="session")
def extended_model(workdir, llama2_dir, extended_dir):
    """A tiny Llama-2-vocabulary model grown by `model extend-vocab` to the 34k tokenizer the packed data uses."""
    from zhllama.model import extend_vocab, init_model

    base = init_model("tiny", llama2_dir, workdir / "tiny-llama2-base", seed=0)
    return extend_vocab(base, extended_dir, workdir / "tiny-llama2-extended", init="mean")
