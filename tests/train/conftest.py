import pytest

from zhllama.data import builtin
from zhllama.data.pack import pack

SEQ_LEN = 64


@pytest.fixture(scope="session")
def packed_dir(workdir, extended_dir):
    corpus = workdir / "pretrain.jsonl"
    builtin.write_jsonl(corpus, "train", ["peoples_daily"], max_chars=120_000)
    return pack(extended_dir, [corpus], SEQ_LEN, workdir / "packed", val_fraction=0.05)
